"""Split-K GEMV for a few tokens: y[m] = W @ x[m] + b with W read straight from GGUF blocks.

At M = 1..4 the cost is reading the quantized bytes, so the kernel is built around that stream:

* a program owns BLOCK_N rows and one K slice (split_k equal slices of 256-weight steps; the last slice
  to finish a tile sums the others' partials up in the same launch, see epilogue.py), so even N = 4096
  gives enough programs to fill every SM;
* each step reads, per row, one whole 256-weight super-block (or eight 32-weight blocks) as contiguous byte
  runs, each byte loaded once and decoded in its *storage order* with integer ops on int32; x is loaded
  in the matching permuted order (a dot product does not care about order);
* products are accumulated elementwise into an fp32 tile with FMAs, one per weight per token, and reduced
  (tl.sum) once at the end: no tl.dot, no padding of M to 16;
* a weight is its quant bits OR-ed into the mantissa of 1.5 and one FFMA with the pre-scaled block scale
  (decode.scaled_quant: exact product, one rounding), the q4_k high nibble used in place (x16) with its
  scale divided by 16.

Three loop layouts, all in the autotune space (configs.GEMV_LAYOUTS):

* layout 1, storage-order tiles: the weight tile is (BLOCK_M, BLOCK_N, TILE_A, TILE_B); the x tile and the
  per-sub-block scales are computed in their own (smaller) shapes and broadcast into it, which Triton
  implements as layout conversions through shared memory: ~12 barriers per step and ~170 registers for
  q4_k on sm_90. The first H100 run measured this layout at 25-29% of the copy bandwidth (44 us for q4_k
  8192x8192 at M = 1): latency-bound, not issue-bound.
* layout 2, per-thread chunks (the heuristic default for q5_k, and q4_k above 2 tokens; see configs):
  every tensor of a step has one shape and layout, so the loop has no conversion, barrier or shared-memory
  traffic (checked on the sm_90 machine code by tests/kernels/test_compile_sm90.py; Triton 3.6 still
  converts for the 2-byte-aligned formats), needs ~80 registers, and is software-pipelined by Triton. It
  folds the q4_k/q5_k min into each weight (one FMA per weight instead of per-step sums of x). Not yet timed
  on a GPU: `bench kernels` times the layouts side by side (gemv_layout1_graph, gemv_layout2_graph, ...).
* layout 3, word-wide decode (every format; the heuristic default up to 2 tokens): the step's
  structure (sub-blocks, bit planes, nibbles) is unrolled at compile time, so every shift, mask and scale
  index is a constant, and each weight tile is (BLOCK_M, BLOCK_N, 16) like its x tile ((16, BLOCK_N,
  BLOCK_M) on Triton 3.6: _WEIGHT_AXIS_FIRST). Quant bytes are read as little-endian int32 words and combined
  four at a time (q4_0, q4_1, q4_k: a nibble; q2_k: a 2-bit plane; q3_k: that and its hmask bit; q5_0, q5_1, q5_k: a
  nibble and its fifth bit; q6_k: a nibble and its top two bits) into bytes 0xC0 | quant; one byte permute
  (PTX prmt) per weight then makes the fp32 1.5 + quant / 128 (the byte into bits 16-23 of 0x3F000000; q8_0's
  whole bytes, and iq4_nl/iq4_xs's table values that two more permutes per word look up, go into bits 8-15
  of 1.0), and one FFMA scales it. 5.3-6.3 sm_90 instructions per weight in the loop at
  M = 1 for the six main formats (3.4-4.0 per weight and token at M = 2), against 6.1-11.8 in layout 1 and
  more in layout 2; 5.7-7.3 for q4_1/q5_0/q5_1, 5.8 for q2_k, 8.1-8.4 for iq4_nl/iq4_xs, 10.5 for mxfp4 (whose
  17-byte blocks leave its quants at any alignment: each word is the two aligned words around it joined by one
  more byte permute, and the exponent byte's power of two scales exactly); no conversion in the loop with
  Triton 3.6 to 3.9 (heuristic configs, bench/results/static-sm90/; not yet timed on a GPU). Needs
  word-aligned weight bytes (WORD_LOADS: 4-byte alignment of the data pointer for q2_k/q4_k/q5_k/iq4_xs, 2-byte
  for the others, whose blocks are 18 to 34, 110 and 210 bytes, but mxfp4: any) and at most 4 tokens per
  program (GEMV3_MAX_BLOCK_M), else the heuristic falls back (configs.GEMV_DEFAULT_LAYOUT).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.iq4_nl import IQ4_NL_VALUES
from ..formats.mxfp4 import MXFP4_VALUES
from . import configs
from .decode import (BLOCK32, BLOCK32_BYTES, BLOCK32_QH_AT, BLOCK32_QS_AT, BLOCK32_QUANT_OFFSET, HAS_MIN, IQ4_NL,
                     IQ4_XS, MXFP4, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0, QTYPE_CODES, block32_scale, e8m0_half,
                     f16_field, f16_field_masked, f16_from_bytes, int8_from_byte, iq4_nl_value, iq4_xs_scale,
                     iq4_xs_unpack_scale, k4_scale_min, k4_unpack_scale_min, nl_value, q2_k_scale_min, q3_k_scale,
                     q3_k_unpack_scale, q6_k_scale, scaled_quant, table_words, u32_from_bytes)
from .epilogue import store_output
from .runtime import INTERPRETER, count_launch, launch_split_k, sm_count, triton_version, tuning_key


# ---------------------------------------------------------------------------------- layout 1 steps
# Each step handles one 256-weight step for BLOCK_N rows (bp/w_rows: (BLOCK_N,) byte pointers) and
# BLOCK_M tokens (xp: (BLOCK_M,) pointers into x) and returns the updated accumulator(s).
# Weight-side tensors carry a leading unit token dim from the byte load on ((1, BN, A, B)): broadcasting
# that dim over the tokens then keeps the layout the loads were given, so the decoded tile never moves
# between threads (a (BN, A, B) tile expanded later gets converted through shared memory every step).

@triton.jit
def _accumulate(acc, w, x):
    """acc + w * x as one FFMA per element, whatever the compiler's FP-fusion default (contraction of
    a * b + c is on by default in Triton 3.6-3.9 and announced to turn off later)."""
    w, x = tl.broadcast(w, x)
    return tl.fma(w, x, acc)


@triton.jit
def _step_q4_k_q5_k(acc, acc_min, bp, xp, IS_Q5: tl.constexpr):
    """q4_k (144 B) / q5_k (176 B) super-block. qs[32c + l] holds weight 64c + l in its low nibble
    (sub-block 2c) and 64c + 32 + l in its high nibble (sub-block 2c + 1); q5_k's fifth bit of sub-block
    s is bit s of qh[l]. Accumulator tile: (4 [c], 32 [l])."""
    c = tl.arange(0, 4)
    l = tl.arange(0, 32)
    byte_off = ((32 * c)[:, None] + l[None, :])[None, None, :, :]
    if IS_Q5:
        qs = tl.load(bp[None, :, None, None] + 48 + byte_off).to(tl.int32)          # (1, BN, 4, 32)
    else:
        qs = tl.load(bp[None, :, None, None] + 16 + byte_off).to(tl.int32)
    lo = qs & 15
    hi = qs & 0xF0          # 16 * high nibble: its scale is divided by 16 instead of shifting every byte
    if IS_Q5:
        qh = tl.load(bp[None, :, None, None] + 16 + l[None, None, None, :]).to(tl.int32)  # (1, BN, 1, 32)
        lo = lo | (((qh >> (2 * c)[None, None, :, None]) & 1) << 4)
        hi = hi | (((qh >> (2 * c + 1)[None, None, :, None]) & 1) << 8)
    d = f16_field(bp)[:, None]
    dmin = f16_field(bp + 2)[:, None]
    sc_lo, m_lo = k4_scale_min(bp + 4, 2 * c)                                       # (BN, 4)
    sc_hi, m_hi = k4_scale_min(bp + 4, 2 * c + 1)
    w_lo = scaled_quant(lo, (d * sc_lo.to(tl.float32) * 8388608.0)[None, :, :, None], 0)       # * 2**23
    w_hi = scaled_quant(hi, (d * sc_hi.to(tl.float32) * 524288.0)[None, :, :, None], 0)        # * 2**23 / 16
    x_off = ((64 * c)[:, None] + l[None, :])[None, :, :]
    x_lo = tl.load(xp[:, None, None] + x_off).to(tl.float32)                        # (BM, 4, 32)
    x_hi = tl.load(xp[:, None, None] + x_off + 32).to(tl.float32)
    acc = _accumulate(acc, w_lo, x_lo[:, None])
    acc = _accumulate(acc, w_hi, x_hi[:, None])
    acc_min += (dmin * m_lo.to(tl.float32))[None] * tl.sum(x_lo, axis=2)[:, None, :]
    acc_min += (dmin * m_hi.to(tl.float32))[None] * tl.sum(x_hi, axis=2)[:, None, :]
    return acc, acc_min


@triton.jit
def _step_q3_k(acc, bp, xp):
    """q3_k super-block (110 B). The 64 qs bytes as 16-byte runs u = 2h + t (h: 128-weight half, t: which
    16 of the 32 positions): byte i of run u holds 2-bit planes j = 0..3 of weights 128h + 32j + 16t + i,
    whose third bit is bit 4h + j of hmask[16t + i]. Accumulator tile: (4 [u], 16 [i]); the four planes
    accumulate into it one after the other."""
    u = tl.arange(0, 4)
    i = tl.arange(0, 16)
    h = u >> 1
    t = u & 1
    qs = tl.load(bp[None, :, None, None] + 32 + ((16 * u)[:, None] + i[None, :])[None, None, :, :]).to(tl.int32)
    hm = tl.load(bp[None, :, None, None] + ((16 * t)[:, None] + i[None, :])[None, None, :, :]).to(tl.int32) << 2
    d = f16_field(bp + 108)[:, None]
    for j in tl.static_range(4):
        # q2 | (third bit << 2), minus 4: the weight's q2 - (third bit ? 0 : 4)
        scale = d * q3_k_scale(bp + 96, 8 * h + 2 * j + t).to(tl.float32) * 8388608.0   # (BN, 4), * 2**23
        w = scaled_quant(((qs >> (2 * j)) & 3) | ((hm >> (4 * h + j)[None, None, :, None]) & 4),
                         scale[None, :, :, None], 4)
        x = tl.load(xp[:, None, None] + ((128 * h + 32 * j + 16 * t)[:, None] + i[None, :])[None, :, :])
        acc = _accumulate(acc, w, x.to(tl.float32)[:, None])
    return acc


@triton.jit
def _step_q2_k(acc, bp, xp):
    """q2_k super-block (84 B): q3_k's 2-bit planes without its hmask (qs at 16 as 16-byte runs u = 2h + t: byte
    i holds planes j = 0..3 of weights 128h + 32j + 16t + i); sub-block 8h + 2j + t has the scale d * (sc & 15)
    and the min dmin * (sc >> 4) of its byte scales[8h + 2j + t] (d at 80, dmin at 82), subtracted from each
    weight. Accumulator tile: (4 [u], 16 [i])."""
    u = tl.arange(0, 4)
    i = tl.arange(0, 16)
    h = u >> 1
    t = u & 1
    qs = tl.load(bp[None, :, None, None] + 16 + ((16 * u)[:, None] + i[None, :])[None, None, :, :]).to(tl.int32)
    d = f16_field(bp + 80)[:, None]
    dmin = f16_field(bp + 82)[:, None]
    for j in tl.static_range(4):
        sc, mn = q2_k_scale_min(tl.load(bp[:, None] + (8 * h + 2 * j + t)[None, :]).to(tl.int32))   # (BN, 4)
        scale = (d * sc.to(tl.float32) * 8388608.0)[None, :, :, None]                          # * 2**23
        w = scaled_quant((qs >> (2 * j)) & 3, scale, 0) - (dmin * mn.to(tl.float32))[None, :, :, None]
        x = tl.load(xp[:, None, None] + ((128 * h + 32 * j + 16 * t)[:, None] + i[None, :])[None, :, :])
        acc = _accumulate(acc, w, x.to(tl.float32)[:, None])
    return acc


@triton.jit
def _step_q6_k(acc, bp, xp):
    """q6_k super-block (210 B). ql as 16-byte runs u = 4h + 2(r & 1) + t: byte i holds the low nibbles of
    weights 128h + 32r + 16t + i for r = r & 1 (low nibble) and r & 1 + 2 (high nibble); their top two
    bits are field r of qh[32h + 16t + i]. Accumulator tile: (8 [u], 16 [i])."""
    u = tl.arange(0, 8)
    i = tl.arange(0, 16)
    h = u >> 2
    r_lo = (u >> 1) & 1
    t = u & 1
    ql = tl.load(bp[None, :, None, None] + ((16 * u)[:, None] + i[None, :])[None, None, :, :]).to(tl.int32)
    qh = tl.load(bp[None, :, None, None] + 128
                 + ((32 * h + 16 * t)[:, None] + i[None, :])[None, None, :, :]).to(tl.int32)
    d = f16_field(bp + 208)[:, None]
    for rb in tl.static_range(2):
        r = 2 * rb + r_lo
        scale = d * q6_k_scale(bp + 192, 8 * h + 2 * r + t).to(tl.float32) * 8388608.0
        w = scaled_quant(((ql >> (4 * rb)) & 15) | (((qh >> (2 * r)[None, None, :, None]) & 3) << 4),
                         scale[None, :, :, None], 32)
        x = tl.load(xp[:, None, None] + ((128 * h + 32 * r + 16 * t)[:, None] + i[None, :])[None, :, :])
        acc = _accumulate(acc, w, x.to(tl.float32)[:, None])
    return acc


@triton.jit
def _step_nibble_blocks(acc, w_rows, xp, step, n_blocks, QTYPE: tl.constexpr):
    """Eight blocks of a 32-weight nibble format (q4_0, q4_1, q5_0, q5_1, iq4_nl, mxfp4; decode.BLOCK32_*): qs[j]
    holds weights j (low nibble) and 16 + j (high); q5's fifth bits are bits j / 16 + j of qh; q4_1/q5_1 add
    the fp16 m at byte 2; mxfp4's scale is its exponent byte. Blocks past n_blocks (K tail) read as zero.
    Accumulator tile: (8 [block], 16 [j])."""
    g = tl.arange(0, 8)
    j = tl.arange(0, 16)
    blk = step * 8 + g
    valid = blk < n_blocks
    bp = w_rows[:, None] + blk[None, :] * BLOCK32_BYTES[QTYPE]                         # (BN, 8)
    qs = tl.load(bp[None, :, :, None] + BLOCK32_QS_AT[QTYPE] + j[None, None, None, :],
                 mask=valid[None, None, :, None], other=0).to(tl.int32)             # (1, BN, 8, 16)
    d = block32_scale(bp, valid[None, :], QTYPE)[None, :, :, None]
    if QTYPE == IQ4_NL or QTYPE == MXFP4:         # d times a table value: exact
        w_lo = d * nl_value(qs & 15, QTYPE).to(tl.float32)
        w_hi = d * nl_value(qs >> 4, QTYPE).to(tl.float32)
    else:
        lo = qs & 15
        hi = qs & 0xF0      # 16 * high nibble: its scale is divided by 16 instead of shifting every byte
        if BLOCK32_QH_AT[QTYPE] != 0:
            qh = u32_from_bytes(bp + BLOCK32_QH_AT[QTYPE], valid[None, :])[None, :, :, None]
            lo = lo | (((qh >> j[None, None, None, :]) & 1) << 4)
            hi = hi | (((qh >> (16 + j)[None, None, None, :]) & 1) << 8)
        OFFSET: tl.constexpr = BLOCK32_QUANT_OFFSET[QTYPE]
        w_lo = scaled_quant(lo, d * 8388608.0, OFFSET)                          # (u - offset) d; d * 2**23
        w_hi = scaled_quant(hi, d * 524288.0, 16 * OFFSET)                      # 16 (u - offset) d / 16
    if HAS_MIN[QTYPE]:
        m = f16_field_masked(bp + 2, valid[None, :])[None, :, :, None]
        w_lo += m
        w_hi += m
    x_off = ((32 * blk)[:, None] + j[None, :])[None, :, :]
    x_lo = tl.load(xp[:, None, None] + x_off, mask=valid[None, :, None], other=0.0).to(tl.float32)
    x_hi = tl.load(xp[:, None, None] + x_off + 16, mask=valid[None, :, None], other=0.0).to(tl.float32)
    acc = _accumulate(acc, w_lo, x_lo[:, None])
    acc = _accumulate(acc, w_hi, x_hi[:, None])
    return acc


@triton.jit
def _step_iq4_xs(acc, bp, xp):
    """iq4_xs super-block (136 B): sub-block g (scale d * (ls_g - 32)) has 16 qs bytes at 8 + 16g; byte j holds
    weights 32g + j (low nibble) and 32g + 16 + j (high), each the scale times the iq4_nl table value. Every
    weight is exact (17-bit scale, 7-bit value). Accumulator tile: (8 [g], 16 [j])."""
    g = tl.arange(0, 8)
    j = tl.arange(0, 16)
    qs = tl.load(bp[None, :, None, None] + 8 + ((16 * g)[:, None] + j[None, :])[None, None, :, :]).to(tl.int32)
    scale = (f16_field(bp)[:, None] * (iq4_xs_scale(bp, g) - 32).to(tl.float32))[None, :, :, None]   # (1, BN, 8, 1)
    x_off = ((32 * g)[:, None] + j[None, :])[None, :, :]
    x_lo = tl.load(xp[:, None, None] + x_off).to(tl.float32)
    x_hi = tl.load(xp[:, None, None] + x_off + 16).to(tl.float32)
    acc = _accumulate(acc, scale * iq4_nl_value(qs & 15).to(tl.float32), x_lo[:, None])
    acc = _accumulate(acc, scale * iq4_nl_value(qs >> 4).to(tl.float32), x_hi[:, None])
    return acc


@triton.jit
def _step_q8_0(acc, w_rows, xp, step, n_blocks):
    """Eight q8_0 blocks (34 B: d, int8 qs[32]). Accumulator tile: (8 [block], 32 [l])."""
    g = tl.arange(0, 8)
    l = tl.arange(0, 32)
    blk = step * 8 + g
    valid = blk < n_blocks
    bp = w_rows[:, None] + blk[None, :] * 34
    qs = tl.load(bp[None, :, :, None] + 2 + l[None, None, None, :], mask=valid[None, None, :, None],
                 other=0).to(tl.int32)
    d = f16_field_masked(bp, valid[None, :])[None, :, :, None] * 8388608.0
    x = tl.load(xp[:, None, None] + ((32 * blk)[:, None] + l[None, :])[None, :, :], mask=valid[None, :, None],
                other=0.0).to(tl.float32)
    acc = _accumulate(acc, scaled_quant(qs ^ 0x80, d, 128), x[:, None])   # int8 = (byte ^ 128) - 128
    return acc


# ---------------------------------------------------------------------------------- layout 2 steps
# Layout 2 ("per-thread chunks"): every tensor of a step has the same rank-5 shape SHAPE = (BLOCK_M,
# BLOCK_N, A, B, 16): [token, row, two format-specific indices, 16 consecutive bytes]. Each thread owns
# runs of 16 consecutive quant bytes (one vector load when the block is 16-byte aligned) and the x
# values and scales those bytes need are loaded through pointers broadcast to that same shape
# (_full), so Triton gives every load the same layout: the step has no layout conversion, shared-memory
# round trip or barrier (layout 1 had ~12 per step on sm_90), and the repeated loads and scale decodes
# a thread makes for its 16 elements fold into one (common-subexpression elimination; SASS checked).
# The loop is software-pipelined by Triton (tl.range num_stages: cp.async for the 16-byte loads).

@triton.jit
def _full(ptr, SHAPE: tl.constexpr):
    return tl.broadcast_to(ptr, SHAPE)


@triton.jit
def _byte(ptr, SHAPE: tl.constexpr):
    return tl.load(_full(ptr, SHAPE)).to(tl.int32)


@triton.jit
def _byte_masked(ptr, mask, SHAPE: tl.constexpr):
    return tl.load(_full(ptr, SHAPE), mask=_full(mask, SHAPE), other=0).to(tl.int32)


@triton.jit
def _f16_full(ptr, SHAPE: tl.constexpr):
    return f16_from_bytes(_byte(ptr, SHAPE), _byte(ptr + 1, SHAPE))


@triton.jit
def _f16_full_masked(ptr, mask, SHAPE: tl.constexpr):
    return f16_from_bytes(_byte_masked(ptr, mask, SHAPE), _byte_masked(ptr + 1, mask, SHAPE))


@triton.jit
def _x_full(ptr, SHAPE: tl.constexpr):
    return tl.load(_full(ptr, SHAPE)).to(tl.float32)


@triton.jit
def _v2_q4_k_q5_k(acc, bp, xp, a, b, i, SHAPE: tl.constexpr, IS_Q5: tl.constexpr):
    """a = c (0..3), b = h (0..1): qs byte 32c + 16h + i holds weights 64c + l (low nibble, sub-block
    2c) and 64c + 32 + l (high nibble, sub-block 2c + 1), l = 16h + i; q5_k's fifth bits: bit 2c / 2c + 1
    of qh[l]. The min is folded into each weight (one more FMA, no per-step sums of x)."""
    l = 16 * b + i
    if IS_Q5:
        qs = _byte(bp + 48 + 32 * a + l, SHAPE)
    else:
        qs = _byte(bp + 16 + 32 * a + l, SHAPE)
    lo = qs & 15
    hi = qs & 0xF0          # 16 * high nibble: its scale is divided by 16 instead of shifting every byte
    if IS_Q5:
        qh = _byte(bp + 16 + l, SHAPE)
        lo = lo | (((qh >> (2 * a)) & 1) << 4)
        hi = hi | (((qh >> (2 * a + 1)) & 1) << 8)
    d = _f16_full(bp, SHAPE)
    dmin = _f16_full(bp + 2, SHAPE)
    sc_lo, m_lo = _k4_scale_min_full(bp + 4, 2 * a, SHAPE)
    sc_hi, m_hi = _k4_scale_min_full(bp + 4, 2 * a + 1, SHAPE)
    w_lo = scaled_quant(lo, d * sc_lo.to(tl.float32) * 8388608.0, 0) - dmin * m_lo.to(tl.float32)
    w_hi = scaled_quant(hi, d * sc_hi.to(tl.float32) * 524288.0, 0) - dmin * m_hi.to(tl.float32)
    acc = _accumulate(acc, w_lo, _x_full(xp + 64 * a + l, SHAPE))
    acc = _accumulate(acc, w_hi, _x_full(xp + 64 * a + 32 + l, SHAPE))
    return acc


@triton.jit
def _k4_scale_min_full(p, s, SHAPE: tl.constexpr):
    """decode.k4_scale_min with SHAPE-broadcast loads (scales[12] at p)."""
    return k4_unpack_scale_min(_byte(p + s, SHAPE), _byte(p + s + 4, SHAPE), _byte(p + (s & 3), SHAPE), s)


@triton.jit
def _v2_q3_k(acc, bp, xp, a, b, i, SHAPE: tl.constexpr):
    """a = h (128-weight half), b = t: qs byte 32h + r (r = 16t + i) holds 2-bit planes j = 0..3 of weights
    128h + 32j + r, whose third bit is bit 4h + j of hmask[r]; sub-block 8h + 2j + t."""
    r = 16 * b + i
    qs = _byte(bp + 32 + 32 * a + r, SHAPE)
    hm = _byte(bp + r, SHAPE) << 2
    d = _f16_full(bp + 108, SHAPE)
    for j in tl.static_range(4):
        s = 8 * a + 2 * j + b
        sc = q3_k_unpack_scale(_byte(bp + 96 + (s & 7), SHAPE), _byte(bp + 104 + (s & 3), SHAPE), s)
        scale = d * sc.to(tl.float32) * 8388608.0
        w = scaled_quant(((qs >> (2 * j)) & 3) | ((hm >> (4 * a + j)) & 4), scale, 4)
        acc = _accumulate(acc, w, _x_full(xp + 128 * a + 32 * j + r, SHAPE))
    return acc


@triton.jit
def _v2_q2_k(acc, bp, xp, a, b, i, SHAPE: tl.constexpr):
    """a = h (128-weight half), b = t: qs byte 16 + 32h + r (r = 16t + i) holds 2-bit planes j = 0..3 of weights
    128h + 32j + r; sub-block 8h + 2j + t (scale and min nibbles in scales[8h + 2j + t]); the min subtracted
    from each weight (folding it into scaled_quant's addend, about 2**23 times the scale, would lose it)."""
    r = 16 * b + i
    qs = _byte(bp + 16 + 32 * a + r, SHAPE)
    d = _f16_full(bp + 80, SHAPE) * 8388608.0
    dmin = _f16_full(bp + 82, SHAPE)
    for j in tl.static_range(4):
        sc, mn = q2_k_scale_min(_byte(bp + 8 * a + 2 * j + b, SHAPE))
        w = scaled_quant((qs >> (2 * j)) & 3, d * sc.to(tl.float32), 0) - dmin * mn.to(tl.float32)
        acc = _accumulate(acc, w, _x_full(xp + 128 * a + 32 * j + r, SHAPE))
    return acc


@triton.jit
def _v2_q6_k(acc, bp, xp, a, b, i, SHAPE: tl.constexpr):
    """a = h, b = u = 2 (r & 1) + t: ql byte 64h + 16u + i holds the low nibbles of weights 128h + 32r + 16t + i
    for r = r & 1 (low nibble) and r & 1 + 2 (high nibble); their top bits are field r of qh[32h + 16t + i];
    sub-block 8h + 2r + t."""
    t = b & 1
    ql = _byte(bp + 64 * a + 16 * b + i, SHAPE)
    qh = _byte(bp + 128 + 32 * a + 16 * t + i, SHAPE)
    d = _f16_full(bp + 208, SHAPE)
    for rb in tl.static_range(2):
        r = 2 * rb + (b >> 1)
        sc = int8_from_byte(_byte(bp + 192 + 8 * a + 2 * r + t, SHAPE))
        w = scaled_quant(((ql >> (4 * rb)) & 15) | (((qh >> (2 * r)) & 3) << 4),
                         d * sc.to(tl.float32) * 8388608.0, 32)
        acc = _accumulate(acc, w, _x_full(xp + 128 * a + 32 * r + 16 * t + i, SHAPE))
    return acc


@triton.jit
def _v2_nibble_blocks(acc, w_rows, x_rows, step, n_blocks, a, i, SHAPE: tl.constexpr, QTYPE: tl.constexpr):
    """a = block g of the step's eight (blocks past n_blocks read as 0) of a 32-weight nibble format (see
    _step_nibble_blocks): qs[i] holds weights i (low nibble) and 16 + i (high)."""
    blk = step * 8 + a
    valid = blk < n_blocks
    bp = w_rows + blk * BLOCK32_BYTES[QTYPE]
    qs = _byte_masked(bp + BLOCK32_QS_AT[QTYPE] + i, valid, SHAPE)
    d = block32_scale(_full(bp, SHAPE), _full(valid, SHAPE), QTYPE)
    if QTYPE == IQ4_NL or QTYPE == MXFP4:
        w_lo = d * nl_value(qs & 15, QTYPE).to(tl.float32)
        w_hi = d * nl_value(qs >> 4, QTYPE).to(tl.float32)
    else:
        lo = qs & 15
        hi = qs & 0xF0      # 16 * high nibble, its scale divided by 16
        if BLOCK32_QH_AT[QTYPE] != 0:
            qh = u32_from_bytes(_full(bp + BLOCK32_QH_AT[QTYPE], SHAPE), _full(valid, SHAPE))
            lo = lo | (((qh >> i) & 1) << 4)
            hi = hi | (((qh >> (16 + i)) & 1) << 8)
        OFFSET: tl.constexpr = BLOCK32_QUANT_OFFSET[QTYPE]
        w_lo = scaled_quant(lo, d * 8388608.0, OFFSET)
        w_hi = scaled_quant(hi, d * 524288.0, 16 * OFFSET)
    if HAS_MIN[QTYPE]:
        m = _f16_full_masked(bp + 2, valid, SHAPE)
        w_lo += m
        w_hi += m
    x_lo = tl.load(_full(x_rows + 32 * blk + i, SHAPE), mask=_full(valid, SHAPE), other=0.0).to(tl.float32)
    x_hi = tl.load(_full(x_rows + 32 * blk + 16 + i, SHAPE), mask=_full(valid, SHAPE), other=0.0).to(tl.float32)
    acc = _accumulate(acc, w_lo, x_lo)
    acc = _accumulate(acc, w_hi, x_hi)
    return acc


@triton.jit
def _v2_iq4_xs(acc, bp, xp, a, i, SHAPE: tl.constexpr):
    """a = sub-block g (see _step_iq4_xs): qs byte 8 + 16g + i holds weights 32g + i (low nibble) and
    32g + 16 + i (high)."""
    qs = _byte(bp + 8 + 16 * a + i, SHAPE)
    ls = iq4_xs_unpack_scale(_byte(bp + 4 + (a >> 1), SHAPE), _byte(bp + 2, SHAPE) | (_byte(bp + 3, SHAPE) << 8), a)
    scale = _f16_full(bp, SHAPE) * (ls - 32).to(tl.float32)
    acc = _accumulate(acc, scale * iq4_nl_value(qs & 15).to(tl.float32), _x_full(xp + 32 * a + i, SHAPE))
    acc = _accumulate(acc, scale * iq4_nl_value(qs >> 4).to(tl.float32), _x_full(xp + 32 * a + 16 + i, SHAPE))
    return acc


@triton.jit
def _v2_q8_0(acc, w_rows, x_rows, step, n_blocks, a, b, i, SHAPE: tl.constexpr):
    """a = block g of the step's eight, b = which 16 of its 32 int8 quants."""
    blk = step * 8 + a
    valid = blk < n_blocks
    bp = w_rows + blk * 34
    qs = _byte_masked(bp + 2 + 16 * b + i, valid, SHAPE)
    d = _f16_full_masked(bp, valid, SHAPE) * 8388608.0
    x = tl.load(_full(x_rows + 32 * blk + 16 * b + i, SHAPE), mask=_full(valid, SHAPE), other=0.0).to(tl.float32)
    return _accumulate(acc, scaled_quant(qs ^ 0x80, d, 128), x)     # int8 = (byte ^ 128) - 128


# ---------------------------------------------------------------------------------- layout 3 steps
# Layout 3 ("word-wide"): tiles of SHAPE = (BLOCK_M, BLOCK_N, 16) (or (16, BLOCK_N, BLOCK_M): see
# _WEIGHT_AXIS_FIRST; the steps only broadcast into SHAPE), element i being byte i of a 16-byte
# run of quant bytes and the x value its weight (or weights) multiplies. Bytes come as int32 words (element
# i reads word i >> 2: the four loads of a word fold into one), combined word-wide into bytes 0xC0 | quant,
# then expanded to one fp32 per weight by _f32_with_byte (q8_0's whole bytes too). The step's
# block structure is unrolled (tl.static_range), so shift amounts, masks and scale indices are constants.

#: Byte permute through PTX prmt on a GPU; the interpreter (which runs no inline assembly) computes the
#: same bits with shifts.
_PRMT: tl.constexpr = tl.constexpr(not INTERPRETER)
#: Where layout 3 puts the axis of 16 consecutive weights in its tiles: first on Triton 3.6, last on 3.7+.
#: Triton's coalescing pass orders a load's dims by the pointer's contiguity, and every weight-side load
#: (quant words, scale bytes) has none along any dim; 3.6 breaks that tie toward the first dim, later versions
#: toward the last. With the x tile's contiguous axis where the tie puts it, weight and x loads get one
#: layout and the loop converts nothing (3.6 otherwise converts every decoded tile through shared memory).
_WEIGHT_AXIS_FIRST: tl.constexpr = tl.constexpr(triton_version() < (3, 7))
#: The fp32 0.5 and 1.0: the bits _f32_with_byte places a quant byte into.
_HALF_BITS: tl.constexpr = tl.constexpr(0x3F000000)
_ONE_BITS: tl.constexpr = tl.constexpr(0x3F800000)
#: 0xC0C0C0C0 as an int32: the 0xC0 each byte carries into bits 16-23 of the fp32 1.5 (0x3FC00000).
_HI_BITS_OF_1_5: tl.constexpr = tl.constexpr(-0x3F3F3F40)
#: 0x80808080 as an int32: each byte's sign bit.
_SIGN_BITS: tl.constexpr = tl.constexpr(-0x7F7F7F80)


#: iq4_nl's values 0-7 and 8-15 (ggml's kvalues_iq4nl) plus 128, as the word pairs _nl_bytes permutes.
_IQ4_NL_UNSIGNED_LO: tl.constexpr = tl.constexpr(table_words(IQ4_NL_VALUES[:8], 128))
_IQ4_NL_UNSIGNED_HI: tl.constexpr = tl.constexpr(table_words(IQ4_NL_VALUES[8:], 128))
#: mxfp4's doubled E2M1 values (ggml's kvalues_mxfp4) plus 128, likewise.
_MXFP4_UNSIGNED_LO: tl.constexpr = tl.constexpr(table_words(MXFP4_VALUES[:8], 128))
_MXFP4_UNSIGNED_HI: tl.constexpr = tl.constexpr(table_words(MXFP4_VALUES[8:], 128))


@triton.jit
def _f32_with_byte(v, q, BASE: tl.constexpr, AT: tl.constexpr):
    """The fp32 whose bits are BASE | (byte ``q`` of int32 ``v``) << AT, for AT 8 or 16 and a BASE whose byte
    there is 0: with _HALF_BITS at 16 and a byte 0xC0 | u (u < 64), 1.5 + u / 128; with _ONE_BITS at 8 and any
    byte b, 1 + b / 32768. One prmt per element on a GPU: result byte j is byte j of BASE (selector nibble
    4 + j: BASE is the second source) but byte AT / 8, which is byte q of v (nibble q); q is a per-element
    constant, which ptxas folds into the instruction."""
    if _PRMT:
        v, sel = tl.broadcast(v, (0x7654 & ~(0xF << (AT // 2))) | (q << (AT // 2)))
        bits = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                         [v, tl.full(v.shape, BASE, tl.int32), sel],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        bits = (((v >> (8 * q)) & 0xFF) << AT) | BASE
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _byte_permute(a, b, sel):
    """PTX prmt.b32 (default mode) with selector nibbles 0..7, on int32 tensors of one shape: byte k of the
    result is byte (nibble k of ``sel``) of the eight bytes b:a (a = bytes 0-3). One instruction on a GPU; the
    interpreter computes the same bits with shifts (tests/kernels/test_gemv_decode.py checks them against the
    PTX definition)."""
    if _PRMT:
        out = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel],
                                        dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = tl.zeros_like(sel)
        for k in tl.static_range(4):
            nib = (sel >> (4 * k)) & 7
            src = tl.where(nib < 4, a, b)
            out |= ((src >> (8 * (nib & 3))) & 0xFF) << (8 * k)
    return out


@triton.jit
def _signed_byte_times(v, q, d):
    """(ub - 128) * d for byte ub = byte ``q`` of int32 ``v`` (a signed byte XOR 0x80: q8_0's quants, iq4's table
    values plus 128) and an fp16 scale d, exactly: fma(1 + ub/32768, 32768 d, -32896 d) (32896 = 128 * 257: 20
    significant bits with d's 11)."""
    return tl.fma(_f32_with_byte(v, q, _ONE_BITS, 8), d * 32768.0, d * -32896.0)


@triton.jit
def _signed_byte_times_pow2(v, q, d):
    """(ub - 128) * d for byte ub = byte ``q`` of int32 ``v`` and a power-of-two fp32 scale d of any exponent
    (mxfp4's): fma(1 + ub/32768, 32768, -32896) is ub - 128 exactly, and the product with d is exact, or the
    +-Inf (or 0 for ub = 128) ggml's fp32 product also gives at the top exponent, where 32768 d would overflow."""
    return tl.fma(_f32_with_byte(v, q, _ONE_BITS, 8), 32768.0, -32896.0) * d


@triton.jit
def _nl_bytes(n, QTYPE: tl.constexpr):
    """The table values plus 128 (0..255) of the four nibbles ``n`` (one in the low half of each byte of the
    int32 word) of a non-linear format (iq4_nl and iq4_xs: int8 quants; mxfp4: doubled E2M1 values), one per
    byte: two table permutes select among values 0-7 and 8-15 by the nibble's low three bits (gathered into a
    16-bit selector), and the nibble's bit 3 picks which per byte."""
    if QTYPE == MXFP4:
        lo_words: tl.constexpr = _MXFP4_UNSIGNED_LO
        hi_words: tl.constexpr = _MXFP4_UNSIGNED_HI
    else:
        lo_words: tl.constexpr = _IQ4_NL_UNSIGNED_LO
        hi_words: tl.constexpr = _IQ4_NL_UNSIGNED_HI
    c = n & 0x07070707
    sel = c | (c >> 4)                                   # byte 0: c0 | c1 << 4; byte 2: c2 | c3 << 4
    sel = (sel & 0xFF) | ((sel >> 8) & 0xFF00)
    lo = _byte_permute(tl.full(sel.shape, lo_words[0], tl.int32), tl.full(sel.shape, lo_words[1], tl.int32), sel)
    hi = _byte_permute(tl.full(sel.shape, hi_words[0], tl.int32), tl.full(sel.shape, hi_words[1], tl.int32), sel)
    upper = ((n >> 3) & 0x01010101) * 0xFF               # 0xFF in the bytes whose nibble is 8..15
    return (hi & upper) | (lo & ~upper)


@triton.jit
def _u16_word(p, i, SHAPE: tl.constexpr):
    """For every element i, the little-endian int32 word of bytes 4 (i >> 2) .. 4 (i >> 2) + 3 of the run at
    the 2-byte-aligned byte pointer(s) ``p``, from two 16-bit loads (q3_k blocks are 110 bytes: only 2-byte
    alignment holds)."""
    h = _full(p.to(tl.pointer_type(tl.uint16)) + 2 * (i >> 2), SHAPE)
    return tl.load(h).to(tl.int32) | (tl.load(h + 1).to(tl.int32) << 16)


@triton.jit
def _u8_word(p, i, SHAPE: tl.constexpr):
    """For every element i, the little-endian int32 word of bytes 4 (i >> 2) .. 4 (i >> 2) + 3 of the run at
    byte pointer(s) ``p`` of any alignment (mxfp4's 17-byte blocks): the aligned words holding its first and
    last byte, joined by one byte permute. Each load holds a byte of the run (an aligned word reads the same
    word twice), so no load reaches past the buffer's 4-byte word that holds its last byte."""
    a = _full(p + 4 * (i >> 2), SHAPE)
    mis = (a.to(tl.int64) & 3).to(tl.int32)
    lo_word = (a - mis).to(tl.pointer_type(tl.int32))
    lo = tl.load(lo_word)
    hi = tl.load(lo_word + (mis != 0).to(tl.int32))
    return _byte_permute(lo, hi, 0x3210 + 0x1111 * mis)     # bytes mis .. mis + 3 of hi:lo


@triton.jit
def _i32_word(p, i, SHAPE: tl.constexpr):
    """For every element i, the little-endian int32 word of bytes 4 (i >> 2) .. 4 (i >> 2) + 3 of the run at
    the 4-byte-aligned byte pointer(s) ``p``: one 32-bit load."""
    return tl.load(_full(p.to(tl.pointer_type(tl.int32)) + (i >> 2), SHAPE))


@triton.jit
def _bit_to(v, FROM: tl.constexpr, TO: tl.constexpr):
    """``v`` shifted so that bit FROM of each byte lands on bit TO of the same byte (0 <= FROM, TO < 8; the
    caller masks off the bits that crossed into neighbouring bytes)."""
    if FROM >= TO:
        out = v >> (FROM - TO)
    else:
        out = v << (TO - FROM)
    return out


@triton.jit
def _half_fma_scales(d, OFFSET: tl.constexpr):
    """128 d and -(192 + OFFSET) d: times a sub-block's integer scale sc, the multiplier and addend with which
    fma(1.5 + u/128, 128 s, -(192 + OFFSET) s) is (u - OFFSET) * s, s = d * sc (exact for the few significant
    bits of d and sc)."""
    return d * 128.0, d * -(192.0 + OFFSET)


@triton.jit
def _v3_q3_k(acc, bp, xp, i, SHAPE: tl.constexpr):
    """q3_k super-block (110 B). Runs (h, t): qs bytes 32 + 32h + 16t + i hold 2-bit planes j of weights
    128h + 32j + 16t + i, whose third bit is bit 4h + j of hmask[16t + i]; sub-block 8h + 2j + t. Per plane and
    word: the plane's bits to bits 0-1 of each byte, the hmask bit to bit 2, 0xC0 OR-ed in. The weight
    (u - 4) * d * sc is then exactly fma(1.5 + u/128, 128 s, -196 s) (s = d * sc: at most 16 significant
    bits, so 128 s and 196 s are exact and so is the result)."""
    q = i & 3
    d = _f16_full(bp + 108, SHAPE)
    d128, dm196 = _half_fma_scales(d, 4)
    for t in tl.static_range(2):
        hm = _u16_word(bp + 16 * t, i, SHAPE)
        for h in tl.static_range(2):
            qs = _u16_word(bp + 32 + 32 * h + 16 * t, i, SHAPE)
            for j in tl.static_range(4):
                s = 8 * h + 2 * j + t
                sc = q3_k_unpack_scale(_byte(bp + 96 + (s & 7), SHAPE), _byte(bp + 104 + (s & 3), SHAPE), s)
                sc = sc.to(tl.float32)
                v = ((qs >> (2 * j)) & 0x03030303) | (_bit_to(hm, 4 * h + j, 2) & 0x04040404) | _HI_BITS_OF_1_5
                w = tl.fma(_f32_with_byte(v, q, _HALF_BITS, 16), sc * d128, sc * dm196)
                acc = _accumulate(acc, w, _x_full(xp + 128 * h + 32 * j + 16 * t + i, SHAPE))
    return acc


@triton.jit
def _v3_q2_k(acc, bp, xp, i, SHAPE: tl.constexpr):
    """q2_k super-block (84 B, so words are 4-byte aligned). Runs (h, t): qs bytes 16 + 32h + 16t + i hold 2-bit
    planes j of weights 128h + 32j + 16t + i; sub-block 8h + 2j + t, whose byte scales[8h + 2j + t] holds the
    scale sc (low nibble) and min m (high). Per plane and word: the plane's bits to bits 0-1 of each byte,
    0xC0 OR-ed in. The weight u * s - dmin * m (s = d * sc, exact) is fma(1.5 + u/128, 128 s, -(192 s + dmin m)):
    exact but for one rounding of the addend, as q4_k's; the addend is one FFMA of exact terms
    (sc * -192 d + -(dmin * m))."""
    q = i & 3
    d = _f16_full(bp + 80, SHAPE)
    dmin = _f16_full(bp + 82, SHAPE)
    d128, dm192 = _half_fma_scales(d, 0)
    for h in tl.static_range(2):
        for t in tl.static_range(2):
            qs = _i32_word(bp + 16 + 32 * h + 16 * t, i, SHAPE)
            for j in tl.static_range(4):
                sc, mn = q2_k_scale_min(_byte(bp + 8 * h + 2 * j + t, SHAPE))
                sc = sc.to(tl.float32)
                addend = tl.fma(sc, dm192, -(dmin * mn.to(tl.float32)))
                v = ((qs >> (2 * j)) & 0x03030303) | _HI_BITS_OF_1_5
                w = tl.fma(_f32_with_byte(v, q, _HALF_BITS, 16), sc * d128, addend)
                acc = _accumulate(acc, w, _x_full(xp + 128 * h + 32 * j + 16 * t + i, SHAPE))
    return acc


@triton.jit
def _v3_q4_k_q5_k(acc, bp, xp, i, SHAPE: tl.constexpr, IS_Q5: tl.constexpr):
    """q4_k (144 B) / q5_k (176 B) super-block. Runs (c, h): qs bytes (16, q5_k: 48) + 32c + 16h + i hold
    weights 64c + 16h + i (low nibble, sub-block 2c) and 64c + 32 + 16h + i (high nibble, sub-block 2c + 1);
    q5_k's fifth bits are bits 2c / 2c + 1 of qh[16h + i] (at 16), moved word-wide to bit 4 of each byte.
    The weight u * s - dmin * m is fma(1.5 + u/128, 128 s, -(192 s + dmin * m)): exact but for one rounding
    of the addend (at most 2**-24 * (192 s + dmin * m), where ggml rounds u * s and the difference instead)."""
    q = i & 3
    d = _f16_full(bp, SHAPE)
    dmin = _f16_full(bp + 2, SHAPE)
    QS: tl.constexpr = 48 if IS_Q5 else 16
    for c in tl.static_range(4):
        for half in tl.static_range(2):
            sc, mn = _k4_scale_min_full(bp + 4, 2 * c + half, SHAPE)
            scale = d * sc.to(tl.float32)
            addend = -(scale * 192.0 + dmin * mn.to(tl.float32))
            for h in tl.static_range(2):
                word = _i32_word(bp + QS + 32 * c + 16 * h, i, SHAPE)
                v = ((word >> (4 * half)) & 0x0F0F0F0F) | _HI_BITS_OF_1_5
                if IS_Q5:
                    qh = _i32_word(bp + 16 + 16 * h, i, SHAPE)
                    v |= _bit_to(qh, 2 * c + half, 4) & 0x10101010
                w = tl.fma(_f32_with_byte(v, q, _HALF_BITS, 16), scale * 128.0, addend)
                acc = _accumulate(acc, w, _x_full(xp + 64 * c + 32 * half + 16 * h + i, SHAPE))
    return acc


@triton.jit
def _v3_q6_k(acc, bp, xp, i, SHAPE: tl.constexpr):
    """q6_k super-block (210 B). Halves n, runs r, k = 0..3: ql bytes 64n + 32 (k & 1) + 16r + i hold in
    nibble k >> 1 the low four bits of weights 128n + 32k + 16r + i, whose top two bits are bits 2k, 2k + 1 of
    qh[32n + 16r + i] (at 128); sub-block 8n + 2k + r (int8 scales at 192, d at 208). Per word: the nibble to
    bits 0-3, the top bits to 4-5, 0xC0 OR-ed in. The weight (u - 32) * d * sc is then exactly
    fma(1.5 + u/128, 128 s, -224 s) (s = d * sc: at most 19 significant bits, 224 s at most 22, the
    result at most 24)."""
    q = i & 3
    d = _f16_full(bp + 208, SHAPE)
    d128, dm224 = _half_fma_scales(d, 32)
    for n in tl.static_range(2):
        for r in tl.static_range(2):
            qh = _u16_word(bp + 128 + 32 * n + 16 * r, i, SHAPE)
            for odd in tl.static_range(2):
                ql = _u16_word(bp + 64 * n + 32 * odd + 16 * r, i, SHAPE)
                for hi in tl.static_range(2):
                    k = 2 * hi + odd
                    sc = int8_from_byte(_byte(bp + 192 + 8 * n + 2 * k + r, SHAPE)).to(tl.float32)
                    v = ((ql >> (4 * hi)) & 0x0F0F0F0F) | (_bit_to(qh, 2 * k, 4) & 0x30303030) | _HI_BITS_OF_1_5
                    w = tl.fma(_f32_with_byte(v, q, _HALF_BITS, 16), sc * d128, sc * dm224)
                    acc = _accumulate(acc, w, _x_full(xp + 128 * n + 32 * k + 16 * r + i, SHAPE))
    return acc


@triton.jit
def _v3_iq4_xs(acc, bp, xp, i, SHAPE: tl.constexpr):
    """iq4_xs super-block (136 B; see _step_iq4_xs). Per sub-block g and word of its 16 qs bytes (at 8 + 16g):
    the table values of both nibble halves looked up word-wide (_nl_bytes), value * d made exactly as
    q8_0's weights (fma(1 + ub/32768, 32768 d, -32896 d)); the two products with x are summed, then scaled by
    the integer ls - 32 into the accumulator (one FFMA per two weights instead of a multiply per weight). One
    FFMA with the scale d * (ls - 32) folded in would round its addend (26 significant bits); this way each
    weight is exact (value * d has 18 significant bits, times ls - 32 at most 24)."""
    q = i & 3
    d = _f16_full(bp, SHAPE)
    high = _byte(bp + 2, SHAPE) | (_byte(bp + 3, SHAPE) << 8)
    for g in tl.static_range(8):
        sc = (iq4_xs_unpack_scale(_byte(bp + 4 + g // 2, SHAPE), high, g) - 32).to(tl.float32)
        word = _i32_word(bp + 8 + 16 * g, i, SHAPE)
        part = tl.zeros(SHAPE, dtype=tl.float32)
        for b in tl.static_range(2):
            ub = _nl_bytes((word >> (4 * b)) & 0x0F0F0F0F, IQ4_NL)
            w = _signed_byte_times(ub, q, d)
            part = _accumulate(part, w, _x_full(xp + 32 * g + 16 * b + i, SHAPE))
        acc = _accumulate(acc, part, sc)
    return acc


@triton.jit
def _spread_nibble_to_bit4(t):
    """The four bits of ``t`` (int32 0..15) to bit 4 of bytes 0..3: t * 0x00204081 puts copies of t at bits 0,
    7, 14 and 21 (no carries: they do not overlap), so bits 0, 8, 16 and 24 are t's bits 0, 1, 2 and 3."""
    return ((t * 0x00204081) & 0x01010101) << 4


@triton.jit
def _v3_blocks(acc, w_rows, x_rows, step, n_blocks, i, SHAPE: tl.constexpr, QTYPE: tl.constexpr,
               TAIL: tl.constexpr):
    """Eight blocks g of a 32-weight format (decode.BLOCK32_*). Nibble formats: qs[j] holds weights j (low
    nibble) and 16 + j (high); q5_0/q5_1's fifth bits (bits j / 16 + j of the 32-bit qh) are spread word-wide
    to bit 4 of each byte. (u - o) * d is then exactly fma(1.5 + u/128, 128 d, -(192 + o) d) (q4_0: o = 8,
    -200 d; q5_0: o = 16, -208 d; both 3-bit multipliers of d's 11 bits); q4_1/q5_1's u * d + m is
    fma(1.5 + u/128, 128 d, m - 192 d), exact but for one rounding of the addend (ggml rounds u * d + m once);
    iq4_nl: the nibbles' table values plus 128 are looked up word-wide by byte permutes (_nl_bytes), then
    scaled as q8_0's bytes; mxfp4 likewise, its quants read at any alignment (_u8_word) and its scale a power of
    two (_signed_byte_times_pow2). q8_0: qs[j] (at 2) is the int8 weight j,
    made 0..255 word-wide (XOR 0x80); (ub - 128) * d is exactly fma(1 + ub/32768, 32768 d, -32896 d)
    (32896 = 128 * 257: 20 significant bits with d's 11). TAIL: the step may run past the row's n_blocks
    blocks; those read the last block again (loads stay in bounds and unmasked: masked loads are not merged
    per word) and count as d = m = 0, x = 0."""
    q = i & 3
    BLOCK_BYTES: tl.constexpr = BLOCK32_BYTES[QTYPE]
    QS: tl.constexpr = BLOCK32_QS_AT[QTYPE]
    QH: tl.constexpr = BLOCK32_QH_AT[QTYPE]
    for g in tl.static_range(8):
        blk = step * 8 + g
        if TAIL:
            valid = blk < n_blocks
            blk = tl.minimum(blk, n_blocks - 1)
        bp = w_rows + blk * BLOCK_BYTES
        if QTYPE == MXFP4:
            d = e8m0_half(_byte(bp, SHAPE))
        else:
            d = _f16_full(bp, SHAPE)
        if TAIL:
            d = tl.where(valid, d, 0.0)
        if HAS_MIN[QTYPE]:
            m = _f16_full(bp + 2, SHAPE)
            if TAIL:
                m = tl.where(valid, m, 0.0)
            addend = m - d * 192.0
        elif QTYPE != MXFP4:        # (mxfp4's d may be as large as 2**127: no addend, which would overflow)
            addend = d * -(192.0 + BLOCK32_QUANT_OFFSET[QTYPE])
        if QH != 0:
            h = _full((bp + QH).to(tl.pointer_type(tl.uint16)), SHAPE)
            qh = tl.load(h).to(tl.int32) | (tl.load(h + 1).to(tl.int32) << 16)
        for b in tl.static_range(2):
            if QTYPE == Q8_0:
                word = _u16_word(bp + 2 + 16 * b, i, SHAPE) ^ _SIGN_BITS
                w = _signed_byte_times(word, q, d)
            else:
                if b == 0:
                    if QTYPE == MXFP4:
                        word = _u8_word(bp + QS, i, SHAPE)
                    else:
                        word = _u16_word(bp + QS, i, SHAPE)
                if QTYPE == IQ4_NL:     # (value + 128) * d, less 128 d: as q8_0's bytes
                    ub = _nl_bytes((word >> (4 * b)) & 0x0F0F0F0F, IQ4_NL)
                    w = _signed_byte_times(ub, q, d)
                elif QTYPE == MXFP4:    # value * d for a power of two d of any exponent
                    ub = _nl_bytes((word >> (4 * b)) & 0x0F0F0F0F, MXFP4)
                    w = _signed_byte_times_pow2(ub, q, d)
                else:
                    v = ((word >> (4 * b)) & 0x0F0F0F0F) | _HI_BITS_OF_1_5
                    if QH != 0:
                        v |= _spread_nibble_to_bit4((qh >> (16 * b + 4 * (i >> 2))) & 15)
                    w = tl.fma(_f32_with_byte(v, q, _HALF_BITS, 16), d * 128.0, addend)
            x = _x_full(x_rows + 32 * blk + 16 * b + i, SHAPE)
            if TAIL:
                x = tl.where(valid, x, 0.0)
            acc = _accumulate(acc, w, x)
    return acc


# ---------------------------------------------------------------------------------- kernel
@triton.jit
def _gemv_layout1(w_rows, x_rows, step_begin, step_end, K, QTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, TILE_A: tl.constexpr, TILE_B: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) partial sums over steps [step_begin, step_end), storage-order tiles."""
    acc = tl.zeros((BLOCK_M, BLOCK_N, TILE_A, TILE_B), dtype=tl.float32)
    acc_min = tl.zeros((BLOCK_M, BLOCK_N, TILE_A), dtype=tl.float32)
    for step in range(step_begin, step_end):
        if QTYPE == Q4_K:
            acc, acc_min = _step_q4_k_q5_k(acc, acc_min, w_rows + step * 144, x_rows + step * 256, False)
        elif QTYPE == Q5_K:
            acc, acc_min = _step_q4_k_q5_k(acc, acc_min, w_rows + step * 176, x_rows + step * 256, True)
        elif QTYPE == Q3_K:
            acc = _step_q3_k(acc, w_rows + step * 110, x_rows + step * 256)
        elif QTYPE == Q2_K:
            acc = _step_q2_k(acc, w_rows + step * 84, x_rows + step * 256)
        elif QTYPE == Q6_K:
            acc = _step_q6_k(acc, w_rows + step * 210, x_rows + step * 256)
        elif QTYPE == IQ4_XS:
            acc = _step_iq4_xs(acc, w_rows + step * 136, x_rows + step * 256)
        elif QTYPE == Q8_0:
            acc = _step_q8_0(acc, w_rows, x_rows, step, K // 32)
        else:  # the 32-weight nibble formats
            acc = _step_nibble_blocks(acc, w_rows, x_rows, step, K // 32, QTYPE)
    y = tl.sum(tl.sum(acc, axis=3), axis=2)
    if QTYPE == Q4_K or QTYPE == Q5_K:
        y -= tl.sum(acc_min, axis=2)
    return y


@triton.jit
def _gemv_layout2(w_rows, x_rows, step_begin, step_end, K, QTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) partial sums over steps [step_begin, step_end), per-thread chunks."""
    if QTYPE == Q4_K or QTYPE == Q5_K:
        A: tl.constexpr = 4
        B: tl.constexpr = 2
    elif QTYPE == Q3_K or QTYPE == Q2_K:
        A: tl.constexpr = 2
        B: tl.constexpr = 2
    elif QTYPE == Q6_K:
        A: tl.constexpr = 2
        B: tl.constexpr = 4
    elif QTYPE == Q8_0:
        A: tl.constexpr = 8
        B: tl.constexpr = 2
    else:  # iq4_xs and the 32-weight nibble formats
        A: tl.constexpr = 8
        B: tl.constexpr = 1
    SHAPE: tl.constexpr = (BLOCK_M, BLOCK_N, A, B, 16)
    a = tl.arange(0, A)[None, None, :, None, None]
    b = tl.arange(0, B)[None, None, None, :, None]
    i = tl.arange(0, 16)[None, None, None, None, :]
    rows = w_rows[None, :, None, None, None]
    xs = x_rows[:, None, None, None, None]
    acc = tl.zeros(SHAPE, dtype=tl.float32)
    for step in tl.range(step_begin, step_end, num_stages=STAGES):
        if QTYPE == Q4_K:
            acc = _v2_q4_k_q5_k(acc, rows + step * 144, xs + step * 256, a, b, i, SHAPE, False)
        elif QTYPE == Q5_K:
            acc = _v2_q4_k_q5_k(acc, rows + step * 176, xs + step * 256, a, b, i, SHAPE, True)
        elif QTYPE == Q3_K:
            acc = _v2_q3_k(acc, rows + step * 110, xs + step * 256, a, b, i, SHAPE)
        elif QTYPE == Q2_K:
            acc = _v2_q2_k(acc, rows + step * 84, xs + step * 256, a, b, i, SHAPE)
        elif QTYPE == Q6_K:
            acc = _v2_q6_k(acc, rows + step * 210, xs + step * 256, a, b, i, SHAPE)
        elif QTYPE == IQ4_XS:
            acc = _v2_iq4_xs(acc, rows + step * 136, xs + step * 256, a, i, SHAPE)
        elif QTYPE == Q8_0:
            acc = _v2_q8_0(acc, rows, xs, step, K // 32, a, b, i, SHAPE)
        else:  # the 32-weight nibble formats
            acc = _v2_nibble_blocks(acc, rows, xs, step, K // 32, a, i, SHAPE, QTYPE)
    return tl.sum(tl.sum(tl.sum(acc, axis=4), axis=3), axis=2)


@triton.jit
def _gemv_layout3(w_rows, x_rows, step_begin, step_end, K, QTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) partial sums over steps [step_begin, step_end), word-wide decode."""
    # The token axis comes after the rows in the layout's order, so that a thread holds every token of its
    # rows and the weight decode (the same for every token) is done once per thread, not once per token.
    rows = w_rows[None, :, None]
    if _WEIGHT_AXIS_FIRST:
        SHAPE: tl.constexpr = (16, BLOCK_N, BLOCK_M)
        i = tl.arange(0, 16)[:, None, None]
        xs = x_rows[None, None, :]
    else:
        SHAPE: tl.constexpr = (BLOCK_M, BLOCK_N, 16)
        i = tl.arange(0, 16)[None, None, :]
        xs = x_rows[:, None, None]
    acc = tl.zeros(SHAPE, dtype=tl.float32)
    full_steps = K // 256          # 32-weight block rows may end inside a step: that one runs after the loop
    for step in tl.range(step_begin, tl.minimum(step_end, full_steps), num_stages=STAGES):
        if QTYPE == Q3_K:
            acc = _v3_q3_k(acc, rows + step * 110, xs + step * 256, i, SHAPE)
        elif QTYPE == Q2_K:
            acc = _v3_q2_k(acc, rows + step * 84, xs + step * 256, i, SHAPE)
        elif QTYPE == Q4_K:
            acc = _v3_q4_k_q5_k(acc, rows + step * 144, xs + step * 256, i, SHAPE, False)
        elif QTYPE == Q5_K:
            acc = _v3_q4_k_q5_k(acc, rows + step * 176, xs + step * 256, i, SHAPE, True)
        elif QTYPE == Q6_K:
            acc = _v3_q6_k(acc, rows + step * 210, xs + step * 256, i, SHAPE)
        elif QTYPE == IQ4_XS:
            acc = _v3_iq4_xs(acc, rows + step * 136, xs + step * 256, i, SHAPE)
        else:  # the 32-weight block formats
            acc = _v3_blocks(acc, rows, xs, step, K // 32, i, SHAPE, QTYPE, False)
    if BLOCK32[QTYPE]:
        # Only the slice the partial step belongs to (a forced split_k that does not divide the steps leaves
        # empty slices past the end, which must not take it too).
        if (step_begin <= full_steps) & (full_steps < step_end):
            acc = _v3_blocks(acc, rows, xs, full_steps, K // 32, i, SHAPE, QTYPE, True)
    if _WEIGHT_AXIS_FIRST:
        y = tl.trans(tl.sum(acc, axis=0))
    else:
        y = tl.sum(acc, axis=2)
    return y


@triton.jit
def gemv_k_slice(K, split_k, pid_k):
    """[step_begin, step_end): the 256-weight steps of K slice ``pid_k`` of ``split_k`` equal slices."""
    n_steps = tl.cdiv(K, 256)
    steps_per_split = tl.cdiv(n_steps, split_k)
    step_begin = pid_k * steps_per_split
    return step_begin, tl.minimum(step_begin + steps_per_split, n_steps)


@triton.jit
def gemv_partial_sums(w_rows, x_rows, step_begin, step_end, K, QTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, TILE_A: tl.constexpr, TILE_B: tl.constexpr, WORD_LOADS: tl.constexpr,
                      LAYOUT: tl.constexpr, STAGES: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) fp32 partial sums of steps [step_begin, step_end) in loop layout LAYOUT."""
    if LAYOUT == 3:
        tl.static_assert(WORD_LOADS, "GEMV layout 3 needs word-aligned weight bytes")
        y = _gemv_layout3(w_rows, x_rows, step_begin, step_end, K, QTYPE, BLOCK_M, BLOCK_N, STAGES)
    elif LAYOUT == 2:
        y = _gemv_layout2(w_rows, x_rows, step_begin, step_end, K, QTYPE, BLOCK_M, BLOCK_N, STAGES)
    else:
        y = _gemv_layout1(w_rows, x_rows, step_begin, step_end, K, QTYPE, BLOCK_M, BLOCK_N, TILE_A, TILE_B)
    return y


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, row_bytes, split_k,
                 M_BUCKET,
                 QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 TILE_A: tl.constexpr, TILE_B: tl.constexpr, WORD_LOADS: tl.constexpr, LAYOUT: tl.constexpr,
                 STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Out-of-range rows/tokens are clamped onto the last valid one: every load stays in bounds without
    # masks (masks would break the byte-run vectorization); their results are never stored.
    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * row_bytes
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64) * stride_xm
    step_begin, step_end = gemv_k_slice(K, split_k, pid_k)
    y = gemv_partial_sums(w_rows, x_rows, step_begin, step_end, K, QTYPE, BLOCK_M, BLOCK_N, TILE_A, TILE_B,
                          WORD_LOADS, LAYOUT, STAGES)
    store_output(y, offs_m, offs_n, M, N, bias_ptr, out_ptr, ws_ptr, cnt_ptr, pid_m * tl.num_programs(0) + pid_n,
                 split_k, HAS_BIAS)


_GEMV_KEY = ("M_BUCKET", "N", "K", "QTYPE", "HAS_BIAS", "WORD_LOADS")

_gemv_tuned = triton.autotune(configs=configs.gemv_configs(), key=list(_GEMV_KEY),
                              prune_configs_by={"early_config_prune": configs.prune_gemv_configs})(_gemv_kernel)


# ---------------------------------------------------------------------------------- launcher
def gemv(x2d: torch.Tensor, qt, bias: "torch.Tensor | None", out: torch.Tensor, *,
         split_k: "int | None" = None, layout: "int | None" = None) -> str:
    """out (M, N) = x2d (M, K) @ W.T (+ bias) with the GEMV kernel; returns the variant that ran
    ("gemv" or "gemv_splitk"). Inputs are validated by the caller (qmatmul): x2d has unit stride along K,
    out is contiguous of x2d's dtype. ``split_k`` forces that many K slices (no tuning); None tunes it.
    ``layout`` (see configs.GEMV_LAYOUTS) asks for that loop layout (no tuning); the heuristic falls back
    from it where it cannot run (see configs.gemv_heuristic_config)."""
    if layout is not None and layout not in configs.GEMV_LAYOUTS:
        raise ValueError(f"unknown GEMV layout {layout!r}; expected one of {configs.GEMV_LAYOUTS}")
    m, k = x2d.shape
    n = qt.shape[0]
    block_m = configs.gemv_block_m(m)
    tile_a, tile_b = configs.GEMV_TILE[qt.qtype]
    args = dict(x_ptr=x2d, w_ptr=qt.data, bias_ptr=bias if bias is not None else out, out_ptr=out,
                M=m, N=n, K=k, stride_xm=x2d.stride(0), row_bytes=qt.row_bytes,
                M_BUCKET=configs.next_power_of_2(m), QTYPE=QTYPE_CODES[qt.qtype], HAS_BIAS=bias is not None,
                BLOCK_M=block_m, TILE_A=tile_a, TILE_B=tile_b, WORD_LOADS=configs.gemv_word_loads(qt))

    def grid(meta):
        return (configs.cdiv(n, meta["BLOCK_N"]), meta["split_k"], configs.cdiv(m, block_m))

    sms = sm_count(x2d.device)
    split = launch_split_k(_gemv_tuned, grid, args, tuning_key("gemv", args, _GEMV_KEY),
                           lambda: configs.gemv_heuristic_config(m, n, k, qt.qtype, sms, split_k, layout,
                                                                 word_loads=args["WORD_LOADS"]),
                           tune=split_k is None and layout is None, out=out)
    variant = "gemv_splitk" if split > 1 else "gemv"
    count_launch(variant)
    return variant
