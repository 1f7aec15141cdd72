"""Rope scaling between GGUF metadata (``{arch}.rope.scaling.*``) and transformers' rope parameters.

Two scalings are carried, computed by both projects the same way: linear (positions divided by ``factor``)
and YaRN (frequencies interpolated by ``factor`` above the original context's correction range, cos/sin
scaled by 1 + 0.1 ln(factor)) with llama.cpp's defaults for an architecture that reads no YaRN keys of its
own (beta_fast 32, beta_slow 1, no extra attention factor). Anything else, either way, is an error naming the
setting: ignored, it would silently change every logit.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

from ..formats.gguf_io import GGUFError, GGUFFile

#: YaRN keys llama.cpp may read, with the values at which they change nothing here.
_YARN_NEUTRAL = {"yarn_ext_factor": (-1.0, 1.0), "yarn_attn_factor": (1.0,), "yarn_beta_fast": (32.0,),
                 "yarn_beta_slow": (1.0,), "yarn_log_multiplier": (0.0,), "attn_factor": (1.0,)}
#: transformers' YaRN defaults that equal llama.cpp's (key -> accepted values).
_HF_YARN_DEFAULTS = {"beta_fast": (None, 32, 32.0), "beta_slow": (None, 1, 1.0), "truncate": (None, True),
                     "attention_factor": (None,)}


def metadata_number(f: GGUFFile, key: str, nonnegative: bool = False) -> Optional[float]:
    """Metadata ``key`` of ``f`` as a float (None when absent); GGUFError naming it unless a finite number
    (and >= 0 when ``nonnegative``)."""
    value = f.metadata.get(key)
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (nonnegative and value < 0)):
        raise GGUFError(f"{f.path}: metadata {key} must be a {'non-negative ' if nonnegative else ''}number, "
                        f"got {value!r}")
    return float(value)


def metadata_positive_int(f: GGUFFile, key: str, default: Optional[int] = None) -> int:
    """Metadata ``key`` of ``f`` (``default`` when absent), a GGUFError naming it unless a positive integer."""
    value = f.metadata.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GGUFError(f"{f.path}: metadata {key} must be a positive integer, got {value!r}")
    return value


def read_rope_scaling(f: GGUFFile, accept: tuple[str, ...] = ()) -> Optional[dict]:
    """The transformers rope parameters (without rope_theta) for the scaling ``f`` declares; None for none.
    ``accept``: YaRN keys the caller reads itself (deepseek2's yarn_log_multiplier), not refused here."""
    arch = f.architecture
    prefix = f"{arch}.rope.scaling."
    kind = f.metadata.get(prefix + "type")
    factor = metadata_number(f, prefix + "factor")
    if kind in (None, "none"):
        legacy = metadata_number(f, f"{arch}.rope.scale_linear")          # the key older converters wrote
        if kind is None and legacy not in (None, 0.0, 1.0):
            if legacy < 0:
                raise GGUFError(f"{f.path}: metadata {arch}.rope.scale_linear must be positive, got {legacy}")
            return {"rope_type": "linear", "factor": legacy}
        return None
    if kind not in ("linear", "yarn"):
        raise GGUFError(f"{f.path}: rope scaling type {kind!r} is not supported (linear and yarn are)")
    if factor is None or factor <= 0:
        raise GGUFError(f"{f.path}: rope.scaling.type is {kind} but rope.scaling.factor is missing or not "
                        f"positive ({factor})")
    if kind == "linear":
        return None if factor == 1.0 else {"rope_type": "linear", "factor": factor}
    original = f.metadata.get(prefix + "original_context_length")
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise GGUFError(f"{f.path}: YaRN rope scaling needs a positive {prefix}original_context_length, "
                        f"got {original!r}")
    unusual = {key: value for key, neutral in _YARN_NEUTRAL.items()
               if key not in accept and (value := metadata_number(f, prefix + key)) is not None
               and value not in neutral}
    if unusual:
        raise GGUFError(f"{f.path}: YaRN settings {unusual} are not supported (only beta_fast 32, beta_slow 1 "
                        f"and no extra attention factor)")
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}


def require_rope_parameters(f: GGUFFile, config, what: str) -> None:
    """GGUFError unless ``config`` takes transformers 5's ``rope_parameters`` (transformers 4 would ignore them
    and compute unscaled rope)."""
    if not hasattr(config, "rope_parameters"):
        import transformers

        raise GGUFError(f"{f.path}: {what} needs transformers >= 5 (rope_parameters); this is transformers "
                        f"{transformers.__version__}")


def rope_scaling_metadata(params: Mapping, what: str = "the") -> tuple[Optional[float], dict]:
    """(rope_theta or None, ``rope.scaling.*`` metadata without the architecture prefix) for one transformers
    rope-parameter dict; ValueError for a scaling llama.cpp would not reproduce from the metadata."""
    p = dict(params or {})
    kind = p.pop("rope_type", p.pop("type", "default")) or "default"
    theta = p.pop("rope_theta", None)
    md: dict = {}
    if kind in ("linear", "yarn"):
        factor = p.pop("factor", None)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"save_gguf: {what} {kind} rope scaling needs a positive factor, got {factor!r}")
        md = {"rope.scaling.type": kind, "rope.scaling.factor": float(factor)}
        if kind == "yarn":
            original = p.pop("original_max_position_embeddings", None)
            if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
                raise ValueError(f"save_gguf: {what} YaRN rope scaling needs original_max_position_embeddings, "
                                 f"got {original!r}")
            md["rope.scaling.original_context_length"] = original
            for key, accepted in _HF_YARN_DEFAULTS.items():
                if key in p and p.pop(key) not in accepted:
                    raise ValueError(f"save_gguf: {what} YaRN {key}={params[key]!r} cannot be written: llama.cpp "
                                     f"uses its default for this architecture")
    elif kind != "default":
        raise ValueError(f"save_gguf: {what} rope scaling {dict(params)!r} cannot be expressed in GGUF metadata "
                         f"(plain, linear and yarn only); rope_type {kind!r} would be lost")
    if p:
        raise ValueError(f"save_gguf: {what} rope scaling {dict(params)!r} cannot be expressed in GGUF metadata; "
                         f"rope_type {kind!r}, keys {', '.join(sorted(p))} would be lost")
    return (None if theta is None else float(theta)), md


def config_rope_metadata(config, partial_rotary: bool = False) -> dict:
    """The rope metadata of a model with one rope for every layer: rope.freq_base, and linear or YaRN scaling
    (:func:`rope_scaling_metadata`); anything llama.cpp would not reproduce is a ValueError. Keys without the
    architecture prefix. Reads transformers 4's (rope_theta, rope_scaling) and 5's (rope_parameters) names.
    ``partial_rotary``: the caller writes the rotated dimensions itself (GLM-4.5), so a partial_rotary_factor
    is accepted."""
    params: dict = {}
    for attr in ("rope_scaling", "rope_parameters"):       # transformers 4 / 5 names
        value = getattr(config, attr, None)
        if isinstance(value, Mapping):
            params.update(value)
        elif value is not None:
            raise ValueError(f"save_gguf: config.{attr}={value!r} cannot be written to GGUF metadata")
    # transformers 5 keeps partial_rotary_factor (phi3) among the rope parameters, 4 on the config
    partial = params.pop("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0) and not partial_rotary:
        raise ValueError(f"save_gguf: partial_rotary_factor={partial} cannot be written (full rotary only)")
    theta, md = rope_scaling_metadata(params, "the config's")
    if theta is None:                                      # transformers 4 keeps it on the config
        theta = getattr(config, "rope_theta", None)
        theta = 10000.0 if theta is None else float(theta)
    return {"rope.freq_base": theta, **md}
