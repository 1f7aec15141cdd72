"""Lets the bench/*.py scripts run a benchmark of this checkout, whether or not the package is installed."""

import sys
from pathlib import Path


def run_main(benchmark: str) -> None:
    """``offload-kernels bench <benchmark> <this script's arguments>``, this checkout's package first on the path."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from offload_kernels.cli.main import main

    sys.exit(main(["bench", benchmark, *sys.argv[1:]]))
