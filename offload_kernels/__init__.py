"""offload_kernels: run PyTorch models whose weights do not fit in GPU memory.

Weights stay in llama.cpp's GGUF block formats, Triton kernels dequantize inside the matmul, and a
C++/CUDA transfer engine streams the quantized bytes from pinned host memory into a ring of device slots.

Layers of the package, bottom to top: ``formats`` -> ``kernels`` -> ``engine`` -> ``layers`` ->
``model`` (offload / GGUF loading) -> ``cli``.
"""

from ._native import info
from .formats import QTYPES, QuantizedTensor, dequantize, quantize

__version__ = "0.1.0"

__all__ = ["QTYPES", "QuantizedTensor", "dequantize", "info", "quantize", "__version__"]
