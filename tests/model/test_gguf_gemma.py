"""Gemma 2 / Gemma 3 GGUF files: save_gguf -> load_gguf_model, against the transformers model itself,
transformers' own GGUF reader and (optionally) llama.cpp."""

import copy
import os
import types

import pytest
import torch
import torch.nn.functional as F

from offload_kernels import OffloadedLinear
from offload_kernels.formats import GGUFFile, dequantize
from offload_kernels.model import streamer_of
from offload_kernels.model.gemma import gemma_metadata, layer_types, query_pre_attn_scalar
from offload_kernels.model.gguf_export import save_gguf
from offload_kernels.model.gguf_model import load_gguf_model

from .test_gguf_model import IDS, LOGITS_RTOL, _parity, _rewrite, hf_reference_logits, needs_llama_cpp

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GEMMA3_LINEAR_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
GEMMA3_YARN_ROPE = {"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                       "original_max_position_embeddings": 32},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}


def tiny_gemma(arch="gemma3", layers=7, seed=0, hidden=256, **config):
    """A small random Gemma whose layers follow llama.cpp's rules (7 layers: gemma3's sixth is its first global
    one), with a window of 4 so that the 10-token input slides, sharp attention, and norm gains spread over
    [0.5, 1.5] (a lost or doubled "+1" changes every layer). gemma2's soft-caps are low enough to bend these
    small scores and logits (at the real 50 and 30 a missing cap would change them by 1e-4 of their range)."""
    torch.manual_seed(seed)
    heads, head_dim = 4, 64
    kw = dict(vocab_size=320, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=128,
              sliding_window=4, query_pre_attn_scalar=query_pre_attn_scalar(arch, layers, hidden, heads, head_dim))
    if arch == "gemma2":
        kw.update(attn_logit_softcapping=8.0, final_logit_softcapping=1.5)
    kw.update(config)
    cfg = {"gemma2": transformers.Gemma2Config, "gemma3": transformers.Gemma3TextConfig}[arch](**kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    return model


CASES = {
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", {}),
    "gemma3_linear_rope": ("gemma3", {"rope_parameters": GEMMA3_LINEAR_ROPE}),
    "gemma3_yarn_rope": ("gemma3", {"rope_parameters": GEMMA3_YARN_ROPE}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gemma_round_trip_is_the_same_model(tmp_path, case):
    """f32 file: the loaded model is the saved one (norm offsets, layer pattern, scales, soft-caps, rope), so
    its logits equal the original's; q8_0 file: transformers' own GGUF reader sees the same tensors."""
    arch, config = CASES[case]
    model = tiny_gemma(arch, **config)
    path = save_gguf(model, tmp_path / "f32.gguf", "f32")
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert type(loaded).__name__ == type(model).__name__
    for key in ("layer_types", "sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
                "final_logit_softcapping", "rope_parameters", "head_dim"):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    ours = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            # the file holds fl(1 + w); w itself loses low bits, the gain 1 + w Gemma multiplies by does not
            assert torch.equal(1 + ours[name], 1 + p), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)

    (tmp_path / "q").mkdir()
    qpath = save_gguf(model, tmp_path / "q" / "q8_0.gguf", "q8_0")
    quantized = load_gguf_model(qpath, dtype=torch.float32, device="cpu")
    assert isinstance(quantized.model.layers[0].mlp.gate_proj, OffloadedLinear)
    assert isinstance(quantized.lm_head, OffloadedLinear)          # tied: over token_embd's bytes
    with torch.no_grad():
        ours_q = quantized(IDS).logits
    # transformers reads the tensors (subtracting the norms' 1 itself) but not llama.cpp's derived settings
    config = copy.deepcopy(quantized.config)
    config.tie_word_embeddings = True          # the loader unties lm_head (its own OffloadedLinear)
    expected = hf_reference_logits(qpath, IDS, config=config)
    torch.testing.assert_close(ours_q, expected, rtol=LOGITS_RTOL, atol=LOGITS_RTOL * expected.abs().max())


def test_gemma_metadata_is_what_llama_cpp_reads(tmp_path):
    path = save_gguf(tiny_gemma("gemma2"), tmp_path / "g2.gguf", "q8_0")
    md = GGUFFile(path).metadata
    assert md["gemma2.attention.sliding_window"] == 4
    assert md["gemma2.attn_logit_softcapping"] == 8.0 and md["gemma2.final_logit_softcapping"] == 1.5
    assert md["gemma2.attention.key_length"] == 64
    path = save_gguf(tiny_gemma("gemma3", rope_parameters=GEMMA3_LINEAR_ROPE), tmp_path / "g3.gguf", "q8_0")
    md = GGUFFile(path).metadata
    assert md["gemma3.rope.freq_base"] == 1e6
    assert md["gemma3.rope.scaling.type"] == "linear" and md["gemma3.rope.scaling.factor"] == 8.0
    assert "output.weight" not in GGUFFile(path)


def test_gemma2_rope_is_read_from_transformers_4_configs_too():
    """transformers 4 keeps gemma2's rope base on the config (rope_theta) and its scaling in rope_scaling, with no
    rope_parameters: both are written, as for llama, not replaced by the default base."""
    cfg = tiny_gemma("gemma2", layers=2).config.to_dict()
    del cfg["rope_parameters"]
    old_config = types.SimpleNamespace(**cfg, rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.0})
    md = gemma_metadata(old_config, "gemma2")
    assert md["rope.freq_base"] == 20000.0
    assert md["rope.scaling.type"] == "linear" and md["rope.scaling.factor"] == 2.0


def test_llama_cpp_rules():
    assert layer_types("gemma2", 4) == ["sliding_attention", "full_attention"] * 2
    assert layer_types("gemma3", 7) == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert layer_types("gemma3", 3, sliding=False) == ["full_attention"] * 3
    assert query_pre_attn_scalar("gemma3", 62, 5376, 32, 128) == 168             # Gemma 3 27B
    assert query_pre_attn_scalar("gemma3", 48, 3840, 16, 256) == 256             # Gemma 3 12B
    assert query_pre_attn_scalar("gemma2", 46, 4608, 32, 128) == 144             # Gemma 2 27B


@pytest.mark.parametrize("change, match", [
    ({"query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256 .*derives 64"),
    ({"layer_types": ["full_attention"] * 7}, "layer_types"),
    ({"sliding_window": None}, "no sliding_window"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e5}}}, "sliding_attention rope"),
    ({"rope_parameters": {"full_attention": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "full_attention rope"),
])
def test_save_gguf_refuses_gemma3_configs_llama_cpp_would_change(tmp_path, change, match):
    model = tiny_gemma("gemma3")
    for key, value in change.items():
        setattr(model.config, key, value)
    with pytest.raises(ValueError, match=match):
        save_gguf(model, tmp_path / "m.gguf", "q8_0")
    assert not list(tmp_path.iterdir())


def test_save_gguf_refuses_gemma2_without_softcapping(tmp_path):
    model = tiny_gemma("gemma2", layers=2)
    model.config.attn_logit_softcapping = None
    with pytest.raises(ValueError, match="attn_logit_softcapping=None .*always soft-caps"):
        save_gguf(model, tmp_path / "m.gguf", "q8_0")


def test_gemma3_without_a_window_is_global_everywhere(tmp_path):
    path = save_gguf(tiny_gemma("gemma3", layers=2), tmp_path / "m.gguf", "q8_0")
    path = _rewrite(tmp_path, path, "nowindow.gguf", {"gemma3.attention.sliding_window": 0})
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert loaded.config.layer_types == ["full_attention"] * 2 and loaded.config.sliding_window is None


def test_gemma_streamed_equals_resident(tmp_path):
    path = save_gguf(tiny_gemma("gemma3"), tmp_path / "m.gguf", "q4_k", mix="q4_k_m")
    resident, full = load_gguf_model(path, dtype=torch.float32, device="cpu", return_report=True)
    budget = full.placement.fixed_bytes + full.placement.linear_bytes["lm_head"] + 3 * sum(
        b for n, b in full.placement.linear_bytes.items() if n.startswith("model.layers.0."))
    streamed, report = load_gguf_model(path, gpu_budget=budget, dtype=torch.float32, device="cpu",
                                       return_report=True)
    assert report.bytes_streamed_per_forward > 0 and streamer_of(streamed) is not None
    with torch.no_grad():
        assert torch.equal(streamed(IDS).logits, resident(IDS).logits)


# ------------------------------------------------------------------------------------------ llama.cpp
class GGMLGelu(torch.nn.Module):
    """GELU (tanh) as llama.cpp's CPU backend computes it in f32: through a table indexed by the input rounded
    to fp16, holding fp16 results (0 below -10, identity above 10). Emulated so that the parity test compares
    model definitions, not that table's rounding."""

    def forward(self, x):
        y = F.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


@needs_llama_cpp
@pytest.mark.parametrize("arch, layers, hidden, config", [
    ("gemma2", 7, 256, {}),
    ("gemma3", 7, 256, {}),
    ("gemma3", 7, 256, {"rope_parameters": GEMMA3_LINEAR_ROPE}),
    ("gemma3", 7, 256, {"rope_parameters": GEMMA3_YARN_ROPE}),
    ("gemma2", 46, 128, {}),           # llama.cpp's 27B rule: queries scaled by 1/sqrt(hidden / heads)
    ("gemma3", 62, 128, {}),
], ids=["gemma2", "gemma3", "gemma3_linear_rope", "gemma3_yarn_rope", "gemma2_27b_rule", "gemma3_27b_rule"])
def test_gemma_parity_with_llama_cpp(tmp_path, arch, layers, hidden, config):
    """f32 files: llama.cpp and we agree to float rounding once its table GELU is emulated. The tolerance
    (5e-4 of the logit range for 7 layers, 2e-3 for 46-62) allows the table's fp16 steps, which amplify across
    layers (one layer: 2e-6); a wrong query scale, window, soft-cap, rope base or norm offset moves these
    logits by 0.08-0.8 of their range (measured by mutating each)."""
    model = tiny_gemma(arch, layers=layers, hidden=hidden, **config)
    path = save_gguf(model, tmp_path / "f32.gguf", "f32")
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    for layer in loaded.model.layers:
        layer.mlp.act_fn = GGMLGelu()
    max_diff, span, top1 = _parity(path, loaded)
    print(f"llama.cpp parity f32 {arch} x{layers} {config}: max |logit diff| {max_diff:.2e} "
          f"(logit range {span:.2f}), top-1 {top1:.0%}")
    assert max_diff <= (5e-4 if layers <= 7 else 2e-3) * span and top1 == 1.0


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_quantized_gemma_parity_with_llama_cpp(tmp_path, arch):
    """A q4_k_m file, lm_head over the tied q6_k token_embd. llama.cpp quantizes activations to 8 bits before
    its quantized dot products, which moves these logits by up to ~5% of their range. So the file is also
    run with every quantized tensor dequantized to f32: there llama.cpp and we must agree as closely as on
    f32 models, and the quantized run may differ from that by llama.cpp's activation rounding only."""
    path = save_gguf(tiny_gemma(arch), tmp_path / "q.gguf", "q4_k", mix="q4_k_m",
                     qtype_overrides={"token_embd.weight": "q6_k"})
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert loaded.lm_head.qtype == "q6_k"
    for layer in loaded.model.layers:
        layer.mlp.act_fn = GGMLGelu()
    f = GGUFFile(path)
    dense = {n: dequantize(f.tensor(n), torch.float32).reshape(f.info(n).shape) for n in f if f.info(n).is_quantized}
    f32_path = _rewrite(tmp_path, path, "dequantized.gguf", tensors=dense)
    f32_diff, span, f32_top1 = _parity(f32_path, loaded)
    q_diff, _, q_top1 = _parity(path, loaded)
    print(f"llama.cpp parity q4_k_m {arch}: max |logit diff| {f32_diff:.2e} on the dequantized file, {q_diff:.4f} on "
          f"the quantized one (logit range {span:.2f}), top-1 {f32_top1:.0%} / {q_top1:.0%}")
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
    assert q_diff <= 0.06 * span and q_top1 >= 0.8
