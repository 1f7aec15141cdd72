"""Entry point of the ``offload-kernels`` command: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "demo": ("offload_kernels.cli.demo", "quantize, offload and run a model sized for this machine; print the results"),
    "run": ("offload_kernels.cli.run", "generate text from a llama.cpp GGUF file with streamed, quantized linears"),
    "plan": ("offload_kernels.cli.plan", "predict tokens/s of a model for a VRAM budget (resident vs streamed)"),
    "info": ("offload_kernels.cli.info", "devices, extension build, measured bandwidths"),
    "bench": ("offload_kernels.cli.bench", "run a benchmark (kernels, transfer, quantize, offload) or plot results"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offload-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: "list[str] | None" = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:   # bad input: say what, no traceback
        print(f"offload-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
