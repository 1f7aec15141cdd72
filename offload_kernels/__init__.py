"""offload_kernels: run PyTorch models whose weights do not fit in GPU memory.

Weights stay in llama.cpp's GGUF block formats, Triton kernels dequantize inside the matmul, and a
C++/CUDA transfer engine streams the quantized bytes from pinned host memory into a ring of device slots.

Layers of the package, bottom to top: ``formats`` -> ``kernels`` -> ``engine`` -> ``layers`` ->
``model`` (offload / GGUF loading) -> ``cli``. Importing the package is light: the kernels (Triton),
the engine and the model API load on first use, so TRITON_INTERPRET may still be set after import.
"""

from importlib import import_module
from typing import Any

from ._native import info
from .formats import LLAMA_QUANTIZE_FALLBACKS, QTYPES, QuantizedTensor, dequantize, quantize

__version__ = "0.1.0"

# public name -> submodule that defines it, imported on first access
_LAZY = {
    "qmatmul": "offload_kernels.kernels",
    "qmatmul_experts": "offload_kernels.kernels",
    "TransferEngine": "offload_kernels.engine",
    "OffloadedLinear": "offload_kernels.layers",
    "OffloadedExperts": "offload_kernels.layers",
    "offload": "offload_kernels.model",
    "OffloadReport": "offload_kernels.model",
    "load_gguf_model": "offload_kernels.model",
    "load_gguf_tokenizer": "offload_kernels.model",
}

__all__ = ["LLAMA_QUANTIZE_FALLBACKS", "QTYPES", "QuantizedTensor", "dequantize", "info", "quantize", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'offload_kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
