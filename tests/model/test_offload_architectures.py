"""offload() beyond Llama: GPT-2's Conv1D linears, T5's fp32-kept modules, torch's own transformer layers
(whose fast paths read weights themselves), and the fallback format for in_features the k-quants cannot
take. CPU path; resident and streamed placements."""

import copy
import importlib

import pytest
import torch
from torch import nn

from offload_kernels import LLAMA_QUANTIZE_FALLBACKS, OffloadedLinear, offload
from offload_kernels.layers.linear_like import is_linear_like, linear_features, linear_weight
from offload_kernels.model import streamer_of
from offload_kernels.model.offload import _names_module, select_linears
from offload_kernels.model.planner import BudgetError

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

# The CPU path multiplies the dequantized weight in fp32 like the reference: only summation order differs.
RTOL, ATOL = 1e-5, 1e-5


def dequantized_reference(original: nn.Module, offloaded: nn.Module) -> nn.Module:
    """``original`` with every offloaded linear's weight set to its dequantized value, in the module's own
    orientation (Conv1D stores the transpose)."""
    ref = copy.deepcopy(original)
    for name, layer in offloaded.named_modules():
        if isinstance(layer, OffloadedLinear):
            target = ref.get_submodule(name)
            w = layer.dequantized_weight(torch.float32)
            target.weight.data = w if isinstance(target, nn.Linear) else w.t().contiguous()
    return ref


def streaming_budget(model, qtype, **select):
    """The smallest budget (in 64 KiB steps from the fixed bytes) that the planner accepts: it streams."""
    sel = select_linears(model, qtype, **select)
    budget = sel.fixed_bytes
    while True:
        try:
            offload(copy.deepcopy(model), qtype, gpu_budget=budget, device="cpu", progress=False, measure=False,
                    **select)
            return budget
        except BudgetError:
            budget += 64 << 10


def offloaded_pair(model, qtype, streamed, **kwargs):
    original = copy.deepcopy(model)
    budget = streaming_budget(model, qtype, **{k: v for k, v in kwargs.items() if k in ("skip",)}) if streamed else None
    report = offload(model, qtype, gpu_budget=budget, device="cpu", progress=False, measure=False, **kwargs)
    assert bool(report.placement.streamed_groups) == streamed
    return report, dequantized_reference(original, model)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------ GPT-2 (Conv1D)
def tiny_gpt2(layers=4):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=256, n_layer=layers, n_head=4, vocab_size=300, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_linear_like_reads_conv1d_as_a_transposed_linear():
    torch.manual_seed(0)
    conv = Conv1D(96, 64)                     # nf=96 outputs, nx=64 inputs: weight (64, 96)
    assert is_linear_like(conv) and linear_features(conv) == (64, 96)
    x = torch.randn(5, 64)
    torch.testing.assert_close(x @ linear_weight(conv).T + conv.bias, conv(x))
    assert not is_linear_like(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="nn.Linear or a transformers Conv1D"):
        linear_weight(nn.Conv1d(4, 4, 1))


@pytest.mark.parametrize("streamed", [False, True])
def test_gpt2_conv1d_layers_are_offloaded(streamed, ids):
    model = tiny_gpt2()
    report, ref = offloaded_pair(model, "q8_0", streamed)
    convs = [n for n, m in ref.named_modules() if isinstance(m, Conv1D)]
    assert len(convs) == 4 * 4 and set(convs) <= set(report.quantized)
    assert all(isinstance(model.get_submodule(n), OffloadedLinear) for n in convs)
    attn = model.transformer.h[0].attn.c_attn
    assert (attn.in_features, attn.out_features) == (256, 768)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=RTOL, atol=ATOL)
        out = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out, ref.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_gpt2_state_dict_round_trip_into_a_fresh_offloaded_model(tmp_path, ids):
    safetensors = pytest.importorskip("safetensors.torch")
    model = tiny_gpt2(layers=2)
    offload(model, "q4_k", device="cpu", progress=False, measure=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # GPT-2 ties lm_head to the token embedding: save one copy, as save_pretrained does.
    state.pop("lm_head.weight")
    safetensors.save_file(state, tmp_path / "gpt2.safetensors")
    fresh = tiny_gpt2(layers=2)
    torch.nn.init.normal_(fresh.transformer.h[0].attn.c_attn.weight)    # differ before the load
    offload(fresh, "q4_k", device="cpu", progress=False, measure=False)
    fresh.load_state_dict(safetensors.load_file(tmp_path / "gpt2.safetensors"), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_from_linear_takes_a_conv1d():
    torch.manual_seed(0)
    conv = Conv1D(64, 256)
    layer = OffloadedLinear.from_linear(conv, "q8_0")
    assert (layer.in_features, layer.out_features) == (256, 64)
    x = torch.randn(3, 256)
    expected = x.double() @ layer.dequantized_weight(torch.float64).T + conv.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="in_features=96 is not a multiple of the q4_k block size 256"):
        OffloadedLinear.from_linear(Conv1D(8, 96), "q4_k")
    with pytest.raises(TypeError, match="nn.Linear or a transformers Conv1D, got Conv1d"):
        OffloadedLinear.from_linear(nn.Conv1d(4, 4, 1), "q8_0")


# ------------------------------------------------------------------------------- T5 (_keep_in_fp32_modules)
def tiny_t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(d_model=256, d_ff=512, num_layers=2, num_heads=4, d_kv=64, vocab_size=300,
                                decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("streamed", [False, True])
def test_t5_keeps_the_modules_the_model_keeps_in_fp32(streamed, ids):
    model = tiny_t5()
    report, ref = offloaded_pair(model, "q8_0", streamed)
    wo = [n for n in report.skipped if n.endswith("DenseReluDense.wo")]
    assert len(wo) == 4 and all("_keep_in_fp32_modules lists 'wo'" in report.skipped[n] for n in wo)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in wo)
    assert isinstance(model.get_submodule("encoder.block.0.layer.1.DenseReluDense.wi"), OffloadedLinear)
    text = str(report).splitlines()        # the report says why, one line per reason
    assert text[1].startswith("  kept encoder.block.0.layer.1.DenseReluDense.wo and 3 more: the model keeps it in fp32")
    assert text[2] == "  kept lm_head: skipped by configuration"
    with torch.no_grad():
        torch.testing.assert_close(model(ids, decoder_input_ids=ids[:, :5]).logits,
                                   ref(ids, decoder_input_ids=ids[:, :5]).logits, rtol=RTOL, atol=ATOL)
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                           ref.generate(ids, max_new_tokens=4, do_sample=False))


def test_keep_in_fp32_can_be_overridden():
    # Off: wo is quantized (and T5's forward, which casts its input to wo.weight.dtype, then fails loudly).
    sel = select_linears(tiny_t5(), "q8_0", keep_model_fp32_modules=False)
    assert "encoder.block.0.layer.1.DenseReluDense.wo" in sel.chosen
    # An explicit override wins over the model's list; skip= still wins over both.
    sel = select_linears(tiny_t5(), "q8_0", skip=("lm_head", "decoder.*"), qtype_overrides={"*.0.*.wo": "q4_0"})
    assert sel.chosen["encoder.block.0.layer.1.DenseReluDense.wo"] == "q4_0"
    assert "_keep_in_fp32_modules" in sel.skipped["encoder.block.1.layer.1.DenseReluDense.wo"]
    assert sel.skipped["decoder.block.0.layer.2.DenseReluDense.wo"] == "skipped by configuration"


@pytest.mark.parametrize("pattern, name, expected", [
    ("wo", "encoder.block.0.layer.1.DenseReluDense.wo", True),
    ("wo", "encoder.block.0.layer.1.two", False),
    ("mlp.gate.weight", "model.layers.3.mlp.gate", True),
    ("mlp.gate", "model.layers.3.mlp.gate_proj", False),
    ("qformer", "qformer.encoder.layer.0.attention.self.query", True),
    ("layer.1", "encoder.block.0.layer.1.DenseReluDense.wi", True),
    ("layer.1", "encoder.block.0.layer.11.DenseReluDense.wi", False),
    ("lm_head", "lm_head", True),
])
def test_model_fp32_patterns_name_modules_by_whole_components(pattern, name, expected):
    assert _names_module(name, pattern) is expected


# --------------------------------------------------------------------- torch's own transformer layers
def test_multihead_attention_out_proj_stays_a_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(256, 4, 512, batch_first=True), nn.Linear(256, 256)).eval()
    original = copy.deepcopy(model)
    report = offload(model, "q8_0", device="cpu", progress=False, measure=False, skip=())
    assert set(report.quantized) == {"0.linear1", "0.linear2", "1"}
    assert "nn.MultiheadAttention passes out_proj" in report.skipped["0.self_attn.out_proj"]
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dequantized_reference(original, model)(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("streamed", [False, True])
def test_transformer_encoder_fast_paths_are_turned_off_for_replaced_layers(streamed):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(256, 4, 512, batch_first=True)
    model = nn.TransformerEncoder(layer, 4, enable_nested_tensor=True).eval()
    assert model.use_nested_tensor and layer.activation_relu_or_gelu
    report, ref = offloaded_pair(model, "q8_0", streamed, skip=())
    assert len(report.quantized) == 8
    assert model.use_nested_tensor is False and all(lay.activation_relu_or_gelu == 0 for lay in model.layers)
    x = torch.randn(3, 7, 256)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=RTOL, atol=ATOL)
        # The reference takes torch's fused nested-tensor path (padded positions come back as zeros there).
        torch.testing.assert_close(model(x, src_key_padding_mask=pad)[~pad], ref(x, src_key_padding_mask=pad)[~pad],
                                   rtol=RTOL, atol=ATOL)


def test_fast_path_settings_are_restored_when_offload_fails(monkeypatch):
    offload_module = importlib.import_module("offload_kernels.model.offload")
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(256, 4, 512, batch_first=True), 2,
                                  enable_nested_tensor=True).eval()

    def fail(*args, **kwargs):
        raise RuntimeError("injected placement failure")

    monkeypatch.setattr(offload_module, "apply_placement", fail)
    with pytest.raises(RuntimeError, match="injected placement failure"):
        offload(model, "q8_0", device="cpu", progress=False, measure=False, skip=())
    assert model.use_nested_tensor is True and all(lay.activation_relu_or_gelu == 1 for lay in model.layers)
    assert not any(isinstance(m, OffloadedLinear) for m in model.modules()) and streamer_of(model) is None


def test_full_transformer_offloads(ids):
    torch.manual_seed(0)
    model = nn.Transformer(256, 4, 2, 2, 512, batch_first=True).eval()
    report, ref = offloaded_pair(model, "q8_0", False, skip=())
    assert len(report.quantized) == 8 and len(report.skipped) == 6     # every attention's out_proj is kept
    src, tgt = torch.randn(2, 7, 256), torch.randn(2, 5, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt), ref(src, tgt), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------ fallback_qtype
def test_fallback_qtype_quantizes_what_the_k_quants_cannot():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(224, 512), nn.GELU(), nn.Linear(512, 224), nn.GELU(), nn.Linear(224, 48),
                          nn.GELU(), nn.Linear(48, 8))
    original = copy.deepcopy(model)
    plain = select_linears(copy.deepcopy(model), "q4_k", skip=())
    assert set(plain.chosen) == {"2"}
    assert "fallback_qtype='q5_0' or LLAMA_QUANTIZE_FALLBACKS would quantize it" in plain.skipped["0"]
    assert "fallback" not in plain.skipped["6"]         # 48 is not a multiple of 32 either: no hint
    report = offload(model, "q4_k", device="cpu", progress=False, measure=False, skip=(), fallback_qtype="q8_0")
    assert report.quantized == {"0": "q8_0", "2": "q4_k", "4": "q8_0"}
    assert "nor of the fallback q8_0's 32" in report.skipped["6"]
    x = torch.randn(4, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dequantized_reference(original, model)(x), rtol=RTOL, atol=ATOL)


def test_llama_quantize_fallbacks_follow_the_intended_format():
    """A mapping picks each layer's fallback by the format it was meant to get, as llama-quantize does
    (LLAMA_QUANTIZE_FALLBACKS: q3_k -> iq4_nl, q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(224, 512), nn.GELU(), nn.Linear(512, 224), nn.GELU(), nn.Linear(224, 96),
                          nn.GELU(), nn.Linear(96, 160), nn.GELU(), nn.Linear(160, 8))
    original = copy.deepcopy(model)
    overrides = {"4": "q5_k", "6": "q6_k", "8": "q3_k"}
    report = offload(model, "q4_k", device="cpu", progress=False, measure=False, skip=(), qtype_overrides=overrides,
                     fallback_qtype=LLAMA_QUANTIZE_FALLBACKS)
    assert report.quantized == {"0": "q5_0", "2": "q4_k", "4": "q5_1", "6": "q8_0", "8": "iq4_nl"}
    x = torch.randn(4, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dequantized_reference(original, model)(x), rtol=RTOL, atol=ATOL)
    partial = select_linears(copy.deepcopy(original), "q4_k", skip=(), qtype_overrides=overrides,
                             fallback_qtype={"q4_k": "q8_0"})
    assert partial.chosen == {"0": "q8_0", "2": "q4_k"}
    assert "not a multiple of the q5_k block size 256" in partial.skipped["4"]


@pytest.mark.parametrize("bad,exc,match", [({"q4_k": "q7"}, ValueError, "unknown qtype"),
                                           ({"q9": "q8_0"}, ValueError, "unknown qtype"),
                                           (8, TypeError, "fallback_qtype must be")])
def test_bad_fallbacks_are_refused(bad, exc, match):
    with pytest.raises(exc, match=match):
        select_linears(nn.Sequential(nn.Linear(64, 8)), "q4_k", skip=(), fallback_qtype=bad)
