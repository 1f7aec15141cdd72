"""iq4_nl (GGML type 20) and iq4_xs (GGML type 23): 4-bit non-linear quants, bit-exact with ggml.

Block of 32 weights in 18 bytes: ``d`` (fp16) at byte 0, then ``qs[16]``; the low nibble of ``qs[j]``
indexes the value of weight ``j``, the high nibble that of weight ``j + 16``, and a weight decodes to
``d * IQ4_NL_VALUES[nibble]`` in fp32 (one rounding).

The quantizer reproduces ``ggml_quantize_chunk(GGML_TYPE_IQ4_NL, ..., imatrix=NULL)``, i.e.
``quantize_iq4_nl`` -> ``quantize_row_iq4_nl_impl(32, 32, ..., quant_weights=NULL, ntry=7)``. Per block:

* weights ``w[j] = x[j] * x[j]``; ``max`` is the first element of largest magnitude (signed);
* ``amax < 1e-15f`` (GROUP_MAX_EPS): scale 0, so ``d = 0`` and every nibble is the index of 0.0 (8);
* a first pass at ``id = 1 / (-max / -127)`` gives ``d = sumq2 > 0 ? sumqx / sumq2 : 0`` and
  ``best = d * sumqx`` (the guard only matters for NaN inputs, where it makes d = 0);
* 15 trials at ``id = (itry - 127) / max``, itry = -7..7, each replacing ``d, best`` when
  ``sumq2 > 0 && sumqx * sumqx > best * sumq2``;
* ``d`` is stored as fp16, and the nibbles are re-chosen with ``1 / d`` of the *unrounded* d.

``sumqx += w*q*x`` and ``sumq2 += w*q*q`` accumulate in fp32, one term at a time, in index order, each
term rounded as ``(w*q)*x``; the reference library is built without FMA contraction (checked: no
vfmadd in its quantize_row_iq4_nl_impl), so every product and sum here is its own rounded torch op.
Divisions go through tensors, never Python scalars (torch's CUDA division by a scalar multiplies by
its reciprocal, which can differ in the last bit).

Checked byte for byte against libggml-base.so of llama-cpp-python 0.3.36 (ggml 0.25.3), including
non-finite inputs: there ``best_index_int8`` is the binary search, which sends NaN to index 15 (newer
ggml's branchless search sends it to 0; for finite inputs the two agree), and fp32 overflow (|x| above
~1.8e19, where x*x is Inf) gives the NaN scales ggml writes.

iq4_xs: super-blocks of 256 weights in 136 bytes: ``d`` (fp16) at 0, ``scales_h`` (uint16, little-endian)
at 2, ``scales_l[4]`` at 4, ``qs[128]`` at 8. Sub-block ``ib`` (0..7) of 32 weights has the 6-bit scale
``ls = ((scales_l[ib/2] >> 4*(ib%2)) & 15) | (((scales_h >> 2*ib) & 3) << 4)`` and decodes as iq4_nl with
scale ``dl = d * (ls - 32)`` (fp32; then ``dl * value``, a second rounding) on its 16 bytes
``qs[16*ib ..]``. Its quantizer reproduces ``ggml_quantize_chunk(GGML_TYPE_IQ4_XS, ..., imatrix=NULL)``,
i.e. ``quantize_iq4_xs`` -> ``quantize_row_iq4_nl_impl(256, 32, ..., quant_weights=NULL, ntry=7)``:

* each 32-weight sub-block gets the iq4_nl scale above (same search, same 1e-15 cut-off to 0);
* ``max_scale`` is the first sub-block scale of strictly largest magnitude (``fabsf(d) > amax_scale``
  starting from 0: a NaN scale is never picked; all scales 0 leaves ``max_scale = +0``);
* ``d = -max_scale / 32`` is stored as fp16 (so an all-zero super-block stores -0.0, bytes 00 80);
  ``id = d ? 1/d : 0``;
* per sub-block ``l = clamp(nearest_int(id * scales[ib]), -32, 31)``, stored as ``l + 32``; with the
  *unrounded* d, ``dl = d * l`` and ``idl = dl ? 1/dl : 0`` (NaN is true), and every nibble is re-chosen as
  ``best_index_int8(idl * x)``; a sub-block whose scale is 0 thus gets ls = 32 and index 8 for its finite
  weights (15 for NaN/Inf ones, where 0 * x is NaN).

nearest_int is the 1.5*2^23 trick on the fp32 bits; its argument is NaN only when a sub-block scale is a
NaN the search generated (Inf/Inf after fp32 overflow), which on x86 is the default NaN (mantissa 0x400000)
and gives l = 0; that is written explicitly here, as CUDA's canonical NaN (0x7FFFFFFF) would give 31.
Checked byte for byte against the same library on ~110k random super-blocks of 27 input cases (see
tests/vectors/generate_iq4_xs_vectors.py), non-finite and overflowing inputs included.
"""

from __future__ import annotations

import torch

from .rounding import fp16_bytes, nearest_int

__all__ = ["IQ4_NL_VALUES", "IQ4_NL_BLOCK_SIZE", "IQ4_NL_BLOCK_BYTES", "GGML_TYPE_IQ4_NL",
           "IQ4_XS_BLOCK_SIZE", "IQ4_XS_BLOCK_BYTES", "GGML_TYPE_IQ4_XS",
           "dequantize_iq4_nl_blocks", "quantize_iq4_nl_blocks", "best_index_iq4_nl",
           "dequantize_iq4_xs_blocks", "quantize_iq4_xs_blocks", "iq4_nl_scales"]

#: kvalues_iq4nl from ggml-common.h: the 16 int8 levels a nibble selects (sorted ascending).
IQ4_NL_VALUES: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
IQ4_NL_BLOCK_SIZE = 32
IQ4_NL_BLOCK_BYTES = 18
GGML_TYPE_IQ4_NL = 20
IQ4_XS_BLOCK_SIZE = 256    # QK_K
IQ4_XS_BLOCK_BYTES = 136   # d (2) + scales_h (2) + scales_l (4) + qs (128)
GGML_TYPE_IQ4_XS = 23
_IQ4_XS_SUBBLOCKS = IQ4_XS_BLOCK_SIZE // IQ4_NL_BLOCK_SIZE   # 8 sub-blocks of 32

_GROUP_MAX_EPS = 1e-15   # ggml's GROUP_MAX_EPS (1e-15f); compared in fp32 below
_NTRY = 7                # quantize_iq4_nl passes ntry = 7


def _values(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(IQ4_NL_VALUES, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ dequantize

def _table_values_into(qs: torch.Tensor, halves: torch.Tensor) -> None:
    """The table values of 32-weight groups' nibbles: qs (..., 16) bytes into halves (..., 2, 16) fp32
    (low nibble of qs[j]: weight j, high nibble: weight 16 + j)."""
    table = _values(qs.device)
    halves[..., 0, :].copy_(table[(qs & 15).long()])
    halves[..., 1, :].copy_(table[(qs >> 4).long()])


def dequantize_iq4_nl_blocks(b: torch.Tensor, out: torch.Tensor) -> None:
    """Decode (nb, 18) uint8 iq4_nl blocks into ``out`` (nb, 32) fp32, as ggml's dequantize_row_iq4_nl."""
    d = b[:, 0:2].contiguous().view(torch.float16).squeeze(1).float()
    _table_values_into(b[:, 2:18], out.view(-1, 2, 16))
    out.mul_(d[:, None])


# -------------------------------------------------------------------------------------------- quantize

def best_index_iq4_nl(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``best_index_int8(16, kvalues_iq4nl, x)`` elementwise on fp32 ``x``, as uint8 indices.

    ``x <= -127`` gives 0 and ``x >= 113`` gives 15; otherwise the binary search stops at the ``mu`` with
    ``values[mu-1] <= x < values[mu]`` and returns ``mu-1`` iff ``x - values[mu-1] < values[mu] - x``
    (both differences rounded to fp32; an exact tie goes up to ``mu``). NaN fails every comparison of the
    search, which then ends at ``mu = 15`` and returns 15.
    """
    x = x.float().contiguous()
    vals = _values(x.device)
    # number of interior levels values[1..14] that are <= x: the binary search's ml. The ends need no test of
    # their own: below values[1] the pair is (values[0], values[1]) and x - values[0] <= 0 < values[1] - x
    # picks 0 for every x <= values[0] (-inf too); at or above values[14], values[15] - x <= 0 picks 15.
    ml = torch.searchsorted(vals[1:15].contiguous(), x, right=True, out_int32=True)
    up = torch.lt(torch.sub(x, vals[ml]), torch.sub(vals[ml + 1], x)).logical_not_()   # mu - 1 or mu
    return ml.add_(up).masked_fill_(torch.isnan(x), 15).to(torch.uint8)


def _ggml_fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp16_bytes, with NaN written as ggml's fp32->fp16 conversion writes it: sign | 0x7E00.
    (torch's CPU conversion does the same; CUDA's cvt.rn.f16.f32 writes the canonical 0x7FFF instead.)"""
    b = fp16_bytes(x)
    nan = torch.isnan(x)
    hi = torch.where(torch.signbit(x), 0xFE, 0x7E).to(torch.uint8)
    b[:, 0] = torch.where(nan, 0, b[:, 0])
    b[:, 1] = torch.where(nan, hi, b[:, 1])
    return b


def _sums(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``sumqx += w*q*x; sumq2 += w*q*q`` over the 32 weights of each block, in fp32, in order.

    w, q, x: (32, nb) (column j is weight j of every block); returns sumqx, sumq2 of shape (nb,).
    """
    wq = w * q
    tqx = wq * x
    tq2 = wq * q
    sumqx = torch.zeros_like(tqx[0])
    sumq2 = torch.zeros_like(tq2[0])
    for j in range(tqx.shape[0]):
        sumqx.add_(tqx[j])
        sumq2.add_(tq2[j])
    return sumqx, sumq2


def _first_largest(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(largest |v| per row, the first value of that magnitude) as ggml's strict ``|v| > amax`` scan from 0
    finds them: NaN never wins (it counts as 0), and a row with no |v| > 0 gives (0, v[:, 0]) — the callers
    cut such rows off."""
    a = v.abs()
    a = torch.where(torch.isnan(a), torch.zeros_like(a), a)
    amax = a.max(dim=1).values
    pos = torch.arange(v.shape[1], device=v.device).expand(v.shape[0], -1)
    first = torch.where(a == amax[:, None], pos, v.shape[1]).amin(dim=1).clamp_(max=v.shape[1] - 1)
    return amax, v.gather(1, first[:, None]).squeeze(1)


def iq4_nl_scales(x: torch.Tensor) -> torch.Tensor:
    """The per-32 scale search of ggml's quantize_row_iq4_nl_impl (no importance weights, ntry = 7).

    x: (n, 32) fp32 groups; returns the fp32 scales (n,) ggml keeps in ``scales[ib]``: 0 where the group's
    amax is below 1e-15f, else the best ``d`` of the first pass and the 15 trials (the module docstring).
    """
    nb, dev = x.shape[0], x.device
    vals = _values(dev)
    xt = x.t().contiguous()                                   # (32, nb): per-weight columns contiguous
    w = xt * xt                                                # weight[j] = xb[j]*xb[j]

    amax, mx = _first_largest(x)             # a block with no |x| > 0 is cut off below anyway
    valid = amax >= torch.tensor(_GROUP_MAX_EPS, dtype=torch.float32, device=dev)

    def full(v: float) -> torch.Tensor:
        return torch.full((nb,), v, dtype=torch.float32, device=dev)

    # first pass: d = -max/values[0]; id = 1/d
    d = torch.div(-mx, full(float(IQ4_NL_VALUES[0])))
    inv = torch.div(full(1.0), d)
    q = vals[best_index_iq4_nl(inv * xt).long()]
    sumqx, sumq2 = _sums(w, q, xt)
    d = torch.where(sumq2 > 0, torch.div(sumqx, sumq2), torch.zeros_like(sumqx))   # d = sumq2 > 0 ? sumqx/sumq2 : 0
    best = d * sumqx

    for itry in range(-_NTRY, _NTRY + 1):
        inv = torch.div(full(float(itry + IQ4_NL_VALUES[0])), mx)
        q = vals[best_index_iq4_nl(inv * xt).long()]
        sumqx, sumq2 = _sums(w, q, xt)
        better = (sumq2 > 0) & ((sumqx * sumqx) > (best * sumq2))
        d_try = torch.div(sumqx, sumq2)
        d = torch.where(better, d_try, d)
        best = torch.where(better, d_try * sumqx, best)

    return torch.where(valid, d, torch.zeros_like(d))         # scales[ib] (0 for near-zero groups)


def quantize_iq4_nl_blocks(x: torch.Tensor) -> torch.Tensor:
    """Quantize (nb, 32) weights (any float dtype; converted to fp32) to (nb, 18) uint8 iq4_nl blocks,
    byte-identical with ``ggml_quantize_chunk(GGML_TYPE_IQ4_NL, ..., imatrix=NULL)``."""
    if x.dim() != 2 or x.shape[1] != IQ4_NL_BLOCK_SIZE:
        raise ValueError(f"iq4_nl quantizes (n, 32) blocks, got shape {tuple(x.shape)}")
    x = x.float()
    nb, dev = x.shape[0], x.device
    scale = iq4_nl_scales(x)                                   # scales[0]

    # dh = fp16(scale); L from the unrounded scale: id = scale ? 1/scale : 0
    inv = torch.where(scale != 0, torch.div(torch.ones_like(scale), scale), torch.zeros_like(scale))
    L = best_index_iq4_nl(inv[:, None] * x)                    # (nb, 32) uint8

    out = torch.empty((nb, IQ4_NL_BLOCK_BYTES), dtype=torch.uint8, device=dev)
    out[:, 0:2] = _ggml_fp16_bytes(scale)
    out[:, 2:18] = L[:, :16] | (L[:, 16:] << 4)
    return out


# ------------------------------------------------------------------------------------------------ iq4_xs

def _iq4_xs_sub_scales(b: torch.Tensor) -> torch.Tensor:
    """The eight 6-bit sub-block scales ls (0..63) of (nb, 136) iq4_xs blocks, as int32 (nb, 8)."""
    scales_h = b[:, 2].int() | (b[:, 3].int() << 8)                                  # little-endian uint16
    scales_l = b[:, 4:8].int()
    ib = torch.arange(_IQ4_XS_SUBBLOCKS, device=b.device)
    low = (scales_l.repeat_interleave(2, dim=1) >> (4 * (ib % 2))) & 0xF              # scales_l[ib/2] nibble ib%2
    high = (scales_h[:, None] >> (2 * ib)) & 3
    return low | (high << 4)


def dequantize_iq4_xs_blocks(b: torch.Tensor, out: torch.Tensor) -> None:
    """Decode (nb, 136) uint8 iq4_xs blocks into ``out`` (nb, 256) fp32, as ggml's dequantize_row_iq4_xs:
    ``dl = d * (ls - 32)`` rounded to fp32, then ``dl * kvalues_iq4nl[nibble]``."""
    if b.dim() != 2 or b.shape[1] != IQ4_XS_BLOCK_BYTES or b.dtype != torch.uint8:
        raise ValueError(f"iq4_xs decodes (n, 136) uint8 blocks, got {tuple(b.shape)} {b.dtype}")
    if out.shape != (b.shape[0], IQ4_XS_BLOCK_SIZE) or out.dtype != torch.float32:
        raise ValueError(f"iq4_xs decodes into (n, 256) float32, got {tuple(out.shape)} {out.dtype}")
    d = b[:, 0:2].contiguous().view(torch.float16).float()                           # (nb, 1)
    dl = d * (_iq4_xs_sub_scales(b) - 32).float()                                    # (nb, 8)
    halves = out.view(-1, _IQ4_XS_SUBBLOCKS, 2, 16)
    _table_values_into(b[:, 8:].reshape(-1, _IQ4_XS_SUBBLOCKS, 16), halves)
    halves.mul_(dl[:, :, None, None])


def quantize_iq4_xs_blocks(x: torch.Tensor) -> torch.Tensor:
    """Quantize (nb, 256) weights (any float dtype; converted to fp32) to (nb, 136) uint8 iq4_xs blocks,
    byte-identical with ``ggml_quantize_chunk(GGML_TYPE_IQ4_XS, ..., imatrix=NULL)``."""
    if x.dim() != 2 or x.shape[1] != IQ4_XS_BLOCK_SIZE:
        raise ValueError(f"iq4_xs quantizes (n, 256) blocks, got shape {tuple(x.shape)}")
    x = x.float().contiguous()
    nb, dev = x.shape[0], x.device
    xs = x.view(nb, _IQ4_XS_SUBBLOCKS, IQ4_NL_BLOCK_SIZE)
    scales = iq4_nl_scales(xs.reshape(-1, IQ4_NL_BLOCK_SIZE)).view(nb, _IQ4_XS_SUBBLOCKS)

    # max_scale: the first scale with the strictly largest |scale| (> 0; NaN never wins), else +0
    amax, first_largest = _first_largest(scales)
    max_scale = torch.where(amax > 0, first_largest, torch.zeros_like(amax))
    ib = torch.arange(_IQ4_XS_SUBBLOCKS, device=dev)

    # d = -max_scale/32 (fp16 in the block, fp32 below); id = d ? 1/d : 0
    d = torch.div(-max_scale, torch.full_like(max_scale, 32.0))
    inv = torch.where(d != 0, torch.div(torch.ones_like(d), d), torch.zeros_like(d))

    # l = clamp(nearest_int(id*scales[ib]), -32, 31); dl = d*l; idl = dl ? 1/dl : 0
    arg = inv[:, None] * scales
    l = torch.where(torch.isnan(arg), torch.zeros_like(arg, dtype=torch.int32), nearest_int(arg))
    l = l.clamp_(-32, 31)
    dl = d[:, None] * l.float()
    idl = torch.where(dl != 0, torch.div(torch.ones_like(dl), dl), torch.zeros_like(dl))
    L = best_index_iq4_nl(idl[:, :, None] * xs)                                    # (nb, 8, 32) uint8

    ls = (l + 32).to(torch.int32)                                                   # 0..63
    scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)                     # (nb, 4)
    scales_h = ((ls >> 4) << (2 * ib)).sum(dim=1)                                   # (nb,), < 2**16

    out = torch.empty((nb, IQ4_XS_BLOCK_BYTES), dtype=torch.uint8, device=dev)
    out[:, 0:2] = _ggml_fp16_bytes(d)
    out[:, 2] = (scales_h & 0xFF).to(torch.uint8)
    out[:, 3] = (scales_h >> 8).to(torch.uint8)
    out[:, 4:8] = scales_l.to(torch.uint8)
    out[:, 8:] = (L[:, :, :16] | (L[:, :, 16:] << 4)).reshape(nb, 128)
    return out
