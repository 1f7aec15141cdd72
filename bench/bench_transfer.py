#!/usr/bin/env python
"""``python bench/bench_transfer.py [options]``: transfer engine bandwidth and copy/compute overlap (CUDA).

Same as ``offload-kernels bench transfer``; the code is offload_kernels/benchmarks/transfer.py (--help: options)."""
from _checkout import run_main

run_main("transfer")
