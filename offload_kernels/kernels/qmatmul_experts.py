"""qmatmul_experts: the chosen experts of a mixture-of-experts layer applied in one call, as the custom op
``offload_kernels::qmatmul_experts``.

The weight is a stack of E experts' (N, K) matrices in one GGUF-quantized tensor of E * N rows (llama.cpp's
``ffn_*_exps``; OffloadedExperts' projections). For expert ids (..., k) it returns (..., k, N): row j of a
token is that token's input times expert ``ids[..., j]``, plus the expert's bias. The input is either one
row per token, shared by the token's k experts (the up/gate projection), or one row per (token, expert)
pair (the down projection).

backend "triton" is one launch whatever the routing, with no host read of it (ids are read by the kernel),
chosen by the mean pairs per expert (configs.select_experts_kernel):

* up to 4, the grouped expert GEMV (expert_gemv.py, CUDA cores): one program row per pair, or, with more
  than half a pair per expert (configs.experts_block_m), the pairs first sorted by expert on the device into
  blocks of up to 4 that share their expert's weight reads;
* above, the grouped expert GEMM (expert_gemm.py, tensor cores): the pairs sorted by expert into blocks of
  16 to 64 (configs.expert_gemm_block_m), each block's expert decoded in the K loop of a tiled tl.dot.

"torch" is the reference: for each distinct expert, the torch dequantizer and a matmul. The op has a fake
implementation (torch.compile) and a backward for the input and the bias (the weight is frozen).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats import QuantizedTensor, dequantize, get_spec
from .configs import expert_gemm_block_m, experts_block_m, select_experts_kernel
from .expert_gemm import expert_gemm
from .expert_gemv import expert_gemv
from .qmatmul import _X_DTYPES, _linear, _reference_dtype, check_bias, check_positive_or_none, resolve_backend
from .runtime import capturing, new_output

#: Kernels qmatmul_experts(kernel=...) takes: "auto" (by the mean pairs per expert), "gemv", "gemm".
EXPERT_KERNELS = ("auto", "gemv", "gemm")


def qmatmul_experts(x: torch.Tensor, qt: QuantizedTensor, expert_ids: torch.Tensor, num_experts: int,
                    bias: Optional[torch.Tensor] = None, backend: str = "auto", *, check_ids: bool = True,
                    kernel: str = "auto", split_k: Optional[int] = None, layout: Optional[int] = None) -> torch.Tensor:
    """y[..., j, :] = x_j @ W[expert_ids[..., j]].T + bias[expert_ids[..., j]] for a stack of experts.

    qt: (num_experts * N, K), expert e being rows e * N ... (e + 1) * N. expert_ids: (..., k) integer
    tensor on x's device. x: (..., K), one row per token shared by its k experts, or (..., k, K), one row
    per (token, expert) pair; float32, float16 or bfloat16. bias: optional (num_experts * N,) of x's dtype.
    Returns (..., k, N) in x's dtype, accumulated in fp32.

    backend: "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1), "torch" (the reference and CPU
    path) or "auto" (triton for CUDA tensors). check_ids: read the ids back to check they lie in
    [0, num_experts) (one device-to-host read), except during CUDA graph capture where no read is possible;
    the Triton kernel clamps ids into that range either way, so a bad id never reads outside the weight.
    kernel (triton only): "auto" picks by the mean pairs per expert; "gemv" or "gemm" force the grouped expert
    GEMV or GEMM. split_k forces the kernel's K split, layout the GEMV's loop layout (so it implies "gemv"):
    for tests and benchmarks.
    Raises TypeError/ValueError naming the problem before anything is launched.
    """
    n, k, backend, x_group = _validate(x, qt, expert_ids, num_experts, bias, backend, kernel, split_k, layout)
    ids = expert_ids if expert_ids.dtype in (torch.int32, torch.int64) else expert_ids.long()
    if check_ids and not capturing(ids.device) and not torch.compiler.is_compiling():
        negative, over = count_out_of_range(ids, num_experts)
        if negative:
            raise ValueError(f"expert_ids holds {negative} negative expert ids")
        if over:
            raise ValueError(f"expert_ids holds {over} ids >= num_experts={num_experts}")
    return torch.ops.offload_kernels.qmatmul_experts(x, qt.data.view(-1), qt.qtype, num_experts, n, k,
                                                     n * qt.row_bytes, ids, bias, backend, kernel,
                                                     0 if split_k is None else int(split_k),
                                                     0 if layout is None else int(layout))


def count_out_of_range(ids: torch.Tensor, num_experts: int) -> tuple[int, int]:
    """(how many ids are negative, how many are >= num_experts): one device-to-host read."""
    negative, over = torch.stack([(ids < 0).sum(), (ids >= num_experts).sum()]).tolist()
    return int(negative), int(over)


def _validate(x, qt, expert_ids, num_experts, bias, backend, kernel, split_k, layout) -> tuple[int, int, str, int]:
    """(N, K, backend, tokens per x row's pairs: k for a shared row, 1 for one row per pair)."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(expert_ids, torch.Tensor):
        raise TypeError(f"expert_ids must be a torch.Tensor, got {type(expert_ids).__name__}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    rows, k = qt.shape
    if rows % num_experts:
        raise ValueError(f"a weight of {rows} rows is not a stack of {num_experts} experts")
    n = rows // num_experts
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if (expert_ids.dtype.is_floating_point or expert_ids.dtype.is_complex
            or expert_ids.dtype in (torch.bool, torch.uint8)):
        raise TypeError(f"expert_ids must hold integer expert ids, got {expert_ids.dtype}")
    if expert_ids.dim() < 1:
        raise ValueError("expert_ids must be (..., k): one row of chosen experts per token")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}) to multiply experts of ({n}, {k}), got {tuple(x.shape)}")
    if x.shape[:-1] == expert_ids.shape[:-1]:
        x_group = expert_ids.shape[-1]
    elif x.shape[:-1] == expert_ids.shape:
        x_group = 1
    else:
        raise ValueError(f"x {tuple(x.shape)} must be (..., K) with one row per token of expert_ids "
                         f"{tuple(expert_ids.shape)}, or (..., k, K) with one row per chosen expert")
    for name, t in (("expert_ids", expert_ids), ("the quantized weight", qt.data)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    check_bias(bias, rows, x, " (num_experts * N)")
    check_positive_or_none(split_k, "split_k")
    check_positive_or_none(layout, "layout")
    if kernel not in EXPERT_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {EXPERT_KERNELS}")
    if kernel == "gemm" and layout is not None:
        raise ValueError("layout= selects a loop of the grouped GEMV; kernel='gemm' has none")
    backend = resolve_backend(backend, x)
    if backend != "triton" and (split_k is not None or layout is not None or kernel != "auto"):
        raise ValueError("kernel=, split_k= and layout= select Triton kernels and configs; they need "
                         "backend='triton'")
    return n, k, backend, x_group


# ---------------------------------------------------------------------------------------------- op
@torch.library.custom_op("offload_kernels::qmatmul_experts", mutates_args=())
def _qmatmul_experts_op(x: torch.Tensor, data: torch.Tensor, qtype: str, num_experts: int, n: int, k: int,
                        expert_bytes: int, expert_ids: torch.Tensor, bias: Optional[torch.Tensor], backend: str,
                        kernel: str, split_k: int, layout: int) -> torch.Tensor:
    """``data``: a flat uint8 buffer in which expert e's (n, k) GGUF rows start at byte e * expert_bytes (a
    stacked weight: expert_bytes = n * row_bytes; an expert cache: its slot size)."""
    spec = _check_buffer(data, qtype, num_experts, n, k, expert_bytes)
    pairs = expert_ids.numel()
    x_group = expert_ids.shape[-1] if x.dim() == expert_ids.dim() else 1
    out_shape = (*expert_ids.shape, n)
    if pairs == 0:
        return x.new_empty(out_shape)
    x2d = x.reshape(-1, k)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    ids = expert_ids.reshape(-1)
    if backend == "torch":
        return _torch_experts(x2d, data, spec, n, k, expert_bytes, ids, x_group, bias).view(out_shape)
    out = new_output((pairs, n), x.dtype, x.device)
    if kernel == "auto":
        kernel = "gemv" if layout else select_experts_kernel(pairs, num_experts)
    if kernel == "gemm":
        block_experts, block_rows = sort_pairs_by_expert(ids, num_experts, expert_gemm_block_m(pairs, num_experts))
        expert_gemm(x2d, data, spec.name, n, k, spec.row_bytes(k), expert_bytes, num_experts, block_experts,
                    block_rows, x_group, bias, out, split_k=split_k or None)
        return out.view(out_shape)
    block_m = experts_block_m(pairs, num_experts)
    if block_m > 1:
        block_experts, block_rows = sort_pairs_by_expert(ids, num_experts, block_m)
        expert_gemv(x2d, data, spec.name, n, k, spec.row_bytes(k), expert_bytes, num_experts, block_experts,
                    x_group, bias, out, block_rows=block_rows, split_k=split_k or None, layout=layout or None)
    else:
        expert_gemv(x2d, data, spec.name, n, k, spec.row_bytes(k), expert_bytes, num_experts, ids.contiguous(),
                    x_group, bias, out, split_k=split_k or None, layout=layout or None)
    return out.view(out_shape)


def sort_pairs_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs grouped by expert into blocks of ``block_m``: (block_experts (B,), block_rows (B, block_m)
    int32, the pairs of each block, P where a block is not full). B = cdiv(P, block_m) + min(E, P) blocks,
    the most any routing needs (each expert's last block may be partial); the unused ones hold only P.
    Device-side torch ops only (no bincount, whose output size is read back): nothing waits for the GPU,
    and a CUDA graph captures it. Ids are clamped into [0, num_experts), as the kernel does."""
    pairs = ids.numel()
    device = ids.device
    ids = ids.reshape(-1).clamp(0, num_experts - 1)
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, ids.long(), torch.ones(pairs, dtype=torch.int64, device=device))
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    n_blocks = -(-pairs // block_m) + min(num_experts, pairs)
    b = torch.arange(n_blocks, device=device)
    expert = torch.searchsorted(block_end, b, right=True)          # num_experts past the last used block
    e = expert.clamp(max=num_experts - 1)
    within = (b - (block_end[e] - blocks[e]))[:, None] * block_m + torch.arange(block_m, device=device)
    live = (expert < num_experts)[:, None] & (within < counts[e][:, None])
    position = (torch.cumsum(counts, 0) - counts)[e][:, None] + within
    rows = torch.where(live, order[position.clamp(max=pairs - 1)], pairs)
    return e.to(torch.int32), rows.to(torch.int32).contiguous()


@_qmatmul_experts_op.register_fake
def _qmatmul_experts_fake(x, data, qtype, num_experts, n, k, expert_bytes, expert_ids, bias, backend, kernel,
                          split_k, layout):
    return x.new_empty((*expert_ids.shape, n))


def _check_buffer(data: torch.Tensor, qtype: str, num_experts: int, n: int, k: int, expert_bytes: int):
    """The format of an expert buffer handed to the op, after checking that every expert's rows lie in it."""
    spec = get_spec(qtype)
    if data.dtype != torch.uint8 or data.dim() != 1 or not data.is_contiguous():
        raise ValueError(f"expert bytes must be a contiguous 1-D uint8 tensor, got {data.dtype} of shape "
                         f"{tuple(data.shape)}")
    if n < 1 or k < 1 or k % spec.block_size:
        raise ValueError(f"experts of ({n}, {k}) are not {spec.name} matrices (K a multiple of {spec.block_size})")
    size = n * spec.row_bytes(k)
    if expert_bytes < size or data.numel() < (num_experts - 1) * expert_bytes + size:
        raise ValueError(f"{data.numel()} bytes cannot hold {num_experts} experts of {size} bytes "
                         f"{expert_bytes} bytes apart")
    return spec


def _expert_matrix(data: torch.Tensor, spec, n: int, k: int, expert_bytes: int, expert: int) -> QuantizedTensor:
    """Expert ``expert``'s (n, k) matrix in a buffer of experts ``expert_bytes`` apart (a view of its bytes)."""
    row_bytes = spec.row_bytes(k)
    start = expert * expert_bytes
    return QuantizedTensor._from_validated(data[start:start + n * row_bytes].view(n, row_bytes), spec, (n, k))


def _torch_experts(x2d: torch.Tensor, data: torch.Tensor, spec, n: int, k: int, expert_bytes: int,
                   ids: torch.Tensor, x_group: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference: for each distinct expert, its pairs' rows times the dequantized expert."""
    out = torch.empty(ids.shape[0], n, dtype=x2d.dtype, device=x2d.device)
    compute = _reference_dtype(x2d)
    for e in torch.unique(ids).tolist():
        pairs = (ids == e).nonzero().squeeze(1)
        w = dequantize(_expert_matrix(data, spec, n, k, expert_bytes, e), compute)
        out[pairs] = _linear(x2d[pairs // x_group], w, None if bias is None else bias[e * n:(e + 1) * n])
    return out


# Backward for x and the bias: dL/dx of a pair is dL/dy @ W_e, summed over a shared row's k experts; the
# bias of expert e gets the sum of its pairs' dL/dy. One dequantize per distinct expert (a host read of the
# ids: training is not the path this op is built for, inference is).
def _setup_context(ctx, inputs, output):
    x, data, qtype, num_experts, n, k, expert_bytes, expert_ids, bias, backend, kernel, split_k, layout = inputs
    ctx.save_for_backward(data, expert_ids)
    ctx.meta = (qtype, num_experts, n, k, expert_bytes, backend, bias is not None, tuple(x.shape))


def _backward(ctx, grad):
    data, expert_ids = ctx.saved_tensors
    qtype, num_experts, n, k, expert_bytes, backend, has_bias, x_shape = ctx.meta
    row_bytes = get_spec(qtype).row_bytes(k)
    ids = expert_ids.reshape(-1)
    g = grad.reshape(-1, n)
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        compute = _reference_dtype(grad)
        per_pair = torch.zeros(ids.shape[0], k, dtype=compute, device=grad.device)
        for e in torch.unique(ids).tolist():
            pairs = (ids == e).nonzero().squeeze(1)
            rows = data[e * expert_bytes:e * expert_bytes + n * row_bytes].view(n, row_bytes)
            w = torch.ops.offload_kernels.dequantize(rows, qtype, n, k, compute, backend)
            per_pair[pairs] = g[pairs].to(compute) @ w
        top_k = expert_ids.shape[-1]
        if len(x_shape) == expert_ids.dim():          # one x row shared by the row's k experts
            per_pair = per_pair.view(-1, top_k, k).sum(1)
        grad_x = per_pair.to(grad.dtype).view(x_shape)
    if has_bias and ctx.needs_input_grad[8]:
        grad_bias = torch.zeros(num_experts, n, dtype=torch.float32, device=grad.device)
        grad_bias.index_add_(0, ids.long(), g.float())
        grad_bias = grad_bias.view(-1).to(grad.dtype)
    return grad_x, None, None, None, None, None, None, None, grad_bias, None, None, None, None


_qmatmul_experts_op.register_autograd(_backward, setup_context=_setup_context)



def qmatmul_expert_buffer(x: torch.Tensor, data: torch.Tensor, qtype: str, n: int, k: int, expert_bytes: int,
                          num_experts: int, expert_ids: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """qmatmul_experts over a raw buffer in which expert i's (n, k) ``qtype`` rows start at byte
    i * expert_bytes of the flat uint8 ``data`` (an expert cache's slots, ids being slot numbers); no bias,
    ids not checked (the caller built them). backend as for qmatmul_experts."""
    return torch.ops.offload_kernels.qmatmul_experts(x, data, qtype, num_experts, n, k, expert_bytes, expert_ids,
                                                     None, resolve_backend(backend, x), "auto", 0, 0)


__all__ = ["count_out_of_range", "qmatmul_expert_buffer", "qmatmul_experts", "sort_pairs_by_expert"]
