#!/usr/bin/env python
"""Plot bench_transfer.py results: host-to-device bandwidth per provider against copy size, and the engine's
copy/compute overlap, from the latest run in each ``bench/results/<gpu>/transfer.csv``.

    python bench/plot_transfer.py                      # every results/*/transfer.csv -> transfer.png beside it
    python bench/plot_transfer.py path/to/transfer.csv [--out plot.png] [--all-runs]
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_rows(path: Path, all_runs: bool) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or all_runs:
        return rows
    latest = max(r["date"] for r in rows)  # one run shares one timestamp
    return [r for r in rows if r["date"] == latest]


def series(rows: list[dict[str, str]], kernel: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """provider -> sorted [(x, median, p20, p80)] for one kernel."""
    out: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for r in rows:
        if r["kernel"] == kernel:
            out[r["provider"]].append((float(r["x"]), float(r["median"]), float(r["p20"]), float(r["p80"])))
    return {k: sorted(v) for k, v in out.items()}


def plot(path: Path, out: Path, all_runs: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    rows = read_rows(path, all_runs)
    if not rows:
        raise SystemExit(f"{path}: no rows")
    fig, (ax_bw, ax_ov) = plt.subplots(1, 2, figsize=(13, 4.8))

    for provider, pts in series(rows, "h2d_bandwidth").items():
        xs = [p[0] / 1e6 for p in pts]
        med = [p[1] for p in pts]
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        ax_bw.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=provider)
    ax_bw.set_xscale("log")
    ax_bw.xaxis.set_major_formatter(ScalarFormatter())
    ax_bw.set_xlabel("copy size (MB)")
    ax_bw.set_ylabel("GB/s (median, p20-p80)")
    ax_bw.set_title("host-to-device bandwidth")
    ax_bw.grid(True, which="both", alpha=0.3)
    ax_bw.legend()

    ratio = series(rows, "overlap_time_ratio").get("engine", [])
    frac = series(rows, "overlap_bandwidth_fraction").get("engine", [])
    if ratio:
        ax_ov.errorbar([p[0] for p in ratio], [p[1] for p in ratio],
                       yerr=[[p[1] - p[2] for p in ratio], [p[3] - p[1] for p in ratio]], marker="o", capsize=3,
                       label="overlapped time / max(copy, compute)")
    if frac:
        ax_ov.errorbar([p[0] for p in frac], [p[1] for p in frac],
                       yerr=[[p[1] - p[2] for p in frac], [p[3] - p[1] for p in frac]], marker="s", capsize=3,
                       label="engine GB/s during compute / peak pinned")
    ax_ov.axhline(1.05, color="gray", linestyle="--", linewidth=0.8, label="targets: 1.05 and 0.95")
    ax_ov.axhline(0.95, color="gray", linestyle="--", linewidth=0.8)
    ax_ov.set_xlabel("spin kernel per layer (ms)")
    ax_ov.set_ylabel("ratio")
    ax_ov.set_title("copy/compute overlap (engine)")
    ax_ov.grid(True, alpha=0.3)
    ax_ov.legend(fontsize=8)

    meta = rows[-1]
    fig.suptitle(f"{meta['gpu']} - torch {meta['torch']} - offload_kernels {meta['version']} ({meta['commit']}, "
                 f"{meta['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="*", type=Path, help="transfer.csv files (default: bench/results/*/transfer.csv)")
    ap.add_argument("--out", type=Path, help="output PNG (only with one CSV; default: transfer.png beside it)")
    ap.add_argument("--all-runs", action="store_true", help="plot every run in the CSV, not only the latest")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_transfer: needs matplotlib (pip install matplotlib, or the package's [bench] extra)")
        return 2
    paths = args.csv or sorted((ROOT / "bench" / "results").glob("*/transfer.csv"))
    if not paths:
        print("plot_transfer: no transfer.csv found; run bench/bench_transfer.py on a CUDA machine first")
        return 0
    if args.out and len(paths) > 1:
        ap.error("--out needs exactly one CSV")
    for p in paths:
        plot(p, args.out or p.with_name("transfer.png"), args.all_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
