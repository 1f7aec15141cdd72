"""Layer inventories of models for planning: from presets, a transformers config, or a GGUF file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..formats import get_spec
from ..formats.gguf_io import GGUFFile
from .planner import LinearSpec


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that determine a llama-family decoder's linear layers."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None

    @property
    def kv_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.kv_heads

    @property
    def q_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.heads


PRESETS: dict[str, LlamaShape] = {
    "llama-3-8b": LlamaShape(4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": LlamaShape(8192, 28672, 80, 64, 8, 128256),
    "llama-2-13b": LlamaShape(5120, 13824, 40, 40, 40, 32000),
    "mistral-7b": LlamaShape(4096, 14336, 32, 32, 8, 32768),
    "qwen2-7b": LlamaShape(3584, 18944, 28, 28, 4, 152064),
    "qwen2-72b": LlamaShape(8192, 29568, 80, 64, 8, 152064),
}


@dataclass(frozen=True)
class ModelInventory:
    name: str
    linears: list[LinearSpec]
    fixed_bytes: int              # embeddings and norms at fp16 (always resident)


def llama_inventory(shape: LlamaShape, qtype: str = "q4_k", lm_head_qtype: str | None = "q6_k",
                    name: str = "model") -> ModelInventory:
    """Linears of a llama-family model quantized to ``qtype`` (lm_head to ``lm_head_qtype``, None = fp16)."""
    get_spec(qtype)
    h, q, kv, f = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    linears = []
    for i in range(shape.layers):
        g = f"model.layers.{i}"
        for short, n, k in (("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
                            ("self_attn.o_proj", h, q), ("mlp.gate_proj", f, h), ("mlp.up_proj", f, h),
                            ("mlp.down_proj", h, f)):
            linears.append(LinearSpec(f"{g}.{short}", n, k, qtype, g))
    linears.append(LinearSpec("lm_head", shape.vocab, h, lm_head_qtype, ""))
    fixed = 2 * (shape.vocab * h + (2 * shape.layers + 1) * h)
    return ModelInventory(name, linears, fixed)


def gguf_inventory(path: "str | os.PathLike[str]") -> ModelInventory:
    """Linears of a GGUF file with the file's own types (2-D ``blk.*``/``output`` weights)."""
    f = GGUFFile(path)
    linears, fixed = [], 0
    for name, info in f.tensor_infos.items():
        if len(info.shape) == 2 and name.endswith(".weight") and name != "token_embd.weight" and info.is_supported:
            group = ".".join(name.split(".")[:2]) if name.startswith("blk.") else ""
            qtype = get_spec(info.ggml_type).name if info.is_quantized else None
            linears.append(LinearSpec(name, info.shape[0], info.shape[1], qtype, group,
                                      unquantized_bytes_per_weight=info.nbytes // max(1, info.shape[0] * info.shape[1])))
        else:
            n = 1
            for d in info.shape:
                n *= d
            fixed += 2 * n          # embeddings and norms are dequantized to fp16 on the device
    return ModelInventory(Path(path).name, linears, fixed)


def config_inventory(path: "str | os.PathLike[str]", qtype: str = "q4_k") -> ModelInventory:
    """From a transformers config.json of a llama-family model."""
    cfg = json.loads(Path(path).read_text())
    shape = LlamaShape(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                       cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                       cfg["vocab_size"], cfg.get("head_dim"))
    return llama_inventory(shape, qtype, name=Path(path).parent.name or "config")


def resolve_inventory(model: str, qtype: str = "q4_k") -> ModelInventory:
    """A preset name, a .gguf file or a config.json -> inventory."""
    if model in PRESETS:
        return llama_inventory(PRESETS[model], qtype, name=model)
    p = Path(model)
    if p.suffix == ".gguf":
        return gguf_inventory(p)
    if p.is_dir() and (p / "config.json").exists():
        p = p / "config.json"
    if p.suffix == ".json":
        return config_inventory(p, qtype)
    raise ValueError(f"unknown model {model!r}: give a preset ({', '.join(PRESETS)}), a .gguf file or a config.json")
