#!/usr/bin/env python
"""Plot bench_kernels.py results from the latest run in each ``bench/results/<gpu>/kernels.csv``: per qtype,
the speedup over fp16 cuBLAS of every provider against M (top row) and the fraction of the device copy
bandwidth the weight stream reaches (bottom row), for one weight shape.

    python bench/plot_kernels.py                         # every results/*/kernels.csv -> kernels.png beside it
    python bench/plot_kernels.py path/to/kernels.csv [--shape 8192x8192] [--out plot.png] [--all-runs]
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = ("auto", "gemv", "gemm", "dequant", "int4_tinygemm")
STYLE = {"auto": dict(color="black", linewidth=2.2, marker="o"), "gemv": dict(marker="v", linestyle="--"),
         "gemm": dict(marker="s", linestyle="--"), "dequant": dict(marker="^", linestyle="--"),
         "int4_tinygemm": dict(marker="x", linestyle=":", color="gray")}


def read_rows(path: Path, all_runs: bool) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or all_runs:
        return rows
    latest = max(r["date"] for r in rows)  # one run shares one timestamp
    return [r for r in rows if r["date"] == latest]


def series(rows, kernel: str, qtype: str, shape: tuple[int, int]) -> dict[str, list[tuple[float, float, float, float]]]:
    """provider -> sorted [(M, median, p20, p80)] of one measurement for one qtype and shape."""
    out: dict[str, list] = defaultdict(list)
    for r in rows:
        if r["kernel"] == kernel and r["qtype"] == qtype and (int(r["N"]), int(r["K"])) == shape:
            out[r["provider"]].append((float(r["x"]), float(r["median"]), float(r["p20"]), float(r["p80"])))
    return {k: sorted(v) for k, v in out.items()}


def plot(path: Path, out: Path, shape: "tuple[int, int] | None", all_runs: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(path, all_runs) if r["kernel"] != "copy_bandwidth"]
    if not rows:
        raise SystemExit(f"{path}: no kernel rows")
    shapes = sorted({(int(r["N"]), int(r["K"])) for r in rows})
    if shape is None:
        shape = (8192, 8192) if (8192, 8192) in shapes else shapes[0]
    elif shape not in shapes:
        raise SystemExit(f"{path}: shape {shape[0]}x{shape[1]} not measured (have {shapes})")
    qtypes = sorted({r["qtype"] for r in rows if (int(r["N"]), int(r["K"])) == shape})
    fig, axes = plt.subplots(2, len(qtypes), figsize=(4.2 * len(qtypes), 7.5), squeeze=False, sharex=True)
    for col, qtype in enumerate(qtypes):
        ax_s, ax_b = axes[0][col], axes[1][col]
        for provider, pts in series(rows, "speedup_vs_cublas_fp16", qtype, shape).items():
            if provider in STYLE:
                ax_s.errorbar([p[0] for p in pts], [p[1] for p in pts],
                              yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], capsize=2,
                              label=provider, **STYLE[provider])
        ax_s.axhline(1.0, color="gray", linewidth=0.8)
        ax_s.set_title(f"{qtype}, {shape[0]}x{shape[1]}")
        ax_s.set_ylabel("speedup over fp16 cuBLAS")
        for provider, pts in series(rows, "hbm_fraction", qtype, shape).items():
            if provider in STYLE:
                ax_b.plot([p[0] for p in pts], [p[1] for p in pts], label=provider, **STYLE[provider])
        ax_b.set_ylabel("weight GB/s / copy GB/s")
        ax_b.set_xlabel("M (tokens)")
        for ax in (ax_s, ax_b):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
        if col == 0:
            ax_s.legend(fontsize=8)
    gpu = rows[0]["gpu"]
    fig.suptitle(f"offload_kernels qmatmul on {gpu} ({rows[0]['date']}, {rows[0]['dtype']} activations)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="?", type=Path, help="a kernels.csv (default: every bench/results/*/kernels.csv)")
    ap.add_argument("--shape", help="NxK to plot (default 8192x8192 when measured)")
    ap.add_argument("--out", type=Path, help="output PNG (default: kernels.png beside the CSV)")
    ap.add_argument("--all-runs", action="store_true", help="plot every run in the CSV, not just the latest")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.lower().split("x")) if args.shape else None
    paths = [args.csv] if args.csv else sorted((ROOT / "bench" / "results").glob("*/kernels.csv"))
    if not paths:
        print("plot_kernels: no bench/results/*/kernels.csv yet (run bench/bench_kernels.py on a GPU)")
        return 0
    for path in paths:
        plot(path, args.out or path.with_suffix(".png"), shape, args.all_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
