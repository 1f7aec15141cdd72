#!/usr/bin/env python
"""``python bench/bench_quantize.py [options]``: quantize/dequantize vs ggml's C reference and gguf.

Same as ``offload-kernels bench quantize``; the code is offload_kernels/benchmarks/quantize.py (--help: options)."""
from _checkout import run_main

run_main("quantize")
