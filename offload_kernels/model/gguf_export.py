"""save_gguf: a transformers llama/mistral/qwen2/qwen3/phi3/gemma2/gemma3 causal LM -> a llama.cpp GGUF file.

Linears are quantized with this package's ggml-exact quantizers (or, for OffloadedLinear layers, their
bytes are written as they are), attn_q/attn_k rows (and their biases) are permuted the way llama.cpp's
converter does, and the metadata llama.cpp needs is written. Used to make test models that both
llama.cpp and :func:`load_gguf_model` read, and to save an offloaded model without requantizing it.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from ..formats import LLAMA_QUANTIZE_FALLBACKS, QTYPES, QuantizedTensor, quantize, write_gguf
from ..layers import OffloadedLinear
from .gguf_model import permute_rows
from .gguf_names import (GEMMA_ARCHITECTURES, HF_TO_GGUF_ARCHITECTURE, OUTPUT, PERMUTED_QK_ARCHITECTURES,
                         SLIDING_WINDOW_ARCHITECTURES, hf_to_gguf_name, qk_side)
from .gemma import gemma_metadata
from .gguf_rope import config_rope_metadata
from .offload import _format_for

# Per-tensor overrides approximating llama.cpp's mixed presets (GGUF-name glob -> qtype).
MIXES: dict[str, dict[str, str]] = {
    "q4_k_m": {"*.attn_v.weight": "q6_k", "*.ffn_down.weight": "q6_k", "output.weight": "q6_k"},
    "q3_k_m": {"*.attn_v.weight": "q5_k", "*.ffn_down.weight": "q5_k", "output.weight": "q6_k"},
    "q2_k": {"*.attn_v.weight": "q3_k", "*.attn_output.weight": "q3_k", "*.ffn_down.weight": "q3_k",
             "output.weight": "q6_k"},
}

_FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16}

# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6


# Control tokens llama.cpp's vocabulary loader looks up by their text for an architecture (and fails to load
# the file without): phi3's end-of-text.
_ARCH_CONTROL_TOKENS = {"phi3": ("<|endoftext|>",)}


def synthetic_spm_vocab(vocab_size: int, control_tokens: "tuple[str, ...]" = ()) -> dict:
    """A SentencePiece-style vocabulary of ``vocab_size`` tokens (specials, ``control_tokens``, 256 byte
    tokens, word pieces)."""
    if vocab_size < 260 + len(control_tokens):
        raise ValueError(f"a synthetic llama vocabulary needs at least {260 + len(control_tokens)} tokens, "
                         f"got {vocab_size}")
    tokens = ["<unk>", "<s>", "</s>", *control_tokens] + [f"<0x{b:02X}>" for b in range(256)]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_CONTROL] * len(control_tokens) + [_BYTE] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    n_fixed = len(tokens)
    i = 0
    while len(tokens) < vocab_size:
        word = letters[i % 26] + (letters[(i // 26) % 26] if i >= 26 else "")
        piece = ("\u2581" + word) if i % 2 == 0 else word
        if piece not in tokens:
            tokens.append(piece)
            types.append(_NORMAL)
        i += 1
    scores = [0.0] * n_fixed + [-float(j) for j in range(len(tokens) - n_fixed)]
    return {"tokens": tokens, "scores": scores, "token_type": types, "bos": 1, "eos": 2, "unk": 0}


def _choose_qtype(gguf_name: str, k: int, default: str, overrides: Mapping[str, str]) -> Optional[str]:
    """The tensor's format: its override or the default; for rows of k weights that format's blocks cannot
    tile, llama-quantize's fallback (LLAMA_QUANTIZE_FALLBACKS: q4_k -> q5_0, ...), else None (f16)."""
    q = next((q for pat, q in overrides.items() if fnmatch.fnmatchcase(gguf_name, pat)), default)
    if q is None or q in _FLOAT_TYPES:
        return q
    return _format_for(k, q, LLAMA_QUANTIZE_FALLBACKS)[0]      # offload(fallback_qtype=...)'s rule


def save_gguf(model: nn.Module, path: "str | os.PathLike[str]", qtype: str = "q4_k", *,
              mix: Optional[str] = None, qtype_overrides: Optional[Mapping[str, str]] = None,
              vocab: Optional[dict] = None, name: Optional[str] = None) -> Path:
    """Write ``model`` (a transformers llama/mistral/qwen2/qwen3/phi3/gemma2/gemma3 text CausalLM) as a GGUF file
    llama.cpp can load. Settings llama.cpp would not reproduce (rope scaling it cannot read, a Gemma attention
    scale or layer pattern other than the one it derives) raise ValueError before anything is written.

    ``qtype`` is a GGUF block format, or "f32"/"f16" for unquantized matrices.
    ``mix`` picks per-tensor overrides ("q4_k_m", "q3_k_m", "q2_k": llama-quantize's presets of those names,
    approximately); ``qtype_overrides`` adds GGUF-name globs.
    ``vocab`` is {"tokens", "scores", "token_type", "bos", "eos", "unk"}; a synthetic SentencePiece-style
    vocabulary of the model's vocab_size is written when it is None.
    """
    overrides = _check_qtypes(qtype, mix, qtype_overrides)   # before anything is looked up or computed
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"save_gguf expects a transformers causal LM (an nn.Module with a config), got "
                        f"{type(model).__name__}")
    config = model.config
    model_type = config.model_type
    if model_type not in HF_TO_GGUF_ARCHITECTURE:
        raise ValueError(f"save_gguf supports {', '.join(HF_TO_GGUF_ARCHITECTURE)} models, got {model_type!r}")
    arch = HF_TO_GGUF_ARCHITECTURE[model_type]
    arch_md = gemma_metadata(config, arch) if arch in GEMMA_ARCHITECTURES else config_rope_metadata(config)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    default_head_dim = config.hidden_size // n_heads
    head_dim = getattr(config, "head_dim", None) or default_head_dim
    vocab = vocab or synthetic_spm_vocab(config.vocab_size, _ARCH_CONTROL_TOKENS.get(arch, ()))
    if len(vocab["tokens"]) != config.vocab_size:       # before quantizing the whole model
        raise ValueError(f"vocab has {len(vocab['tokens'])} tokens but the model's vocab_size is {config.vocab_size}")

    tensors: dict[str, "QuantizedTensor | torch.Tensor"] = {}
    modules = dict(model.named_modules())
    for hf_name, value in list(model.state_dict(keep_vars=False).items()):
        module_name = hf_name.rpartition(".")[0]
        if isinstance(modules.get(module_name), OffloadedLinear):
            if hf_name.endswith(".weight"):
                value = modules[module_name].quantized_weight()
            elif not hf_name.endswith(".bias"):
                continue                                       # weight_format: encoded in the GGUF type
        gguf_name = hf_to_gguf_name(hf_name, arch)
        if gguf_name is None:
            continue
        if getattr(config, "tie_word_embeddings", False) and gguf_name == OUTPUT:
            continue
        # llama.cpp's rope layout: q/k weight rows and, along its length, a q/k bias are permuted alike.
        side = qk_side(gguf_name) if model_type in PERMUTED_QK_ARCHITECTURES else ""
        heads = n_heads if side == "q" else n_kv
        if isinstance(value, QuantizedTensor):
            tensors[gguf_name] = value.index_rows(permute_rows(value.shape[0], heads)) if side else value
            continue
        w = value.detach().float().cpu()
        if arch in GEMMA_ARCHITECTURES and gguf_name.endswith("norm.weight"):
            w = w + 1.0                      # llama.cpp multiplies by the stored gain, Gemma by 1 + w
        elif side:
            w = w[permute_rows(w.shape[0], heads)]
        is_matrix = w.dim() == 2 and not gguf_name.endswith("norm.weight")
        q = _choose_qtype(gguf_name, w.shape[-1], qtype, overrides) if is_matrix else None
        if q in _FLOAT_TYPES:
            tensors[gguf_name] = w.to(_FLOAT_TYPES[q])
        else:
            tensors[gguf_name] = quantize(w, q) if q else (w if w.dim() == 1 else w.half())

    md = {
        "general.name": name or model_type,
        f"{arch}.context_length": int(config.max_position_embeddings),
        f"{arch}.embedding_length": int(config.hidden_size),
        f"{arch}.block_count": int(config.num_hidden_layers),
        f"{arch}.feed_forward_length": int(config.intermediate_size),
        f"{arch}.attention.head_count": int(n_heads),
        f"{arch}.attention.head_count_kv": int(n_kv),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
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
    window = getattr(config, "sliding_window", None) if arch in SLIDING_WINDOW_ARCHITECTURES else None
    if window:
        md[f"{arch}.attention.sliding_window"] = int(window)
    md.update({f"{arch}.{key}": value for key, value in arch_md.items()})
    if head_dim != default_head_dim or config.hidden_size % n_heads or arch in GEMMA_ARCHITECTURES:
        # An explicit head_dim (Mistral Nemo style): llama.cpp otherwise takes hidden_size / heads. Gemma: always,
        # as llama.cpp's converter does (transformers' reader would otherwise take Gemma's default head_dim, 256).
        md[f"{arch}.attention.key_length"] = int(head_dim)
        md[f"{arch}.attention.value_length"] = int(head_dim)
    return write_gguf(path, tensors, md, architecture=arch)


def _check_qtypes(qtype, mix, qtype_overrides) -> dict[str, Optional[str]]:
    """The per-tensor overrides, after checking every type and mix name the caller gave."""
    valid = (*QTYPES, *_FLOAT_TYPES)
    if qtype not in valid:
        raise ValueError(f"unknown qtype {qtype!r}; valid: {', '.join(valid)}")
    if mix is not None and mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; valid mixes: {', '.join(MIXES)} (plain types go in qtype: "
                         f"{', '.join(valid)})")
    overrides = dict(MIXES[mix]) if mix else {}
    for pattern, q in (qtype_overrides or {}).items():
        if not isinstance(pattern, str):
            raise TypeError(f"qtype_overrides keys are GGUF-name globs, got {pattern!r}")
        if q is not None and q not in valid:
            raise ValueError(f"qtype_overrides[{pattern!r}]: unknown qtype {q!r}; valid: {', '.join(valid)} "
                             f"or None (f16)")
        overrides[pattern] = q
    return overrides
