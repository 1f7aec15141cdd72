"""The output epilogue shared by the GEMV and GEMM kernels (@triton.jit)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_output(acc, offs_m, offs_n, M, N, bias_ptr, out_ptr, ws_ptr, pid_k, split_k, HAS_BIAS: tl.constexpr):
    """Finish a (BLOCK_M, BLOCK_N) fp32 tile of y = x @ W.T + b.

    split_k == 1: add the bias and store in the output dtype. split_k > 1: this program holds one K slice's
    partial sum; it is atomically added to the zeroed fp32 workspace (the K slice 0 program adds the
    bias), and the launcher casts the workspace into the output afterwards.
    """
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = tl.where(pid_k == 0, acc + bias[None, :], acc)
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if split_k == 1:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ws_ptr + offs, acc, mask=mask, sem="relaxed")
