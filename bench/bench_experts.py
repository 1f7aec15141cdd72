#!/usr/bin/env python
"""``python bench/bench_experts.py [options]``: one MoE layer's experts, grouped vs by-expert vs fp16 (CUDA).

Same as ``offload-kernels bench experts``; the code is offload_kernels/benchmarks/experts.py (--help: options)."""
from _checkout import run_main

run_main("experts")
