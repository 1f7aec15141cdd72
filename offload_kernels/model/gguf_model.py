"""load_gguf_model: a llama.cpp GGUF file -> a Hugging Face transformers model with offloaded linears.

Every linear is an OffloadedLinear over the file's own quantized bytes (no requantization, no float
copy); embeddings and norms are dequantized to ``dtype``. Everything is checked before anything is
allocated on the GPU: architecture, tensor names, types and shapes, and the file's length.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..formats import QuantizedTensor, dequantize, get_spec
from ..formats.gguf_io import GGUFError, GGUFFile, GGUFTensorInfo
from ..layers import OffloadedLinear
from .offload import OffloadReport, _report, apply_placement
from .planner import LinearSpec, default_budget, parse_bytes, plan_placement

log = logging.getLogger("offload_kernels")

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# llama.cpp's converter permutes attn_q/attn_k rows for its rope layout on these architectures.
_PERMUTED_QK = ("llama", "mistral")

_BLOCK_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


@dataclass(frozen=True)
class _Target:
    """Where one file tensor goes in the transformers model."""

    hf_name: str                 # e.g. "model.layers.3.self_attn.q_proj" (module) or a parameter path
    kind: str                    # "linear", "linear_bias", "embedding", "norm", "rope_freqs"
    permute_heads: int = 0       # >0: undo llama.cpp's q/k row permutation with this many heads


def _targets(f: GGUFFile, arch: str, n_heads: int, n_kv_heads: int) -> dict[str, _Target]:
    out: dict[str, _Target] = {}
    unknown = []
    for name in f:
        if name == "token_embd.weight":
            out[name] = _Target("model.embed_tokens.weight", "embedding")
        elif name == "output_norm.weight":
            out[name] = _Target("model.norm.weight", "norm")
        elif name == "output.weight":
            out[name] = _Target("lm_head", "linear")
        elif name == "rope_freqs.weight":
            out[name] = _Target("model.rotary_emb", "rope_freqs")
        elif (m := _BLOCK_TENSOR.match(name)) and (m.group(2) in _BLOCK_LINEARS or m.group(2) in _BLOCK_NORMS):
            i, short, what = m.groups()
            prefix = f"model.layers.{i}."
            if short in _BLOCK_NORMS and what == "weight":
                out[name] = _Target(prefix + _BLOCK_NORMS[short] + ".weight", "norm")
            elif short in _BLOCK_LINEARS:
                heads = 0
                if arch in _PERMUTED_QK and short in ("attn_q", "attn_k"):
                    heads = n_heads if short == "attn_q" else n_kv_heads
                kind = "linear" if what == "weight" else "linear_bias"
                out[name] = _Target(prefix + _BLOCK_LINEARS[short], kind, heads)
            else:
                unknown.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise GGUFError(f"{f.path}: tensors not understood for architecture {arch!r}: {', '.join(unknown[:8])}"
                        + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
    return out


def unpermute_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """Gather index undoing llama.cpp's rope permutation of q/k rows: hf_weight = gguf_weight[index].

    Within each head the converter moves row (pair j, i) of the (2, half) layout to (i, pair j) of the
    (half, 2) layout; this index moves it back. Whole rows move, so it is free on quantized data.
    """
    if n_heads <= 0 or n_rows % (2 * n_heads):
        raise GGUFError(f"cannot undo the q/k permutation: {n_rows} rows do not split into {n_heads} heads x 2")
    half = n_rows // n_heads // 2
    return torch.arange(n_rows).view(n_heads, half, 2).transpose(1, 2).reshape(n_rows)


def permute_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`unpermute_rows`: gguf_weight = hf_weight[index] (what llama.cpp's converter does)."""
    return torch.argsort(unpermute_rows(n_rows, n_heads))


def _hf_config(path: Path):
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    cfg = dict(parsed["config"])
    model_type = cfg.pop("model_type")
    cfg.pop("_model_name_or_path", None)
    return AutoConfig.for_model(model_type, **cfg)


def _check_tensor(f: GGUFFile, info: GGUFTensorInfo, target: _Target, expected: tuple[int, ...]) -> None:
    if info.shape != expected:
        raise GGUFError(f"{f.path}: tensor {info.name!r} has shape {info.shape}, expected {expected} "
                        f"for {target.hf_name}")
    if target.kind == "linear" and info.is_quantized and not info.is_supported:
        raise GGUFError(f"{f.path}: tensor {info.name!r} has type {info.ggml_type.name}, which is not supported "
                        f"(supported: q4_0, q8_0, q3_k, q4_k, q5_k, q6_k, f16, bf16, f32)")


def load_gguf_model(path: "str | os.PathLike[str]", gpu_budget: "int | str | None" = None,
                    dtype: torch.dtype = torch.float16, device: "torch.device | str | None" = None, *,
                    num_slots: int = 2, measure: bool = False, return_report: bool = False):
    """Build a transformers causal LM from a llama.cpp GGUF file, linears over the file's quantized bytes.

    Architectures: llama, mistral, qwen2. Layers within ``gpu_budget`` (bytes or "20GiB"; None: as for
    :func:`offload`, the free device memory less a margin) stay resident on the device, the rest stream
    through the transfer engine. Returns the model (and the
    OffloadReport when ``return_report``). Raises GGUFError for unsupported or malformed files before
    anything is allocated on the device.
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype must be fp16, bf16 or fp32, got {dtype}")
    budget = parse_bytes(gpu_budget)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but torch sees no CUDA device")
    if budget is None:
        budget = default_budget(device)
    f = GGUFFile(path)
    arch = f.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{f.path}: architecture {arch!r} is not supported (supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    config = _hf_config(f.path)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    targets = _targets(f, arch, n_heads, n_kv)

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())

    # ---------------------------------------------------------------- validate every tensor first
    for name, target in targets.items():
        info = f.info(name)
        if target.kind == "linear":
            lin = modules[target.hf_name]
            _check_tensor(f, info, target, (lin.out_features, lin.in_features))
        elif target.kind == "linear_bias":
            _check_tensor(f, info, target, (modules[target.hf_name].out_features,))
        elif target.kind in ("embedding", "norm"):
            _check_tensor(f, info, target, tuple(params[target.hf_name].shape))
        if target.kind != "linear" and info.is_quantized and not info.is_supported:
            raise GGUFError(f"{f.path}: tensor {name!r} has unsupported type {info.ggml_type.name}")
    expected_linears = {n for n, m in modules.items() if isinstance(m, nn.Linear)}
    provided = {t.hf_name for t in targets.values() if t.kind == "linear"}
    tied = "lm_head" not in provided and "lm_head" in expected_linears
    missing = expected_linears - provided - ({"lm_head"} if tied else set())
    if missing:
        raise GGUFError(f"{f.path}: missing weights for {', '.join(sorted(missing)[:8])}")
    covered = {t.hf_name for t in targets.values()}
    missing_params = [n for n in params if n not in covered and n.rpartition(".")[0] not in expected_linears]
    missing_bias = [n for n in params if n.endswith(".bias") and n.rpartition(".")[0] in expected_linears
                    and n.rpartition(".")[0] not in {t.hf_name for t in targets.values() if t.kind == "linear_bias"}]
    if missing_params or missing_bias:
        raise GGUFError(f"{f.path}: missing tensors for {', '.join(sorted(missing_params + missing_bias)[:8])}")

    # ---------------------------------------------------------------- plan before touching the device
    linear_sources = {t.hf_name: n for n, t in targets.items() if t.kind == "linear"}
    if tied:
        linear_sources["lm_head"] = "token_embd.weight"
    quantized = {hf: src for hf, src in linear_sources.items() if f.info(src).is_quantized}
    specs = [LinearSpec(hf, *f.info(src).shape, get_spec(f.info(src).ggml_type).name, _group(hf))
             for hf, src in quantized.items()]
    elem = torch.tensor([], dtype=dtype).element_size()
    fixed = sum(int(torch.Size(f.info(n).shape).numel()) * elem for n, t in targets.items()
                if t.kind in ("embedding", "norm", "linear_bias"))
    fixed += sum(int(torch.Size(f.info(src).shape).numel()) * elem for hf, src in linear_sources.items()
                 if hf not in quantized)
    placement = plan_placement(specs, budget, fixed, num_slots)

    # ---------------------------------------------------------------- build
    layers: dict[str, OffloadedLinear] = {}
    unpermute: dict[str, torch.Tensor] = {}     # layer -> row gather, applied once the bytes are placed
    for hf, src in linear_sources.items():
        target = targets.get(src) or _Target(hf, "linear")
        bias_src = src.replace(".weight", ".bias")
        bias = f.tensor(bias_src).to(dtype, copy=True) if bias_src in f and src != "token_embd.weight" else None
        if hf in quantized:
            new = OffloadedLinear.from_quantized(f.tensor(src), bias)     # over the mapped file bytes
            if target.permute_heads:
                unpermute[hf] = unpermute_rows(new.out_features, target.permute_heads)
        else:                                   # float linear in the file: kept as nn.Linear in dtype
            w = f.tensor(src)
            w = w[unpermute_rows(w.shape[0], target.permute_heads)].to(dtype) if target.permute_heads \
                else w.to(dtype, copy=True)
            new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=dtype)
            new.weight = nn.Parameter(w, requires_grad=False)
            if bias is not None:
                new.bias = nn.Parameter(bias, requires_grad=False)
        parent, _, attr = hf.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        if isinstance(new, OffloadedLinear):
            layers[hf] = new
    for name, target in targets.items():
        if target.kind in ("embedding", "norm"):
            t = f.tensor(name)
            value = dequantize(t, dtype) if isinstance(t, QuantizedTensor) else t.to(dtype, copy=True)
            _set_parameter(model, target.hf_name, value)
        elif target.kind == "rope_freqs":
            _apply_rope_freqs(model, f.tensor(name).float())
    if tied:
        model.config.tie_word_embeddings = False   # lm_head holds the quantized bytes, not the embedding

    apply_placement(model, layers, placement, device)
    # Undo llama.cpp's q/k row order where the bytes now live (device memory, the engine's pinned storage,
    # or copy-on-write pages of the mapping): one tensor-sized temporary at a time, never a host copy of
    # the model. Views of the mapping keep it alive only as long as a layer still reads from it.
    for hf, rows in unpermute.items():
        w = layers[hf].weight
        w.copy_(w.index_select(0, rows.to(w.device)))
    f.close()
    model.eval()
    report = _report(device, "gguf", placement, {n: layers[n].qtype for n in layers}, {}, specs, measure,
                     (1, 8, 64, 512))
    return (model, report) if return_report else model


def _group(hf_name: str) -> str:
    m = re.match(r"^(model\.layers\.\d+)\.", hf_name)
    return m.group(1) if m else ""


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, nn.Parameter(value, requires_grad=False))


def _apply_rope_freqs(model: nn.Module, freqs: torch.Tensor) -> None:
    """llama.cpp's rope frequency factors divide each rotary frequency (Llama 3.1-style scaling)."""
    rotary = model.get_submodule("model.rotary_emb")
    inv = rotary.inv_freq
    if inv.shape != freqs.shape:
        raise GGUFError(f"rope_freqs has {freqs.numel()} factors, the model has {inv.numel()} rotary frequencies")
    rotary.inv_freq = (inv.float() / freqs.to(inv.device)).to(inv.dtype)
    if hasattr(rotary, "original_inv_freq"):
        rotary.original_inv_freq = rotary.inv_freq


def load_gguf_tokenizer(path: "str | os.PathLike[str]"):
    """A transformers tokenizer built from the GGUF file's tokenizer metadata."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
