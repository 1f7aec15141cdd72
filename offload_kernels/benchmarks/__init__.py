"""Benchmarks of offload_kernels, importable from the installed package so the CLI can run them.

One module per benchmark, each with ``add_arguments(parser)`` and ``run(args) -> int`` (the CLI calls them):

* ``kernels``: the Triton qmatmul kernels against fp16 cuBLAS and torch's int4 kernel (CUDA);
* ``transfer``: host-to-device bandwidth and copy/compute overlap of the transfer engine (CUDA);
* ``quantize``: quantize/dequantize speed against ggml's C reference and gguf's numpy code (CPU, CUDA);
* ``offload``: end-to-end tokens/s of an offloaded Llama-3-8B-shaped model (CUDA);

plus ``plots`` (PNGs from the CSVs) and ``results`` (the plumbing they share: run metadata, timing
statistics, the long-format CSV, markdown summaries, the results directory). Run them as
``offload-kernels bench NAME [options]`` or ``python bench/bench_NAME.py [options]`` from a checkout.
"""
