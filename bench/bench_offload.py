#!/usr/bin/env python
"""``python bench/bench_offload.py [options]``: end-to-end tokens/s of offload(model) on a Llama-3-8B shape (CUDA).

Same as ``offload-kernels bench offload``; the code is offload_kernels/benchmarks/offload.py (--help: options)."""
from _checkout import run_main

run_main("offload")
