"""OpenAI gpt-oss (llama.cpp's gpt-oss, LLM_ARCH_OPENAI_MOE; transformers' gpt_oss): the config from a GGUF file's
metadata, and the metadata from a config.

:func:`gpt_oss_config` reads the keys llama.cpp's loader reads into a ``GptOssConfig`` (transformers' own GGUF
reader maps tensors under other names), :func:`gpt_oss_metadata` writes them back for save_gguf. What llama.cpp
computes and transformers' classes must agree on:

* attention with biases on q, k, v and o, one learned sink logit per head (``attn_sinks``) joining each row's
  softmax and then dropped, scaled by 1/sqrt(head size); q and k rotated in the neox layout over the whole head
  (llama.cpp reshapes the heads by ``rope.dimension_count``, so it must equal the head size);
* sliding-window layers: llama.cpp's ``set_swa_pattern(p)`` (``attention.sliding_window_pattern``, default 2)
  makes layer i slide unless i % p == p - 1 (all slide for p = 0), over the last ``attention.sliding_window``
  positions (the query's own included), which is transformers' ``layer_types`` and ``sliding_window``;
* routing: the top k router logits (biased) chosen, weighted by the softmax over those k
  (LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT), as GptOssTopKRouter does; no weight scale;
* experts: gate and up with biases, llama.cpp's swiglu_oai with alpha 1.702 and limit 7.0 hard-coded
  (min(gate, limit) * sigmoid(alpha * that) * (clamp(up, -limit, limit) + 1)), down with bias, then the weight;
* YaRN with llama.cpp's correction range rounded outward to whole dimensions (transformers' ``truncate=True``;
  gpt-oss configs default to False) and its 1 + 0.1 ln(factor) attention factor, beta_fast 32, beta_slow 1.
"""

from __future__ import annotations

import math

from ..formats.gguf_io import GGUFError, GGUFFile
from .gguf_names import EMBEDDING
from .gguf_rope import (config_rope_metadata, metadata_number, metadata_positive_int, read_rope_scaling,
                        require_rope_parameters)
from .shapes import expert_used_count

ARCH = "gpt-oss"
#: llama.cpp's swiglu_oai constants for gpt-oss (build_moe_ffn, LLM_FFN_SWIGLU_OAI_MOE): not read from the file.
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0
#: llama.cpp's sliding-window period for gpt-oss when the file gives none: even layers slide, odd ones do not.
DEFAULT_SWA_PERIOD = 2
SLIDING, FULL = "sliding_attention", "full_attention"


def sliding_layers(n_layers: int, period: int) -> list[bool]:
    """Which layers slide under llama.cpp's set_swa_pattern(period): all but the last of each period's layers
    (period 0: every layer; period 1: none)."""
    return [period == 0 or i % period < period - 1 for i in range(n_layers)]


def gpt_oss_config(f: GGUFFile):
    """The ``GptOssConfig`` that a gpt-oss file's metadata describes (the head size is set afterwards by
    gguf_model's _set_head_dim, which also refuses a rope.dimension_count other than the head size)."""
    from transformers import GptOssConfig

    require_rope_parameters(f, GptOssConfig, "gpt-oss")    # transformers 4 would ignore the rope we give it
    md = f.metadata

    def positive(key: str, default=None) -> int:
        return metadata_positive_int(f, f"{ARCH}.{key}", default)

    def number(key: str, default: float) -> float:
        value = metadata_number(f, f"{ARCH}.{key}")
        return default if value is None else value

    layers = positive("block_count")
    heads = positive("attention.head_count")
    experts = positive("expert_count")
    vocab = md.get(f"{ARCH}.vocab_size") or (f.info(EMBEDDING).shape[0] if EMBEDDING in f else None)
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise GGUFError(f"{f.path}: no vocabulary size ({ARCH}.vocab_size or the {EMBEDDING} tensor)")
    _refuse_what_transformers_computes_differently(f)
    period = _swa_period(f)
    swiglu = ({"swiglu_alpha": SWIGLU_ALPHA, "swiglu_limit": SWIGLU_LIMIT}
              if hasattr(GptOssConfig, "swiglu_alpha") else {})     # older transformers hard-codes the same two
    try:
        return GptOssConfig(
            vocab_size=vocab, hidden_size=positive("embedding_length"),
            intermediate_size=positive("expert_feed_forward_length"),     # transformers' experts' width
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=positive("attention.head_count_kv", heads),
            max_position_embeddings=positive("context_length", 4096),
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5),
            rope_parameters=_rope_parameters(f, number("rope.freq_base", 10000.0)),
            sliding_window=positive("attention.sliding_window"),
            layer_types=[SLIDING if s else FULL for s in sliding_layers(layers, period)],
            num_local_experts=experts, num_experts_per_tok=expert_used_count(f, experts),
            attention_bias=True, tie_word_embeddings=False,
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"), eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
            **swiglu)
    except GGUFError:
        raise
    except Exception as exc:            # the config class's own checks (heads not dividing, ...)
        raise GGUFError(f"{f.path}: cannot build a gpt-oss config from the file's metadata "
                        f"({type(exc).__name__}: {exc})") from exc


def _refuse_what_transformers_computes_differently(f: GGUFFile) -> None:
    """Keys newer llama.cpp reads for gpt-oss that transformers' model has no counterpart for, unless neutral:
    a rope base of its own for the sliding layers, scaled expert weights, sliding layers of another head size."""
    md = f.metadata
    base, base_swa = metadata_number(f, f"{ARCH}.rope.freq_base"), metadata_number(f, f"{ARCH}.rope.freq_base_swa")
    if base_swa is not None and base_swa != (10000.0 if base is None else base):
        raise GGUFError(f"{f.path}: {ARCH}.rope.freq_base_swa={base_swa} differs from rope.freq_base={base}: "
                        f"transformers' gpt-oss rotates every layer with one base")
    scale = metadata_number(f, f"{ARCH}.expert_weights_scale")
    if scale not in (None, 0.0, 1.0):
        raise GGUFError(f"{f.path}: {ARCH}.expert_weights_scale={scale}: transformers' gpt-oss does not scale the "
                        f"experts' weights")
    for kind in ("key", "value"):
        swa, full = md.get(f"{ARCH}.attention.{kind}_length_swa"), md.get(f"{ARCH}.attention.{kind}_length")
        if swa is not None and swa != full:
            raise GGUFError(f"{f.path}: {ARCH}.attention.{kind}_length_swa={swa!r} differs from "
                            f"{kind}_length={full!r}: transformers' gpt-oss has one head size")


def _swa_period(f: GGUFFile) -> int:
    key = f"{ARCH}.attention.sliding_window_pattern"
    period = f.metadata.get(key, DEFAULT_SWA_PERIOD)
    if isinstance(period, bool) or not isinstance(period, int) or period < 0:
        raise GGUFError(f"{f.path}: metadata {key} must be a non-negative integer (the sliding-window period), got "
                        f"{period!r}")
    return period


def _rope_parameters(f: GGUFFile, theta: float) -> dict:
    """transformers' rope parameters for the file: llama.cpp's YaRN (gguf_rope) with its rounded correction
    range, or plain rope (GptOssConfig would otherwise default to its own YaRN)."""
    scaling = read_rope_scaling(f)
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    if scaling["rope_type"] == "yarn":
        scaling = {**scaling, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}
    return {**scaling, "rope_theta": theta}


def gpt_oss_metadata(config) -> dict:
    """The gpt-oss keys (without the architecture prefix) llama.cpp reads beyond the generic ones: rope,
    the sliding window and its period, the head size; a ValueError for what llama.cpp would compute
    differently (other SwiGLU constants, YaRN with an unrounded correction range, a layer pattern it cannot
    express)."""
    alpha = float(getattr(config, "swiglu_alpha", SWIGLU_ALPHA))
    limit = float(getattr(config, "swiglu_limit", SWIGLU_LIMIT))
    if not (math.isclose(alpha, SWIGLU_ALPHA, rel_tol=1e-6) and math.isclose(limit, SWIGLU_LIMIT, rel_tol=1e-6)):
        raise ValueError(f"save_gguf: swiglu_alpha={alpha}, swiglu_limit={limit}: llama.cpp's gpt-oss computes "
                         f"its experts with alpha {SWIGLU_ALPHA} and limit {SWIGLU_LIMIT}")
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type") == "yarn" and params.get("truncate") is False:
        raise ValueError("save_gguf: YaRN truncate=False (gpt-oss's default) cannot be written: llama.cpp rounds "
                         "the correction range to whole dimensions, as transformers does with "
                         "rope_parameters['truncate'] = True; set that to write this model")
    period = layer_period(config)
    window = getattr(config, "sliding_window", None)
    sliding = any(sliding_layers(config.num_hidden_layers, period))
    if sliding and not (isinstance(window, int) and window > 0):
        raise ValueError(f"save_gguf: sliding_attention layers need a positive sliding_window, got {window!r}")
    md = {**config_rope_metadata(config), "attention.sliding_window": int(window or config.max_position_embeddings),
          "attention.key_length": int(config.head_dim), "attention.value_length": int(config.head_dim)}
    if period != DEFAULT_SWA_PERIOD:
        md["attention.sliding_window_pattern"] = period
    return md


def layer_period(config) -> int:
    """The sliding-window period whose llama.cpp pattern is ``config.layer_types``; ValueError when none is."""
    types = list(getattr(config, "layer_types", None) or [])
    n = config.num_hidden_layers
    if len(types) != n or set(types) - {SLIDING, FULL}:
        raise ValueError(f"save_gguf: layer_types {types!r} are not {n} of {SLIDING!r} / {FULL!r}")
    pattern = [t == SLIDING for t in types]
    for period in (DEFAULT_SWA_PERIOD, *range(0, n + 1)):
        if sliding_layers(n, period) == pattern:
            return period
    raise ValueError(f"save_gguf: layer_types {types!r} are not a pattern llama.cpp can express (each period's "
                     f"layers sliding but the last: attention.sliding_window_pattern)")
