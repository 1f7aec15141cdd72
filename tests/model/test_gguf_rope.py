"""Rope scaling in GGUF metadata (offload_kernels/model/gguf_rope.py): linear and YaRN written by save_gguf,
read by load_gguf_model, and (optionally) computed as llama.cpp computes them; what neither side can
reproduce is refused by name."""

import os
import types

import pytest
import torch

from offload_kernels.formats import GGUFError, GGUFFile
from offload_kernels.model.gguf_export import save_gguf
from offload_kernels.model.gguf_model import load_gguf_model
from offload_kernels.model.gguf_rope import require_rope_parameters

from .test_gguf_model import IDS, _parity, _rewrite, needs_llama_cpp, tiny_model

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
SCALINGS = {"linear": {"rope_type": "linear", "factor": 4.0}, "yarn": YARN}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rope_scaling_round_trips(tmp_path, arch, scaling):
    model = tiny_model(arch, layers=1, rope_scaling=dict(SCALINGS[scaling]))
    path = save_gguf(model, tmp_path / "m.gguf", "f32")
    md = GGUFFile(path).metadata
    assert md[f"{arch}.rope.scaling.type"] == scaling and md[f"{arch}.rope.scaling.factor"] == 4.0
    if scaling == "yarn":
        assert md[f"{arch}.rope.scaling.original_context_length"] == 32
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert loaded.config.rope_parameters["rope_type"] == scaling
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
        unscaled = tiny_model(arch, layers=1)(IDS).logits
    assert not torch.allclose(unscaled, model(IDS).logits, atol=1e-3)   # the scaling matters at these positions


@pytest.mark.parametrize("metadata, match", [
    ({"llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 4.0}, "rope scaling type 'longrope'"),
    ({"llama.rope.scaling.type": "linear"}, "rope.scaling.factor is missing or not positive"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": -2.0}, "missing or not positive"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, "original_context_length"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": 32, "llama.rope.scaling.yarn_beta_fast": 16.0},
     "YaRN settings {'yarn_beta_fast': 16.0}"),
])
def test_rope_scaling_we_cannot_reproduce_is_refused(tmp_path, metadata, match):
    path = save_gguf(tiny_model(layers=1), tmp_path / "m.gguf", "q8_0")
    path = _rewrite(tmp_path, path, "scaled.gguf", metadata)
    with pytest.raises(GGUFError, match=match):
        load_gguf_model(path, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("rope, match", [
    (dict(YARN, beta_fast=16.0), "YaRN beta_fast=16.0 cannot be written"),
    (dict(YARN, attention_factor=1.5), "YaRN attention_factor=1.5 cannot be written"),
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' would be lost"),
])
def test_save_gguf_refuses_yarn_settings_llama_cpp_ignores(tmp_path, rope, match):
    with pytest.raises(ValueError, match=match):
        save_gguf(tiny_model(layers=1, rope_scaling=rope), tmp_path / "m.gguf", "q8_0")
    assert not list(tmp_path.iterdir())


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rope_scaling_parity_with_llama_cpp(tmp_path, arch, scaling):
    """Linear and YaRN scaling (original context 32, factor 4: the ramp between extrapolated and interpolated
    frequencies, and YaRN's 1 + 0.1 ln(4) attention factor, both matter at 10 tokens) computed alike."""
    model = tiny_model(arch, layers=2, rope_scaling=dict(SCALINGS[scaling]))
    path = save_gguf(model, tmp_path / "f32.gguf", "f32")
    max_diff, span, top1 = _parity(path, load_gguf_model(path, dtype=torch.float32, device="cpu"))
    print(f"llama.cpp parity f32 {arch} {scaling} rope: max |logit diff| {max_diff:.2e} (logit range {span:.2f})")
    assert max_diff <= 1e-4 * span and top1 == 1.0


def test_transformers_without_rope_parameters_is_refused(tmp_path):
    """transformers 4 configs have no rope_parameters: a scaled file (or a Gemma, whose layer types need them)
    must not load there with unscaled rope."""
    path = save_gguf(tiny_model(layers=1, rope_scaling=dict(YARN)), tmp_path / "m.gguf", "q8_0")
    old_config = types.SimpleNamespace(rope_theta=10000.0, rope_scaling=None)
    with pytest.raises(GGUFError, match="yarn rope scaling needs transformers >= 5"):
        require_rope_parameters(GGUFFile(path), old_config, "yarn rope scaling")
    require_rope_parameters(GGUFFile(path), types.SimpleNamespace(rope_parameters={}), "yarn rope scaling")
