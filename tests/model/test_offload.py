"""offload(model) end to end on a transformers LlamaForCausalLM, CPU path (torch kernels + host engine)."""

import copy
import importlib

import pytest
import torch
from torch import nn

from offload_kernels import OffloadedLinear, offload
from offload_kernels.model import BudgetError, streamer_of
from offload_kernels.model.offload import select_linears
from offload_kernels.model.planner import budget_for_resident_fraction, parse_bytes

transformers = pytest.importorskip("transformers")

# Offloaded logits vs the same model with its linears' weights replaced by the dequantized weights:
# identical math on the CPU path, so only summation order differs.
LOGITS_RTOL = 1e-5


def tiny_llama(layers=6, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def dequantized_copy(original: nn.Module, offloaded: nn.Module) -> nn.Module:
    """``original`` with every offloaded linear's weight set to its dequantized value."""
    ref = copy.deepcopy(original)
    layers = {n: m for n, m in offloaded.named_modules() if isinstance(m, OffloadedLinear)}
    for name, mod in ref.named_modules():
        if name in layers:
            mod.weight.data = layers[name].dequantized_weight(torch.float32)
    return ref


def budget_for(model, fraction_streamed, qtype="q8_0", num_slots=2):
    """A budget that streams about ``fraction_streamed`` of the quantized bytes through ``num_slots`` slots."""
    n_blocks = len(model.model.layers)
    assert fraction_streamed * n_blocks > num_slots, "this budget would not force streaming"
    sel = select_linears(model, qtype)
    return budget_for_resident_fraction(sel.specs, sel.fixed_bytes, 1 - fraction_streamed, num_slots)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k"])
@pytest.mark.parametrize("num_slots", [1, 2, 3])
def test_streamed_logits_match_dequantized_model(qtype, num_slots, ids):
    model = tiny_llama(layers=6)
    off = copy.deepcopy(model)
    report = offload(off, qtype, gpu_budget=budget_for(model, 0.7, qtype, num_slots), device="cpu", num_slots=num_slots, progress=False, measure=False)
    assert report.placement.streamed_groups, "the budget must force streaming"
    ref = dequantized_copy(model, off)
    with torch.no_grad():
        expected = ref(ids).logits
        for _ in range(3):                     # learning pass, then prefetching passes
            got = off(ids).logits
            torch.testing.assert_close(got, expected, rtol=LOGITS_RTOL, atol=LOGITS_RTOL * expected.abs().max())
    s = streamer_of(off).stats()
    assert s["bytes_copied"] > 0 and s["mispredictions"] == 0


def test_fully_resident_and_streamed_agree_and_generate(ids):
    model = tiny_llama()
    resident, streamed = copy.deepcopy(model), copy.deepcopy(model)
    r1 = offload(resident, "q4_k", device="cpu", progress=False, measure=False)
    r2 = offload(streamed, "q4_k", gpu_budget=budget_for(model, 0.5, "q4_k"), device="cpu", progress=False, measure=False)
    assert r1.bytes_streamed_per_forward == 0 and r2.bytes_streamed_per_forward > 0
    assert r1.placement.resident_bytes == r2.placement.resident_bytes + r2.bytes_streamed_per_forward
    with torch.no_grad():
        assert torch.equal(resident(ids).logits, streamed(ids).logits)
    mask = torch.ones_like(ids)
    g1 = resident.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    g2 = streamed.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert g1.shape == (2, 15) and torch.equal(g1, g2)


def test_new_call_order_still_correct(ids):
    """A forward that visits blocks in another order than the learned one: mispredictions, never wrong answers."""
    model = tiny_llama()
    resident, streamed = copy.deepcopy(model), copy.deepcopy(model)
    offload(resident, "q8_0", device="cpu", progress=False, measure=False)
    offload(streamed, "q8_0", gpu_budget=budget_for(model, 0.7), device="cpu", progress=False, measure=False)
    with torch.no_grad():
        streamed(ids)                                      # learn the normal order

        def shuffled_blocks(m):
            h = m.model.embed_tokens(ids)
            pos = torch.arange(ids.shape[1])[None]
            rope = m.model.rotary_emb(h, pos)
            for i in (3, 0, 2, 1, 3):
                h = m.model.layers[i](h, position_embeddings=rope, position_ids=pos)
                h = h[0] if isinstance(h, tuple) else h
            return h

        assert torch.equal(shuffled_blocks(streamed), shuffled_blocks(resident))
        assert torch.equal(streamed(ids).logits, resident(ids).logits)   # and the normal order afterwards
    assert streamer_of(streamed).mispredictions > 0


def test_forward_hooks_still_fire(ids):
    model = tiny_llama(layers=4)
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append("before-offload"))
    offload(model, "q8_0", gpu_budget=budget_for(model, 0.75), device="cpu", progress=False, measure=False)
    assert streamer_of(model) is not None
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda *a: calls.append("after-offload"))
    model.model.layers[1].register_forward_hook(lambda *a: calls.append("block"))
    with torch.no_grad():
        model(ids)
    assert calls == ["before-offload", "after-offload", "block"]


def test_state_dict_round_trip(tmp_path, ids):
    from safetensors.torch import load_file, save_file

    model = tiny_llama(layers=4)
    offload(model, "q4_k", gpu_budget=budget_for(model, 0.75, "q4_k"), device="cpu", progress=False, measure=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    fresh = tiny_llama(layers=4, seed=123)
    offload(fresh, "q4_k", gpu_budget=budget_for(fresh, 0.75, "q4_k"), device="cpu", progress=False, measure=False)
    missing, unexpected = fresh.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)   # tied lm_head is saved once
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_skips_and_overrides(ids):
    model = tiny_llama(layers=2)
    report = offload(model, "q4_k", device="cpu", progress=False, measure=False,
                     skip=("lm_head", "*.layers.1.mlp.*"), qtype_overrides={"*.v_proj": "q8_0", "*.o_proj": None})
    layers = dict(model.named_modules())
    assert isinstance(layers["lm_head"], nn.Linear) and not isinstance(layers["lm_head"], OffloadedLinear)
    assert isinstance(layers["model.layers.1.mlp.up_proj"], nn.Linear)
    assert layers["model.layers.0.self_attn.v_proj"].qtype == "q8_0"
    assert layers["model.layers.0.self_attn.q_proj"].qtype == "q4_k"
    assert type(layers["model.layers.0.self_attn.o_proj"]) is nn.Linear
    assert "model.layers.0.self_attn.o_proj" in report.skipped


def test_layers_with_odd_in_features_are_kept_with_a_reason(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 100), nn.ReLU(), nn.Linear(100, 256))
    with caplog.at_level("INFO", logger="offload_kernels"):
        report = offload(model, "q4_k", device="cpu", progress=False, measure=False)
    assert isinstance(model[0], OffloadedLinear) and type(model[2]) is nn.Linear
    assert "not a multiple of the q4_k block size 256" in report.skipped["2"]
    assert "in_features=100" in caplog.text
    assert model(torch.randn(3, 256)).shape == (3, 256)


def test_report_predictions_and_text(ids):
    model = tiny_llama(layers=4)
    report = offload(model, "q4_k", gpu_budget=budget_for(model, 0.75, "q4_k"), device="cpu", progress=False, measure=True,
                     token_counts=(1, 64))
    assert [p.tokens for p in report.predictions] == [1, 64]
    assert report.hardware.link_bytes_per_s > 0 and report.predictions[0].tokens_per_s > 0
    text = str(report)
    assert "streamed:" in text and "per forward" in text and "tokens/s" in text


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"qtype": "q9_k"}, ValueError, "unknown qtype"),
    ({"gpu_budget": -5}, ValueError, "non-negative"),
    ({"gpu_budget": "-1GiB"}, ValueError, "non-negative"),
    ({"gpu_budget": "12 furlongs"}, ValueError, "unknown unit"),
    ({"gpu_budget": 1000}, BudgetError, "too small"),
    ({"num_slots": 0}, ValueError, "num_slots"),
    ({"qtype_overrides": {"*": "q7"}}, ValueError, "unknown qtype"),
    ({"device": "cuda"}, ValueError, "no CUDA device"),
    ({"device": "meta"}, ValueError, "device must be cuda or cpu, got meta"),
    ({"device": "tpu"}, ValueError, "device must be cuda or cpu, got 'tpu'"),
    ({"num_slots": 1.5}, ValueError, "num_slots must be a positive int"),
    ({"fallback_qtype": 8}, TypeError, "fallback_qtype must be"),
    ({"qtype_overrides": {"*.down_prj": "q8_0"}}, ValueError, "match no nn.Linear"),
    ({"qtype_overrides": ["*.down_proj"]}, TypeError, "mapping"),
    ({"skip": 5}, TypeError, "skip"),
    ({"skip": ["lm_head", 3]}, TypeError, "strings"),
    ({"skip": "*"}, ValueError, "no linear layer to quantize"),
    ({"fallback_qtype": "q6_0"}, ValueError, "unknown qtype"),
    ({"keep_model_fp32_modules": "no"}, TypeError, "keep_model_fp32_modules must be True or False"),
])
def test_bad_arguments_raise_before_touching_the_model(kwargs, exc, match):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    model = tiny_llama(layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        offload(model, **{"device": "cpu", "progress": False, "measure": False, **kwargs})
    assert not any(isinstance(m, OffloadedLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_offloading_twice_is_refused():
    model = tiny_llama(layers=1)
    offload(model, "q8_0", device="cpu", progress=False, measure=False)
    with pytest.raises(ValueError, match="already contains OffloadedLinear"):
        offload(model, "q8_0", device="cpu", progress=False, measure=False)
    with pytest.raises(TypeError, match="nn.Module"):
        offload("model")
    with pytest.raises(TypeError, match="select_linears expects an nn.Module, got str"):
        select_linears("model")


def test_parse_budget_strings_used_by_offload():
    assert parse_bytes("1GiB") == 2**30


def test_gradients_through_streamed_layers_use_the_right_weights(ids):
    """Autograd keeps a streamed layer's bytes past the slot's reuse: dL/dx must match the resident model."""
    model = tiny_llama()
    resident, streamed = copy.deepcopy(model), copy.deepcopy(model)
    offload(resident, "q8_0", device="cpu", progress=False, measure=False)
    offload(streamed, "q8_0", gpu_budget=budget_for(model, 0.7), device="cpu", progress=False, measure=False)
    grads = []
    for m in (resident, streamed):
        emb = m.model.embed_tokens(ids).detach().requires_grad_(True)
        m(inputs_embeds=emb).logits.square().mean().backward()
        grads.append(emb.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------- all-or-nothing replacement
def _snapshot(model):
    """The model's module objects (in order) and a copy of its state."""
    return list(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot, ids, logits):
    modules, state = snapshot
    now = list(model.named_modules())
    assert [n for n, _ in now] == [n for n, _ in modules]
    assert all(a is b for (_, a), (_, b) in zip(now, modules)), "a module was not restored"
    assert not any(isinstance(m, OffloadedLinear) for m in model.modules())
    assert state.keys() == model.state_dict().keys()
    assert all(torch.allclose(state[k], v, rtol=0, atol=0, equal_nan=True) for k, v in model.state_dict().items())
    assert streamer_of(model) is None
    assert not model._forward_hooks and not model._forward_pre_hooks     # no streamer hooks left behind
    if logits is None:
        return
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("poison, exc, match", [
    ("nan", ValueError, r"model\.layers\.2\.mlp\.down_proj: weight contains NaN"),
    ("inf", ValueError, r"model\.layers\.2\.mlp\.down_proj: weight contains NaN or Inf"),
    ("1e20", ValueError, r"model\.layers\.2\.mlp\.down_proj: weight magnitude too large"),
    ("f64 bias", TypeError, r"model\.layers\.2\.mlp\.down_proj: bias dtype"),
])
def test_bad_weight_in_a_late_layer_fails_before_any_layer_is_replaced(poison, exc, match, ids):
    model = tiny_llama(layers=3)
    down = model.model.layers[2].mlp.down_proj
    with torch.no_grad():
        if poison == "f64 bias":
            down.bias = nn.Parameter(torch.zeros(down.out_features, dtype=torch.float64), requires_grad=False)
        else:
            down.weight[3, 5] = float(poison)
    with torch.no_grad():
        logits = None if poison == "f64 bias" else model(ids).logits     # an f64 bias does not run at all
    snapshot = _snapshot(model)
    with pytest.raises(exc, match=match):
        offload(model, "q8_0", device="cpu", progress=False, measure=False)
    _assert_unchanged(model, snapshot, ids, logits)


@pytest.mark.parametrize("streamed", [False, True])
def test_quantize_failing_mid_loop_restores_the_model(monkeypatch, streamed, ids):
    offload_module = importlib.import_module("offload_kernels.model.offload")   # the package exports a function of that name

    model = tiny_llama(layers=4)
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append("hook"))
    with torch.no_grad():
        logits = model(ids).logits
    snapshot = _snapshot(model)
    real_quantize, n = offload_module.quantize, []

    def third_call_fails(w, qtype):
        n.append(1)
        if len(n) == 3:
            raise RuntimeError("injected failure")
        return real_quantize(w, qtype)

    monkeypatch.setattr(offload_module, "quantize", third_call_fails)
    budget = budget_for(model, 0.75) if streamed else None
    with pytest.raises(RuntimeError, match="injected failure"):
        offload(model, "q8_0", gpu_budget=budget, device="cpu", progress=False, measure=False)
    assert len(n) == 3
    calls.clear()
    _assert_unchanged(model, snapshot, ids, logits)
    assert calls == ["hook"]
    monkeypatch.undo()                      # and the restored model offloads normally afterwards
    offload(model, "q8_0", gpu_budget=budget, device="cpu", progress=False, measure=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, OffloadedLinear)


def test_failure_while_attaching_the_streamer_restores_the_model(monkeypatch, ids):
    from offload_kernels.model.streaming import WeightStreamer

    model = tiny_llama(layers=4)
    with torch.no_grad():
        logits = model(ids).logits
    snapshot = _snapshot(model)
    real_attach = WeightStreamer.attach

    def attach_then_fail(self, root):
        real_attach(self, root)              # its hooks are on the model now
        raise RuntimeError("injected attach failure")

    monkeypatch.setattr(WeightStreamer, "attach", attach_then_fail)
    with pytest.raises(RuntimeError, match="injected attach failure"):
        offload(model, "q8_0", gpu_budget=budget_for(model, 0.75), device="cpu", progress=False, measure=False)
    _assert_unchanged(model, snapshot, ids, logits)


# ------------------------------------------------------------------------- hooks follow the module
def test_hooks_registered_before_offload_fire_and_remove(ids):
    model = tiny_llama(layers=4)
    original = model.model.layers[1].self_attn.q_proj
    calls = []
    handles = [
        original.register_forward_pre_hook(lambda m, args, kwargs: calls.append("pre-kwargs"), with_kwargs=True),
        original.register_forward_hook(lambda m, args, out: calls.append("forward")),
        original.register_forward_hook(lambda m, args, kwargs, out: calls.append("always"), with_kwargs=True,
                                       always_call=True),
        original.register_forward_pre_hook(lambda m, args: calls.append("pre")),
    ]
    offload(model, "q8_0", gpu_budget=budget_for(model, 0.75), device="cpu", progress=False, measure=False)
    new = model.model.layers[1].self_attn.q_proj
    assert isinstance(new, OffloadedLinear)
    for attr in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
                 "_load_state_dict_pre_hooks"):
        assert getattr(new, attr) is getattr(original, attr), attr
    with torch.no_grad():
        model(ids)
    assert calls == ["pre-kwargs", "pre", "forward", "always"]
    calls.clear()
    with pytest.raises(ValueError, match="last dimension"):
        new(torch.randn(2, 3))                   # always_call hooks run even when forward raises
    assert calls == ["pre-kwargs", "pre", "always"]
    for h in handles:
        h.remove()
    calls.clear()
    with torch.no_grad():
        model(ids)
    assert calls == [] and not new._forward_hooks and not new._forward_pre_hooks


# ------------------------------------------------------------------------- tied embeddings
def tied_llama(layers=2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_tied_embedding_stays_in_fixed_bytes_when_lm_head_is_quantized(ids):
    model = tied_llama()
    embedding = model.model.embed_tokens.weight
    kept = select_linears(model, "q8_0")                   # lm_head skipped
    quantized = select_linears(model, "q8_0", skip=())     # lm_head quantized: the embedding still is resident
    assert "lm_head" in quantized.chosen and "lm_head" not in kept.chosen
    assert quantized.fixed_bytes == kept.fixed_bytes >= embedding.numel() * embedding.element_size()
    everything = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    block_weights = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
                        if isinstance(m, nn.Linear) and n != "lm_head")
    assert quantized.fixed_bytes == everything - block_weights
    report = offload(model, "q8_0", device="cpu", progress=False, measure=False, skip=())
    assert report.placement.fixed_bytes == quantized.fixed_bytes
    assert isinstance(model.lm_head, OffloadedLinear) and model.model.embed_tokens.weight is embedding
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


# ------------------------------------------------------------------------- skip as a single string
def test_skip_accepts_a_single_pattern_string():
    model = tiny_llama(layers=2)
    report = offload(model, "q8_0", device="cpu", progress=False, measure=False, skip="lm_head")
    assert type(model.lm_head) is nn.Linear and report.skipped == {"lm_head": "skipped by configuration"}
    model = tiny_llama(layers=2)
    offload(model, "q8_0", device="cpu", progress=False, measure=False, skip="*.mlp.*")
    assert type(model.model.layers[1].mlp.up_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, OffloadedLinear)
    assert isinstance(model.lm_head, OffloadedLinear)


# ------------------------------------------------------------------------- placement order, late failures
def test_streamed_weights_never_follow_model_to(monkeypatch):
    """model.to(device) must run only once the streamed layers are marked as streamed: before, it would
    copy every streamed weight to the device (on CUDA: the bytes the budget said would not fit, and the
    engine then refuses them as not host data). On CPU the copy is a no-op, so check the order itself."""
    model = tiny_llama(layers=4)
    states = []
    real_to = nn.Module.to

    def recording_to(self, *args, **kwargs):
        if self is model:
            states.append({n: m._streamer is not None for n, m in model.named_modules()
                           if isinstance(m, OffloadedLinear)})
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", recording_to)
    report = offload(model, "q8_0", gpu_budget=budget_for(model, 0.75), device="cpu", progress=False, measure=False)
    streamed = {n for g in report.placement.streamed_groups for n in g}
    assert streamed and states, "the budget must force streaming and offload must move the model"
    for state in states:
        assert {n for n, is_streamed in state.items() if is_streamed} == streamed


def test_a_failed_measurement_keeps_the_offload_without_predictions(monkeypatch, caplog, ids):
    offload_module = importlib.import_module("offload_kernels.model.offload")

    def no_memory(device):
        raise torch.OutOfMemoryError("injected: no memory left to measure")

    monkeypatch.setattr(offload_module, "measure_hardware", no_memory)
    model = tiny_llama(layers=4)
    with caplog.at_level("WARNING", logger="offload_kernels"):
        report = offload(model, "q8_0", gpu_budget=budget_for(model, 0.75), device="cpu", progress=False,
                         measure=True)
    assert report.hardware is None and report.predictions == []
    assert "could not measure" in caplog.text
    assert isinstance(model.model.layers[0].self_attn.q_proj, OffloadedLinear)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_interrupt_after_placement_restores_the_model(monkeypatch, ids):
    """A KeyboardInterrupt after the streamer is attached (here: while measuring) rolls everything back."""
    offload_module = importlib.import_module("offload_kernels.model.offload")

    model = tiny_llama(layers=4)
    with torch.no_grad():
        logits = model(ids).logits
    snapshot = _snapshot(model)

    def interrupted(device):
        assert streamer_of(model) is not None           # the streamer really was attached
        raise KeyboardInterrupt

    monkeypatch.setattr(offload_module, "measure_hardware", interrupted)
    with pytest.raises(KeyboardInterrupt):
        offload(model, "q8_0", gpu_budget=budget_for(model, 0.75), device="cpu", progress=False, measure=True)
    assert streamer_of(model) is None
    _assert_unchanged(model, snapshot, ids, logits)
