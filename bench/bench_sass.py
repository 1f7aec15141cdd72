#!/usr/bin/env python
"""``python bench/bench_sass.py [options]``: the GEMV loop in sm_90 machine code per layout (no GPU needed).

Same as ``offload-kernels bench sass``; the code is offload_kernels/benchmarks/sass.py (--help: options)."""
from _checkout import run_main

run_main("sass")
