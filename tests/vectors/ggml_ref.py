"""ggml's reference quantizers and dequantizers, called through ctypes (numpy only, no torch).

The library is ``libggml-base.so`` as built by llama-cpp-python (it ships in ``llama_cpp/lib``).
``ggml_quantize_chunk`` with a NULL importance matrix runs ``quantize_row_<type>_ref``, the code path
``llama-quantize`` takes without an imatrix.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

#: Environment variable naming libggml-base.so for the live tests and the benchmark.
LIB_ENV = "OFFLOAD_KERNELS_GGML_LIB"

# name -> (ggml_type id, weights per block, bytes per block), from ggml.h / ggml-common.h
GGML_TYPES = {
    "q4_0": (2, 32, 18),
    "q4_1": (3, 32, 20),
    "q5_0": (6, 32, 22),
    "q5_1": (7, 32, 24),
    "q8_0": (8, 32, 34),
    "q2_k": (10, 256, 84),
    "q3_k": (11, 256, 110),
    "q4_k": (12, 256, 144),
    "q5_k": (13, 256, 176),
    "q6_k": (14, 256, 210),
    "iq4_nl": (20, 32, 18),
    "iq4_xs": (23, 256, 136),
    "mxfp4": (39, 32, 17),
}

_DEQUANTIZE_SYMBOLS = {
    "q4_0": "dequantize_row_q4_0", "q4_1": "dequantize_row_q4_1", "q5_0": "dequantize_row_q5_0",
    "q5_1": "dequantize_row_q5_1", "q8_0": "dequantize_row_q8_0", "q2_k": "dequantize_row_q2_K",
    "q3_k": "dequantize_row_q3_K",
    "q4_k": "dequantize_row_q4_K", "q5_k": "dequantize_row_q5_K", "q6_k": "dequantize_row_q6_K",
    "iq4_nl": "dequantize_row_iq4_nl", "iq4_xs": "dequantize_row_iq4_xs", "mxfp4": "dequantize_row_mxfp4",
}


class GgmlRef:
    """ctypes bindings to one libggml-base.so."""

    def __init__(self, path: "str | os.PathLike"):
        self.path = str(path)
        lib = ctypes.CDLL(self.path)
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        for symbol in _DEQUANTIZE_SYMBOLS.values():
            fn = getattr(lib, symbol)
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        self._lib = lib

    def quantize(self, w: np.ndarray, qtype: str) -> np.ndarray:
        """(n, k) fp32 -> (n, k / block_size * block_bytes) uint8, single-threaded ggml reference."""
        type_id, block_size, block_bytes = GGML_TYPES[qtype]
        w = np.ascontiguousarray(w, dtype=np.float32)
        n, k = w.shape
        out = np.empty((n, k // block_size * block_bytes), dtype=np.uint8)
        written = self._lib.ggml_quantize_chunk(type_id, w.ctypes.data, out.ctypes.data, 0, n, k, None)
        assert written == out.nbytes, (written, out.nbytes)
        return out

    def dequantize(self, blocks: np.ndarray, qtype: str, k: int) -> np.ndarray:
        """(n, row_bytes) uint8 -> (n, k) fp32 via ggml's ``dequantize_row_*``."""
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
        n = blocks.shape[0]
        out = np.empty((n, k), dtype=np.float32)
        getattr(self._lib, _DEQUANTIZE_SYMBOLS[qtype])(blocks.ctypes.data, out.ctypes.data, n * k)
        return out


def find_library(explicit: "str | None" = None) -> "Path | None":
    """libggml-base.so from ``explicit``, else the environment variable, else None."""
    path = explicit or os.environ.get(LIB_ENV)
    if not path:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"libggml-base.so not found at {path}")
    return path
