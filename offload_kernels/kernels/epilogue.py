"""The output epilogue shared by the GEMV and GEMM kernels (@triton.jit).

With a K split, the split_k programs of an output tile finish it among themselves, in the same launch:
each atomically adds its partial tile into an fp32 workspace and then counts itself in at the tile's
arrival counter; the program that arrives last reads the complete sum, adds the bias, stores the output
in its dtype and sets the workspace tile and the counter back to zero. A split-K call is then one kernel,
with no memset before it and no cast after it (two launches and two dispatcher round trips fewer per
call at decode batch sizes), and the output is written by the kernel, never through a copy.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _finish(acc, offs, mask, offs_n, mask_n, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr):
    """Add the bias to the complete fp32 tile and store it in the output dtype."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_output(acc, offs_m, offs_n, M, N, bias_ptr, out_ptr, ws_ptr, cnt_ptr, tile, split_k,
                 HAS_BIAS: tl.constexpr):
    """Finish a (BLOCK_M, BLOCK_N) fp32 tile of y = x @ W.T + b (``tile``: its index in the launch grid).

    split_k == 1: add the bias and store. split_k > 1: this program holds one K slice's partial sum; see the
    module docstring. ws_ptr (fp32, M x N) and cnt_ptr (int32, one per tile) must be zero on entry; the
    launch leaves them zero.
    """
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if split_k == 1:
        _finish(acc, offs, mask, offs_n, mask_n, bias_ptr, out_ptr, HAS_BIAS)
    else:
        tl.atomic_add(ws_ptr + offs, acc, mask=mask, sem="relaxed")
        # The barrier puts every thread's adds before the arrival, which one thread counts with release
        # semantics; the last arrival's acquire then makes all split_k partial sums visible to its program.
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == split_k - 1:
            # Read where the atomics landed (L2, ".cg"), never a line an earlier tile left in this SM's L1.
            total = tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(ws_ptr + offs, tl.zeros_like(total), mask=mask)
            tl.store(cnt_ptr + tile, 0)
            _finish(total, offs, mask, offs_n, mask_n, bias_ptr, out_ptr, HAS_BIAS)
