"""q2_k, q3_k, q4_k, q5_k and q6_k quantizers, byte-identical to ggml's ``quantize_row_q*_K_ref``.

Each takes (nblocks, 256) fp32 and returns (nblocks, block_bytes) uint8 on the same device. Per block,
ggml searches a scale (and min) per group (kquant_search), quantizes the group scales against one fp16
block scale, re-quantizes every weight with the scales as stored, and packs the bits. All of it runs on
all blocks of a chunk at once; the arithmetic is ggml's fp32, in ggml's order (see kquant_arith).
"""

from __future__ import annotations

from typing import Callable

import torch

from .kquant_arith import (GROUP_MAX_EPS, Scratch, divide, first_absmax, nearest_int_, nearest_int_exact,
                           positive_max, scratch_for, sequential_dot, sqrt_f32, to_int8, to_uint8)
from .kquant_search import search_q3, search_qkx2, search_qx
from .rounding import fp16_bytes, fp16_round_trip

QK_K = 256

# Blocks per internal chunk on CPU: big enough that each torch op amortizes its overhead over many
# groups, small enough that the search temporaries stay in cache (tuned on a 2-core x86 VM); they also
# bound the CPU scratch memory. Other devices take the caller's chunk whole.
_CPU_CHUNK_BLOCKS = {"q2_k": 2048, "q3_k": 1024, "q4_k": 2048, "q5_k": 2048, "q6_k": 2048}
_CPU_Q3_DESCENT_GROUPS = 32768   # groups searched together by q3_k's greedy passes on CPU


def _chunk_blocks(x: torch.Tensor, qtype: str) -> int:
    """Blocks per internal chunk for x's device."""
    return _CPU_CHUNK_BLOCKS[qtype] if x.device.type == "cpu" else max(x.shape[0], 1)


def _quantize_chunked(x: torch.Tensor, block_bytes: int, step: int, scratch: Scratch,
                      chunk_fn: Callable[[torch.Tensor, torch.Tensor, int], None]) -> torch.Tensor:
    """(nb, block_bytes) uint8 filled by ``chunk_fn(x_chunk, out_chunk, first_block)`` chunk by chunk,
    each chunk's scratch freed for the next."""
    nb = x.shape[0]
    out = torch.empty((nb, block_bytes), dtype=torch.uint8, device=x.device)
    for start in range(0, nb, step):
        with scratch.region():
            chunk_fn(x[start:start + step], out[start:start + step], start)
    return out


def _quantize_independent_chunks(x: torch.Tensor, qtype: str, block_bytes: int,
                                 chunk_fn: Callable[[torch.Tensor, torch.Tensor, Scratch], None]) -> torch.Tensor:
    """_quantize_chunked for formats whose chunks need nothing from each other, sharing one Scratch."""
    scratch = scratch_for(x.device)
    return _quantize_chunked(x, block_bytes, _chunk_blocks(x, qtype), scratch,
                             lambda xc, out, _start: chunk_fn(xc, out, scratch))


def _position_major(x: torch.Tensor, group: int, scratch: Scratch) -> torch.Tensor:
    """(nb, 256) -> (group, nb * 256/group): row i holds position i of every group (groups in block order)."""
    ngroups = x.numel() // group
    return scratch.take(group, ngroups).copy_(x.reshape(ngroups, group).t())


def _requantize(x: torch.Tensor, d: torch.Tensor, offset: "torch.Tensor | None", lo: int, hi: int,
                searched: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """ggml's final pass: L = clamp(nearest_int((x + offset)/d), lo, hi) - lo per group, except that groups
    with d == 0 keep the quants of the search (``if (!d) continue``).

    x: (nb, ngroups, group) fp32; d, offset: (nb, ngroups); searched: (nb, ngroups, group) quants of
    the search, already shifted (any strides). Returns uint8 quants of x's shape.
    """
    q = scratch.take(*x.shape)
    if offset is None:
        q.copy_(x)
    else:
        torch.add(x, offset[..., None], out=q)
    q = nearest_int_(q.div_(d[..., None])).clamp_(lo, hi).sub_(lo).to(torch.uint8)
    kept = torch.nonzero(d.reshape(-1) == 0).squeeze(1)          # usually few or none
    if kept.numel():
        flat = q.view(-1, x.shape[-1])
        flat.index_copy_(0, kept, searched.reshape(-1, x.shape[-1]).index_select(0, kept).to(torch.uint8))
    return q


def _pack_bit_planes(bits: torch.Tensor) -> torch.Tensor:
    """(nb, 8, 32) uint8 whose lowest bit is plane k -> (nb, 32): bit k of byte l is plane k's bit at l."""
    bits = bits & 1
    out = bits[:, 0].clone()
    for k in range(1, 8):
        out |= bits[:, k] << k
    return out


def _pack_crumbs(q: torch.Tensor) -> torch.Tensor:
    """(..., 4, 32) uint8 of 2-bit values -> (..., 32): value r in bits 2r..2r+1."""
    return q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)


# ----------------------------------------------------------------------------------------------------
# q2_k


def _q2_k_chunk(x: torch.Tensor, out: torch.Tensor, scratch: Scratch) -> None:
    nb = x.shape[0]
    xt = _position_major(x, 16, scratch)
    weights = torch.abs(xt, out=scratch.take(*xt.shape))              # |x|, no av_x term
    scales, mins, quants = search_qkx2(xt, weights, nmax=3, rmin=-0.5, rdelta=0.1, nstep=15, scratch=scratch,
                                       use_mad=True)
    scales, mins = scales.view(nb, 16), mins.view(nb, 16)

    max_scale = positive_max(scales, dim=1)
    max_min = positive_max(mins, dim=1)
    inv_scale = torch.where(max_scale > 0, divide(15.0, max_scale), 0.0)
    inv_min = torch.where(max_min > 0, divide(15.0, max_min), 0.0)
    # ggml neither clamps these nor masks the scale to 4 bits: the byte is (uint8_t)(ls | lm << 4), so an
    # out-of-range ls (a negative group scale, or a wrapped nearest_int) spills into the min's nibble. It
    # happens: below max_scale ~4e-38, 15/max_scale is Inf and nearest_int(Inf) = -2^22 (low byte 0).
    ls = nearest_int_exact(inv_scale[:, None] * scales)
    lm = nearest_int_exact(inv_min[:, None] * mins)
    sc = to_uint8(ls | ((lm & 15) << 4))
    d = max_scale / torch.full_like(max_scale, 15.0)
    dmin = max_min / torch.full_like(max_min, 15.0)

    # the final pass reads the scales back from the stored bytes
    group_d = fp16_round_trip(d)[:, None] * (sc & 15).float()
    group_dm = fp16_round_trip(dmin)[:, None] * (sc >> 4).float()
    searched = quants.t().reshape(nb, 16, 16)                        # a view: group-major quants
    q = _requantize(x.reshape(nb, 16, 16), group_d, group_dm, 0, 3, searched, scratch)
    out[:, 0:16] = sc
    out[:, 16:80] = _pack_crumbs(q.view(nb, 2, 4, 32)).view(nb, 64)  # (half, r, l): weight 128h + 32r + l
    out[:, 80:82] = fp16_bytes(d)
    out[:, 82:84] = fp16_bytes(dmin)


def quantize_q2_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """(nb, 256) fp32 -> (nb, 84) uint8: scales[16] (scale | min << 4), qs[64], d, dmin."""
    return _quantize_independent_chunks(x, "q2_k", 84, _q2_k_chunk)


# ----------------------------------------------------------------------------------------------------
# q4_k / q5_k


def _quantize_qkx2(x: torch.Tensor, nmax: int, rmin: float, nstep: int, scratch: Scratch):
    """The part q4_k and q5_k share, on one chunk: returns (d, dmin) fp32 (nb,), packed scales (nb, 12)
    uint8 and the quants (nb, 8, 32) uint8 in 0..nmax."""
    nb = x.shape[0]
    xt = _position_major(x, 32, scratch)
    sum_x2 = sequential_dot(xt, xt, start_at_zero=True)
    av_x = sqrt_f32(sum_x2 / torch.full_like(sum_x2, 32.0))
    weights = torch.abs(xt, out=scratch.take(*xt.shape)).add_(av_x)   # av_x + |x|
    scales, mins, quants = search_qkx2(xt, weights, nmax, rmin, 0.1, nstep, scratch)
    scales, mins = scales.view(nb, 8), mins.view(nb, 8)

    max_scale = positive_max(scales, dim=1)
    max_min = positive_max(mins, dim=1)
    inv_scale = torch.where(max_scale > 0, divide(63.0, max_scale), 0.0)
    inv_min = torch.where(max_min > 0, divide(63.0, max_min), 0.0)
    ls = to_uint8(nearest_int_exact(inv_scale[:, None] * scales)).clamp_(max=63)
    lm = to_uint8(nearest_int_exact(inv_min[:, None] * mins)).clamp_(max=63)
    d = max_scale / torch.full_like(max_scale, 63.0)
    dmin = max_min / torch.full_like(max_min, 63.0)

    group_d = fp16_round_trip(d)[:, None] * ls.float()
    group_dm = fp16_round_trip(dmin)[:, None] * lm.float()
    searched = quants.t().reshape(nb, 8, 32)                         # a view: group-major quants
    q = _requantize(x.reshape(nb, 8, 32), group_d, group_dm, 0, nmax, searched, scratch)
    return d, dmin, _pack_scale_min_k4(ls, lm), q


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit (scale, min) pairs (nb, 8) int32 -> ggml's 12-byte layout (nb, 12) uint8."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    packed = torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 15) | ((hi_m & 15) << 4)],
                       dim=1)
    return packed.to(torch.uint8)


def _write_scales_k4(out: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, scales: torch.Tensor) -> None:
    """The header q4_k and q5_k blocks share: fp16 d and dmin, then the 12 packed 6-bit scale/min bytes."""
    out[:, 0:2] = fp16_bytes(d)
    out[:, 2:4] = fp16_bytes(dmin)
    out[:, 4:16] = scales


def _q4_k_chunk(x: torch.Tensor, out: torch.Tensor, scratch: Scratch) -> None:
    d, dmin, scales, q = _quantize_qkx2(x, nmax=15, rmin=-1.0, nstep=20, scratch=scratch)
    nb = x.shape[0]
    _write_scales_k4(out, d, dmin, scales)
    q = q.view(nb, 4, 2, 32)                                          # group 2c + h, position l
    torch.bitwise_or(q[:, :, 0], q[:, :, 1] << 4, out=out[:, 16:144].view(nb, 4, 32))


def _q5_k_chunk(x: torch.Tensor, out: torch.Tensor, scratch: Scratch) -> None:
    d, dmin, scales, q = _quantize_qkx2(x, nmax=31, rmin=-0.5, nstep=15, scratch=scratch)
    nb = x.shape[0]
    _write_scales_k4(out, d, dmin, scales)
    out[:, 16:48] = _pack_bit_planes(q >> 4)                          # bit s of qh[l]: fifth bit of group s
    low = (q & 15).view(nb, 4, 2, 32)
    torch.bitwise_or(low[:, :, 0], low[:, :, 1] << 4, out=out[:, 48:176].view(nb, 4, 32))


def quantize_q4_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """(nb, 256) fp32 -> (nb, 144) uint8: d, dmin, scales[12], qs[128]."""
    return _quantize_independent_chunks(x, "q4_k", 144, _q4_k_chunk)


def quantize_q5_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """(nb, 256) fp32 -> (nb, 176) uint8: d, dmin, scales[12], qh[32], qs[128]."""
    return _quantize_independent_chunks(x, "q5_k", 176, _q5_k_chunk)


# ----------------------------------------------------------------------------------------------------
# q3_k


def _q3_k_chunk(x: torch.Tensor, out: torch.Tensor, scales: torch.Tensor, quants: torch.Tensor,
                scratch: Scratch) -> None:
    """Block scales, final quants and packing of q3_k for one chunk, given the group search's results:
    scales (nb, 16) and the searched quants (16, nb*16) uint8."""
    nb = x.shape[0]
    max_scale, _ = first_absmax(scales, dim=1)
    has_scale = max_scale != 0
    iscale = divide(-32.0, torch.where(has_scale, max_scale, 1.0))
    ls = to_int8(nearest_int_exact(iscale[:, None] * scales)).clamp_(-32, 31) + 32
    ls = torch.where(has_scale[:, None], ls, 0)                      # ggml leaves the scales zeroed
    d = torch.where(has_scale, divide(1.0, iscale), 0.0)

    group_d = fp16_round_trip(d)[:, None] * (ls - 32).float()
    searched = quants.t().reshape(nb, 16, 16)
    q = _requantize(x.reshape(nb, 16, 16), group_d, None, -4, 3, searched, scratch).view(nb, 8, 32)
    out[:, 0:32] = _pack_bit_planes(q >> 2)                           # bit k of hmask[m]: high bit of weight 32k+m
    out[:, 32:96] = _pack_crumbs((q & 3).view(nb, 2, 4, 32)).view(nb, 64)   # (half, r, l)
    out[:, 96:108] = _pack_scales_q3(ls)
    out[:, 108:110] = fp16_bytes(d)


def _pack_scales_q3(ls: torch.Tensor) -> torch.Tensor:
    """Sixteen 6-bit scales (nb, 16) int32 -> ggml's 12-byte q3_k layout (nb, 12) uint8."""
    low = (ls[:, :8] & 15) | ((ls[:, 8:] & 15) << 4)
    high = _pack_crumbs((ls >> 4).view(-1, 4, 4))                    # (j / 4, j % 4)
    return torch.cat([low, high], dim=1).to(torch.uint8)


def quantize_q3_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """(nb, 256) fp32 -> (nb, 110) uint8: hmask[32], qs[64], scales[12], d."""
    scratch = scratch_for(x.device)
    step = _chunk_blocks(x, "q3_k")
    descent_groups = _CPU_Q3_DESCENT_GROUPS if x.device.type == "cpu" else max(16 * x.shape[0], 1)
    scales, quants = search_q3(x.reshape(-1, 16), nmax=4, scratch=scratch, chunk_groups=16 * step,
                               descent_groups=descent_groups)
    scales = scales.view(-1, 16)

    def chunk(xc: torch.Tensor, out: torch.Tensor, start: int) -> None:
        _q3_k_chunk(xc, out, scales[start:start + xc.shape[0]], quants[:, 16 * start:16 * (start + xc.shape[0])],
                    scratch)
    return _quantize_chunked(x, 110, step, scratch, chunk)


# ----------------------------------------------------------------------------------------------------
# q6_k


def _q6_k_chunk(x: torch.Tensor, out: torch.Tensor, scratch: Scratch) -> None:
    nb = x.shape[0]
    scales, quants = search_qx(_position_major(x, 16, scratch), nmax=32, scratch=scratch)
    scales = scales.view(nb, 16)
    max_scale, max_abs_scale = first_absmax(scales, dim=1)
    live = max_abs_scale >= GROUP_MAX_EPS
    iscale = divide(-128.0, torch.where(live, max_scale, 1.0))
    d = torch.where(live, divide(1.0, iscale), 0.0)
    ls = to_int8(nearest_int_exact(iscale[:, None] * scales).clamp_(max=127))
    ls = torch.where(live[:, None], ls, 0)

    group_d = fp16_round_trip(d)[:, None] * ls.float()
    searched = quants.t().reshape(nb, 16, 16)
    q = _requantize(x.reshape(nb, 16, 16), group_d, None, -32, 31, searched, scratch)
    q = q.mul_(live.to(torch.uint8)[:, None, None]).view(nb, 2, 4, 32)   # (half, r, l); ggml zeroes dead blocks
    nib = q & 15
    torch.bitwise_or(nib[:, :, 0:2], nib[:, :, 2:4] << 4, out=out[:, 0:128].view(nb, 2, 2, 32))  # (half, r&1, l)
    out[:, 128:192] = _pack_crumbs(q >> 4).view(nb, 64)
    out[:, 192:208] = to_uint8(ls)
    out[:, 208:210] = fp16_bytes(d)


def quantize_q6_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """(nb, 256) fp32 -> (nb, 210) uint8: ql[128], qh[64], int8 scales[16], d."""
    return _quantize_independent_chunks(x, "q6_k", 210, _q6_k_chunk)
