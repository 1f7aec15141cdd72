#!/usr/bin/env python
"""``python bench/plot.py [CSV ...]``: the PNG of each benchmark CSV under bench/results/ (default: all of them).

Same as ``offload-kernels bench plot``; the code is offload_kernels/benchmarks/plots.py (--help: options)."""
from _checkout import run_main

run_main("plot")
