"""Per-format GGUF decode helpers shared by the Triton kernels (@triton.jit device functions).

The values follow docs/block-formats.md (ggml's ``dequantize_row_*``) exactly:

* integer quants become fp32 through the 2**23 "magic number" (OR the small unsigned integer into the
  mantissa of 2**23, reinterpret as fp32, subtract 2**23 + offset). It is exact for 0 <= u < 2**23 and
  costs one integer op and one FADD instead of a quarter-rate int->float conversion;
* scales are applied in ggml's order, ``(d * sc) * q - (dmin * m)``. ``fmul``/``fsub`` keep every
  product and difference separately rounded: on a GPU with libdevice's ``mul_rn``/``sub_rn`` (PTX
  ``mul.rn.f32``/``sub.rn.f32``, which ptxas never contracts into an FMA), in the interpreter with plain
  numpy ops (which never fuse). A contracted ``fma(d1, q, -m1)`` would change last bits. (Triton links
  libdevice in flush-to-zero mode, i.e. ``mul.rn.ftz``; harmless here: the smallest nonzero magnitude in
  these products is 2**-24, the smallest fp16 subnormal, far above the fp32 subnormal range.)
  tests/kernels/test_compile_sm90.py checks the compiled dequantize kernels contain no FFMA.

Two families of helpers:

* ``decode_tile``: a (BLOCK_N, NSUB, SUB) tile of fp32 weights in natural K order (element
  k0 + SUB*s + l of each row) for the GEMM and the dequantize kernel; bit-exact with the torch reference.
  ``decode_tile_f16`` is the same tile in fp16 arithmetic for the GEMM with fp16 activations (two weights
  per instruction, within a stated bound instead of bit-exact); both read bytes through ``_tile_parts``.
* the building blocks the GEMV uses to decode bytes in their storage order (``f16_field``,
  ``scaled_quant``, ``k4_scale_min``, ``q3_k_scale``, ``q6_k_scale``). ``scaled_quant`` folds the
  int->float conversion into the scale multiply (one FFMA, exact product, but a zero result is always +0,
  so it is not used where bits must match). It needs a true single-rounding tl.fma, which GPUs have and
  Triton's interpreter emulates (the GEMV tests would fail by half a quantization step otherwise).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..formats import get_spec
from ..formats.iq4_nl import IQ4_NL_VALUES
from ..formats.mxfp4 import MXFP4_VALUES

#: Format names in code order: a format's code (the QTYPE constexpr passed to kernels) is its index. Formats are
#: appended, never reordered, so a code stays what tuning keys and compiled kernels were made with.
_NAMES_BY_CODE = ("q4_0", "q8_0", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs", "q4_1", "q5_0", "q5_1", "iq4_nl", "q2_k",
                  "mxfp4")
QTYPE_CODES = {name: code for code, name in enumerate(_NAMES_BY_CODE)}

# The codes by name for the kernels' branches (``BLOCK32[QTYPE]`` tells the 32-weight block formats from the
# 256-weight super-block ones: a Triton 3.6 jit helper cannot return a constexpr to branch on).
Q4_0 = tl.constexpr(QTYPE_CODES["q4_0"])
Q8_0 = tl.constexpr(QTYPE_CODES["q8_0"])
Q3_K = tl.constexpr(QTYPE_CODES["q3_k"])
Q4_K = tl.constexpr(QTYPE_CODES["q4_k"])
Q5_K = tl.constexpr(QTYPE_CODES["q5_k"])
Q6_K = tl.constexpr(QTYPE_CODES["q6_k"])
IQ4_XS = tl.constexpr(QTYPE_CODES["iq4_xs"])
Q4_1 = tl.constexpr(QTYPE_CODES["q4_1"])
Q5_0 = tl.constexpr(QTYPE_CODES["q5_0"])
Q5_1 = tl.constexpr(QTYPE_CODES["q5_1"])
IQ4_NL = tl.constexpr(QTYPE_CODES["iq4_nl"])
Q2_K = tl.constexpr(QTYPE_CODES["q2_k"])
MXFP4 = tl.constexpr(QTYPE_CODES["mxfp4"])

#: The formats of 32-weight blocks (all but the super-block formats).
BLOCK32_QTYPES = frozenset(name for name in QTYPE_CODES if get_spec(name).block_size == 32)

#: Weights per scale (the sub-block a scale covers): BLOCK_K of the tile decoders must be a multiple.
SUB_BLOCK = {**dict.fromkeys(QTYPE_CODES, 32), "q2_k": 16, "q3_k": 16, "q6_k": 16}


def _per_code(fact) -> tl.constexpr:
    """``fact(spec)`` of every format, as a constexpr tuple indexed by the QTYPE code inside kernels."""
    return tl.constexpr(tuple(fact(get_spec(name)) for name in _NAMES_BY_CODE))


# Per format code, from the specs (0 for the super-block formats where a fact is about 32-weight blocks):
#: whether it is a format of 32-weight blocks (else of 256-weight super-blocks);
BLOCK32: tl.constexpr = _per_code(lambda s: s.block_size == 32)
#: bytes per 32-weight block;
BLOCK32_BYTES: tl.constexpr = _per_code(lambda s: s.block_bytes if s.block_size == 32 else 0)
#: where its quants start: they end the block (16 nibble bytes; q8_0's 32 int8);
BLOCK32_QS_AT: tl.constexpr = _per_code(lambda s: s.block_bytes - (32 if s.name == "q8_0" else 16) if s.block_size == 32 else 0)
#: where q5_0/q5_1 keep the 32 fifth bits (a little-endian uint32: bit j is weight j's); 0: no fifth bits;
BLOCK32_QH_AT: tl.constexpr = _per_code(lambda s: {"q5_0": 2, "q5_1": 4}.get(s.name, 0))
#: the offset subtracted from the unsigned quant (q8_0: its byte XOR 0x80); iq4_nl maps nibbles by table;
BLOCK32_QUANT_OFFSET: tl.constexpr = _per_code(lambda s: {"q4_0": 8, "q8_0": 128, "q5_0": 16}.get(s.name, 0))
#: whether a weight has a min term (the formats with a second fp16 field: q2_k/q4_k/q5_k: - dmin * m;
#: q4_1/q5_1: + m, the fp16 at byte 2).
HAS_MIN: tl.constexpr = _per_code(lambda s: len(s.fp16_offsets) == 2)


def table_words(values, bias: int = 0) -> tuple[int, ...]:
    """Small integers ``values`` + ``bias``, one byte each, as little-endian int32 words (four per word)."""
    words = []
    for w in range(0, len(values), 4):
        word = sum(((v + bias) & 0xFF) << (8 * j) for j, v in enumerate(values[w:w + 4]))
        words.append(word - (1 << 32) if word >= 1 << 31 else word)
    return tuple(words)


#: iq4_nl's 16 int8 quant values (ggml's kvalues_iq4nl) as four int32 words, for nl_value.
_IQ4_NL_WORDS: tl.constexpr = tl.constexpr(table_words(IQ4_NL_VALUES))
#: mxfp4's 16 doubled E2M1 values (ggml's kvalues_mxfp4) as four int32 words, for nl_value.
_MXFP4_WORDS: tl.constexpr = tl.constexpr(table_words(MXFP4_VALUES))


# ------------------------------------------------------------------------------------- scalar helpers
@triton.jit
def fmul(a, b, RN: tl.constexpr):
    """a * b rounded on its own (never fused with a later add when RN, i.e. on a GPU)."""
    if RN:
        a, b = tl.broadcast(a, b)
        return libdevice.mul_rn(a, b)
    else:
        return a * b


@triton.jit
def fsub(a, b, RN: tl.constexpr):
    """a - b rounded on its own (never fused with an earlier multiply when RN)."""
    if RN:
        a, b = tl.broadcast(a, b)
        return libdevice.sub_rn(a, b)
    else:
        return a - b


@triton.jit
def small_uint_to_f32(u, OFFSET: tl.constexpr):
    """float(u) - OFFSET, exactly, for int32 0 <= u < 2**23 (see module docstring)."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def scaled_quant(u, scale_2p23, OFFSET: tl.constexpr):
    """(u - OFFSET) * scale in one integer op and one FFMA, for int32 0 <= u < 2**22, given scale_2p23 =
    scale * 2**23 where scale has at most 22 significant bits (an fp16 d times a small integer: 1.5 *
    scale_2p23 is then exact). The bits 0x3FC00000 + (u - OFFSET) are the fp32 1.5 + (u - OFFSET) * 2**-23,
    so fma(val, scale_2p23, -1.5 * scale_2p23) is the exact product (u - OFFSET) * scale rounded once:
    the value small_uint_to_f32(u, OFFSET) * scale gives, one FADD cheaper. Only a zero result's sign may
    differ (always +0), which is why the bit-exact tile decoder does not use it; the GEMV does."""
    if OFFSET == 0:
        bits = u | 0x3FC00000
    else:
        bits = u + (0x3FC00000 - OFFSET)
    return tl.fma(bits.to(tl.float32, bitcast=True), scale_2p23, -1.5 * scale_2p23)


@triton.jit
def f16_from_bytes(lo, hi):
    """The fp16 whose little-endian bytes are ``lo``, ``hi`` (int32 0..255), as fp32."""
    return (lo | (hi << 8)).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def f16_field(ptr):
    """The little-endian fp16 at byte pointer(s) ``ptr``, as fp32. Assembled from two byte loads so that
    no alignment is assumed (blocks of 18, 34, 110, 210 bytes leave fields only 2-byte aligned, and the
    weight bytes may start anywhere inside a transfer slot)."""
    return f16_from_bytes(tl.load(ptr).to(tl.int32), tl.load(ptr + 1).to(tl.int32))


@triton.jit
def f16_field_masked(ptr, mask):
    """f16_field with masked-off lanes reading as 0.0."""
    return f16_from_bytes(tl.load(ptr, mask=mask, other=0).to(tl.int32),
                          tl.load(ptr + 1, mask=mask, other=0).to(tl.int32))


@triton.jit
def k4_unpack_scale_min(a, b, c, s):
    """q4_k/q5_k 6-bit (scale, min) of sub-block(s) ``s`` (0..7) from the int32 bytes a = scales[s],
    b = scales[s + 4], c = scales[s & 3] (scales[s - 4] when s >= 4), any broadcastable shapes."""
    low_half = s < 4
    sc = tl.where(low_half, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(low_half, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc, mn


@triton.jit
def k4_scale_min(scales_ptr, s):
    """q4_k/q5_k 6-bit (scale, min) of sub-blocks ``s`` (int32 (S,), values 0..7) for the rows whose
    ``scales[12]`` start at ``scales_ptr`` ((BN,) byte pointers): two int32 (BN, S) tensors."""
    p = scales_ptr[:, None]
    return k4_unpack_scale_min(tl.load(p + s[None, :]).to(tl.int32), tl.load(p + (s + 4)[None, :]).to(tl.int32),
                               tl.load(p + (s & 3)[None, :]).to(tl.int32), s[None, :])


@triton.jit
def k4_head_from_words(bp, s):
    """q4_k/q5_k (d, dmin, sc, mn) of sub-blocks ``s`` ((S,) int32) for the blocks at byte pointers ``bp``
    ((BN,), 4-byte aligned), read as the four little-endian int32 words of the 16-byte block head (d, dmin;
    scales[0:4]; scales[4:8]; scales[8:12]) instead of seven byte loads: one (BN, 4) load that Triton's
    pipeliner can copy asynchronously a step ahead (byte loads stay in the loop, their latency exposed).
    Returns fp32 (BN,) d and dmin and int32 (BN, S) sc and mn, the values k4_scale_min and f16_field give."""
    words = tl.load(bp.to(tl.pointer_type(tl.int32))[:, None] + tl.arange(0, 4)[None, :])
    even, odd = tl.split(tl.reshape(words, (words.shape[0], 2, 2)))      # (w0, w2), (w1, w3)
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    w1 = w1[:, None]
    w2 = w2[:, None]
    w3 = w3[:, None]
    d = f16_from_bytes(w0 & 255, (w0 >> 8) & 255)
    dmin = f16_from_bytes((w0 >> 16) & 255, (w0 >> 24) & 255)
    sc, mn = k4_scale_min_from_words(w1, w2, w3, s[None, :])
    return d, dmin, sc, mn


@triton.jit
def k4_scale_min_from_words(w1, w2, w3, s):
    """q4_k/q5_k 6-bit (scale, min) of sub-block(s) ``s`` (0..7) from the int32 words w1, w2, w3 holding
    scales[0:4], scales[4:8], scales[8:12] little-endian; any broadcastable shapes."""
    shift = 8 * (s & 3)
    low_half = s < 4
    a = (tl.where(low_half, w1, w2) >> shift) & 255        # scales[s]
    b = (tl.where(low_half, w2, w3) >> shift) & 255        # scales[s + 4]
    c = (w1 >> shift) & 255                                # scales[s & 3]
    return k4_unpack_scale_min(a, b, c, s)


@triton.jit
def q3_k_unpack_scale(low_byte, high_byte, s):
    """q3_k signed sub-block scale (sc3[s] - 32) of sub-block(s) ``s`` (0..15) from the int32 bytes
    low_byte = scales[s % 8] (low 4 bits: its nibble s // 8) and high_byte = scales[8 + s % 4] (high 2
    bits: its field s // 4), any broadcastable shapes."""
    low = (low_byte >> (4 * (s >> 3))) & 15
    high = (high_byte >> (2 * (s >> 2))) & 3
    return (low | (high << 4)) - 32


@triton.jit
def q3_k_scale(scales_ptr, s):
    """q3_k signed sub-block scales (sc3[s] - 32) of sub-blocks ``s`` (int32 (S,), 0..15) for the rows
    whose ``scales[12]`` start at ``scales_ptr`` ((BN,) byte pointers): int32 (BN, S)."""
    p = scales_ptr[:, None]
    return q3_k_unpack_scale(tl.load(p + (s & 7)[None, :]).to(tl.int32),
                             tl.load(p + (8 + (s & 3))[None, :]).to(tl.int32), s[None, :])


@triton.jit
def q2_k_scale_min(sc_byte):
    """q2_k 4-bit (scale, min) of a sub-block from its byte ``scales[s]`` (int32 0..255): low and high nibble."""
    return sc_byte & 15, sc_byte >> 4


@triton.jit
def int8_from_byte(b):
    """The int8 value of byte(s) ``b`` (int32 0..255)."""
    return (b ^ 0x80) - 128


@triton.jit
def nl_value(nib, QTYPE: tl.constexpr):
    """The table value of the nibble(s) ``nib`` (int32 0..15) of a non-linear 32-weight format, int32: iq4_nl's
    int8 quant, or mxfp4's doubled E2M1 value. Byte nib & 3 of table word nib >> 2: three selects, a shift and a
    sign extension, no table in memory (the format picks the words at compile time)."""
    if QTYPE == MXFP4:
        words: tl.constexpr = _MXFP4_WORDS
    else:
        words: tl.constexpr = _IQ4_NL_WORDS
    word = tl.where(nib < 8, tl.where(nib < 4, words[0], words[1]), tl.where(nib < 12, words[2], words[3]))
    return int8_from_byte((word >> (8 * (nib & 3))) & 255)


@triton.jit
def iq4_nl_value(nib):
    """iq4_nl's int8 quant value of nibble(s) ``nib`` (iq4_xs shares the table)."""
    return nl_value(nib, IQ4_NL)


@triton.jit
def e8m0_half(e):
    """2**(e - 128) as fp32 for exponent byte(s) ``e`` (int32 0..255): ggml's GGML_E8M0_TO_FP32_HALF, built from
    its bits (subnormal for e = 0, 1)."""
    bits = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def block32_scale(bp, mask, QTYPE: tl.constexpr):
    """The scale d of the 32-weight block(s) at byte pointer(s) ``bp`` (masked-off lanes: 0 or mxfp4's 2**-128,
    which only ever multiplies masked-off zeros), as fp32: the fp16 at byte 0, or mxfp4's exponent byte."""
    if QTYPE == MXFP4:
        return e8m0_half(tl.load(bp, mask=mask, other=0).to(tl.int32))
    else:
        return f16_field_masked(bp, mask)


@triton.jit
def iq4_xs_unpack_scale(low_byte, high_bits, s):
    """iq4_xs 6-bit sub-block scale(s) (still offset by 32) of sub-block(s) ``s`` (0..7) from the int32
    byte low_byte = scales_l[s // 2] (its nibble s % 2) and the 16-bit scales_h (its 2-bit field s)."""
    return ((low_byte >> (4 * (s & 1))) & 15) | (((high_bits >> (2 * s)) & 3) << 4)


@triton.jit
def iq4_xs_scale(bp, s):
    """iq4_xs 6-bit scales (offset 32) of sub-blocks ``s`` ((S,) int32) of the super-blocks at byte pointers
    ``bp`` ((BN,)): int32 (BN, S), from byte loads (scales_h at 2, scales_l at 4)."""
    p = bp[:, None]
    high = tl.load(p + 2).to(tl.int32) | (tl.load(p + 3).to(tl.int32) << 8)
    return iq4_xs_unpack_scale(tl.load(p + 4 + (s >> 1)[None, :]).to(tl.int32), high, s[None, :])


@triton.jit
def u32_from_bytes(p, mask):
    """The little-endian 32-bit word at byte pointer(s) ``p`` as int32, from four byte loads (q5_0's qh sits
    at offset 2 of a 22-byte block: no alignment can be assumed); masked-off lanes read 0."""
    w = tl.load(p, mask=mask, other=0).to(tl.int32)
    for b in tl.static_range(1, 4):
        w |= tl.load(p + b, mask=mask, other=0).to(tl.int32) << (8 * b)
    return w


@triton.jit
def q6_k_scale(scales_ptr, s):
    """q6_k int8 sub-block scales of sub-blocks ``s`` (int32 (S,), 0..15): int32 (BN, S)."""
    return int8_from_byte(tl.load(scales_ptr[:, None] + s[None, :]).to(tl.int32))


# ------------------------------------------------------------------------------------- tile decoders
@triton.jit
def quant_value(u, OFFSET: tl.constexpr, F16: tl.constexpr):
    """u - OFFSET exactly, for integer quants 0 <= u < 1024 (int32, or int16 with F16): fp32 through the
    2**23 magic number, or (F16) fp16 through 1024's: u OR-ed into the 10-bit mantissa of 1024.0 is the
    fp16 1024 + u, and subtracting 1024 + OFFSET is exact. Both are one integer op and one add, and the fp16
    ones pack two weights per instruction (LOP3/HADD2 on half2 registers)."""
    if F16:
        return (u.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + OFFSET)
    else:
        return small_uint_to_f32(u, OFFSET)


@triton.jit
def _tile_parts(w_rows, k0, n_blocks, QTYPE: tl.constexpr, NSUB: tl.constexpr, SUB: tl.constexpr,
                RN: tl.constexpr, F16: tl.constexpr, HEAD_WORDS: tl.constexpr):
    """The pieces of a (BN, NSUB, SUB) weight tile, in ggml's arithmetic: the quants minus their offset
    (``quant_value``: (BN, NSUB, SUB), fp32 or fp16; iq4_nl's and mxfp4's table values), the fp32 scale of each
    sub-block row ((BN, NSUB): d * sc with one rounding, or d; mxfp4's power of two), and the fp32 min term
    subtracted ((BN, NSUB): q2_k/q4_k/q5_k dmin * m, q4_1/q5_1 -m; 0.0 for the other formats). See decode_tile for the tile's coordinates."""
    s = tl.arange(0, NSUB)
    l = tl.arange(0, SUB)
    min_term = 0.0
    # Integer work in int16 for the fp16 decode (half the width: two lanes per register, no narrowing
    # before the fp16 bit trick), int32 otherwise (what the bit-exact fp32 path was tuned with).
    if F16:
        IT: tl.constexpr = tl.int16
    else:
        IT: tl.constexpr = tl.int32
    if QTYPE == Q8_0:
        blk = k0 // 32 + s
        valid = blk < n_blocks
        bp = w_rows[:, None] + blk[None, :] * 34
        scale = f16_field_masked(bp, valid[None, :])
        byte = tl.load(bp[:, :, None] + 2 + l[None, None, :], mask=valid[None, :, None], other=0)
        q = quant_value(byte.to(IT) ^ 0x80, 128, F16)                  # int8 = (b ^ 128) - 128
    elif BLOCK32[QTYPE]:                    # q4_0, q4_1, q5_0, q5_1, iq4_nl, mxfp4: 16 nibble bytes per block
        blk = k0 // 32 + s
        valid = blk < n_blocks
        bp = w_rows[:, None] + blk[None, :] * BLOCK32_BYTES[QTYPE]           # (BN, NSUB) block starts
        scale = block32_scale(bp, valid[None, :], QTYPE)
        # Each qs byte is loaded once and split into its two nibbles along a new dim: [n, s, half, j] is
        # weight 16 * half + j of block s, so merging (half, j) gives the natural order.
        j = tl.arange(0, 16)
        half = tl.arange(0, 2)[None, None, :, None]
        byte = tl.load(bp[:, :, None, None] + BLOCK32_QS_AT[QTYPE] + j[None, None, None, :],
                       mask=valid[None, :, None, None], other=0)
        nib = (byte.to(IT) >> (4 * half).to(IT)) & 15
        if BLOCK32_QH_AT[QTYPE] != 0:       # q5_0/q5_1: bit 16 * half + j of qh is the weight's fifth bit
            qh = u32_from_bytes(bp + BLOCK32_QH_AT[QTYPE], valid[None, :])[:, :, None, None]
            nib = nib | (((qh >> (16 * half + j[None, None, None, :])) & 1) << 4).to(IT)
        if QTYPE == IQ4_NL or QTYPE == MXFP4:
            if F16:
                q = nl_value(nib.to(tl.int32), QTYPE).to(tl.float16)
            else:
                q = nl_value(nib, QTYPE).to(tl.float32)
        else:
            q = quant_value(nib, BLOCK32_QUANT_OFFSET[QTYPE], F16)
        q = tl.reshape(q, (nib.shape[0], NSUB, SUB))
        if HAS_MIN[QTYPE]:                  # q4_1/q5_1: w = q * d + m, i.e. q * d - (-m) (exactly the same)
            min_term = -f16_field_masked(bp + 2, valid[None, :])
    elif QTYPE == IQ4_XS:
        bp = w_rows + (k0 // 256) * 136
        sb = (k0 % 256) // 32 + s                                           # 32-weight sub-block
        scale = fmul(f16_field(bp)[:, None], (iq4_xs_scale(bp, sb) - 32).to(tl.float32), RN)
        j = tl.arange(0, 16)
        half = tl.arange(0, 2)[None, None, :, None]
        byte = tl.load(bp[:, None, None, None] + 8 + (16 * sb)[None, :, None, None] + j[None, None, None, :])
        nib = (byte.to(tl.int32) >> (4 * half)) & 15                        # [n, s, half, j]: weight 16 half + j
        if F16:
            q = iq4_nl_value(nib).to(tl.float16)
        else:
            q = iq4_nl_value(nib).to(tl.float32)
        q = tl.reshape(q, (nib.shape[0], NSUB, SUB))
    elif QTYPE == Q3_K:
        bp = w_rows + (k0 // 256) * 110
        sb = (k0 % 256) // 16 + s                                           # sub-block in the super-block
        d = f16_field(bp + 108)
        scale = fmul(d[:, None], q3_k_scale(bp + 96, sb).to(tl.float32), RN)
        if NSUB % 2 == 0 and NSUB <= 8:
            # The tile covers NSUB // 2 whole 2-bit planes j of one 128-weight half h: each plane is the
            # same 32 qs bytes (and 32 hmask bytes), so they are loaded once and shifted per plane.
            l32 = tl.arange(0, 32)
            h = (k0 % 256) // 128
            j = ((k0 % 128) // 32 + tl.arange(0, NSUB // 2))[None, :, None]
            qs = tl.load(bp[:, None, None] + 32 + 32 * h + l32[None, None, :]).to(IT)   # (BN, 1, 32)
            hm = tl.load(bp[:, None, None] + l32[None, None, :]).to(IT)
            q = quant_value(((qs >> (2 * j).to(IT)) & 3) | (((hm >> (4 * h + j).to(IT)) & 1) << 2), 4, F16)
            q = tl.reshape(q, (q.shape[0], NSUB, SUB))                       # plane p = sub-blocks 2p, 2p+1
        else:
            h = sb >> 3                                                     # 128-weight half
            j = (sb >> 1) & 3                                               # 2-bit plane
            l32 = (16 * (sb & 1))[:, None] + l[None, :]                     # position in the 32-byte run
            qs = tl.load(bp[:, None, None] + 32 + ((32 * h)[:, None] + l32)[None, :, :]).to(IT)
            hm = tl.load(bp[:, None, None] + l32[None, :, :]).to(IT)
            q2 = (qs >> (2 * j).to(IT)[None, :, None]) & 3
            hb = (hm >> (4 * h + j).to(IT)[None, :, None]) & 1
            q = quant_value(q2 | (hb << 2), 4, F16)                         # q2 - (hb ? 0 : 4)
    elif QTYPE == Q2_K:
        bp = w_rows + (k0 // 256) * 84
        sb = (k0 % 256) // 16 + s                                           # sub-block in the super-block
        sc, mn = q2_k_scale_min(tl.load(bp[:, None] + sb[None, :]).to(tl.int32))
        scale = fmul(f16_field(bp + 80)[:, None], sc.to(tl.float32), RN)
        min_term = fmul(f16_field(bp + 82)[:, None], mn.to(tl.float32), RN)
        # As q3_k's low two bits (the qs at 16): whole planes loaded once and shifted, or per sub-block.
        if NSUB % 2 == 0 and NSUB <= 8:
            l32 = tl.arange(0, 32)
            h = (k0 % 256) // 128
            j = ((k0 % 128) // 32 + tl.arange(0, NSUB // 2))[None, :, None]
            qs = tl.load(bp[:, None, None] + 16 + 32 * h + l32[None, None, :]).to(IT)   # (BN, 1, 32)
            q = quant_value((qs >> (2 * j).to(IT)) & 3, 0, F16)
            q = tl.reshape(q, (q.shape[0], NSUB, SUB))                       # plane p = sub-blocks 2p, 2p+1
        else:
            h = sb >> 3
            j = (sb >> 1) & 3
            l32 = (16 * (sb & 1))[:, None] + l[None, :]
            qs = tl.load(bp[:, None, None] + 16 + ((32 * h)[:, None] + l32)[None, :, :]).to(IT)
            q = quant_value((qs >> (2 * j).to(IT)[None, :, None]) & 3, 0, F16)
    elif QTYPE == Q6_K:
        bp = w_rows + (k0 // 256) * 210
        sb = (k0 % 256) // 16 + s
        d = f16_field(bp + 208)
        scale = fmul(d[:, None], q6_k_scale(bp + 192, sb).to(tl.float32), RN)
        # (Loading each qh run once and broadcasting it over the groups, as q3_k does, compiled to more
        # instructions and register spills on sm_90; the per-sub-block gather stays.)
        h = sb >> 3
        r = (sb >> 1) & 3
        l32 = (16 * (sb & 1))[:, None] + l[None, :]
        ql = tl.load(bp[:, None, None] + ((64 * h + 32 * (r & 1))[:, None] + l32)[None, :, :]).to(IT)
        qh = tl.load(bp[:, None, None] + 128 + ((32 * h)[:, None] + l32)[None, :, :]).to(IT)
        nib = (ql >> (4 * (r >> 1)).to(IT)[None, :, None]) & 15
        hi = (qh >> (2 * r).to(IT)[None, :, None]) & 3
        q = quant_value(nib | (hi << 4), 32, F16)
    else:  # Q4_K, Q5_K
        if QTYPE == Q4_K:
            bp = w_rows + (k0 // 256) * 144
        else:
            bp = w_rows + (k0 // 256) * 176
        sb = (k0 % 256) // 32 + s
        if QTYPE == Q4_K:
            byte = tl.load(bp[:, None, None] + 16 + (32 * (sb >> 1))[None, :, None] + l[None, None, :])
        else:
            byte = tl.load(bp[:, None, None] + 48 + (32 * (sb >> 1))[None, :, None] + l[None, None, :])
        nib = (byte.to(IT) >> (4 * (sb & 1)).to(IT)[None, :, None]) & 15   # sub-block 2c + half of qs[32c + l]
        if QTYPE == Q5_K:
            qh = tl.load(bp[:, None, None] + 16 + l[None, None, :]).to(IT)
            nib = nib | (((qh >> sb.to(IT)[None, :, None]) & 1) << 4)
        q = quant_value(nib, 0, F16)
        if HEAD_WORDS:
            d, dmin, sc, mn = k4_head_from_words(bp, sb)
        else:
            d = f16_field(bp)
            dmin = f16_field(bp + 2)
            sc, mn = k4_scale_min(bp + 4, sb)
        scale = fmul(d[:, None], sc.to(tl.float32), RN)
        min_term = fmul(dmin[:, None], mn.to(tl.float32), RN)
    return q, scale, min_term


@triton.jit
def decode_tile(w_rows, k0, n_blocks, QTYPE: tl.constexpr, NSUB: tl.constexpr, SUB: tl.constexpr,
                RN: tl.constexpr, HEAD_WORDS: tl.constexpr = False):
    """fp32 weights of columns k0 .. k0 + NSUB*SUB of the rows starting at ``w_rows`` ((BN,) byte pointers),
    as a (BN, NSUB, SUB) tile: element [n, s, l] is column k0 + SUB*s + l, bit-exact with ggml.

    SUB is the format's sub-block (SUB_BLOCK: 16 for q2_k/q3_k/q6_k, else 32), so one scale covers each
    [n, s, :] row. Super-block formats: NSUB*SUB divides 256 and k0 is a multiple of it (the tile lies inside
    one super-block).
    32-weight block formats: each s is a whole block; blocks >= n_blocks (K tail) read as 0.
    """
    q, scale, min_term = _tile_parts(w_rows, k0, n_blocks, QTYPE, NSUB, SUB, RN, False, HEAD_WORDS)
    if QTYPE == MXFP4:
        # a small integer times a power of two: exact, so no rounding to pin; a plain multiply also keeps the
        # subnormal products of exponent bytes 0 and 1, which libdevice's flush-to-zero mul_rn would not
        w = scale[:, :, None] * q
    else:
        w = fmul(scale[:, :, None], q, RN)
    if HAS_MIN[QTYPE]:
        w = fsub(w, min_term[:, :, None], RN)
    return w


@triton.jit
def decode_tile_f16(w_rows, k0, n_blocks, QTYPE: tl.constexpr, NSUB: tl.constexpr, SUB: tl.constexpr,
                    RN: tl.constexpr, HEAD_WORDS: tl.constexpr = False):
    """decode_tile's tile computed in fp16 arithmetic, for the fused GEMM with fp16 activations (whose
    tensor-core operand is fp16 anyway): the exact fp16 quant q times the sub-block scale rounded to fp16,
    minus the min term rounded to fp16 (q2_k/q4_k/q5_k, q4_1/q5_1), in one fp16 FMA (one rounding). Two weights per
    instruction. Each weight w = q * scale - min differs from decode_tile's by at most
    2**-11 * (|q * scale| + |min| + |w|) (three fp16 roundings: scale, min, result) instead of the
    2**-12 * |w| of rounding the exact value to fp16; the min term makes that bound larger than w itself
    only where q * scale and min nearly cancel. Scales and weights must be in fp16 range (values that are
    not are no weight an fp16 model can use). The fp32 scales are computed as in decode_tile."""
    q, scale, min_term = _tile_parts(w_rows, k0, n_blocks, QTYPE, NSUB, SUB, RN, True, HEAD_WORDS)
    scale16 = scale.to(tl.float16)[:, :, None]
    if HAS_MIN[QTYPE]:
        return tl.fma(q, scale16, -min_term.to(tl.float16)[:, :, None])
    return q * scale16
