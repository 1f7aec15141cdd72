"""save_gguf: a transformers llama/mistral/qwen2/qwen3/phi3/gemma2/gemma3/qwen2_moe/qwen3_moe/mixtral/glm4_moe/gpt_oss/
deepseek_v3 causal LM -> a llama.cpp GGUF file.

Linears are quantized with this package's ggml-exact quantizers (or, for OffloadedLinear layers, their
bytes are written as they are), attn_q/attn_k rows (and their biases) are permuted the way llama.cpp's
converter does, and the metadata llama.cpp needs is written. Used to make test models that both
llama.cpp and :func:`load_gguf_model` read, and to save an offloaded model without requantizing it.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..formats import LLAMA_QUANTIZE_FALLBACKS, QTYPES, QuantizedTensor, quantize, write_gguf
from ..formats.gguf_io import check_split_max_tensors
from ..layers import OffloadedExperts, OffloadedLinear
from ..layers.offloaded_experts import expert_weight, is_experts_module, projection_shape
from .deepseek2 import LatentKVProjection, deepseek2_metadata, split_kv_b
from .gguf_model import permute_rows
from .glm4moe import glm4moe_metadata
from .gpt_oss import gpt_oss_metadata
from .gguf_names import (DEEPSEEK2_ARCHITECTURES, GEMMA_ARCHITECTURES, GLM4MOE_ARCHITECTURES, GPT_OSS_ARCHITECTURES,
                         HF_TO_GGUF_ARCHITECTURE, LATENT_KV_MODULE, MOE_ARCHITECTURES, OUTPUT,
                         PERMUTED_QK_ARCHITECTURES, SLIDING_WINDOW_ARCHITECTURES, hf_to_gguf_name, qk_side)
from .gemma import gemma_metadata
from .gguf_rope import config_rope_metadata
from .gguf_vocab import byte_level_vocab, synthetic_spm_vocab, vocab_metadata
from .offload import _format_for

# Per-tensor overrides approximating llama.cpp's mixed presets (GGUF-name glob -> qtype).
MIXES: dict[str, dict[str, str]] = {
    "q4_k_m": {"*.attn_v.weight": "q6_k", "*.ffn_down.weight": "q6_k", "*.ffn_down_exps.weight": "q6_k",
               "*.ffn_down_shexp.weight": "q6_k", "output.weight": "q6_k"},
    "q3_k_m": {"*.attn_v.weight": "q5_k", "*.ffn_down.weight": "q5_k", "*.ffn_down_exps.weight": "q5_k",
               "*.ffn_down_shexp.weight": "q5_k", "output.weight": "q6_k"},
    "q2_k": {"*.attn_v.weight": "q3_k", "*.attn_output.weight": "q3_k", "*.ffn_down.weight": "q3_k",
             "*.ffn_down_exps.weight": "q3_k", "*.ffn_down_shexp.weight": "q3_k", "output.weight": "q6_k"},
}

_FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16}

# Control tokens llama.cpp's vocabulary loader looks up by their text for an architecture (and fails to load
# the file without): phi3's end-of-text.
_ARCH_CONTROL_TOKENS = {"phi3": ("<|endoftext|>",)}
# The pre-tokenizer name llama.cpp's converter writes for an architecture, where several names share its split.
PREFERRED_PRE_TOKENIZERS = {"glm4moe": ("glm4",), "gpt-oss": ("gpt-4o",), "deepseek2": ("deepseek-v3",),
                            "qwen2": ("qwen2",), "qwen3": ("qwen2",),
                            "qwen2moe": ("qwen2",), "qwen3moe": ("qwen2",)}


def _choose_qtype(gguf_name: str, k: int, default: str, overrides: Mapping[str, str]) -> Optional[str]:
    """The tensor's format: its override or the default; for rows of k weights that format's blocks cannot
    tile, llama-quantize's fallback (LLAMA_QUANTIZE_FALLBACKS: q4_k -> q5_0, ...), else None (f16)."""
    q = next((q for pat, q in overrides.items() if fnmatch.fnmatchcase(gguf_name, pat)), default)
    if q is None or q in _FLOAT_TYPES:
        return q
    return _format_for(k, q, LLAMA_QUANTIZE_FALLBACKS)[0]      # offload(fallback_qtype=...)'s rule


def save_gguf(model: nn.Module, path: "str | os.PathLike[str]", qtype: str = "q4_k", *,
              mix: Optional[str] = None, qtype_overrides: Optional[Mapping[str, str]] = None,
              vocab: Optional[dict] = None, tokenizer: Any = None, name: Optional[str] = None,
              fuse_gate_up_exps: bool = False, split_max_tensors: int = 0) -> Path:
    """Write ``model`` (a transformers llama/mistral/qwen2/qwen3/phi3/gemma2/gemma3 text CausalLM, or the MoE
    qwen2_moe/qwen3_moe/mixtral/glm4_moe/gpt_oss/deepseek_v3, the last as an MLA file: kv_b_proj split into
    attn_k_b and attn_v_b) as a GGUF file llama.cpp can load. Settings llama.cpp would not
    reproduce (rope scaling it cannot read, a Gemma attention scale or layer pattern other than the one it derives,
    gpt-oss's YaRN without truncate or a sliding pattern it cannot express) raise ValueError before anything is
    written.

    ``qtype`` is a GGUF block format, or "f32"/"f16" for unquantized matrices.
    ``mix`` picks per-tensor overrides ("q4_k_m", "q3_k_m", "q2_k": llama-quantize's presets of those names,
    approximately); ``qtype_overrides`` adds GGUF-name globs.
    ``vocab`` is a vocabulary dict (``gguf_vocab``): SentencePiece-style {"tokens", "scores", "token_type", "bos",
    "eos", "unk"}, or a byte-level BPE one from ``gguf_vocab.byte_level_vocab(tokenizer, pre)`` (llama.cpp then
    tokenizes as the model's own tokenizer does); or ``tokenizer``, the model's byte-level BPE tokenizer (a
    transformers fast tokenizer), from which that dict is built with the llama.cpp pre-tokenizer whose split matches
    its own (``gguf_vocab.pre_tokenizer_name``; a SentencePiece tokenizer needs ``vocab``). With neither, a
    synthetic SentencePiece-style vocabulary of the model's vocab_size is written.
    ``fuse_gate_up_exps`` writes each MoE block's gate and up expert stacks as one ffn_gate_up_exps (each expert's
    gate rows, then its up rows), as llama.cpp's converter does with ``--fuse-gate-up-exps``.
    ``split_max_tensors`` > 0 splits the file as llama.cpp's gguf-split does (``<stem>-00001-of-0000N.gguf``, ...,
    at most that many tensors each); the first part's path is returned.
    """
    overrides = _check_qtypes(qtype, mix, qtype_overrides)   # before anything is looked up or computed
    if not isinstance(fuse_gate_up_exps, bool):
        raise TypeError(f"fuse_gate_up_exps must be a bool, got {fuse_gate_up_exps!r}")
    check_split_max_tensors(split_max_tensors)
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"save_gguf expects a transformers causal LM (an nn.Module with a config), got "
                        f"{type(model).__name__}")
    config = model.config
    model_type = config.model_type
    if model_type not in HF_TO_GGUF_ARCHITECTURE:
        raise ValueError(f"save_gguf supports {', '.join(HF_TO_GGUF_ARCHITECTURE)} models, got {model_type!r}")
    arch = HF_TO_GGUF_ARCHITECTURE[model_type]
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    default_head_dim = config.hidden_size // n_heads
    head_dim = getattr(config, "head_dim", None) or default_head_dim
    if arch in GEMMA_ARCHITECTURES:
        arch_md = gemma_metadata(config, arch)
    elif arch in GLM4MOE_ARCHITECTURES:         # llama.cpp reads glm4moe's routing and rotary settings too
        arch_md = {**config_rope_metadata(config, partial_rotary=True), **glm4moe_metadata(config, head_dim)}
    elif arch in GPT_OSS_ARCHITECTURES:         # its sliding-window pattern, head size and YaRN
        arch_md = gpt_oss_metadata(config)
    elif arch in DEEPSEEK2_ARCHITECTURES:       # latent ranks, per-head sizes, routing groups, YaRN's mscale
        arch_md = deepseek2_metadata(config)
    else:
        arch_md = config_rope_metadata(config)
    if tokenizer is not None:
        if vocab is not None:
            raise ValueError("save_gguf takes vocab or tokenizer, not both")
        vocab = byte_level_vocab(tokenizer, prefer=PREFERRED_PRE_TOKENIZERS.get(arch, ()))
    vocab = vocab or synthetic_spm_vocab(config.vocab_size, _ARCH_CONTROL_TOKENS.get(arch, ()))
    vocab_md = vocab_metadata(vocab, config.vocab_size)       # checked before quantizing the whole model

    renormalizes = arch != "qwen2moe"          # llama.cpp's qwen2moe weights the chosen experts as routed
    own_rule = GLM4MOE_ARCHITECTURES + GPT_OSS_ARCHITECTURES + DEEPSEEK2_ARCHITECTURES
    if (arch in MOE_ARCHITECTURES and arch not in own_rule
            and getattr(config, "norm_topk_prob", renormalizes) != renormalizes):
        raise ValueError(f"llama.cpp's {arch} {'renormalizes' if renormalizes else 'does not renormalize'} the "
                         f"chosen experts' weights; this model has norm_topk_prob={config.norm_topk_prob}, which it "
                         f"would not reproduce")
    tensors: dict[str, "QuantizedTensor | torch.Tensor"] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())
    expert_modules = {n: m for n, m in modules.items() if isinstance(m, OffloadedExperts) or is_experts_module(m)}
    if expert_modules and arch not in MOE_ARCHITECTURES:
        raise ValueError(f"{next(iter(expert_modules))} is an experts module, which GGUF architecture {arch} has no "
                         f"tensors for")
    for module_name, experts in expert_modules.items():
        _add_expert_stacks(tensors, shapes, module_name, experts, qtype, overrides)
        if fuse_gate_up_exps:
            _fuse_gate_up(tensors, shapes, module_name)
    for hf_name, value in list(model.state_dict(keep_vars=False).items()):
        module_name = hf_name.rpartition(".")[0]
        if arch in DEEPSEEK2_ARCHITECTURES and LATENT_KV_MODULE in module_name:
            _add_latent_kv(tensors, shapes, hf_name, modules, value, config, qtype, overrides)
            continue
        if isinstance(modules.get(module_name), OffloadedLinear):
            if hf_name.endswith(".weight"):
                value = modules[module_name].quantized_weight()
            elif not hf_name.endswith(".bias"):
                continue                                       # weight_format: encoded in the GGUF type
        gguf_name = hf_to_gguf_name(hf_name, arch)
        if gguf_name is None:
            continue
        if getattr(config, "tie_word_embeddings", False) and gguf_name == OUTPUT and arch not in GPT_OSS_ARCHITECTURES:
            continue                                           # (llama.cpp's gpt-oss always reads output.weight)
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
        if gguf_name.endswith("ffn_gate_inp.weight"):         # the router stays f32, as llama-quantize keeps it
            tensors[gguf_name] = w
            continue
        if gguf_name.endswith("ffn_gate_inp_shexp.weight"):   # the shared expert's gate: one row, stored 1-D
            tensors[gguf_name] = w.reshape(-1)
            continue
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
        **vocab_md,
    }
    window = getattr(config, "sliding_window", None) if arch in SLIDING_WINDOW_ARCHITECTURES else None
    if window:
        md[f"{arch}.attention.sliding_window"] = int(window)
    if arch == "qwen2moe":
        md[f"{arch}.expert_shared_feed_forward_length"] = int(config.shared_expert_intermediate_size)
    if expert_modules:
        count = getattr(config, "num_local_experts", None) or config.num_experts
        width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        md[f"{arch}.expert_count"] = int(count)
        md[f"{arch}.expert_used_count"] = int(config.num_experts_per_tok)
        md[f"{arch}.expert_feed_forward_length"] = int(width)
    if head_dim != default_head_dim or config.hidden_size % n_heads or arch in GEMMA_ARCHITECTURES:
        # An explicit head_dim (Mistral Nemo style): llama.cpp otherwise takes hidden_size / heads. Gemma: always,
        # as llama.cpp's converter does (transformers' reader would otherwise take Gemma's default head_dim, 256).
        md[f"{arch}.attention.key_length"] = int(head_dim)
        md[f"{arch}.attention.value_length"] = int(head_dim)
    md.update({f"{arch}.{key}": value for key, value in arch_md.items()})   # the architecture's own word is last
    return write_gguf(path, tensors, md, architecture=arch, shapes=shapes, split_max_tensors=split_max_tensors)


def _add_latent_kv(tensors: dict, shapes: dict, hf_name: str, modules: Mapping[str, nn.Module],
                   value: torch.Tensor, config, qtype: str, overrides: Mapping[str, Optional[str]]) -> None:
    """One state_dict entry of a deepseek_v3 block's kv_b_proj, written as llama.cpp's MLA files hold it: attn_k_b
    (heads x kv_lora_rank x qk_nope, each head's k rows transposed) and attn_v_b (heads x v_head x kv_lora_rank).
    A LatentKVProjection (a loaded MLA file) gives k_proj's rows and v_proj's own bytes; an nn.Linear is split."""
    module_name, _, what = hf_name.rpartition(".")
    m = re.match(rf"^model\.layers\.(\d+)\.{re.escape(LATENT_KV_MODULE)}(?:\.(k_proj|v_proj))?$", module_name)
    if m is None or what not in ("weight", "weight_format"):
        raise ValueError(f"{hf_name}: not a weight of a block's {LATENT_KV_MODULE}")
    blk, part = f"blk.{m.group(1)}", m.group(2)
    heads, nope, v_head = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    module = modules[module_name]
    if part is not None and not isinstance(modules[module_name.rpartition(".")[0]], LatentKVProjection):
        raise ValueError(f"{module_name}: expected a LatentKVProjection's {part}")
    if isinstance(module, OffloadedLinear):
        if what != "weight":                # weight_format is encoded in the GGUF type
            return
        if part == "v_proj":                # attn_v_b's rows are v_proj's: its bytes as they are
            w = module.quantized_weight()
            tensors[f"{blk}.attn_v_b.weight"] = w
            shapes[f"{blk}.attn_v_b.weight"] = (heads, v_head, w.shape[1])
            return
        w = module.dequantized_weight(torch.float32).cpu()     # to be transposed or split, then quantized
    else:
        w = value.detach().float().cpu()
    if part is None:                        # transformers' kv_b_proj: split as llama.cpp's converter does
        k_b, v_b = split_kv_b(w, heads, nope, v_head)
        parts = {"attn_k_b": k_b, "attn_v_b": v_b}
    elif part == "k_proj":
        parts = {"attn_k_b": w.reshape(heads, nope, -1).transpose(1, 2).contiguous()}
    else:
        parts = {"attn_v_b": w.reshape(heads, v_head, -1)}
    for short, t in parts.items():
        name = f"{blk}.{short}.weight"
        q = _choose_qtype(name, t.shape[-1], qtype, overrides)
        flat = t.reshape(-1, t.shape[-1])
        if q and q not in _FLOAT_TYPES:
            tensors[name] = quantize(flat, q)
            shapes[name] = tuple(t.shape)
        else:
            tensors[name] = t.to(_FLOAT_TYPES.get(q, torch.float16)).contiguous()


def _add_expert_stacks(tensors: dict, shapes: dict, module_name: str, experts: nn.Module, qtype: str,
                       overrides: Mapping[str, Optional[str]]) -> None:
    """An experts module's ffn_gate_exps, ffn_up_exps and ffn_down_exps (experts x rows x columns), and for one
    with biases (gpt-oss) their .bias tensors (experts x rows, f32): an OffloadedExperts' own bytes (each expert's
    gate_up rows split into its gate and up rows), or a float module's stacks quantized like any matrix (in a
    block format even when ``qtype`` is a float type: load_gguf_model reads expert stacks only quantized)."""
    m = re.match(r"^model\.layers\.(\d+)\.mlp\.experts$", module_name)
    if m is None or not experts.has_gate:
        raise ValueError(f"{module_name}: only model.layers.N.mlp.experts modules with gate and up rows can be "
                         f"written as GGUF expert stacks")
    blk = f"blk.{m.group(1)}"
    interleaved = not getattr(experts, "is_concatenated", True)      # gpt-oss: gate row i, then up row i
    if isinstance(experts, OffloadedExperts):
        gate_up = experts.gate_up_proj.quantized_weight()
        down = experts.down_proj.quantized_weight()
        e = experts.num_experts
        gate, up = _split_gate_up(gate_up.data.view(e, gate_up.shape[0] // e, gate_up.row_bytes), interleaved)
        half = gate.shape[1]
        for part, rows in (("gate", gate), ("up", up)):
            name = f"{blk}.ffn_{part}_exps.weight"
            tensors[name] = QuantizedTensor(rows.reshape(e * half, -1), gate_up.spec, (e * half, gate_up.shape[1]))
            shapes[name] = (e, half, gate_up.shape[1])
        tensors[f"{blk}.ffn_down_exps.weight"] = down
        shapes[f"{blk}.ffn_down_exps.weight"] = (e, down.shape[0] // e, down.shape[1])
        biases = {name: getattr(experts, name).bias for name in ("gate_up_proj", "down_proj")}
    else:
        e, two_i, h = projection_shape(experts, "gate_up_proj")
        w = torch.stack([expert_weight(experts, "gate_up_proj", i) for i in range(e)]).float().cpu()
        gate, up = _split_gate_up(w, interleaved)
        down = torch.stack([expert_weight(experts, "down_proj", i) for i in range(e)]).float().cpu()
        for part, stack in {"gate": gate, "up": up, "down": down}.items():
            name = f"{blk}.ffn_{part}_exps.weight"
            q = _choose_qtype(name, stack.shape[-1], qtype, overrides)
            if q is None or q in _FLOAT_TYPES:
                raise ValueError(f"{name}: expert stacks are written in a block format (load_gguf_model reads them "
                                 f"only quantized), got {q or 'f16'}; give a qtype_overrides entry for "
                                 f"'*_exps.weight'")
            tensors[name] = quantize(stack.reshape(-1, stack.shape[-1]), q)
            shapes[name] = tuple(stack.shape)
        biases = {name: experts._parameters.get(f"{name}_bias") if experts.has_bias else None
                  for name in ("gate_up_proj", "down_proj")}
    if experts.has_bias:
        gate_up_b, down_b = (biases[n].detach().float().cpu().reshape(e, -1) for n in ("gate_up_proj", "down_proj"))
        gate_b, up_b = _split_gate_up(gate_up_b.unsqueeze(-1), interleaved)
        for part, b in (("gate", gate_b.squeeze(-1)), ("up", up_b.squeeze(-1)), ("down", down_b)):
            tensors[f"{blk}.ffn_{part}_exps.bias"] = b.contiguous()


def _fuse_gate_up(tensors: dict, shapes: dict, module_name: str) -> None:
    """Replace a block's ffn_gate_exps and ffn_up_exps (and their biases) by one ffn_gate_up_exps: per expert the
    gate rows, then the up rows (llama.cpp's converter's torch.cat along the rows). Rows are quantized one by one,
    so the fused stack holds exactly the bytes of the two."""
    blk = "blk." + module_name.split(".")[2]
    gate, up = tensors.pop(f"{blk}.ffn_gate_exps.weight"), tensors.pop(f"{blk}.ffn_up_exps.weight")
    e, i, h = shapes.pop(f"{blk}.ffn_gate_exps.weight")
    shapes.pop(f"{blk}.ffn_up_exps.weight")
    if gate.spec.name != up.spec.name:
        raise ValueError(f"{blk}: ffn_gate_exps is {gate.spec.name} and ffn_up_exps {up.spec.name}; a fused "
                         f"ffn_gate_up_exps has one format")
    rows = torch.cat([gate.data.view(e, i, -1), up.data.view(e, i, -1)], dim=1).reshape(2 * e * i, -1)
    tensors[f"{blk}.ffn_gate_up_exps.weight"] = QuantizedTensor(rows, gate.spec, (2 * e * i, h))
    shapes[f"{blk}.ffn_gate_up_exps.weight"] = (e, 2 * i, h)
    if f"{blk}.ffn_gate_exps.bias" in tensors:
        gate_b, up_b = tensors.pop(f"{blk}.ffn_gate_exps.bias"), tensors.pop(f"{blk}.ffn_up_exps.bias")
        tensors[f"{blk}.ffn_gate_up_exps.bias"] = torch.cat([gate_b, up_b], dim=1).contiguous()


def _split_gate_up(rows: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up), each (experts, rows / 2, ...), from (experts, rows, ...) gate_up rows: all gate rows then all up
    rows per expert, or, ``interleaved``, alternating (gguf_model._join_gate_up's inverse)."""
    e, two_i = rows.shape[:2]
    if interleaved:
        pairs = rows.reshape(e, two_i // 2, 2, *rows.shape[2:])
        return pairs[:, :, 0].contiguous(), pairs[:, :, 1].contiguous()
    halves = rows.reshape(e, 2, two_i // 2, *rows.shape[2:])
    return halves[:, 0].contiguous(), halves[:, 1].contiguous()


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
