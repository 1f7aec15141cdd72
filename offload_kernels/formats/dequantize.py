"""Reference dequantizers in vectorized torch, bit-exact with llama.cpp's ``dequantize_row_*``.

All arithmetic is fp32 in ggml's order: the block scale d is multiplied by the integer sub-block scale
first, then by the quant, then the min term is subtracted (k-quants) or the block min added (q4_1,
q5_1). Each step is its own torch op, so no fused multiply-add can change the last bit. Runs on any
device torch does.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .iq4_nl import dequantize_iq4_nl_blocks, dequantize_iq4_xs_blocks
from .mxfp4 import dequantize_mxfp4_blocks
from .qtypes import get_spec
from .quantized_tensor import QuantizedTensor

# Weights decoded per step: cache-sized temporaries on CPU, few launches on GPUs.
_CHUNK_WEIGHTS = {"cpu": 1 << 20, "cuda": 1 << 25}


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte ``offset`` of every block, as fp32 (nb,)."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).squeeze(1).float()


def unpack_scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit (scale, min) pairs of q4_k/q5_k from their 12 packed bytes: (nb, 8) uint8 each."""
    lo, hi, mix = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([lo & 63, (mix & 15) | ((lo >> 6) << 4)], dim=1)
    mn = torch.cat([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], dim=1)
    return sc, mn


def unpack_scales_q3_k(scales: torch.Tensor) -> torch.Tensor:
    """The sixteen 6-bit q3_k sub-block scales (still offset by 32) from 12 packed bytes: (nb, 16) uint8."""
    low = torch.cat([scales[:, 0:8] & 15, scales[:, 0:8] >> 4], dim=1)            # s = 0..15
    high = _bit_planes(scales[:, 8:12], 2, dim=1).reshape(-1, 16)    # [4j + i]: field j of byte 8 + i
    return low | (high << 4)


# Each decoder writes fp32 values into ``out`` (nb, block_size): the integer quants are built in 8-bit
# arithmetic, converted once, then scaled in place, so the fp32 data is touched three times at most.

def _dq_q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b, 0)
    qs = b[:, 2:18]
    halves = out.view(-1, 2, 16)
    halves[:, 0].copy_((qs & 15).view(torch.int8) - 8)
    halves[:, 1].copy_((qs >> 4).view(torch.int8) - 8)
    out.mul_(d[:, None])


def _dq_q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    d, m = _f16(b, 0), _f16(b, 2)
    qs = b[:, 4:20]
    halves = out.view(-1, 2, 16)
    halves[:, 0].copy_(qs & 15)
    halves[:, 1].copy_(qs >> 4)
    out.mul_(d[:, None])                      # q*d is exact in fp32 (4-bit q, fp16 d): no rounding to fuse
    out.add_(m[:, None])


def _fifth_bit_table() -> torch.Tensor:
    """(256,) int64 whose 8 bytes for index v are 16 * (bit t of v), t = 0..7 (built from bytes and read back
    as bytes, so host byte order does not matter)."""
    v = torch.arange(256, dtype=torch.int32)[:, None]
    return (((v >> torch.arange(8, dtype=torch.int32)) & 1) << 4).to(torch.uint8).view(torch.int64).squeeze(1)


_FIFTH_BITS = {}   # device -> _fifth_bit_table() there


def _q5_quants(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """The 32 five-bit quants (nb, 32) uint8 of a q5_0/q5_1 block from its little-endian uint32 qh (as 4
    bytes) and 16 nibble bytes: weight j is the low nibble of qs[j], weight 16 + j the high nibble of qs[j];
    the fifth bit of weight j is bit j of qh, i.e. bit j % 8 of qh byte j // 8."""
    table = _FIFTH_BITS.get(qh.device)
    if table is None:
        table = _FIFTH_BITS[qh.device] = _fifth_bit_table().to(qh.device)
    # One 8-byte lookup per qh byte expands its bits in place (3x faster on CPU than shifting out planes).
    q = table[qh.long()].view(torch.uint8).view(-1, 2, 16)                 # [8i + t] = 16 * bit t of byte i
    q[:, 0] |= qs & 15
    q[:, 1] |= qs >> 4
    return q.view(-1, 32)


def _dq_q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b, 0)
    out.copy_(_q5_quants(b[:, 2:6], b[:, 6:22]).view(torch.int8) - 16)
    out.mul_(d[:, None])


def _dq_q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    d, m = _f16(b, 0), _f16(b, 2)
    out.copy_(_q5_quants(b[:, 4:8], b[:, 8:24]))
    out.mul_(d[:, None])                      # exact (5-bit q, fp16 d), so ggml's possible fma is no different
    out.add_(m[:, None])


def _dq_q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b, 0)
    out.copy_(b[:, 2:34].view(torch.int8))
    out.mul_(d[:, None])


def _dq_q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = unpack_scale_min_k4(b[:, 4:16])
    qs = b[:, 16:144].reshape(nb, 4, 32)
    q = out.view(nb, 4, 2, 32)                                      # sub-block s = 2*chunk + half
    q[:, :, 0].copy_(qs & 15)
    q[:, :, 1].copy_(qs >> 4)
    _scale_min_(out.view(nb, 8, 32), d, sc, dmin, mn)


def _bit_planes(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The ``8 // bits`` fields of ``bits`` bits of every byte of ``x``, lowest first, stacked along a new
    ``dim``. Shifts by Python scalars: torch's CPU shift by a broadcast tensor is not vectorized and was
    the largest cost of the decoders that used it."""
    mask = (1 << bits) - 1
    planes = [x & mask] + [(x >> shift) & mask for shift in range(bits, 8, bits)]
    return torch.stack(planes, dim=dim)


def _dq_q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = unpack_scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48]
    qs = b[:, 48:176].reshape(nb, 4, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], dim=2).reshape(nb, 8, 32)
    q |= _bit_planes(qh, 1, dim=1) << 4                              # fifth bit of sub-block s: bit s of qh
    out.view(nb, 8, 32).copy_(q)
    _scale_min_(out.view(nb, 8, 32), d, sc, dmin, mn)


def _scale_min_(q: torch.Tensor, d, sc, dmin, mn) -> None:
    """q <- (d*sc)*q - (dmin*m), per 32-weight sub-block, in ggml's order."""
    q.mul_((d[:, None] * sc.float())[:, :, None])
    q.sub_((dmin[:, None] * mn.float())[:, :, None])


def _dq_q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    sc = b[:, 0:16]                                                   # scale | min << 4, s = 8h + 2r + (l >> 4)
    qs = b[:, 16:80].reshape(nb, 2, 32)                               # (half h, l)
    d, dmin = _f16(b, 80), _f16(b, 82)
    out.view(nb, 2, 4, 32).copy_(_bit_planes(qs, 2, dim=2))          # weight 128h + 32r + l: bits 2r of qs[h, l]
    q = out.view(nb, 16, 16)
    q.mul_((d[:, None] * (sc & 15).float())[:, :, None])
    q.sub_((dmin[:, None] * (sc >> 4).float())[:, :, None])


def _dq_q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    hmask = b[:, 0:32]
    qs = b[:, 32:96].reshape(nb, 2, 32)                               # (half h, l)
    d = _f16(b, 108)
    sc = unpack_scales_q3_k(b[:, 96:108]).view(torch.int8) - 32      # (nb, 16)
    q2 = _bit_planes(qs, 2, dim=2)                                    # (nb, 2, 4, 32): e = 128h+32j+l
    no_high = _bit_planes(hmask, 1, dim=1).view(nb, 2, 4, 32) ^ 1     # bit 4h + j of hmask[l]
    q = q2.view(torch.int8) - (no_high << 2).view(torch.int8)         # minus 4 when the high bit is 0
    out.copy_(q.view(nb, 256))
    out.view(nb, 16, 16).mul_((d[:, None] * sc.float())[:, :, None])  # s = 8h + 2j + (l >> 4)


def _dq_q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    ql = b[:, 0:128].reshape(nb, 2, 2, 32)                           # (h, r&1, l)
    qh = b[:, 128:192].reshape(nb, 2, 32)                            # (h, l)
    scales = b[:, 192:208].contiguous().view(torch.int8)
    d = _f16(b, 208)
    nib = torch.cat([ql & 15, ql >> 4], dim=2)                       # (nb, 2, 4, 32): r = 2*(r>>1) + (r&1)
    q = (nib | (_bit_planes(qh, 2, dim=2) << 4)).view(torch.int8) - 32
    out.copy_(q.view(nb, 256))
    out.view(nb, 16, 16).mul_((d[:, None] * scales.float())[:, :, None])  # s = 8h + 2r + (l >> 4)


_DEQUANTIZERS: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "q4_0": _dq_q4_0, "q4_1": _dq_q4_1, "q5_0": _dq_q5_0, "q5_1": _dq_q5_1, "q8_0": _dq_q8_0, "q2_k": _dq_q2_k,
    "q3_k": _dq_q3_k,
    "q4_k": _dq_q4_k, "q5_k": _dq_q5_k, "q6_k": _dq_q6_k, "iq4_nl": dequantize_iq4_nl_blocks,
    "iq4_xs": dequantize_iq4_xs_blocks, "mxfp4": dequantize_mxfp4_blocks,
}

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_dtype(dtype) -> None:
    # An integer or fp8 output would truncate the decoded values (or fail deep inside a decoder).
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(map(str, _FLOAT_DTYPES))}, got {dtype!r}")


def dequantize_blocks(blocks: torch.Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode (nblocks, block_bytes) uint8 blocks to (nblocks, block_size) values of ``dtype``."""
    spec = get_spec(qtype)
    _check_dtype(dtype)
    if not isinstance(blocks, torch.Tensor):
        raise TypeError(f"blocks must be a torch.uint8 tensor, got {type(blocks).__name__}")
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != spec.block_bytes:
        raise ValueError(f"{spec.name} blocks must be uint8 of shape (n, {spec.block_bytes}), "
                         f"got {blocks.dtype} {tuple(blocks.shape)}")
    return _decode_chunked(blocks, spec.name, spec.block_size, dtype)


def empty_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, except that large CPU buffers come from numpy, which asks the kernel for transparent
    huge pages: first-touch page faults otherwise cost more than decoding into the buffer."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < (4 << 20):
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def _decode_chunked(blocks: torch.Tensor, name: str, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    fn = _DEQUANTIZERS[name]
    nb = blocks.shape[0]
    out = empty_output((nb, block_size), dtype, blocks.device)
    step = max(1, _CHUNK_WEIGHTS.get(blocks.device.type, 1 << 22) // block_size)
    scratch = None if dtype == torch.float32 else torch.empty((min(nb, step), block_size), device=blocks.device)
    for start in range(0, nb, step):
        stop = min(nb, start + step)
        if scratch is None:
            fn(blocks[start:stop], out[start:stop])
        else:
            fn(blocks[start:stop], scratch[:stop - start])
            out[start:stop].copy_(scratch[:stop - start])
    return out


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight of a QuantizedTensor, exactly as llama.cpp decodes it, cast to ``dtype``.

    Values are computed in fp32 (bit-exact with ggml) and then rounded to ``dtype``.
    """
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"dequantize expects a QuantizedTensor, got {type(qt).__name__}")
    _check_dtype(dtype)
    spec = qt.spec
    blocks = qt.data.view(-1, spec.block_bytes)
    return _decode_chunked(blocks, spec.name, spec.block_size, dtype).view(qt.shape)
