"""save_gguf: a transformers llama/mistral/qwen2 causal LM -> a llama.cpp GGUF file.

Linears are quantized with this package's ggml-exact quantizers (or, for OffloadedLinear layers, their
bytes are written as they are), attn_q/attn_k rows are permuted the way llama.cpp's converter does, and
the metadata llama.cpp needs is written. Used to make test models that both llama.cpp and
:func:`load_gguf_model` read, and to save an offloaded model without requantizing it.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from ..formats import QuantizedTensor, get_spec, quantize, write_gguf
from ..layers import OffloadedLinear
from .gguf_model import permute_rows

# Per-tensor overrides approximating llama.cpp's mixed presets (GGUF-name glob -> qtype).
MIXES: dict[str, dict[str, str]] = {
    "q4_k_m": {"*.attn_v.weight": "q6_k", "*.ffn_down.weight": "q6_k", "output.weight": "q6_k"},
    "q3_k_m": {"*.attn_v.weight": "q5_k", "*.ffn_down.weight": "q5_k", "output.weight": "q6_k"},
}

_HF_TO_GGUF_LINEAR = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_TO_GGUF_NORM = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTES_QK = {"llama", "mistral"}

_FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16}

# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6


def synthetic_spm_vocab(vocab_size: int) -> dict:
    """A SentencePiece-style vocabulary of ``vocab_size`` tokens (specials, 256 byte tokens, word pieces)."""
    if vocab_size < 260:
        raise ValueError(f"a synthetic llama vocabulary needs at least 260 tokens, got {vocab_size}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < vocab_size:
        word = letters[i % 26] + (letters[(i // 26) % 26] if i >= 26 else "")
        piece = ("\u2581" + word) if i % 2 == 0 else word
        if piece not in tokens:
            tokens.append(piece)
            types.append(_NORMAL)
        i += 1
    scores = [0.0] * 259 + [-float(j) for j in range(len(tokens) - 259)]
    return {"tokens": tokens, "scores": scores, "token_type": types, "bos": 1, "eos": 2, "unk": 0}


def _gguf_name(hf_name: str) -> Optional[str]:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        i, rest, what = parts[2], ".".join(parts[3:-1]), parts[-1]
        if rest in _HF_TO_GGUF_LINEAR:
            return f"blk.{i}.{_HF_TO_GGUF_LINEAR[rest]}.{what}"
        if rest in _HF_TO_GGUF_NORM and what == "weight":
            return f"blk.{i}.{_HF_TO_GGUF_NORM[rest]}.weight"
    return None


def _choose_qtype(gguf_name: str, k: int, default: str, overrides: Mapping[str, str]) -> Optional[str]:
    q = next((q for pat, q in overrides.items() if fnmatch.fnmatchcase(gguf_name, pat)), default)
    if q in _FLOAT_TYPES:
        return q
    if q is not None and k % get_spec(q).block_size:
        q = "q8_0" if k % 32 == 0 else None                    # llama.cpp falls back the same way
    return q


def save_gguf(model: nn.Module, path: "str | os.PathLike[str]", qtype: str = "q4_k", *,
              mix: Optional[str] = None, qtype_overrides: Optional[Mapping[str, str]] = None,
              vocab: Optional[dict] = None, name: Optional[str] = None) -> Path:
    """Write ``model`` (a transformers llama/mistral/qwen2 CausalLM) as a GGUF file llama.cpp can load.

    ``qtype`` is a GGUF block format, or "f32"/"f16" for unquantized matrices.
    ``mix`` picks per-tensor overrides ("q4_k_m", "q3_k_m"); ``qtype_overrides`` adds GGUF-name globs.
    ``vocab`` is {"tokens", "scores", "token_type", "bos", "eos", "unk"}; a synthetic SentencePiece-style
    vocabulary of the model's vocab_size is written when it is None.
    """
    config = model.config
    model_type = config.model_type
    if model_type not in _GGUF_ARCH:
        raise ValueError(f"save_gguf supports llama, mistral and qwen2 models, got {model_type!r}")
    if qtype not in _FLOAT_TYPES:
        get_spec(qtype)
    overrides = dict(MIXES[mix]) if mix else {}
    if mix and mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; known: {', '.join(MIXES)}")
    overrides.update(qtype_overrides or {})
    arch = _GGUF_ARCH[model_type]
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads

    tensors: dict[str, "QuantizedTensor | torch.Tensor"] = {}
    modules = dict(model.named_modules())
    for hf_name, value in list(model.state_dict(keep_vars=False).items()):
        module_name = hf_name.rpartition(".")[0]
        if isinstance(modules.get(module_name), OffloadedLinear):
            if hf_name.endswith(".weight"):
                value = modules[module_name].quantized_weight()
            elif not hf_name.endswith(".bias"):
                continue                                       # weight_format: encoded in the GGUF type
        gguf_name = _gguf_name(hf_name)
        if gguf_name is None:
            continue
        if getattr(config, "tie_word_embeddings", False) and gguf_name == "output.weight":
            continue
        permute = model_type in _PERMUTES_QK and (".attn_q." in gguf_name or ".attn_k." in gguf_name) and \
            gguf_name.endswith(".weight")
        heads = n_heads if ".attn_q." in gguf_name else n_kv
        if isinstance(value, QuantizedTensor):
            tensors[gguf_name] = value.index_rows(permute_rows(value.shape[0], heads)) if permute else value
            continue
        w = value.detach().float().cpu()
        if permute:
            w = w[permute_rows(w.shape[0], heads)]
        is_matrix = w.dim() == 2 and not gguf_name.endswith("norm.weight")
        q = _choose_qtype(gguf_name, w.shape[-1], qtype, overrides) if is_matrix else None
        if q in _FLOAT_TYPES:
            tensors[gguf_name] = w.to(_FLOAT_TYPES[q])
        else:
            tensors[gguf_name] = quantize(w, q) if q else (w if w.dim() == 1 else w.half())

    vocab = vocab or synthetic_spm_vocab(config.vocab_size)
    if len(vocab["tokens"]) != config.vocab_size:
        raise ValueError(f"vocab has {len(vocab['tokens'])} tokens but the model's vocab_size is {config.vocab_size}")
    md = {
        "general.name": name or model_type,
        f"{arch}.context_length": int(config.max_position_embeddings),
        f"{arch}.embedding_length": int(config.hidden_size),
        f"{arch}.block_count": int(config.num_hidden_layers),
        f"{arch}.feed_forward_length": int(config.intermediate_size),
        f"{arch}.attention.head_count": int(n_heads),
        f"{arch}.attention.head_count_kv": int(n_kv),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{arch}.rope.freq_base": float(_rope_theta(config)),
        f"{arch}.rope.dimension_count": int(head_dim),
        f"{arch}.vocab_size": int(config.vocab_size),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": list(vocab["tokens"]),
        "tokenizer.ggml.scores": [float(s) for s in vocab["scores"]],
        "tokenizer.ggml.token_type": [int(t) for t in vocab["token_type"]],
        "tokenizer.ggml.bos_token_id": int(vocab["bos"]),
        "tokenizer.ggml.eos_token_id": int(vocab["eos"]),
        "tokenizer.ggml.unknown_token_id": int(vocab["unk"]),
        "tokenizer.ggml.add_bos_token": True,
    }
    return write_gguf(path, tensors, md, architecture=arch)


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:                                  # transformers 5 keeps it in rope_parameters
        params = getattr(config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0)
    return float(theta)
