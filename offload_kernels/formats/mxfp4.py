"""mxfp4 (GGML type 39): OCP microscaling FP4, the format of gpt-oss's expert weights, bit-exact with ggml.

Block of 32 weights in 17 bytes: a shared exponent ``e`` (E8M0, one byte) at byte 0, then ``qs[16]``; the low
nibble of ``qs[j]`` is the FP4 (E2M1) code of weight ``j``, the high nibble that of weight ``j + 16``. ggml keeps
the E2M1 values doubled, as the small integers MXFP4_VALUES (code 8 is a second zero, -0), and halves the
scale instead: a weight decodes to ``MXFP4_VALUES[code] * 2**(e - 128)`` in fp32 (ggml's
``GGML_E8M0_TO_FP32_HALF``: the fp32 bits ``(e - 1) << 23`` for e >= 2, the subnormals ``0x00200000 << e`` for
e = 0, 1). The product of a small integer and a power of two is exact (or an Inf for e = 255), so the decode
involves no rounding at all.

The quantizer reproduces ``quantize_row_mxfp4_ref`` (what ``ggml_quantize_chunk`` runs for this type; an
importance matrix is ignored). Per block:

* ``amax``: the largest |x| (a running ``amax < |x|``: NaNs never enter it);
* ``e = (uint8_t)(floorf(log2f(amax)) - 2 + 127)``, 0 when amax is 0. ``log2f`` is fp32: just below a power of
  two it rounds up to the integer, so e is that of the power of two (the fp64 log2 rounded to fp32 gives the same
  floor as glibc's log2f there; checked against ggml on every exponent). The float-to-uint8 cast of a value
  outside 0..255 (amax below 2**-125, or an Inf) is what x86 compiles it to: the int32 conversion's low byte
  (INT_MIN for Inf, so 0);
* each weight takes the first code whose ``|value * d - x|`` (fp32, d the halved scale) is smallest: ties go to
  the lower code, and a NaN weight (whose every distance is NaN) to code 0.

Checked byte for byte against libggml-base.so of llama-cpp-python 0.3.36 (tests/vectors/generate_ggml_vectors.py).
"""

from __future__ import annotations

import torch

__all__ = ["MXFP4_VALUES", "MXFP4_BLOCK_SIZE", "MXFP4_BLOCK_BYTES", "e8m0_half_to_f32", "dequantize_mxfp4_blocks",
           "quantize_mxfp4_blocks", "mxfp4_exponents"]

#: ggml's kvalues_mxfp4: the E2M1 values doubled, indexed by the 4-bit code (sign in bit 3).
MXFP4_VALUES: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
MXFP4_BLOCK_SIZE = 32
MXFP4_BLOCK_BYTES = 17


def e8m0_half_to_f32(e: torch.Tensor) -> torch.Tensor:
    """2**(e - 128) as fp32 for uint8 exponents ``e``, exactly as ggml's GGML_E8M0_TO_FP32_HALF (subnormal for
    e = 0, 1)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.bitwise_left_shift(torch.full_like(e, 0x00200000), e), (e - 1) << 23)
    return bits.view(torch.float32)


def _values(device: torch.device) -> torch.Tensor:
    return torch.tensor(MXFP4_VALUES, dtype=torch.float32, device=device)


def dequantize_mxfp4_blocks(b: torch.Tensor, out: torch.Tensor) -> None:
    """Decode (nb, 17) uint8 mxfp4 blocks into ``out`` (nb, 32) fp32, as ggml's dequantize_row_mxfp4."""
    values = _values(b.device)
    qs = b[:, 1:17].long()
    halves = out.view(-1, 2, 16)
    halves[:, 0] = values[qs & 15]
    halves[:, 1] = values[qs >> 4]
    out.mul_(e8m0_half_to_f32(b[:, 0])[:, None])


def mxfp4_exponents(amax: torch.Tensor) -> torch.Tensor:
    """ggml's shared exponent byte for blocks whose largest magnitude is ``amax`` (fp32, >= 0): uint8."""
    finite = torch.isfinite(amax) & (amax > 0)
    # log2f rounded as fp32, then floored: the fp64 log2 is far more accurate than fp32 needs, so rounding it
    # to fp32 gives glibc's log2f result at the only places that matter (just below powers of two).
    safe = torch.where(finite, amax, torch.ones_like(amax))
    floor_log2 = torch.floor(torch.log2(safe.double()).float()).to(torch.int32)
    e = torch.where(finite, (floor_log2 + 125) & 0xFF, torch.zeros_like(floor_log2))
    return e.to(torch.uint8)


def quantize_mxfp4_blocks(x: torch.Tensor) -> torch.Tensor:
    """(nb, 32) fp32 -> (nb, 17) uint8 mxfp4 blocks, byte-identical to ggml's quantize_row_mxfp4_ref."""
    x = x.float()
    nb = x.shape[0]
    amax = torch.nan_to_num(x.abs(), nan=0.0, posinf=float("inf")).amax(dim=1)
    e = mxfp4_exponents(amax)
    grid = _values(x.device)[None, :] * e8m0_half_to_f32(e)[:, None]            # (nb, 16): exact products
    err = (grid[:, None, :] - x[:, :, None]).abs_()                             # (nb, 32, 16), fp32 as ggml
    codes = err.argmin(dim=2).to(torch.uint8)                                  # first smallest: ggml's tie rule
    out = torch.empty((nb, MXFP4_BLOCK_BYTES), dtype=torch.uint8, device=x.device)
    out[:, 0] = e
    out[:, 1:] = codes[:, :16] | (codes[:, 16:] << 4)
    return out
