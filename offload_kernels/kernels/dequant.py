"""Standalone Triton dequantize: GGUF blocks -> (N, K) fp32/fp16/bf16, bit-exact with the torch reference.

Used for large M, where y = x @ W.T is compute-bound: dequantize once to the activation dtype, then let
cuBLAS (torch.matmul) run the matmul. Each program decodes a (BLOCK_N, 256) tile (one k-quant super-block
or eight 32-weight blocks per row) with decode.decode_tile and stores it; fp32 values equal ggml's, and
the fp16/bf16 outputs are those values rounded to nearest even, i.e. ``dequantize(qt, fp32).to(dtype)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import QuantizedTensor
from . import configs
from .decode import QTYPE_CODES, SUB_BLOCK, decode_tile
from .runtime import INTERPRETER, count_launch, launch, new_output, tuning_key

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _dequant_kernel(w_ptr, out_ptr, N, K, row_bytes, QTYPE: tl.constexpr, SUB: tl.constexpr, RN: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * row_bytes   # clamped rows: loads in bounds
    k0 = pid_k * BLOCK_K
    w = decode_tile(w_rows, k0, K // 32, QTYPE, BLOCK_K // SUB, SUB, RN)  # (BLOCK_N, NSUB, SUB)
    cols = k0 + (SUB * tl.arange(0, BLOCK_K // SUB))[:, None] + tl.arange(0, SUB)[None, :]
    mask = (offs_n < N)[:, None, None] & (cols < K)[None, :, :]
    ptrs = out_ptr + offs_n.to(tl.int64)[:, None, None] * K + cols[None, :, :]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


_DEQUANT_KEY = ("N", "K", "QTYPE")

_dequant_tuned = triton.autotune(
    configs=configs.dequant_configs(), key=list(_DEQUANT_KEY),
    prune_configs_by={"early_config_prune": configs.prune_dequant_configs})(_dequant_kernel)


def dequantize_triton(qt: QuantizedTensor, dtype: torch.dtype = torch.float16, *,
                      out: "torch.Tensor | None" = None) -> torch.Tensor:
    """Decode a QuantizedTensor to an (N, K) tensor of ``dtype`` (float32, float16 or bfloat16) with the
    Triton dequantize kernel. Bit-exact: equals ``offload_kernels.formats.dequantize(qt, dtype)``.

    ``qt`` must be on a CUDA device, or on the CPU with the Triton interpreter on (TRITON_INTERPRET=1
    before triton is imported). ``out``, if given, is a contiguous (N, K) tensor of ``dtype`` on the same
    device that receives the values (and is returned).
    """
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"dequantize_triton expects a QuantizedTensor, got {type(qt).__name__}")
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    check_triton_device(qt.device, "the QuantizedTensor", dtype)
    n, k = qt.shape
    if out is None:
        out = new_output((n, k), dtype, qt.device)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != (n, k) or out.dtype != dtype or out.device != qt.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous ({n}, {k}) {dtype} tensor on {qt.device}, got "
                             f"{'contiguous' if out.is_contiguous() else 'non-contiguous'} {tuple(out.shape)} "
                             f"{out.dtype} on {out.device}")
    dequantize_into(qt, out)
    return out


def dequantize_into(qt: QuantizedTensor, out: torch.Tensor) -> None:
    """Launch the dequantize kernel writing all of ``out`` (contiguous (N, K), validated by the caller)."""
    n, k = qt.shape
    args = dict(w_ptr=qt.data, out_ptr=out, N=n, K=k, row_bytes=qt.row_bytes, QTYPE=QTYPE_CODES[qt.qtype],
                SUB=SUB_BLOCK[qt.qtype], RN=not INTERPRETER, BLOCK_K=configs.DEQUANT_BLOCK_K)

    def grid(meta):
        return (configs.cdiv(n, meta["BLOCK_N"]), configs.cdiv(k, meta["BLOCK_K"]))

    launch(_dequant_tuned, grid, args, tuning_key("dequant", args, _DEQUANT_KEY),
           configs.dequant_heuristic_config, tune=True, device=out.device)
    count_launch("dequant")


def check_triton_device(device: torch.device, what: str, dtype: "torch.dtype | None" = None) -> None:
    """Raise ValueError unless Triton can run on ``device`` (CUDA, or CPU under the interpreter) with
    ``dtype`` (the interpreter, numpy underneath, has no bfloat16: it would silently compute garbage)."""
    if device.type == "cpu" and INTERPRETER and dtype == torch.bfloat16:
        raise ValueError(f"{what} is bfloat16 on the CPU: the Triton interpreter cannot compute in bfloat16 "
                         "(use float16/float32, a CUDA device, or backend='torch')")
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETER):
        return
    if device.type == "cpu":
        raise ValueError(f"{what} is on the CPU: the Triton kernels need CUDA tensors, or the Triton interpreter "
                         "(set TRITON_INTERPRET=1 before triton is imported); use backend='torch' for the CPU path")
    raise ValueError(f"{what} is on {device}: the Triton kernels run on CUDA devices only")
