"""offload(model) end to end on a transformers LlamaForCausalLM, CPU path (torch kernels + host engine)."""

import copy

import pytest
import torch
from torch import nn

from offload_kernels import OffloadedLinear, offload
from offload_kernels.model import BudgetError, streamer_of
from offload_kernels.model.planner import parse_bytes

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
    probe = copy.deepcopy(model)
    report = offload(probe, qtype, device="cpu", progress=False, measure=False)
    q = report.placement.resident_bytes
    n_blocks = len(probe.model.layers)
    assert fraction_streamed * n_blocks > num_slots, "this budget would not force streaming"
    return int(report.placement.fixed_bytes + num_slots * q / n_blocks + (1 - fraction_streamed) * q) + 1


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
