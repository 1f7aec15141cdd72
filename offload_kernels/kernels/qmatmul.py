"""qmatmul: y = x @ W.T + b for a GGUF-quantized W, as the custom op ``offload_kernels::qmatmul``.

Dispatch (backend="triton"): M = number of tokens (product of x's leading dims) picks the kernel family
from configs.KERNEL_BY_M: the split-K GEMV, the fused tiled GEMM (split-K for mid M), or the Triton
dequantize kernel followed by torch.matmul (cuBLAS). backend="torch" is the reference path (and the CPU
path): the torch dequantizer, then a matmul. The op takes plain tensors, ints and strings and has a fake
(meta) implementation, so torch.compile(fullgraph=True) traces through it and CUDA graphs capture it. It
is differentiable in x and the bias (the quantized weight is frozen), through the companion op
``offload_kernels::dequantize``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F

from ..formats import QTYPES, QuantizedTensor, dequantize, get_spec
from .configs import KERNEL_FAMILIES, select_kernel
from .dequant import check_triton_device, dequantize_into
from .gemm import gemm
from .gemv import gemv
from .runtime import INTERPRETER, new_output

BACKENDS = ("auto", "triton", "torch")
KERNELS = ("auto",) + KERNEL_FAMILIES
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SPECS = {name: get_spec(name) for name in QTYPES}      # the op's qtype strings are canonical names


def qmatmul(x: torch.Tensor, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None, backend: str = "auto", *,
            kernel: str = "auto", split_k: Optional[int] = None) -> torch.Tensor:
    """y = x @ W.T + bias where W (N, K) is the GGUF-quantized ``qt``; x (..., K) -> y (..., N).

    x: float32, float16 or bfloat16, any strides, on qt's device; y has x's dtype; products are
    accumulated in fp32. bias: optional (N,) tensor of x's dtype and device.

    backend:
      * "triton": the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
      * "torch": the reference path: the torch dequantizer, then F.linear in fp32 for fp32 x or on the
        CPU, in x's dtype (cuBLAS, fp32 accumulation) otherwise;
      * "auto": "triton" for CUDA tensors, "torch" otherwise (the interpreter is a testing tool, orders of
        magnitude slower than torch on the CPU, so it is never chosen implicitly).
    kernel (backend "triton" only): "auto" picks by the number of tokens M (configs.KERNEL_BY_M);
      "gemv", "gemm" or "dequant" force a family. split_k forces the GEMV/GEMM K split (1: none) with a
      heuristic config instead of the tuned one; None lets the autotuner choose. Both are for tests and
      benchmarks.

    Differentiable with respect to x and bias (dL/dx = dL/dy @ W); the weight gets no gradient. Under
    forward-mode AD and torch.func transforms (jvp, vmap, grad, ...) y comes from the dequantized weight
    and F.linear, which those transforms differentiate and batch.
    Raises TypeError/ValueError naming the problem before anything is launched.
    """
    n, k, backend = _validate(x, qt, bias, backend, kernel, split_k)
    if _eager_fast_path(x, bias):
        return _forward(x, qt, bias, backend, kernel, split_k)
    if _transformed(x, bias):
        return _linear_on_dequantized(x, qt, bias, backend)
    return torch.ops.offload_kernels.qmatmul(x, qt.data, qt.qtype, n, k, bias, backend, kernel,
                                             0 if split_k is None else int(split_k))


def _eager_fast_path(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """True when calling the implementation directly is indistinguishable from calling the op: eager mode
    (not traced by torch.compile), no gradient to record (backward or forward-mode), no torch.func
    transform (vmap, jvp, grad), plain tensors and no torch function/dispatch mode that would want to see
    the op (vmap, say, then runs it per sample through torch's fallback instead of handing the kernels a
    batched tensor wrapper). The dispatcher round trip it skips costs tens of microseconds per
    call, which a decode step pays once per linear layer."""
    if type(x) is not torch.Tensor or (bias is not None and type(bias) is not torch.Tensor):
        return False
    if x.device.type not in ("cuda", "cpu"):     # meta tensors and the like: the op's fake implementation
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return not (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
                or torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active()
                or _forward_ad._current_level >= 0)


def _transformed(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """A torch.func transform (jvp, vmap, grad, jacrev, ...) is active, or x or the bias carries a
    forward-mode tangent, outside torch.compile's tracing. The op has a backward formula but no forward-mode
    or batching rule: through it a jvp would get a zero tangent, silently."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        return True
    # The dual level is process-wide: only inputs that carry a tangent need the differentiable path.
    return _forward_ad._current_level >= 0 and any(
        t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in (x, bias))


def _linear_on_dequantized(x: torch.Tensor, qt: QuantizedTensor, bias: Optional[torch.Tensor],
                           backend: str) -> torch.Tensor:
    """y from differentiable torch ops on the dequantized weight (the dequantize op, then F.linear), which
    every transform knows: exact tangents under jvp, one batched matmul under vmap. The weight is
    materialized in the compute dtype (fp32 for fp32 x or on the CPU, as torch_qmatmul does); kernel= and
    split_k= do not apply."""
    n, k = qt.shape
    compute = _reference_dtype(x)
    return _linear(x, torch.ops.offload_kernels.dequantize(qt.data, qt.qtype, n, k, compute, backend), bias)


def _forward(x: torch.Tensor, qt: QuantizedTensor, bias: Optional[torch.Tensor], backend: str, kernel: str,
             split_k: Optional[int]) -> torch.Tensor:
    """The op's computation on validated arguments: x (..., K) -> (..., N)."""
    n, k = qt.shape
    lead = x.shape[:-1]
    m = math.prod(lead)
    if m == 0:
        return x.new_empty((*lead, n))
    x2d = x.reshape(m, k)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if backend == "torch":
        y = torch_qmatmul(x2d, qt, bias)
    else:
        y = triton_qmatmul(x2d, qt, bias, kernel, split_k)
    return y.view(*lead, n)


def _validate(x, qt, bias, backend, kernel, split_k) -> tuple[int, int, str]:
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        hint = " (use float32)" if x.dtype == torch.float64 else ""
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}{hint}")
    n, k = qt.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}) to multiply a ({n}, {k}) weight, got {tuple(x.shape)}")
    if x.device != qt.device:
        raise ValueError(f"x is on {x.device} but the quantized weight is on {qt.device}")
    check_bias(bias, n, x)
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(map(repr, KERNELS))}")
    check_positive_or_none(split_k, "split_k")
    backend = resolve_backend(backend, x)
    if backend != "triton" and (kernel != "auto" or split_k is not None):
        raise ValueError("kernel= and split_k= select Triton kernels; they need backend='triton'")
    return n, k, backend


def check_bias(bias: Optional[torch.Tensor], rows: int, x: torch.Tensor, shape_note: str = "") -> None:
    """A bias must be None or a (rows,) tensor of x's dtype on x's device."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (rows,):
        raise ValueError(f"bias must have shape ({rows},){shape_note}, got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} does not match x dtype {x.dtype}")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")


def check_positive_or_none(value, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """"triton" or "torch" for ``backend`` ("auto": triton for CUDA tensors), checked for x's device."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    if backend == "auto":
        backend = "triton" if x.device.type == "cuda" else "torch"
    if backend == "triton":
        check_triton_device(x.device, "x", x.dtype)
    return backend


# ---------------------------------------------------------------------------------------------- op
def _op_weight(data: torch.Tensor, qtype: str, n: int, k: int) -> QuantizedTensor:
    """The op's weight, rewrapped once per call. qmatmul() passes the pieces of an already validated
    QuantizedTensor, for which a few cheap comparisons suffice (and take the fast constructor); anything
    else (the op called directly with inconsistent pieces) gets the full validation and its error."""
    spec = _SPECS.get(qtype)
    if (spec is not None and data.dtype == torch.uint8 and data.dim() == 2 and n > 0 and k > 0
            and k % spec.block_size == 0 and data.shape[0] == n and data.shape[1] == spec.row_bytes(k)
            and data.is_contiguous()):
        return QuantizedTensor._from_validated(data, spec, (n, k))
    return QuantizedTensor(data, qtype, (n, k))


@torch.library.custom_op("offload_kernels::qmatmul", mutates_args=())
def _qmatmul_op(x: torch.Tensor, data: torch.Tensor, qtype: str, n: int, k: int, bias: Optional[torch.Tensor],
                backend: str, kernel: str, split_k: int) -> torch.Tensor:
    return _forward(x, _op_weight(data, qtype, n, k), bias, backend, kernel, split_k or None)


@_qmatmul_op.register_fake
def _qmatmul_fake(x, data, qtype, n, k, bias, backend, kernel, split_k):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("offload_kernels::dequantize", mutates_args=())
def _dequantize_op(data: torch.Tensor, qtype: str, n: int, k: int, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """The (N, K) weight in ``dtype``: the Triton dequantize kernel (backend "triton") or the torch one."""
    qt = _op_weight(data, qtype, n, k)
    if backend == "torch":
        return dequantize(qt, dtype)
    out = new_output((n, k), dtype, data.device)
    dequantize_into(qt, out)
    return out


@_dequantize_op.register_fake
def _dequantize_fake(data, qtype, n, k, dtype, backend):
    return data.new_empty((n, k), dtype=dtype)


# Backward (the weight is frozen: gradients for x and the bias only), so a quantized layer can sit inside
# a model that trains other parameters (adapters, norms). dL/dx = dL/dy @ W, with W dequantized by the
# same backend in the gradient's dtype (fp32 on the CPU), through the dequantize op so that AOTAutograd
# can trace it.
def _qmatmul_setup_context(ctx, inputs, output):
    x, data, qtype, n, k, bias, backend, kernel, split_k = inputs
    ctx.save_for_backward(data)
    ctx.meta = (qtype, n, k, backend, bias is not None)


def _qmatmul_backward(ctx, grad):
    (data,) = ctx.saved_tensors
    qtype, n, k, backend, has_bias = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        compute = _reference_dtype(grad)
        w = torch.ops.offload_kernels.dequantize(data, qtype, n, k, compute, backend)
        grad_x = torch.matmul(grad.to(compute), w).to(grad.dtype)
    if has_bias and ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, n).sum(0, dtype=torch.float32).to(grad.dtype)
    return grad_x, None, None, None, None, grad_bias, None, None, None


_qmatmul_op.register_autograd(_qmatmul_backward, setup_context=_qmatmul_setup_context)


def torch_qmatmul(x2d: torch.Tensor, qt: QuantizedTensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference path: torch dequantizer + F.linear. fp32 math for fp32 x and on the CPU (where fp16
    matmuls are slow and not guaranteed to accumulate in fp32); otherwise the weight is rounded to x's
    dtype and cuBLAS multiplies with fp32 accumulation (fast, and within that dtype's own precision)."""
    return _linear(x2d, dequantize(qt, _reference_dtype(x2d)), bias)


def _reference_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the reference path dequantizes to and multiplies in for activations (or gradients) x:
    fp32 for fp32 and on the CPU, x's own dtype for fp16/bf16 on CUDA."""
    return torch.float32 if (x.dtype == torch.float32 or x.device.type != "cuda") else x.dtype


def _linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, w, bias) in w's dtype, returned in x's. Casts only where the dtype differs (the common
    same-dtype case costs no dispatcher round trip)."""
    b = bias if (bias is None or bias.dtype == w.dtype) else bias.to(w.dtype)
    y = F.linear(x if x.dtype == w.dtype else x.to(w.dtype), w, b)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def triton_qmatmul(x2d: torch.Tensor, qt: QuantizedTensor, bias: Optional[torch.Tensor], kernel: str = "auto",
                   split_k: Optional[int] = None) -> torch.Tensor:
    """(M, K) x with unit K stride -> (M, N) with the Triton kernel family ``kernel`` ("auto": by M)."""
    m = x2d.shape[0]
    family = select_kernel(m) if kernel == "auto" else kernel
    if family == "dequant":
        w = new_output(tuple(qt.shape), x2d.dtype, x2d.device)
        dequantize_into(qt, w)
        return F.linear(x2d, w, bias)
    out = new_output((m, qt.shape[0]), x2d.dtype, x2d.device)
    if family == "gemv":
        gemv(x2d, qt, bias, out, split_k=split_k)
    else:
        gemm(x2d, qt, bias, out, split_k=split_k)
    return out


__all__ = ["BACKENDS", "KERNELS", "INTERPRETER", "qmatmul", "torch_qmatmul", "triton_qmatmul"]
