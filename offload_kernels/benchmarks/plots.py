"""PNGs from the benchmarks' CSVs (matplotlib, Agg backend), one figure per CSV, written beside it.

* ``kernels.csv``: per qtype, speedup over fp16 cuBLAS of every provider against M (top) and the weight
  bandwidth as a fraction of the device copy bandwidth (bottom), for one weight shape;
* ``transfer.csv``: host-to-device GB/s per provider against copy size, and the engine's overlap ratios;
* ``formats.csv`` (the quantize benchmark): quantize and dequantize throughput per qtype and provider;
* ``offload.csv``: tokens/s against tokens per forward per placement with the link-bound ideal of each
  streamed placement (dashed), prefill (1 x T) and batch (B x 1) layouts, and the ratio to the ideal;
* ``experts.csv``: one MoE layer's time per call against tokens per provider with the HBM-bound ideal
  (top), and the speedup over the fp16 transformers module (bottom), per model shape.

Each plots the latest run in its CSV unless ``--all-runs``.

    offload-kernels bench plot                          # every CSV under the results directory
    offload-kernels bench plot path/to/kernels.csv [--shape 8192x8192] [--out plot.png] [--all-runs]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Callable

from .results import default_results_base, read_rows

Point = tuple[float, float, float, float]   # (x, median, p20, p80)
KERNEL_STYLE = {"auto": dict(color="black", linewidth=2.2, marker="o"),
                "auto_graph": dict(color="black", linewidth=1.2, marker="o", linestyle=":"),
                "gemv": dict(marker="v", linestyle="--"),
                "gemm": dict(marker="s", linestyle="--"), "dequant": dict(marker="^", linestyle="--"),
                "int4_tinygemm": dict(marker="x", linestyle=":", color="gray")}


def series(rows: list[dict[str, str]], kernel: str, **match: str) -> dict[str, list[Point]]:
    """provider -> [(x, median, p20, p80)] sorted by x, for rows of ``kernel`` whose columns equal ``match``."""
    out: dict[str, list[Point]] = defaultdict(list)
    for r in rows:
        if r["kernel"] == kernel and all(r.get(k) == v for k, v in match.items()):
            out[r["provider"]].append((float(r["x"]), float(r["median"]), float(r["p20"]), float(r["p80"])))
    return {k: sorted(v) for k, v in out.items()}


def errorbar(ax, pts: list[Point], **style) -> None:
    """Medians with p20-p80 error bars."""
    ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                yerr=[[max(0.0, p[1] - p[2]) for p in pts], [max(0.0, p[3] - p[1]) for p in pts]], capsize=2, **style)


def suptitle(fig, rows: list[dict[str, str]], what: str) -> None:
    r = rows[-1]
    fig.suptitle(f"{what} on {r['gpu']} - torch {r['torch']}, triton {r.get('triton', '?')}, offload_kernels "
                 f"{r['version']} ({r['commit']}, {r['date']})", fontsize=9)


# ----------------------------------------------------------------------------------------- per benchmark
def plot_kernels(plt, rows: list[dict[str, str]], shape: "tuple[int, int] | None"):
    rows = [r for r in rows if r["kernel"] != "copy_bandwidth"]
    shapes = sorted({(int(r["N"]), int(r["K"])) for r in rows})
    if not shapes:
        raise ValueError("no kernel rows")
    if shape is None:
        shape = (8192, 8192) if (8192, 8192) in shapes else shapes[0]
    elif shape not in shapes:
        raise ValueError(f"shape {shape[0]}x{shape[1]} not measured (have {shapes})")
    match = {"N": str(shape[0]), "K": str(shape[1])}
    qtypes = sorted({r["qtype"] for r in rows if r["N"] == match["N"] and r["K"] == match["K"]})
    fig, axes = plt.subplots(2, len(qtypes), figsize=(4.2 * len(qtypes), 7.5), squeeze=False, sharex=True)
    for col, qtype in enumerate(qtypes):
        ax_s, ax_b = axes[0][col], axes[1][col]
        for provider, pts in series(rows, "speedup_vs_cublas_fp16", qtype=qtype, **match).items():
            if provider in KERNEL_STYLE:
                errorbar(ax_s, pts, label=provider, **KERNEL_STYLE[provider])
        ax_s.axhline(1.0, color="gray", linewidth=0.8)
        ax_s.set_title(f"{qtype}, {shape[0]}x{shape[1]}")
        ax_s.set_ylabel("speedup over fp16 cuBLAS")
        for provider, pts in series(rows, "hbm_fraction", qtype=qtype, **match).items():
            if provider in KERNEL_STYLE:
                ax_b.plot([p[0] for p in pts], [p[1] for p in pts], label=provider, **KERNEL_STYLE[provider])
        ax_b.set_ylabel("weight GB/s / copy GB/s")
        ax_b.set_xlabel("M (tokens)")
        for ax in (ax_s, ax_b):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
        if col == 0:
            ax_s.legend(fontsize=8)
    suptitle(fig, rows, f"qmatmul ({rows[0].get('dtype', '')} activations, autotune {rows[0].get('autotune', '?')})")
    return fig


def plot_transfer(plt, rows: list[dict[str, str]], shape=None):
    fig, (ax_bw, ax_ov) = plt.subplots(1, 2, figsize=(13, 4.8))
    for provider, pts in series(rows, "h2d_bandwidth").items():
        errorbar(ax_bw, [(p[0] / 1e6, *p[1:]) for p in pts], marker="o", label=provider)
    ax_bw.set_xscale("log")
    ax_bw.set_xlabel("copy size (MB)")
    ax_bw.set_ylabel("GB/s (median, p20-p80)")
    ax_bw.set_title("host-to-device bandwidth")
    ax_bw.legend()
    for kernel, label, marker in (("overlap_time_ratio", "overlapped time / max(copy, compute)", "o"),
                                  ("overlap_bandwidth_fraction", "engine GB/s during compute / peak pinned", "s")):
        pts = series(rows, kernel).get("engine", [])
        if pts:
            errorbar(ax_ov, pts, marker=marker, label=label)
    ax_ov.axhline(1.05, color="gray", linestyle="--", linewidth=0.8, label="targets: 1.05 and 0.95")
    ax_ov.axhline(0.95, color="gray", linestyle="--", linewidth=0.8)
    ax_ov.set_xlabel("spin kernel per layer (ms)")
    ax_ov.set_ylabel("ratio")
    ax_ov.set_title("copy/compute overlap (engine)")
    ax_ov.legend(fontsize=8)
    for ax in (ax_bw, ax_ov):
        ax.grid(True, which="both", alpha=0.3)
    suptitle(fig, rows, "transfer engine")
    return fig


def plot_quantize(plt, rows: list[dict[str, str]], shape=None):
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    several_thread_counts = len({r.get("threads") for r in rows}) > 1
    for ax, kernel in zip(axes, ("quantize_throughput", "dequantize_throughput")):
        medians: dict[str, dict[str, float]] = defaultdict(dict)     # provider -> qtype -> Mweights/s
        for r in rows:
            if r["kernel"] == kernel:
                # a run timed with several --threads values gets one bar per provider and thread count
                label = r["provider"] + (f" ({r['threads']} threads)" if several_thread_counts else "")
                medians[label][r["x"]] = float(r["median"])
        qtypes = sorted({q for by_qtype in medians.values() for q in by_qtype})
        width = 0.8 / max(1, len(medians))
        for i, (provider, by_qtype) in enumerate(medians.items()):
            ax.bar([q + i * width for q in range(len(qtypes))], [by_qtype.get(q, 0.0) for q in qtypes], width,
                   label=provider)
        ax.set_xticks([q + width * (len(medians) - 1) / 2 for q in range(len(qtypes))], qtypes)
        ax.set_yscale("log")
        ax.set_ylabel("million weights / s (median)")
        ax.set_title(kernel.replace("_throughput", ""))
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    suptitle(fig, rows, f"GGUF quantize/dequantize ({rows[0].get('shape', '')})")
    return fig


def plot_offload(plt, rows: list[dict[str, str]], shape=None):
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    providers = sorted({r["provider"] for r in rows if r["kernel"] == "tokens_per_s"})
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}    # one color per provider in every panel
    for ax, layout in zip(axes[:2], ("prefill", "batch")):
        for provider, pts in series(rows, "tokens_per_s", layout=layout).items():
            errorbar(ax, pts, marker="o", color=colors[provider], label=provider)
        for provider, pts in series(rows, "ideal_tokens_per_s", layout=layout).items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="--", color=colors.get(provider),
                    label=f"{provider} ideal")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per forward" + (" (1 x T prefill)" if layout == "prefill" else " (B x 1 token)"))
        ax.set_ylabel("tokens/s (median, p20-p80)")
        ax.set_title(f"{layout}: tokens/s")
        ax.legend(fontsize=7)
    ax = axes[2]
    for layout, style in (("prefill", "-"), ("batch", ":")):
        for provider, pts in series(rows, "ratio_to_ideal", layout=layout).items():
            errorbar(ax, pts, marker="o", linestyle=style, color=colors.get(provider), label=f"{provider} ({layout})")
    ax.axhline(0.9, color="gray", linestyle="--", linewidth=0.8, label="target 0.9")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("measured / link-bound ideal tokens/s")
    ax.set_title("streamed placements vs their ideal")
    ax.legend(fontsize=7)
    for a in axes:
        a.grid(True, which="both", alpha=0.3)
    r = rows[-1]
    suptitle(fig, rows, f"offload(), {r.get('layers', '?')} layers, {r.get('qtype', '')}")
    return fig


def plot_experts(plt, rows: list[dict[str, str]], shape=None):
    shapes = sorted({r["shape"] for r in rows if r["kernel"] == "time"})
    if not shapes:
        raise ValueError("no experts rows")
    fig, axes = plt.subplots(2, len(shapes), figsize=(6.5 * len(shapes), 9), squeeze=False)
    for col, name in enumerate(shapes):
        ax = axes[0][col]
        for provider, pts in series(rows, "time", shape=name).items():
            errorbar(ax, [(x, m * 1e3, lo * 1e3, hi * 1e3) for x, m, lo, hi in pts], marker="o", label=provider)
        ideal = series(rows, "hbm_ideal_time", shape=name).get("ideal", [])
        ax.plot([p[0] for p in ideal], [p[1] * 1e3 for p in ideal], "k--", label="HBM-bound ideal")
        ax.set_yscale("log")
        ax.set_ylabel("us per call (median, p20-p80)")
        ax.set_title(f"{name}: one layer's experts")
        ax = axes[1][col]
        for provider, pts in series(rows, "speedup_vs_fp16", shape=name).items():
            errorbar(ax, pts, marker="o", label=provider)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        ax.set_ylabel("speedup over the fp16 transformers module")
        for a in axes[:, col]:
            a.set_xscale("log", base=2)
            a.set_xlabel("tokens per call")
            a.grid(True, which="both", alpha=0.3)
            a.legend(fontsize=7)
    suptitle(fig, rows, f"MoE experts, {rows[-1].get('qtype', '')}")
    return fig


PLOTTERS: dict[str, Callable] = {"kernels": plot_kernels, "transfer": plot_transfer, "formats": plot_quantize,
                                 "offload": plot_offload, "experts": plot_experts}


def plot_kind(csv_path: Path) -> "str | None":
    """Which plot a results CSV gets, by its file name: kernels, transfer, formats, offload (offload_<shape>
    too: the offload benchmark on another model shape)."""
    stem = Path(csv_path).stem
    kind = "offload" if stem.startswith("offload_") else stem
    return kind if kind in PLOTTERS else None


def plot_csv(csv_path: Path, out: "Path | None" = None, all_runs: bool = False,
             shape: "tuple[int, int] | None" = None) -> Path:
    """Draw the PNG of one results CSV (the plot is chosen by its file name); returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    kind = plot_kind(csv_path)
    if kind is None:
        raise ValueError(f"{csv_path}: no plot for {csv_path.stem!r} (expected one of {', '.join(PLOTTERS)}, or "
                         f"offload_<shape>)")
    rows = read_rows(csv_path, all_runs)
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    fig = PLOTTERS[kind](plt, rows, shape)
    out = Path(out) if out else csv_path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("csv", nargs="*", type=Path,
                        help="results CSVs (default: every <results>/*/{kernels,transfer,formats,offload,experts}.csv)")
    parser.add_argument("--results", type=Path, default=None, help="base results directory to search")
    parser.add_argument("--shape", help="NxK of the kernels plot (default 8192x8192 when measured)")
    parser.add_argument("--out", type=Path, help="output PNG (only with one CSV; default: beside the CSV)")
    parser.add_argument("--all-runs", action="store_true", help="plot every run in a CSV, not only the latest")


def run(args: argparse.Namespace) -> int:
    base = args.results or default_results_base()
    paths = args.csv or sorted(p for p in base.glob("*/*.csv") if plot_kind(p) is not None)
    if not paths:
        print(f"bench plot: no results CSVs under {base}")
        return 0
    if args.out and len(paths) > 1:
        raise SystemExit("bench plot: --out needs exactly one CSV")
    shape = tuple(int(v) for v in args.shape.lower().split("x")) if args.shape else None
    for path in paths:
        print(f"wrote {plot_csv(path, args.out, args.all_runs, shape)}")
    return 0
