"""``offload-kernels bench NAME [options]``: run one of the benchmarks in offload_kernels.benchmarks, or plot
their results. The GPU benchmarks say that they need CUDA and exit 0 on a machine without it; ``quantize``,
``sass`` (machine code compiled for sm_90) and ``plot`` run anywhere. Results go to
bench/results/<device-slug>/ of the checkout (``--out DIR``)."""

from __future__ import annotations

import argparse
import importlib

# sub-command -> module defining add_arguments(parser) and run(args) -> int; its docstring is the help.
BENCHMARKS = {name: f"offload_kernels.benchmarks.{module}" for name, module in
              (("kernels", "kernels"), ("transfer", "transfer"), ("quantize", "quantize"), ("offload", "offload"),
               ("experts", "experts"), ("sass", "sass"), ("plot", "plots"))}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, module in BENCHMARKS.items():
        mod = importlib.import_module(module)
        summary = " ".join(mod.__doc__.split("\n\n")[0].split()).replace("%", "%%")   # argparse %-formats help
        p = sub.add_parser(name, help=summary, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(BENCHMARKS[args.benchmark]).run(args) or 0)
