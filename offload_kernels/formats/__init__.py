"""GGUF block formats: specs, QuantizedTensor, bit-exact quantize/dequantize, GGUF file I/O."""

from .dequantize import dequantize, dequantize_blocks
from .gguf_io import GGUFError, GGUFFile, GGUFTensorInfo, read_gguf, write_gguf
from .qtypes import LLAMA_QUANTIZE_FALLBACKS, QTYPES, QTypeSpec, get_spec
from .quantize import quantize, quantize_blocks
from .quantized_tensor import QuantizedTensor

__all__ = ["GGUFError", "GGUFFile", "GGUFTensorInfo", "LLAMA_QUANTIZE_FALLBACKS", "QTYPES", "QTypeSpec",
           "QuantizedTensor", "dequantize", "dequantize_blocks", "get_spec", "quantize", "quantize_blocks", "read_gguf",
           "write_gguf"]
