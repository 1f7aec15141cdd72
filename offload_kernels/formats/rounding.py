"""ggml's fp32 rounding helpers, reproduced exactly in torch.

ggml rounds with three different rules; matching its bytes means using the same one in each place:
``nearest_int`` (the 1.5*2^23 magic-number trick: round half to even, and its exact wrap-around for
out-of-range inputs), C ``roundf`` (half away from zero) and truncating casts.
"""

from __future__ import annotations

import torch

_MAGIC = 12582912.0  # 1.5 * 2**23: adding it leaves the rounded integer in the low mantissa bits


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` on fp32 values, as int32 (bit-exact, including its out-of-range results)."""
    bits = (x.float() + _MAGIC).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: round half away from zero (fp32 in, fp32 out, signed zeros kept).

    ``a - floor(a)`` is exact in fp32 for ``a = |x|`` (Sterbenz: floor(a) <= a < 2*floor(a) once a >= 1),
    so comparing it with 0.5 decides the rounding with no error; adding 0.5 first would round wrongly just
    below 0.5. Built from floor/abs/copysign because torch's CPU ``trunc`` is not vectorized.
    """
    a = x.abs()
    f = torch.floor(a)
    return f.add_(torch.sub(a, f).ge_(0.5)).copysign_(x)


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to fp16 (round to nearest even, as GGML_FP32_TO_FP16) as (..., 2) little-endian bytes."""
    return x.to(torch.float16).view(torch.uint8).view(*x.shape, 2)


def fp16_round_trip(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))."""
    return x.to(torch.float16).float()
