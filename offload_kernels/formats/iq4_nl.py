"""iq4_nl (GGML type 20): 4-bit non-linear quants, bit-exact with ggml.

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
"""

from __future__ import annotations

import torch

from .rounding import fp16_bytes

__all__ = ["IQ4_NL_VALUES", "IQ4_NL_BLOCK_SIZE", "IQ4_NL_BLOCK_BYTES", "GGML_TYPE_IQ4_NL",
           "dequantize_iq4_nl_blocks", "quantize_iq4_nl_blocks", "best_index_iq4_nl"]

#: kvalues_iq4nl from ggml-common.h: the 16 int8 levels a nibble selects (sorted ascending).
IQ4_NL_VALUES: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
IQ4_NL_BLOCK_SIZE = 32
IQ4_NL_BLOCK_BYTES = 18
GGML_TYPE_IQ4_NL = 20

_GROUP_MAX_EPS = 1e-15   # ggml's GROUP_MAX_EPS (1e-15f); compared in fp32 below
_NTRY = 7                # quantize_iq4_nl passes ntry = 7


def _values(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(IQ4_NL_VALUES, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ dequantize

def dequantize_iq4_nl_blocks(b: torch.Tensor, out: torch.Tensor) -> None:
    """Decode (nb, 18) uint8 iq4_nl blocks into ``out`` (nb, 32) fp32, as ggml's dequantize_row_iq4_nl."""
    d = b[:, 0:2].contiguous().view(torch.float16).squeeze(1).float()
    qs = b[:, 2:18]
    table = _values(b.device)
    halves = out.view(-1, 2, 16)
    halves[:, 0].copy_(table[(qs & 15).long()])
    halves[:, 1].copy_(table[(qs >> 4).long()])
    out.mul_(d[:, None])


# -------------------------------------------------------------------------------------------- quantize

def best_index_iq4_nl(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``best_index_int8(16, kvalues_iq4nl, x)`` elementwise on fp32 ``x``, as uint8 indices.

    ``x <= -127`` gives 0 and ``x >= 113`` gives 15; otherwise the binary search stops at the ``mu`` with
    ``values[mu-1] <= x < values[mu]`` and returns ``mu-1`` iff ``x - values[mu-1] < values[mu] - x``
    (both differences rounded to fp32; an exact tie goes up to ``mu``). NaN fails every comparison of the
    search, which then ends at ``mu = 15`` and returns 15.
    """
    x = x.float()
    vals = _values(x.device)
    # number of interior levels values[1..14] that are <= x: the binary search's ml
    ml = torch.searchsorted(vals[1:15].contiguous(), x.contiguous(), right=True)
    lo = vals[ml]
    hi = vals[ml + 1]
    idx = ml + torch.sub(x, lo).lt(torch.sub(hi, x)).logical_not_()        # mu - 1 or mu
    idx = torch.where(x <= vals[0], 0, idx)
    idx = torch.where(x >= vals[15], 15, idx)
    idx = torch.where(torch.isnan(x), 15, idx)
    return idx.to(torch.uint8)


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


def quantize_iq4_nl_blocks(x: torch.Tensor) -> torch.Tensor:
    """Quantize (nb, 32) weights (any float dtype; converted to fp32) to (nb, 18) uint8 iq4_nl blocks,
    byte-identical with ``ggml_quantize_chunk(GGML_TYPE_IQ4_NL, ..., imatrix=NULL)``."""
    if x.dim() != 2 or x.shape[1] != IQ4_NL_BLOCK_SIZE:
        raise ValueError(f"iq4_nl quantizes (n, 32) blocks, got shape {tuple(x.shape)}")
    x = x.float()
    nb, dev = x.shape[0], x.device
    vals = _values(dev)
    xt = x.t().contiguous()                                   # (32, nb): per-weight columns contiguous
    w = xt * xt                                                # weight[j] = xb[j]*xb[j]

    # amax / max: first element whose |x| is strictly largest (ggml scans with `ax > amax`)
    # (NaN never passes `ax > amax`: it counts as 0 here; a block with no |x| > 0 is cut off below anyway)
    ax = x.abs()
    ax = torch.where(torch.isnan(ax), torch.zeros_like(ax), ax)
    amax = ax.max(dim=1).values
    pos = torch.arange(IQ4_NL_BLOCK_SIZE, device=dev).expand(nb, -1)
    first = torch.where(ax == amax[:, None], pos, IQ4_NL_BLOCK_SIZE).amin(dim=1).clamp_(max=IQ4_NL_BLOCK_SIZE - 1)
    mx = x.gather(1, first[:, None]).squeeze(1)
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

    scale = torch.where(valid, d, torch.zeros_like(d))     # scales[0] (0 for near-zero blocks)

    # dh = fp16(scale); L from the unrounded scale: id = scale ? 1/scale : 0
    inv = torch.where(scale != 0, torch.div(full(1.0), scale), torch.zeros_like(scale))
    L = best_index_iq4_nl(inv[:, None] * x)                    # (nb, 32) uint8

    out = torch.empty((nb, IQ4_NL_BLOCK_BYTES), dtype=torch.uint8, device=dev)
    out[:, 0:2] = _ggml_fp16_bytes(scale)
    out[:, 2:18] = L[:, :16] | (L[:, 16:] << 4)
    return out
