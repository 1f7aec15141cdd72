#!/usr/bin/env python
"""``python bench/bench_kernels.py [options]``: the Triton qmatmul kernels vs fp16 cuBLAS and int4 (CUDA).

Same as ``offload-kernels bench kernels``; the code is offload_kernels/benchmarks/kernels.py (--help: options)."""
from _checkout import run_main

run_main("kernels")
