"""quantize(w, qtype): float weight -> QuantizedTensor, byte-identical to ggml's reference quantizers.

The reference quantizers are what ``llama-quantize`` writes without an importance matrix. Every
format's block quantizer is vectorized torch over all blocks at once (no Python loop over blocks), so
the same code runs on CPU and, much faster, on CUDA.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .iq4_nl import quantize_iq4_nl_blocks, quantize_iq4_xs_blocks
from .mxfp4 import quantize_mxfp4_blocks
from .qtypes import QTypeSpec, get_spec
from .quantized_tensor import QuantizedTensor
from .quantize_kquants import (quantize_q2_k_blocks, quantize_q3_k_blocks, quantize_q4_k_blocks,
                               quantize_q5_k_blocks, quantize_q6_k_blocks)
from .quantize_legacy import (quantize_q4_0_blocks, quantize_q4_1_blocks, quantize_q5_0_blocks,
                              quantize_q5_1_blocks, quantize_q8_0_blocks)

_BLOCK_QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "q4_0": quantize_q4_0_blocks, "q4_1": quantize_q4_1_blocks, "q5_0": quantize_q5_0_blocks,
    "q5_1": quantize_q5_1_blocks, "q8_0": quantize_q8_0_blocks, "q2_k": quantize_q2_k_blocks,
    "q3_k": quantize_q3_k_blocks,
    "q4_k": quantize_q4_k_blocks, "q5_k": quantize_q5_k_blocks, "q6_k": quantize_q6_k_blocks,
    "iq4_nl": quantize_iq4_nl_blocks, "iq4_xs": quantize_iq4_xs_blocks, "mxfp4": quantize_mxfp4_blocks,
}

# Weights per call of a block quantizer (measured on a 2-core CPU). The k-quant quantizers split their
# input into cache-sized pieces themselves, so larger chunks only save per-call overhead; the legacy
# formats' few elementwise passes run fastest on L2-sized chunks. On CUDA large chunks fill the GPU.
_CHUNK_WEIGHTS = {"cpu": 1 << 22, "cuda": 1 << 24}
_CPU_LEGACY_CHUNK_WEIGHTS = 1 << 19


# Above this, x*x and the weighted sums of ggml's scale searches overflow fp32 (the fp16 block scales
# overflow far earlier for most data; that is checked on the result).
MAX_ABS_WEIGHT = 1e15


#: Float dtypes quantize accepts (their values are converted to fp32 exactly, as llama-quantize does).
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_weight_dtype(dtype: torch.dtype, what: str) -> None:
    """TypeError unless ``dtype`` is one of WEIGHT_DTYPES. fp8 (and fp4) tensors are floating point to
    torch, but their values are meaningless without the per-tensor/per-block scales stored beside them."""
    if dtype in WEIGHT_DTYPES:
        return
    if dtype.is_floating_point and dtype.itemsize < 2:
        raise TypeError(f"{what} dtype {dtype} is not supported: fp8/fp4 values need their checkpoint's scales "
                        f"applied first; dequantize them to float32 (or float16/bfloat16) and quantize that")
    raise TypeError(f"{what} must be floating point (float32, float16, bfloat16 or float64), got {dtype}")


def validate_weight(w: torch.Tensor, spec: QTypeSpec) -> None:
    """Raise TypeError/ValueError naming what is wrong with a weight to be quantized."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(w).__name__}")
    check_weight_dtype(w.dtype, "weight")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(w.shape)}")
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(w.shape)}")
    if k % spec.block_size:
        raise ValueError(f"K={k} (in_features) is not a multiple of the {spec.name} block size {spec.block_size}")
    if w.is_meta:
        raise ValueError("cannot quantize a meta tensor (it has no values)")
    lo, hi = (float(v) for v in torch.aminmax(w.detach()))     # one pass; NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad_mask = ~torch.isfinite(w.detach())
        bad = bad_mask.nonzero()[0].tolist()
        raise ValueError(f"weight contains NaN or Inf (first at row {bad[0]}, column {bad[1]}); "
                         f"{int(bad_mask.sum())} non-finite values in all")
    peak = max(-lo, hi)
    if peak > MAX_ABS_WEIGHT:
        raise ValueError(f"weight magnitude too large for {spec.name}: max |w| = {peak:.3g} exceeds {MAX_ABS_WEIGHT:.0e}, "
                         f"beyond which ggml's fp32 search arithmetic overflows; rescale the weight")


def quantize_blocks(x: torch.Tensor, qtype: "str | QTypeSpec") -> torch.Tensor:
    """(nblocks, block_size) fp32 -> (nblocks, block_bytes) uint8 GGUF blocks."""
    spec = get_spec(qtype)
    fn = _BLOCK_QUANTIZERS[spec.name]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_weight_dtype(x.dtype, "x")
    x = x.float().reshape(-1, spec.block_size)
    if x.device.type == "cpu" and spec.block_size == 32:
        chunk = _CPU_LEGACY_CHUNK_WEIGHTS
    else:
        chunk = _CHUNK_WEIGHTS.get(x.device.type, _CHUNK_WEIGHTS["cuda"])
    step = max(1, chunk // spec.block_size)
    if x.shape[0] <= step:
        return fn(x)
    out = torch.empty((x.shape[0], spec.block_bytes), dtype=torch.uint8, device=x.device)
    for start in range(0, x.shape[0], step):
        out[start:start + step] = fn(x[start:start + step])
    return out


def quantize(w: torch.Tensor, qtype: "str | QTypeSpec") -> QuantizedTensor:
    """Quantize a 2-D float weight (N, K) to a GGUF block format, on the weight's device.

    The bytes equal ggml's ``quantize_row_<qtype>_ref`` on the weight converted to fp32. K must be a
    multiple of the block size (32 for q4_0/q4_1/q5_0/q5_1/q8_0, 256 for the k-quants); NaN/Inf are rejected.
    """
    spec = get_spec(qtype)
    validate_weight(w, spec)
    n, k = w.shape
    blocks = quantize_blocks(w.detach().to(torch.float32).contiguous(), spec)
    _check_scales_finite(blocks, spec, w)
    return QuantizedTensor(blocks.view(n, spec.row_bytes(k)), spec, (n, k))


def _check_scales_finite(blocks: torch.Tensor, spec: QTypeSpec, w: torch.Tensor) -> None:
    """ggml silently writes an Inf fp16 scale when a block's range exceeds fp16; we refuse instead."""
    for off in spec.fp16_offsets:
        exponent_all_ones = (blocks[:, off + 1] & 0x7C) == 0x7C
        if bool(exponent_all_ones.any()):
            block = int(exponent_all_ones.nonzero()[0, 0])
            per_row = w.shape[1] // spec.block_size
            raise ValueError(
                f"weight magnitude too large for {spec.name}: the fp16 scale of block {block % per_row} in row "
                f"{block // per_row} overflows (max |w| there is "
                f"{float(w.reshape(-1, spec.block_size)[block].abs().max()):.3g}); rescale the weight")
