"""What the per-architecture MoE GGUF tests share: the three files each saves of its tiny model, the reference model
whose expert stacks hold a loaded file's dequantized bytes, the load-and-save round trip and the on-demand check."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from offload_kernels import OffloadedExperts
from offload_kernels.formats.gguf_io import GGUFFile
from offload_kernels.model.gguf_export import save_gguf
from offload_kernels.model.gguf_model import load_gguf_model


def save_test_files(model, root: Path) -> dict[str, Path]:
    """q8_0, Q4_K_M-style and f32 files of ``model``; the f32 one keeps only the expert stacks (which load only
    quantized) in q8_0, isolating the architecture from the arithmetic."""
    return {"q8_0": save_gguf(model, root / "q8_0.gguf", "q8_0"),
            "q4_k_m": save_gguf(model, root / "q4_k_m.gguf", "q4_k", mix="q4_k_m"),
            "f32": save_gguf(model, root / "f32.gguf", "f32", qtype_overrides={"*_exps.weight": "q8_0"})}


def with_file_experts(model, loaded):
    """A copy of ``model`` whose expert stacks are ``loaded``'s dequantized ones (the file's bytes), stored as the
    transformers module keeps them ((experts, in, out) where it says ``is_transposed``)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, ours in zip(ref.model.layers, loaded.model.layers):
            experts = getattr(ours.mlp, "experts", None)
            if not isinstance(experts, OffloadedExperts):       # a dense block
                continue
            for name in ("gate_up_proj", "down_proj"):
                w = torch.stack([experts.expert_weights(name, e) for e in range(experts.num_experts)])
                target = getattr(layer.mlp.experts, name)
                target.copy_(w.transpose(1, 2) if layer.mlp.experts.is_transposed else w)
    return ref


def assert_matches_file_experts(loaded, model, ids: torch.Tensor) -> None:
    """``loaded`` (from an f32 file whose expert stacks alone are quantized) computes ``model``'s logits with the
    file's expert weights, to float rounding."""
    with torch.no_grad():
        ours, expected = loaded(ids).logits, with_file_experts(model, loaded)(ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def resaved(path: Path, tmp_path: Path) -> tuple[GGUFFile, GGUFFile]:
    """The Q4_K_M-style file at ``path`` and the file save_gguf writes of the model load_gguf_model builds from it
    (with the same mix): what a round trip keeps is checked on the pair."""
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    again = save_gguf(loaded, tmp_path / "again.gguf", "q4_k", mix="q4_k_m")
    a, b = GGUFFile(path), GGUFFile(again)
    assert set(a) == set(b)
    return a, b


def assert_on_demand_equals_resident(path: Path, gpu_budget: str, cache_slots: int, ids: torch.Tensor) -> None:
    """The file's experts copied on demand through a cache of ``cache_slots`` give the resident model's logits."""
    resident = load_gguf_model(path, dtype=torch.float32, device="cpu")
    on_demand = load_gguf_model(path, dtype=torch.float32, device="cpu", gpu_budget=gpu_budget, experts="on_demand",
                                expert_cache_slots=cache_slots)
    with torch.no_grad():
        torch.testing.assert_close(on_demand(ids).logits, resident(ids).logits, rtol=1e-5, atol=1e-5)
