"""The 32-weight ("legacy") formats' quantizers, byte-identical to ggml's ``quantize_row_<type>_ref`` for
q4_0, q4_1, q5_0, q5_1 and q8_0."""

from __future__ import annotations

import torch

from .rounding import fp16_bytes, roundf


def _signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |x|, the first element of that magnitude) per row, as ggml's strict ``amax < |v|`` scan finds them.

    A row whose largest magnitude occurs with one sign only (nearly all rows) needs no index search; rows
    holding both +m and -m fall back to argmax. All-zero rows keep the scan's initial +0.0.
    """
    lo, hi = x.amin(dim=1), x.amax(dim=1)      # two passes beat torch's CPU aminmax(dim=1) ~5x on short rows
    amax = torch.maximum(hi.abs(), lo.abs())           # abs: an all-zero row gives +0.0, as in ggml
    has_pos, has_neg = hi == amax, -lo == amax
    vmax = torch.where(has_pos, amax, -amax)
    both = (has_pos & has_neg & (amax > 0)).nonzero().squeeze(1)
    if both.numel():
        rows = x[both]
        first = torch.argmax(rows.abs(), dim=1, keepdim=True)
        vmax[both] = torch.gather(rows, 1, first).squeeze(1)
    vmax = torch.where(amax > 0, vmax, torch.zeros_like(vmax))
    return amax, vmax


def _inverse_or_zero(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / d, torch.zeros_like(d))


def quantize_q4_0_blocks(x: torch.Tensor) -> torch.Tensor:
    """(nb, 32) fp32 -> (nb, 18) uint8. d = (value of largest magnitude) / -8; q = min(15, trunc(x/d + 8.5))."""
    _, vmax = _signed_absmax(x)
    d = vmax / -8.0                                   # a power of two: exact as a multiply, too
    y = x * _inverse_or_zero(d)[:, None]
    # ggml casts (x*id + 8.5f) to int8_t (truncation; never negative here), then clamps to 15. When d is
    # so small that 1/d overflows, x*id is +-inf or NaN and x86's conversion yields 0x80000000, whose low
    # byte is 0: nan_to_num reproduces that.
    # |y| <= 8 (up to rounding of 1/d), so y + 8.5 lies in [0, 17): the int32 cast is the truncation itself,
    # and clamping and packing in int32 is cheaper than in float or uint8 on CPU.
    q = y.add_(8.5).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).to(torch.int32).clamp_(max=15)
    qs = (q[:, :16] | (q[:, 16:] << 4)).to(torch.uint8)
    return torch.cat([fp16_bytes(d), qs], dim=1)


def quantize_q8_0_blocks(x: torch.Tensor) -> torch.Tensor:
    """(nb, 32) fp32 -> (nb, 34) uint8. d = max|x| / 127; q = roundf(x * (1/d))."""
    amax, _ = _signed_absmax(x)
    # A tensor divisor: torch's CUDA kernels turn division by a Python scalar into a multiply by its
    # reciprocal, which is not the IEEE quotient ggml computes.
    d = amax / torch.full_like(amax, 127.0)
    # ggml stores roundf(x * id) into int8_t; as for q4_0, +-inf/NaN (1/d overflowed) convert to 0 on x86.
    y = roundf(x * _inverse_or_zero(d)[:, None]).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    q = y.to(torch.int8).view(torch.uint8)
    return torch.cat([fp16_bytes(d), q], dim=1)


def _first_min(x: torch.Tensor) -> torch.Tensor:
    """The per-row minimum as ggml's strict ``v < min`` scan (from FLT_MAX) finds it: the first element of the
    smallest value. Only a zero minimum can tell which element that was (-0.0 or +0.0, and the sign reaches
    the fp16 m field), so only rows whose minimum is zero look for their first zero."""
    mn = x.amin(dim=1)
    zero = (mn == 0).nonzero().squeeze(1)
    if zero.numel():
        rows = x[zero]
        first = torch.argmax((rows == 0).to(torch.uint8), dim=1, keepdim=True)   # argmax: first of the maxima
        mn[zero] = torch.gather(rows, 1, first).squeeze(1)
    return mn


def _scale_and_min(x: torch.Tensor, nmax: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, min, (x - min) * id) of the q4_1/q5_1 reference: d = (max - min) / nmax, id = d ? 1/d : 0."""
    mn = _first_min(x)
    # ggml's max and min come from the same element when they are equal, so max - min is then +0; torch's
    # amax may pick a -0 where _first_min picked a +0, and abs turns the resulting -0 back into +0
    # (max - min is never negative otherwise).
    span = (x.amax(dim=1) - mn).abs_()
    # A tensor divisor, as for q8_0: CUDA turns division by a Python scalar into a multiply by 1/15.
    d = span / torch.full_like(span, nmax)
    y = (x - mn[:, None]).mul_(_inverse_or_zero(d)[:, None])
    return d, mn, y


def _trunc_quants(y: torch.Tensor, offset: float) -> torch.Tensor:
    """ggml's truncating cast of ``y + offset`` to an 8-bit integer, as int32. Non-negative and below 33 for
    every finite y these formats produce, so the int32 cast is the truncation itself; when 1/d overflowed
    (d subnormal), y is +inf, or NaN where 0 * inf, and x86's conversion gives 0x80000000, whose low byte
    is 0: nan_to_num reproduces that (as for q4_0)."""
    return y.add_(offset).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).to(torch.int32)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(nb, 32) int32 quants -> (nb, 16) uint8: qs[j] = low nibble of weight j | low nibble of weight 16+j << 4."""
    return ((q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)).to(torch.uint8)


def _pack_fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """(nb, 32) int32 quants -> (nb, 4) uint8: the little-endian uint32 qh whose bit j is bit 4 of weight j."""
    high = ((q >> 4) & 1).to(torch.uint8).view(-1, 4, 8)            # [i, t]: weight 8i + t, bit t of byte i
    qh = high[:, :, 0].clone()
    for t in range(1, 8):                                           # Python-scalar shifts (see _bit_planes)
        qh |= high[:, :, t] << t
    return qh


def quantize_q4_1_blocks(x: torch.Tensor) -> torch.Tensor:
    """(nb, 32) fp32 -> (nb, 20) uint8. d = (max - min) / 15, m = min; q = min(15, trunc((x - min)/d + 0.5))."""
    d, mn, y = _scale_and_min(x, 15.0)
    # ggml: MIN(15, (int8_t)(x0 + 0.5f)); (x - min) * id <= 15 up to rounding, so only the clamp to 15 bites.
    q = _trunc_quants(y, 0.5).clamp_(max=15)
    return torch.cat([fp16_bytes(d), fp16_bytes(mn), _pack_nibbles(q)], dim=1)


def quantize_q5_0_blocks(x: torch.Tensor) -> torch.Tensor:
    """(nb, 32) fp32 -> (nb, 22) uint8. d = (value of largest magnitude) / -16; q = min(31, trunc(x/d + 16.5))."""
    _, vmax = _signed_absmax(x)
    d = vmax / -16.0                                  # a power of two: exact as a multiply, too
    y = x * _inverse_or_zero(d)[:, None]
    q = _trunc_quants(y, 16.5).clamp_(max=31)         # ggml: MIN(31, (int8_t)(x0 + 16.5f))
    return torch.cat([fp16_bytes(d), _pack_fifth_bits(q), _pack_nibbles(q)], dim=1)


def quantize_q5_1_blocks(x: torch.Tensor) -> torch.Tensor:
    """(nb, 32) fp32 -> (nb, 24) uint8. d = (max - min) / 31, m = min; q = trunc((x - min)/d + 0.5), 5 bits."""
    d, mn, y = _scale_and_min(x, 31.0)
    # ggml: (uint8_t)(x0 + 0.5f) with no clamp, keeping bits 0-4 only (a 32 would store as 0); it cannot
    # reach 32 since (x - min) * id <= 31 up to rounding, and the packers keep just those bits too.
    q = _trunc_quants(y, 0.5)
    return torch.cat([fp16_bytes(d), fp16_bytes(mn), _pack_fifth_bits(q), _pack_nibbles(q)], dim=1)
