"""Triton kernels that multiply by GGUF-quantized weights, dequantizing inside the matmul.

Public API:

* ``qmatmul(x, qt, bias=None, backend="auto", *, kernel="auto", split_k=None)``: y = x @ W.T + b, also
  registered as the custom op ``torch.ops.offload_kernels.qmatmul`` (fake impl for torch.compile,
  autograd for x and bias; ``torch.ops.offload_kernels.dequantize`` is its traceable dequantizer);
* ``qmatmul_experts(x, qt, expert_ids, num_experts, bias=None, backend="auto")``: a mixture-of-experts
  projection for the experts each token chose, in one launch of the grouped expert GEMV or, with many tokens
  per expert, GEMM (custom op ``offload_kernels::qmatmul_experts``);
* ``dequantize_triton(qt, dtype=torch.float16, *, out=None)``: the Triton dequantize kernel (bit-exact);
* ``select_kernel(m)`` / ``KERNEL_BY_M``: which kernel family runs for M tokens;
* ``launch_counts()`` / ``reset_launch_counts()``: which Triton kernels ran (for tests and benchmarks);
* ``poison_outputs()``: debug context manager, outputs start as NaN instead of uninitialized memory.

Importing this package imports triton: set TRITON_INTERPRET=1 before it to run the kernels on CPU tensors.
The first call per shape autotunes (in-process cache; never inside a CUDA graph capture); set
OFFLOAD_KERNELS_AUTOTUNE=0 to always use the heuristic configs.
"""

from .configs import KERNEL_BY_M, KERNEL_FAMILIES, select_kernel
from .dequant import dequantize_triton
from .qmatmul import BACKENDS, KERNELS, qmatmul
from .qmatmul_experts import qmatmul_experts
from .runtime import (INTERPRETER, KERNEL_VARIANTS, forget_tuned_configs, launch_counts, poison_outputs,
                      reset_launch_counts)

__all__ = ["BACKENDS", "INTERPRETER", "KERNELS", "KERNEL_BY_M", "KERNEL_FAMILIES", "KERNEL_VARIANTS",
           "dequantize_triton", "forget_tuned_configs", "launch_counts", "poison_outputs", "qmatmul", "qmatmul_experts",
           "reset_launch_counts", "select_kernel"]
