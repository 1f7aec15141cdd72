"""Gemma 2 and Gemma 3 (text) in GGUF: the settings llama.cpp derives instead of reading, both directions.

A GGUF file does not say everything transformers' Gemma needs; llama.cpp fills the rest in by rule:

* which layers use sliding-window attention: the last layer of every period of 2 (gemma2) or 6 (gemma3) is
  global, the others slide (``attention.sliding_window`` gives the window);
* the query scale: 1/sqrt(head_dim), except for the 27B models (recognised by their layer count), whose
  queries are scaled by 1/sqrt(hidden / heads) (transformers' ``query_pre_attn_scalar``);
* gemma3's sliding layers rotate with base 10000 and no scaling; its global layers use ``rope.freq_base``
  and any ``rope.scaling`` (gguf_rope);
* soft-capping: gemma2 caps attention scores and logits (50 and 30 unless the file says otherwise), gemma3
  with sliding windows caps neither.

:func:`configure_gemma` applies those rules to the transformers config the loader builds;
:func:`gemma_metadata` is the exporter's side: it writes the keys llama.cpp reads and refuses a config
those rules would not reproduce, so a saved model computes the same function in llama.cpp.
"""

from __future__ import annotations

from typing import Mapping, Optional

from ..formats.gguf_io import GGUFError, GGUFFile
from .gguf_rope import (config_rope_metadata, metadata_number, read_rope_scaling, require_rope_parameters,
                        rope_scaling_metadata)

#: Every SWA_PERIOD[arch]-th layer (the last of each period) attends globally, as llama.cpp's set_swa_pattern.
SWA_PERIOD = {"gemma2": 2, "gemma3": 6}
#: Layer counts llama.cpp takes for the 27B models, whose query scale is 1/sqrt(hidden / heads).
LAYERS_OF_27B = {"gemma2": 46, "gemma3": 62}
#: gemma2's soft-caps when the file names none (llama.cpp's defaults, also transformers').
GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
#: gemma2's window when the file names none (llama.cpp's default).
GEMMA2_DEFAULT_WINDOW = 4096
#: Rope base of gemma3's sliding layers (fixed in llama.cpp, not read from the file).
GEMMA3_LOCAL_ROPE_BASE = 10000.0
#: The FFN activation llama.cpp computes for Gemma (GELU, tanh approximation).
GEMMA_ACTIVATION = "gelu_pytorch_tanh"


def layer_types(arch: str, n_layers: int, sliding: bool = True) -> list[str]:
    """transformers' layer_types for llama.cpp's sliding-window pattern (all global when not ``sliding``)."""
    period = SWA_PERIOD[arch]
    return ["sliding_attention" if sliding and (i + 1) % period else "full_attention" for i in range(n_layers)]


def query_pre_attn_scalar(arch: str, n_layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """The number whose inverse square root llama.cpp scales queries by (transformers' query_pre_attn_scalar)."""
    return hidden // heads if n_layers == LAYERS_OF_27B[arch] else head_dim


# ------------------------------------------------------------------------------------------------ loading
def _rope(theta: float, scaling: Optional[dict]) -> dict:
    return {"rope_type": "default", "rope_theta": float(theta), **(scaling or {})}


def configure_gemma(f: GGUFFile, config) -> None:
    """Complete the transformers config of a gemma2/gemma3 file with llama.cpp's rules (module docstring)."""
    arch = f.architecture
    require_rope_parameters(f, config, f"architecture {arch}")
    n = config.num_hidden_layers
    window = f.metadata.get(f"{arch}.attention.sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise GGUFError(f"{f.path}: metadata {arch}.attention.sliding_window must be a non-negative integer, "
                        f"got {window!r}")
    if arch == "gemma2" and window is None:
        window = GEMMA2_DEFAULT_WINDOW
    sliding = bool(window)
    config.sliding_window = int(window) if sliding else None
    config.layer_types = layer_types(arch, n, sliding)
    config.query_pre_attn_scalar = query_pre_attn_scalar(arch, n, config.hidden_size, config.num_attention_heads,
                                                         config.head_dim)
    config.hidden_activation = GEMMA_ACTIVATION
    theta = metadata_number(f, f"{arch}.rope.freq_base", nonnegative=True) or 10000.0
    scaling = read_rope_scaling(f)
    if arch == "gemma2":
        for key, default in GEMMA2_SOFTCAPS.items():
            value = metadata_number(f, f"{arch}.{key}", nonnegative=True)
            setattr(config, key, default if value is None else value or None)
        config.rope_parameters = _rope(theta, scaling)
    else:
        config.attn_logit_softcapping = None
        final = metadata_number(f, f"{arch}.final_logit_softcapping", nonnegative=True)
        # llama.cpp's sliding-window gemma3 graph applies no final soft-cap; the full-attention one, the file's
        config.final_logit_softcapping = final if final and not sliding else None
        config.rope_parameters = {"full_attention": _rope(theta, scaling),
                                  "sliding_attention": _rope(GEMMA3_LOCAL_ROPE_BASE, None)}


# ------------------------------------------------------------------------------------------------ saving
def gemma_metadata(config, arch: str) -> dict:
    """The gemma2/gemma3 metadata (keys without the ``arch.`` prefix; "rope.freq_base" included) for
    ``config``, after checking that llama.cpp's rules (module docstring) reproduce it. ValueError otherwise."""
    n = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    problems = []
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if activation != GEMMA_ACTIVATION:
        problems.append(f"hidden_activation {activation!r} (llama.cpp computes {GEMMA_ACTIVATION!r})")
    if getattr(config, "use_bidirectional_attention", None):
        problems.append("use_bidirectional_attention=True (llama.cpp's Gemma is causal)")
    window = getattr(config, "sliding_window", None)
    if not window:
        problems.append("no sliding_window (llama.cpp's Gemma uses one)")
    elif list(config.layer_types) != layer_types(arch, n):
        problems.append(f"layer_types {list(config.layer_types)} (llama.cpp: every {SWA_PERIOD[arch]}th layer "
                        f"global, the others sliding)")
    expected = query_pre_attn_scalar(arch, n, config.hidden_size, config.num_attention_heads, head_dim)
    if config.query_pre_attn_scalar != expected:
        problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} (llama.cpp derives {expected} "
                        f"for {n} layers)")
    md: dict = {"attention.sliding_window": int(window or 0)}
    if arch == "gemma2":
        for key in GEMMA2_SOFTCAPS:
            value = getattr(config, key, None)
            if not value:
                problems.append(f"{key}={value!r} (llama.cpp's gemma2 always soft-caps)")
            else:
                md[key] = float(value)
        md.update(config_rope_metadata(config))          # one rope for every layer, as llama's
    else:
        for key in GEMMA2_SOFTCAPS:
            if getattr(config, key, None):
                problems.append(f"{key}={getattr(config, key)!r} (llama.cpp's sliding-window gemma3 does not "
                                f"soft-cap)")
        params = getattr(config, "rope_parameters", None) or {}
        if not isinstance(params, Mapping) or set(params) != {"full_attention", "sliding_attention"}:
            raise ValueError(f"save_gguf: gemma3 rope_parameters {params!r} must give full_attention and "
                             f"sliding_attention parameters")
        theta, scaling = rope_scaling_metadata(params["full_attention"], "the full_attention")
        md.update({"rope.freq_base": 10000.0 if theta is None else theta, **scaling})
        local = rope_scaling_metadata(params["sliding_attention"], "the sliding_attention")
        if local != (GEMMA3_LOCAL_ROPE_BASE, {}):
            problems.append(f"sliding_attention rope {params['sliding_attention']!r} (llama.cpp: base "
                            f"{GEMMA3_LOCAL_ROPE_BASE:g}, unscaled)")
    if problems:
        raise ValueError(f"save_gguf: this {arch} config cannot be written so that llama.cpp computes the same "
                         f"model: " + "; ".join(problems))
    return md
