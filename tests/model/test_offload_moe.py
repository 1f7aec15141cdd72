"""offload() on mixture-of-experts models: transformers' experts modules (3-D expert stacks, not nn.Linear)
become OffloadedExperts, resident or streamed with their block. CPU path (torch kernels + host engine)."""

import copy
import importlib

import pytest
import torch
from torch import nn

from offload_kernels import OffloadedExperts, OffloadedLinear, offload
from offload_kernels.model import streamer_of
from offload_kernels.model.offload import select_linears
from offload_kernels.model.planner import budget_for_resident_fraction

transformers = pytest.importorskip("transformers")
if not hasattr(pytest.importorskip("transformers.integrations.moe"), "use_experts_implementation"):
    pytest.skip("this transformers has no 3-D expert modules (use_experts_implementation: transformers 5)",
                allow_module_level=True)

# The CPU path multiplies the dequantized weights in fp32 like the reference: only summation order differs.
RTOL = 1e-5
VOCAB = 300


def tiny_moe(arch: str, layers: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=512, num_local_experts=4, num_experts_per_tok=2, **common)
        return transformers.MixtralForCausalLM(cfg).eval()
    if arch == "qwen3_moe":       # experts only on some layers, the others dense
        cfg = transformers.Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=256, num_experts=8,
                                          num_experts_per_tok=2, head_dim=64, decoder_sparse_step=1,
                                          mlp_only_layers=[1], **common)
        return transformers.Qwen3MoeForCausalLM(cfg).eval()
    if arch == "gpt_oss":         # transposed stacks with biases, interleaved gate/up, its own gating
        cfg = transformers.GptOssConfig(intermediate_size=256, num_local_experts=4, num_experts_per_tok=2,
                                        head_dim=64, layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                                        **common)
        model = transformers.GptOssForCausalLM(cfg).eval()
        with torch.no_grad():     # transformers initializes the expert biases to zero: make them count
            for name, p in model.named_parameters():
                if name.endswith("_bias"):
                    p.normal_(0, 0.02)
        return model
    if arch == "qwen2_moe":       # a gated shared expert (nn.Linear modules) beside the routed ones
        cfg = transformers.Qwen2MoeConfig(intermediate_size=512, moe_intermediate_size=256, num_experts=8,
                                          num_experts_per_tok=2, shared_expert_intermediate_size=512, **common)
        return transformers.Qwen2MoeForCausalLM(cfg).eval()
    if arch == "phimoe":          # its router is an nn.Linear subclass with its own forward: kept
        cfg = transformers.PhimoeConfig(intermediate_size=512, num_local_experts=4, num_experts_per_tok=2, **common)
        return transformers.PhimoeForCausalLM(cfg).eval()
    raise ValueError(arch)


ARCHS = ["mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "phimoe"]


def dequantized_reference(original: nn.Module, offloaded: nn.Module) -> nn.Module:
    """``original`` with every quantized weight (linears and expert stacks) set to its dequantized value."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for name, module in offloaded.named_modules():
            if isinstance(module, OffloadedExperts):
                target = ref.get_submodule(name)
                for proj in module.qtypes:
                    w = torch.stack([module.expert_weights(proj, e) for e in range(module.num_experts)])
                    getattr(target, proj).copy_(w.transpose(1, 2) if module.is_transposed else w)
            elif isinstance(module, OffloadedLinear) and not _inside_experts(offloaded, name):
                ref.get_submodule(name).weight.data = module.dequantized_weight(torch.float32)
    return ref


def assert_logits_match(off, ref, ids, rtol=RTOL, passes=3):
    """``off``'s logits equal ``ref``'s to ``rtol`` (of the logits' largest magnitude) for ``passes`` passes
    (learning, then prefetching)."""
    with torch.no_grad():
        expected = ref(ids).logits
        for _ in range(passes):
            torch.testing.assert_close(off(ids).logits, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def _inside_experts(model, name):
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), OffloadedExperts)


def streaming_budget(model, qtype, fraction_streamed=0.75, num_slots=2):
    sel = select_linears(model, qtype)
    return budget_for_resident_fraction(sel.specs, sel.fixed_bytes, 1 - fraction_streamed, num_slots)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("streamed", [False, True])
def test_logits_match_the_dequantized_model(arch, streamed, ids):
    model = tiny_moe(arch)
    off = copy.deepcopy(model)
    budget = streaming_budget(model, "q8_0") if streamed else None
    report = offload(off, "q8_0", gpu_budget=budget, device="cpu", progress=False, measure=False)
    assert bool(report.placement.streamed_groups) == streamed
    experts = [n for n, m in off.named_modules() if isinstance(m, OffloadedExperts)]
    assert experts and report.experts == experts
    assert not any(m.__class__.__name__.endswith("Experts") and not isinstance(m, OffloadedExperts)
                   for m in off.modules()), "an experts module was left unquantized"
    for name in experts:
        for proj in off.get_submodule(name).qtypes:
            assert report.quantized[f"{name}.{proj}"] == "q8_0"
    assert_logits_match(off, dequantized_reference(model, off), ids)
    if streamed:
        s = streamer_of(off).stats()
        assert s["bytes_copied"] > 0 and s["mispredictions"] == 0
    out = off.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_routing_changes_between_passes_never_give_wrong_answers(ids):
    """Streamed MoE blocks are copied whole: whichever experts a pass picks, the slot holds them all."""
    model = tiny_moe("mixtral", layers=6)
    off = copy.deepcopy(model)
    offload(off, "q4_k", gpu_budget=streaming_budget(model, "q4_k"), device="cpu", progress=False, measure=False)
    ref = dequantized_reference(model, off)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for tokens in (1, 17, 3, 40, 1):
            batch = torch.randint(0, VOCAB, (1, tokens), generator=g)
            expected = ref(batch).logits
            torch.testing.assert_close(off(batch).logits, expected, rtol=RTOL, atol=RTOL * expected.abs().max())
    assert streamer_of(off).mispredictions == 0


def test_overrides_and_skips_reach_the_expert_projections(ids):
    model = tiny_moe("qwen3_moe")
    sel = select_linears(model, "q4_k", qtype_overrides={"*.down_proj": "q6_k"})
    assert sel.chosen["model.layers.0.mlp.experts.down_proj"] == "q6_k"
    assert sel.chosen["model.layers.0.mlp.experts.gate_up_proj"] == "q4_k"
    assert sel.chosen["model.layers.1.mlp.down_proj"] == "q6_k"            # the dense layer's nn.Linear too
    assert sel.experts["model.layers.0.mlp.experts"] == {"gate_up_proj": "q4_k", "down_proj": "q6_k"}
    # an experts module is quantized whole or kept whole
    off = copy.deepcopy(model)
    report = offload(off, "q4_k", skip=["lm_head", "*.experts.down_proj"], device="cpu", progress=False,
                     measure=False)
    assert not any(isinstance(m, OffloadedExperts) for m in off.modules()) and report.experts == []
    reason = report.skipped["model.layers.0.mlp.experts.gate_up_proj"]
    assert "quantized whole" in reason and "down_proj is kept (skipped by configuration)" in reason
    assert isinstance(off.model.layers[0].self_attn.q_proj, OffloadedLinear)
    with torch.no_grad():
        off(ids)


def test_expert_stacks_whose_in_features_the_block_does_not_divide_take_the_fallback():
    model = tiny_moe("qwen3_moe")
    for layer in model.model.layers:          # a 96-wide expert intermediate size: no q4_k super-block fits
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            experts.gate_up_proj = nn.Parameter(torch.randn(8, 192, 256) * 0.05)
            experts.down_proj = nn.Parameter(torch.randn(8, 256, 96) * 0.05)
    sel = select_linears(model, "q4_k")
    assert "model.layers.0.mlp.experts.gate_up_proj" not in sel.chosen
    assert "not a multiple of the q4_k block size 256" in sel.skipped["model.layers.0.mlp.experts.down_proj"]
    sel = select_linears(model, "q4_k", fallback_qtype={"q4_k": "q5_0"})
    assert sel.experts["model.layers.0.mlp.experts"] == {"gate_up_proj": "q4_k", "down_proj": "q5_0"}


def test_planner_sees_the_experts_each_token_uses():
    model = tiny_moe("qwen3_moe")
    sel = select_linears(model, "q4_k")
    spec = next(s for s in sel.specs if s.name == "model.layers.0.mlp.experts.down_proj")
    assert (spec.num_experts, spec.experts_per_token) == (8, 2)
    assert (spec.out_features, spec.in_features) == (8 * 256, 256)
    assert spec.read_fraction(1) == pytest.approx(0.25)
    assert spec.read_fraction(4096) == pytest.approx(1.0)
    dense = next(s for s in sel.specs if s.name == "model.layers.1.mlp.down_proj")
    assert dense.num_experts == 1 and dense.read_fraction(1) == 1.0


def test_state_dict_round_trip(tmp_path, ids):
    from safetensors.torch import load_file, save_file

    model = tiny_moe("gpt_oss", seed=1)
    offload(model, "q4_k", gpu_budget=streaming_budget(model, "q4_k"), device="cpu", progress=False, measure=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    fresh = tiny_moe("gpt_oss", seed=2)
    offload(fresh, "q4_k", gpu_budget=streaming_budget(fresh, "q4_k"), device="cpu", progress=False, measure=False)
    missing, unexpected = fresh.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=False)
    assert not unexpected and not missing
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_hooks_on_experts_modules_still_fire(ids):
    model = tiny_moe("mixtral")
    calls = []
    model.model.layers[0].mlp.experts.register_forward_hook(lambda *a: calls.append("experts"))
    offload(model, "q8_0", gpu_budget=streaming_budget(model, "q8_0"), device="cpu", progress=False, measure=False)
    assert isinstance(model.model.layers[0].mlp.experts, OffloadedExperts)
    with torch.no_grad():
        model(ids)
    assert calls == ["experts"]


def _snapshot(model):
    return list(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    modules, state = snapshot
    now = list(model.named_modules())
    assert [n for n, _ in now] == [n for n, _ in modules]
    assert all(a is b for (_, a), (_, b) in zip(now, modules)), "a module was not restored"
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert streamer_of(model) is None


def test_bad_expert_weight_fails_before_anything_is_replaced():
    model = tiny_moe("mixtral")
    with torch.no_grad():
        model.model.layers[3].mlp.experts.down_proj[2, 5, 7] = float("inf")
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.experts\.down_proj, expert 2: weight contains "
                                         r"NaN or Inf"):
        offload(model, "q8_0", device="cpu", progress=False, measure=False)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("streamed", [False, True])
def test_failure_mid_loop_restores_the_experts(monkeypatch, streamed):
    layers_module = importlib.import_module("offload_kernels.model.offload")
    model = tiny_moe("mixtral")
    snapshot = _snapshot(model)
    real, n = layers_module.OffloadedExperts.from_experts, []

    def second_call_fails(module, qtype, device=None):
        n.append(1)
        if len(n) == 2:
            raise RuntimeError("injected failure")
        return real(module, qtype, device)

    monkeypatch.setattr(layers_module.OffloadedExperts, "from_experts", second_call_fails)
    budget = streaming_budget(model, "q8_0") if streamed else None
    with pytest.raises(RuntimeError, match="injected failure"):
        offload(model, "q8_0", gpu_budget=budget, device="cpu", progress=False, measure=False)
    _assert_unchanged(model, snapshot)


def test_linear_subclasses_with_their_own_forward_are_kept_and_plain_ones_replaced():
    phimoe = tiny_moe("phimoe", layers=2)
    sel = select_linears(phimoe, "q8_0")
    assert "overrides nn.Linear.forward" in sel.skipped["model.layers.0.mlp.router"]
    assert "model.layers.0.mlp.router" not in sel.chosen
    torch.manual_seed(0)
    falcon = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4)).eval()
    sel = select_linears(falcon, "q8_0")
    assert "transformer.h.0.mlp.dense_h_to_4h" in sel.chosen          # FalconLinear computes x @ W.T (+ b)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_cuda_streamed_experts_match_the_dequantized_model(arch, ids):
    """The CUDA path: Triton kernels on each expert's slice of the slot the transfer engine filled."""
    model = tiny_moe(arch, layers=6)
    off = copy.deepcopy(model)
    report = offload(off, "q4_k", gpu_budget=streaming_budget(model, "q4_k"), device="cuda", progress=False,
                     measure=False)
    assert report.placement.streamed_groups
    assert_logits_match(off, dequantized_reference(model, off).cuda(), ids.cuda(), rtol=1e-3)
    assert streamer_of(off).mispredictions == 0


# ------------------------------------------------------------------------- experts on demand
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("slots", [1, 3, None])
def test_experts_on_demand_match_the_dequantized_model(arch, slots, ids):
    from offload_kernels.model.offload import expert_cache_of

    model = tiny_moe(arch)
    off = copy.deepcopy(model)
    report = offload(off, "q8_0", gpu_budget=streaming_budget(model, "q8_0"), device="cpu", progress=False,
                     measure=False, experts="on_demand", expert_cache_slots=slots)
    p = report.placement
    cache = expert_cache_of(off)
    assert p.on_demand and cache.num_slots == p.expert_cache_slots and (slots is None or slots == p.expert_cache_slots)
    on_demand_modules = {n.rpartition(".")[0] for n in p.on_demand}
    assert p.expert_count == sum(off.get_submodule(n).num_experts for n in on_demand_modules)
    # streamed blocks: experts on demand, the rest of the block streamed; resident blocks: experts resident
    streamed = {n for g in p.streamed_groups for n in g}
    for name in (n for n in report.quantized if ".experts." in n):
        module = off.get_submodule(name)
        if name in p.on_demand:
            assert module.placement == "streamed" and module.weight.device.type == "cpu" and name not in streamed
        else:
            assert name in p.resident
    assert "experts on demand" in str(report)
    assert_logits_match(off, dequantized_reference(model, off), ids)
    assert streamer_of(off) is None or streamer_of(off).mispredictions == 0
    out = off.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("slots", [2, None])
def test_speculative_prefetch_changes_copies_never_results(arch, slots, ids):
    """expert_prefetch=True: each on-demand layer copies the experts the next one's router picks for its own
    input; the logits and generate() are those of the model without it, and the guesses are counted."""
    from offload_kernels.model.offload import expert_cache_of

    model = tiny_moe(arch, layers=6)
    outs = []
    for prefetch in (False, True):
        off = copy.deepcopy(model)
        offload(off, "q8_0", gpu_budget=streaming_budget(model, "q8_0"), device="cpu", progress=False,
                measure=False, experts="on_demand", expert_cache_slots=slots, expert_prefetch=prefetch)
        cache = expert_cache_of(off)
        linked = [m for m in cache.modules if m._prefetch_next is not None]
        assert len(linked) == (len(cache.modules) - 1 if prefetch else 0) and len(cache.modules) >= 2
        with torch.no_grad():
            logits = off(ids).logits
            decoded = off.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
        stats = cache.stats()
        assert (stats["prefetched"] > 0) == prefetch
        assert stats["prefetch_hits"] + stats["prefetch_wasted"] <= stats["prefetched"]
        outs.append((logits, decoded))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    assert torch.equal(outs[1][1], outs[0][1])


def test_a_right_guess_is_a_hit_in_the_next_layer():
    """Two on-demand layers whose routers agree: every expert the second layer chooses was copied by the
    first layer's guess, and counts as a prefetch hit, not a miss."""
    from offload_kernels.model.expert_cache import ExpertCache

    model = tiny_moe("mixtral", layers=2)
    blocks = [model.model.layers[i].mlp for i in range(2)]
    with torch.no_grad():
        blocks[1].gate.weight.copy_(blocks[0].gate.weight)
    for block in blocks:
        block.experts = OffloadedExperts.from_experts(block.experts, "q8_0")
    cache = ExpertCache([b.experts for b in blocks], "cpu", num_slots=4, prefetch=True)
    assert cache.link_next_layers(model) == 1
    x = torch.randn(1, 3, 256)
    with torch.no_grad():
        blocks[0](x)
        first = cache.stats()
        assert first["prefetched"] > 0 and first["misses"] > 0
        blocks[1](x)                     # the same input, the same router: the guess was right
    stats = cache.stats()
    assert stats["prefetch_hits"] == first["prefetched"] and stats["misses"] == first["misses"]
    assert stats["prefetch_wasted"] == 0


def test_expert_prefetch_needs_experts_on_demand():
    model = tiny_moe("mixtral", layers=2)
    with pytest.raises(ValueError, match="expert_prefetch=True .* needs experts='on_demand'"):
        offload(model, "q8_0", device="cpu", progress=False, measure=False, expert_prefetch=True)
    with pytest.raises(TypeError, match="expert_prefetch must be a bool"):
        offload(model, "q8_0", device="cpu", progress=False, measure=False, experts="on_demand",
                expert_prefetch="yes")
    assert not any(isinstance(m, OffloadedExperts) for m in model.modules())


def test_a_budget_that_holds_everything_needs_no_expert_cache():
    from offload_kernels.model.offload import expert_cache_of

    off = tiny_moe("mixtral", layers=2)
    report = offload(off, "q8_0", device="cpu", progress=False, measure=False, experts="on_demand")
    assert not report.placement.on_demand and not report.placement.streamed_groups
    assert expert_cache_of(off) is None


def test_experts_on_demand_fill_what_the_rest_leaves():
    from offload_kernels.model.offload import expert_cache_of
    from offload_kernels.model.planner import BudgetError

    model = tiny_moe("qwen3_moe", layers=6)
    budget = streaming_budget(model, "q8_0", fraction_streamed=0.7)
    off = copy.deepcopy(model)
    report = offload(off, "q8_0", gpu_budget=budget, device="cpu", progress=False, measure=True,
                     experts="on_demand", token_counts=(1, 64))
    p = report.placement
    with_block = offload(copy.deepcopy(model), "q8_0", gpu_budget=budget, device="cpu", progress=False,
                         measure=False).placement
    # slots sized for the blocks' other layers: as much resident as streaming whole keeps, less at most the
    # cache's minimum (the experts one token uses)
    assert p.device_bytes <= budget
    assert p.resident_bytes >= with_block.resident_bytes - 2 * p.expert_slot_bytes
    assert p.slot_bytes < with_block.slot_bytes          # streamed blocks' slots no longer hold their experts
    assert 2 <= p.expert_cache_slots <= p.expert_count and expert_cache_of(off).num_slots == p.expert_cache_slots
    assert expert_cache_of(off).slot_bytes == p.expert_slot_bytes and p.expert_slot_bytes % 256 == 0
    if p.expert_cache_slots < p.expert_count:
        assert 0 < p.expert_miss_fraction(0.25) < 1 and p.expert_miss_fraction(1.0) == 1.0
    assert report.predictions[0].bound in ("link", "memory", "compute")
    sel = select_linears(model, "q8_0")
    with pytest.raises(BudgetError, match="expert cache of 2 experts"):
        offload(copy.deepcopy(model), "q8_0", gpu_budget=sel.fixed_bytes + 1000, device="cpu", progress=False,
                measure=False, experts="on_demand")


def test_state_dict_loads_into_on_demand_experts_reach_the_cache(ids):
    model = tiny_moe("mixtral", seed=1)
    other = tiny_moe("mixtral", seed=2)
    off = copy.deepcopy(model)
    budget = streaming_budget(model, "q4_k")
    offload(off, "q4_k", gpu_budget=budget, device="cpu", progress=False, measure=False, experts="on_demand",
            expert_cache_slots=3)
    with torch.no_grad():
        off(ids)                                   # the cache now holds some of model's experts
    reference = copy.deepcopy(other)
    offload(reference, "q4_k", device="cpu", progress=False, measure=False)
    off.load_state_dict(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(off(ids).logits, reference(ids).logits, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"experts": "lazily"}, "experts must be 'with_block' or 'on_demand'"),
    ({"expert_cache_slots": 4}, "with experts='on_demand'"),
    ({"experts": "on_demand", "expert_cache_slots": 0}, "expert_cache_slots must be a positive int"),
])
def test_bad_expert_arguments_are_refused_before_the_model_is_touched(kwargs, match):
    model = tiny_moe("mixtral", layers=2)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        offload(model, "q8_0", device="cpu", progress=False, measure=False, **kwargs)
    _assert_unchanged(model, snapshot)


def test_failure_creating_the_expert_cache_restores_the_model(monkeypatch):
    from offload_kernels.model import expert_cache

    model = tiny_moe("mixtral")
    snapshot = _snapshot(model)

    def broken(self, *args, **kwargs):
        raise RuntimeError("injected cache failure")

    monkeypatch.setattr(expert_cache.ExpertCache, "__init__", broken)
    with pytest.raises(RuntimeError, match="injected cache failure"):
        offload(model, "q8_0", gpu_budget=streaming_budget(model, "q8_0"), device="cpu", progress=False,
                measure=False, experts="on_demand")
    _assert_unchanged(model, snapshot)


@pytest.mark.gpu
@pytest.mark.parametrize("slots,prefetch", [(1, False), (None, False), (2, True), (None, True)])
def test_cuda_experts_on_demand_match_the_dequantized_model(slots, prefetch, ids):
    """On CUDA (copy stream, events), with and without speculative prefetch: prefill (experts grouped by
    expert) and decode steps (the grouped kernel over the cache's slots) both match the reference."""
    model = tiny_moe("qwen3_moe", layers=6)
    off = copy.deepcopy(model)
    report = offload(off, "q4_k", gpu_budget=streaming_budget(model, "q4_k"), device="cuda", progress=False,
                     measure=False, experts="on_demand", expert_cache_slots=slots, expert_prefetch=prefetch)
    assert report.placement.on_demand
    ref = dequantized_reference(model, off).cuda()
    assert_logits_match(off, ref, ids.cuda(), rtol=1e-3)
    for t in range(1, 4):                       # single-token calls: the grouped path
        assert_logits_match(off, ref, ids[:1, t:t + 1].cuda(), rtol=1e-3, passes=1)


def test_torch_compile_runs_offloaded_experts(ids):
    """torch.compile traces around the routing counts' host read (a graph break) and the expert cache's
    Python, and gives the eager logits (to float rounding: the norms and attention are fused)."""
    model = tiny_moe("qwen3_moe", layers=4)
    offload(model, "q8_0", gpu_budget=streaming_budget(model, "q8_0"), device="cpu", progress=False,
            measure=False, experts="on_demand")
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model)
        for _ in range(2):
            torch.testing.assert_close(compiled(ids).logits, expected, rtol=1e-5, atol=1e-5)
