"""ExpertCache: which experts are copied, LRU reuse, invalidation, and the CUDA stream ordering."""

import pytest
import torch

from offload_kernels import OffloadedExperts, kernels
from offload_kernels.layers import offloaded_experts
from offload_kernels.model.expert_cache import ExpertCache, expert_slot_bytes

transformers = pytest.importorskip("transformers")
if not hasattr(pytest.importorskip("transformers.integrations.moe"), "use_experts_implementation"):
    pytest.skip("this transformers has no 3-D expert modules (use_experts_implementation: transformers 5)",
                allow_module_level=True)
from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: E402


def experts_module(seed=0, experts=6):
    torch.manual_seed(seed)
    m = MixtralExperts(transformers.MixtralConfig(hidden_size=256, intermediate_size=256,
                                                  num_local_experts=experts))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return OffloadedExperts.from_experts(m, {"gate_up_proj": "q4_k", "down_proj": "q6_k"})


def used(cache, module, experts):
    """Run the cache over ``experts`` and return the bytes it handed out for each, checked against the
    module's own host bytes."""
    up_layer, down_layer = module.gate_up_proj, module.down_proj
    rows_up, rows_down = up_layer.out_features // module.num_experts, down_layer.out_features // module.num_experts
    seen = []
    for e, up, down in cache.experts(module, experts):
        assert torch.equal(up.data, up_layer.weight[e * rows_up:(e + 1) * rows_up])
        assert torch.equal(down.data, down_layer.weight[e * rows_down:(e + 1) * rows_down])
        assert up.qtype == "q4_k" and down.qtype == "q6_k"
        seen.append(e)
    return seen


def test_least_recently_used_experts_are_replaced_first():
    module = experts_module()
    cache = ExpertCache([module], "cpu", num_slots=2)
    assert cache.slot_bytes == expert_slot_bytes(module)
    assert used(cache, module, [0, 1]) == [0, 1] and (cache.hits, cache.misses) == (0, 2)
    assert used(cache, module, [1, 2]) == [1, 2] and (cache.hits, cache.misses) == (1, 3)   # 2 replaces 0
    used(cache, module, [0])                                                                 # 0 replaces 1
    assert (cache.hits, cache.misses) == (1, 4)
    used(cache, module, [2, 0])
    assert (cache.hits, cache.misses) == (3, 4)
    assert cache.bytes_copied == 4 * (module.gate_up_proj.weight_nbytes + module.down_proj.weight_nbytes) // 6


def test_more_experts_than_slots_go_in_waves():
    module = experts_module()
    cache = ExpertCache([module], "cpu", num_slots=1)
    assert used(cache, module, [5, 3, 0, 4]) == [5, 3, 0, 4]
    assert cache.misses == 4 and cache.stats()["experts_cached"] == 1


def test_a_consumer_that_stops_early_leaves_the_cache_consistent():
    module = experts_module()
    cache = ExpertCache([module], "cpu", num_slots=3)
    it = cache.experts(module, [0, 1, 2, 3])
    next(it)
    it.close()
    assert used(cache, module, [3, 2, 1, 0]) == [3, 2, 1, 0]


def test_invalidate_drops_only_that_modules_experts():
    a, b = experts_module(1), experts_module(2)
    cache = ExpertCache([a, b], "cpu", num_slots=4)
    used(cache, a, [0, 1])
    used(cache, b, [0, 1])
    cache.invalidate(a.down_proj)
    cache.reset_stats()
    used(cache, a, [0, 1])
    used(cache, b, [0, 1])
    assert (cache.hits, cache.misses) == (2, 2)


def test_the_projections_name_the_cache_as_their_streamer_until_closed():
    module = experts_module()
    cache = ExpertCache([module], "cpu", num_slots=2)
    assert module.gate_up_proj.placement == "streamed" and module._expert_cache is cache
    x = torch.randn(3, 256)
    assert torch.equal(module.gate_up_proj(x), torch.nn.functional.linear(
        x, module.gate_up_proj.dequantized_weight()))             # called on its own: all experts' rows
    cache.close()
    assert module.gate_up_proj.placement == "resident" and module._expert_cache is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one OffloadedExperts"):
        ExpertCache([], "cpu", 2)
    with pytest.raises(ValueError, match="num_slots must be a positive int"):
        ExpertCache([experts_module()], "cpu", 0)


def test_resident_places_every_expert_at_once_and_refuses_more_than_the_slots():
    module = experts_module()
    cache = ExpertCache([module], "cpu", num_slots=3)
    used(cache, module, [4])
    with cache.resident(module, [1, 4, 2]) as (slot_of, up_bytes, down_bytes):
        assert sorted(slot_of) == [1, 2, 4] and len(set(slot_of.values())) == 3
        rows_up = module.gate_up_proj.out_features // 6
        for e, s in slot_of.items():
            start = s * cache.slot_bytes
            expected = module.gate_up_proj.weight[e * rows_up:(e + 1) * rows_up].reshape(-1)
            assert torch.equal(up_bytes[start:start + expected.numel()], expected)
    assert (cache.hits, cache.misses) == (1, 3)
    with pytest.raises(ValueError, match="4 experts cannot be resident in a cache of 3 slots"):
        with cache.resident(module, [0, 1, 2, 3]):
            pass


@pytest.mark.parametrize("tokens,slots,grouped", [(1, 2, "expert_gemv"), (3, 6, "expert_gemv"), (3, 2, None),
                                                  (7, 6, "expert_gemv"), (13, 6, "expert_gemm")])
def test_on_demand_forward_matches_resident_experts(tokens, slots, grouped, monkeypatch):
    """The chosen experts all in the cache: one grouped launch per projection over the cache's slots (Triton,
    interpreted), the GEMV up to 4 pairs per expert (12 tokens here), the GEMM beyond; more experts than
    slots: expert by expert. Same result as the module with its experts resident, and the cache's hit and
    miss counts follow the routing."""
    cached, resident = experts_module(), experts_module()
    cache = ExpertCache([cached], "cpu", num_slots=slots)
    monkeypatch.setattr(cached, "kernel_backend", "triton")
    monkeypatch.setattr(resident, "kernel_backend", "triton")
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 256, generator=g)
    index = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), -1)
    kernels.reset_launch_counts()
    y = cached(x, index, weights)
    ran = kernels.launch_counts()
    if grouped:
        assert ran[grouped] + ran[f"{grouped}_splitk"] == 2, ran
    else:
        assert not any(ran[v] for v in kernels.KERNEL_VARIANTS if v.startswith("expert_")), ran
    distinct = len(set(index.flatten().tolist()))
    assert (cache.hits, cache.misses) == (0, distinct)
    torch.testing.assert_close(y, resident(x, index, weights), rtol=1e-5, atol=1e-6)
    cached(x, index, weights)                   # again: every expert still cached when they all fit
    if distinct <= slots:
        assert (cache.hits, cache.misses) == (distinct, distinct)


def test_on_demand_expert_parallel_sentinels(monkeypatch):
    """Other ranks' experts (ids >= num_experts) are neither copied nor counted, in either path."""
    for limit in (offloaded_experts.GROUPED_MAX_PAIRS_PER_EXPERT, 0):
        monkeypatch.setattr(offloaded_experts, "GROUPED_MAX_PAIRS_PER_EXPERT", limit)
        cached, resident = experts_module(), experts_module()
        cache = ExpertCache([cached], "cpu", num_slots=4)
        cached._is_expert_parallel = resident._is_expert_parallel = True
        x = torch.randn(3, 256)
        index = torch.tensor([[0, 6], [6, 6], [2, 0]])
        weights = torch.full((3, 2), 0.5)
        y = cached(x, index, weights)
        assert cache.misses == 2 and torch.all(y[1] == 0)
        torch.testing.assert_close(y, resident(x, index, weights), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_copies_are_ordered_after_the_kernels_that_read_the_slot():
    """One slot, many experts: every copy must wait for the previous expert's kernels (a slow kernel on the
    compute stream would otherwise see its bytes overwritten)."""
    module = experts_module()
    cache = ExpertCache([module], "cuda", num_slots=1)
    results = []
    for e, up, down in cache.experts(module, [0, 1, 2, 3, 4, 5]):
        torch.cuda._sleep(5_000_000)                 # a long kernel before the reads on the compute stream
        results.append((e, up.data.clone(), down.data.clone()))
    torch.cuda.synchronize()
    rows_up = module.gate_up_proj.out_features // 6
    for e, up, _ in results:
        assert torch.equal(up.cpu(), module.gate_up_proj.weight[e * rows_up:(e + 1) * rows_up])


def test_gradients_through_cached_experts_use_each_experts_own_bytes():
    """Backward runs after later experts reused the cache's one slot: it must still see each expert's bytes."""
    cached = experts_module()
    ExpertCache([cached], "cpu", num_slots=1)
    reference = experts_module()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 256, generator=g)
    index = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(9)])
    weights = torch.softmax(torch.randn(9, 2, generator=g), -1)
    grads = []
    for m in (cached, reference):
        xi = x.clone().requires_grad_(True)
        m(xi, index, weights).square().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
