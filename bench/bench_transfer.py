#!/usr/bin/env python
"""Host-to-device transfer benchmark for offload_kernels' TransferEngine.

Measures, on one CUDA device:

* bandwidth (GB/s) of a host-to-device copy for 1 MB to 1 GB: a pageable torch copy, torch
  ``pin_memory()`` + ``non_blocking``, CuPy from pinned memory (an independent ceiling; skipped if CuPy is
  missing), and the engine (prefetch + acquire of an item that is not resident);
* copy/compute overlap: a pipelined sweep over ``--layers`` items (prefetch the next, acquire this one,
  run the synthetic spin kernel, release) against the same sweep without compute and the compute alone,
  reported as overlapped time / max(copy time, compute time), plus the engine's copy bandwidth while the
  compute runs as a fraction of the peak pinned bandwidth measured in the same run;
* pinned host bytes / registered bytes for the engine and for torch's ``pin_memory()``.

Every figure is a median with p20/p80 over repetitions, or a ratio. Rows are appended (long format) to
``bench/results/<gpu-slug>/transfer.csv``; ``transfer.md`` next to it gets a summary of this run, and
``bench/plot_transfer.py`` draws the CSV. Without a CUDA device (or with a host-only build of the extension)
it says so and exits 0.

    python bench/bench_transfer.py                 # full run (about two minutes on an H100)
    python bench/bench_transfer.py --quick         # smaller sizes and fewer repetitions
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import itertools
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CSV_COLUMNS = ["kernel", "provider", "x", "median", "p20", "p80", "unit", "gpu", "torch", "version", "commit",
               "date"]
MB = 1_000_000
GB = 1e9

# Targets printed as PASS/FAIL (informational; nothing asserts them).
TARGET_BW_FRACTION = 0.95    # engine bandwidth while compute runs / peak pinned bandwidth
TARGET_OVERLAP_RATIO = 1.05  # overlapped time / max(copy time, compute time)
TARGET_PINNED_RATIO = 1.02   # pinned host bytes / registered bytes


def cuda_unavailable_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    try:
        from offload_kernels._native import native_module

        native = native_module()
    except ImportError as exc:
        return str(exc)
    if not native.BUILT_WITH_CUDA:
        return "offload_kernels._C was built host-only (rebuild it with nvcc available)"
    return None


def summarize(values: list[float]) -> tuple[float, float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.median(arr)), float(np.percentile(arr, 20)), float(np.percentile(arr, 80))


class Results:
    """Rows of this run, in the CSV's long format."""

    def __init__(self, meta: dict[str, str]) -> None:
        self.meta = meta
        self.rows: list[dict[str, object]] = []

    def add(self, kernel: str, provider: str, x: float, values: list[float], unit: str) -> tuple[float, float, float]:
        med, p20, p80 = summarize(values)
        self.rows.append({"kernel": kernel, "provider": provider, "x": x, "median": med, "p20": p20, "p80": p80,
                          "unit": unit, **self.meta})
        return med, p20, p80

    def get(self, kernel: str, provider: str, x: float | None = None) -> dict[str, object] | None:
        for r in self.rows:
            if r["kernel"] == kernel and r["provider"] == provider and (x is None or r["x"] == x):
                return r
        return None

    def append_csv(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            if new:
                writer.writeheader()
            for r in self.rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


# --------------------------------------------------------------------------- timing helpers

def event_times_ms(once: Callable[[], None], stream, reps: int, warmup: int = 2) -> list[float]:
    """Device time of `once()` on `stream`, each repetition measured on its own (not pipelined)."""
    import torch

    times = []
    with torch.cuda.stream(stream):
        for i in range(warmup + reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            once()
            end.record(stream)
            end.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return times


def gbps(nbytes: int, times_ms: list[float]) -> list[float]:
    return [nbytes / (t * 1e-3) / GB for t in times_ms]


# --------------------------------------------------------------------------- bandwidth providers

def bw_torch_pageable(size: int, reps: int, stream) -> list[float]:
    import torch

    src = torch.ones(size, dtype=torch.uint8)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    return gbps(size, event_times_ms(lambda: dst.copy_(src), stream, reps))


def bw_torch_pinned(size: int, reps: int, stream) -> list[float]:
    import torch

    src = torch.ones(size, dtype=torch.uint8).pin_memory()
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    return gbps(size, event_times_ms(lambda: dst.copy_(src, non_blocking=True), stream, reps))


def bw_cupy_pinned(size: int, reps: int) -> list[float]:
    import cupy

    pinned = cupy.cuda.alloc_pinned_memory(size)
    host = np.frombuffer(pinned, dtype=np.uint8, count=size)
    host[:] = 1
    dst = cupy.empty(size, dtype=cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    out = []
    for i in range(reps + 2):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        cupy.cuda.runtime.memcpyAsync(dst.data.ptr, host.ctypes.data, size,
                                      cupy.cuda.runtime.memcpyHostToDevice, stream.ptr)
        end.record(stream)
        end.synchronize()
        if i >= 2:
            out.append(size / (cupy.cuda.get_elapsed_time(start, end) * 1e-3) / GB)
    return out


def bw_engine(size: int, reps: int, stream) -> list[float]:
    from offload_kernels.engine import TransferEngine

    with TransferEngine("cuda", num_slots=2) as eng:
        src = np.ones(size, dtype=np.uint8)
        handles = itertools.cycle(eng.register_many([src, src, src]))  # 3 items, 2 slots: never a hit
        del src

        def once() -> None:
            h = next(handles)
            if not eng.prefetch(h):
                raise RuntimeError("engine benchmark expected a copy, got a hit")
            eng.acquire(h, stream)
            eng.release(h, stream)

        return gbps(size, event_times_ms(once, stream, reps))


# --------------------------------------------------------------------------- overlap

def bench_overlap(results: Results, item_bytes: int, layers: int, spin_ratios: list[float],
                  spin_ms_fixed: list[float], reps: int, num_slots: int, cycles_per_ms: float, stream,
                  peak_gbs: float) -> list[dict[str, float]]:
    import torch

    from offload_kernels.engine import TransferEngine, spin

    summary = []
    with TransferEngine("cuda", num_slots=num_slots) as eng:
        src = np.ones(item_bytes, dtype=np.uint8)
        handles = eng.register_many([src] * layers)
        del src

        def sweep(spin_cycles: int, copies: bool) -> tuple[float, float]:
            """(elapsed ms, engine GB/s of its copies). Item 0 lands before the clock starts, so the
            pipeline fill is not counted and the sweep makes layers - 1 copies."""
            with torch.cuda.stream(stream):
                if copies:
                    eng.prefetch(handles[0])
                    eng.synchronize()
                    eng.reset_stats()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                for i, h in enumerate(handles):
                    if copies:
                        if i + 1 < layers:
                            eng.prefetch(handles[i + 1])
                        eng.acquire(h, stream)
                    if spin_cycles:
                        spin(spin_cycles, stream)
                    if copies:
                        eng.release(h, stream)
                end.record(stream)
                end.synchronize()
                bw = float("nan")
                if copies:
                    eng.synchronize()
                    s = eng.stats()
                    bw = s["bytes_copied"] / s["copy_time_s"] / GB if s["copy_time_s"] > 0 else float("nan")
                return start.elapsed_time(end), bw

        sweep(0, True)  # warm-up: slots allocated
        copy_runs = [sweep(0, True) for _ in range(reps)]
        copy_ms = statistics.median(t for t, _ in copy_runs)
        per_copy_ms = copy_ms / (layers - 1)
        spin_list = [r * per_copy_ms for r in spin_ratios] + list(spin_ms_fixed)
        for spin_ms in spin_list:
            cycles = int(cycles_per_ms * spin_ms)
            compute_ms = statistics.median(sweep(cycles, False)[0] for _ in range(reps))
            both = [sweep(cycles, True) for _ in range(reps)]
            reference = max(copy_ms, compute_ms)
            x = round(spin_ms, 4)
            ratio = results.add("overlap_time_ratio", "engine", x, [t / reference for t, _ in both], "ratio")
            bw = results.add("overlap_bandwidth", "engine", x, [b for _, b in both], "GB/s")
            frac = results.add("overlap_bandwidth_fraction", "engine", x, [b / peak_gbs for _, b in both],
                               "fraction of peak pinned")
            summary.append({"spin_ms": spin_ms, "copy_ms": copy_ms, "compute_ms": compute_ms,
                            "overlapped_ms": statistics.median(t for t, _ in both), "ratio": ratio[0],
                            "bw_gbs": bw[0], "bw_fraction": frac[0]})
    return summary


# --------------------------------------------------------------------------- pinned bytes

def bench_pinned_ratio(results: Results, count: int) -> dict[str, float]:
    import torch

    from offload_kernels.engine import TransferEngine

    rng = np.random.default_rng(0)
    sizes = np.exp(rng.uniform(np.log(64 << 10), np.log(16 << 20), size=count)).astype(np.int64).tolist()
    arrays = [np.ones(n, dtype=np.uint8) for n in sizes]
    registered = sum(sizes)
    out = {}
    with TransferEngine("cuda") as eng:
        eng.register_many(arrays)
        s = eng.stats()
        out["engine_register_many"] = s["pinned_bytes"] / registered
        out["engine_pinned"] = float(s["pinned"])
    with TransferEngine("cuda") as eng:
        for a in arrays:
            eng.register(a)
        out["engine_register"] = eng.stats()["pinned_bytes"] / registered

    key = "allocated_bytes.current"
    stats_fn = getattr(torch.cuda, "host_memory_stats", None)
    before = stats_fn().get(key) if stats_fn else None
    pinned = [torch.from_numpy(a).pin_memory() for a in arrays]
    after = stats_fn().get(key) if stats_fn else None
    if before is not None and after is not None and after > before:
        out["torch_pin_memory"] = (after - before) / registered
    else:  # no host allocator statistics in this torch: its documented power-of-two rounding
        out["torch_pin_memory_estimated"] = sum(1 << (n - 1).bit_length() for n in sizes) / registered
    del pinned
    for provider, value in out.items():
        if provider != "engine_pinned":
            results.add("pinned_bytes_ratio", provider, float(registered), [value], "ratio")
    return out


# --------------------------------------------------------------------------- report

def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def write_markdown(path: Path, results: Results, bandwidth: dict[str, dict[int, tuple]], overlap: list[dict],
                   pinned: dict[str, float], peak_gbs: float, targets: list[tuple[str, str, bool]],
                   notes: list[str]) -> None:
    m = results.meta
    lines = [f"# Transfer benchmark: {m['gpu']}", "",
             f"torch {m['torch']}, offload_kernels {m['version']}, commit {m['commit']}, {m['date']}", "",
             "## Host-to-device bandwidth (GB/s, median [p20, p80])", ""]
    providers = list(bandwidth)
    sizes = sorted({s for p in providers for s in bandwidth[p]})
    lines.append("| size | " + " | ".join(providers) + " |")
    lines.append("|---|" + "---|" * len(providers))
    for size in sizes:
        cells = []
        for p in providers:
            v = bandwidth[p].get(size)
            cells.append(f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]" if v else "-")
        lines.append(f"| {size / MB:g} MB | " + " | ".join(cells) + " |")
    lines += ["", f"Peak pinned bandwidth in this run: {peak_gbs:.1f} GB/s", "",
              "## Copy/compute overlap (engine, pipelined sweep)", "",
              "| spin per layer (ms) | copies (ms) | compute (ms) | overlapped (ms) | overlapped / max | "
              "GB/s during compute | fraction of peak |", "|---|---|---|---|---|---|---|"]
    for o in overlap:
        lines.append(f"| {o['spin_ms']:.3f} | {o['copy_ms']:.2f} | {o['compute_ms']:.2f} | {o['overlapped_ms']:.2f} "
                     f"| {o['ratio']:.3f} | {o['bw_gbs']:.1f} | {o['bw_fraction']:.3f} |")
    lines += ["", "## Pinned host bytes / registered bytes", "", "| provider | ratio |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in pinned.items() if k != "engine_pinned"]
    lines += ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {name} | {measured} | {verdict(ok)} |" for name, measured, ok in targets]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="1,4,16,64,256,1024", help="copy sizes in MB (1e6 bytes)")
    ap.add_argument("--reps", type=int, default=0, help="repetitions per measurement (default: by size)")
    ap.add_argument("--overlap-mb", type=float, default=64, help="item size of the overlap sweep, MB")
    ap.add_argument("--layers", type=int, default=16, help="items in the overlap sweep")
    ap.add_argument("--num-slots", type=int, default=2, help="engine slots in the overlap sweep")
    ap.add_argument("--spin-ratios", default="0.5,1,2",
                    help="spin kernel length per layer as multiples of one item's copy time")
    ap.add_argument("--spin-ms", default="", help="extra spin lengths per layer in ms (comma-separated)")
    ap.add_argument("--pinned-items", type=int, default=128, help="items in the pinned-bytes comparison")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--quick", action="store_true", help="sizes up to 64 MB, fewer repetitions")
    args = ap.parse_args(argv)

    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"bench_transfer: needs CUDA ({reason}); nothing measured.")
        return 0

    import torch

    import offload_kernels
    from offload_kernels.engine import calibrate_spin

    sizes = [int(float(s) * MB) for s in args.sizes_mb.split(",") if s.strip()]
    if args.quick:
        sizes = [s for s in sizes if s <= 64 * MB] or sizes[:1]
    gpu = torch.cuda.get_device_name()
    results = Results({"gpu": gpu, "torch": torch.__version__, "version": offload_kernels.__version__,
                       "commit": git_commit(),
                       "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()})
    notes: list[str] = []
    stream = torch.cuda.Stream()
    print(f"GPU: {gpu}; torch {torch.__version__}")

    try:
        import cupy  # noqa: F401

        have_cupy = True
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip CuPy"
        have_cupy = False
        notes.append(f"CuPy unavailable ({type(exc).__name__}: {exc}); its pinned-memory ceiling was skipped.")
        print(f"note: {notes[-1]}")

    providers: dict[str, Callable[[int, int], list[float]]] = {
        "torch_pageable": lambda n, r: bw_torch_pageable(n, r, stream),
        "torch_pinned": lambda n, r: bw_torch_pinned(n, r, stream),
        "engine": lambda n, r: bw_engine(n, r, stream),
    }
    if have_cupy:
        providers["cupy_pinned"] = bw_cupy_pinned
    bandwidth: dict[str, dict[int, tuple]] = {p: {} for p in providers}
    print("\nhost-to-device bandwidth, GB/s: median [p20, p80]")
    for size in sizes:
        reps = args.reps or int(np.clip(2 * 1024 * MB // size, 5, 30 if args.quick else 50))
        if args.quick:
            reps = min(reps, 10)
        line = [f"{size / MB:>7g} MB:"]
        for name, fn in list(providers.items()):
            try:
                values = fn(size, reps)
            except Exception as exc:  # noqa: BLE001 - only the independent CuPy ceiling may drop out
                if name != "cupy_pinned":
                    raise
                notes.append(f"CuPy failed ({type(exc).__name__}: {exc}); its ceiling was skipped.")
                print(f"note: {notes[-1]}")
                del providers[name]
                continue
            med, p20, p80 = results.add("h2d_bandwidth", name, size, values, "GB/s")
            bandwidth[name][size] = (med, p20, p80)
            line.append(f"{name} {med:6.1f} [{p20:.1f}, {p80:.1f}]")
        print("  ".join(line))
        torch.cuda.empty_cache()

    bandwidth = {p: v for p, v in bandwidth.items() if v}
    pinned_providers = [p for p in ("torch_pinned", "cupy_pinned") if p in bandwidth]
    peak_gbs = max(bandwidth[p][s][0] for p in pinned_providers for s in bandwidth[p])
    engine_peak = max(v[0] for v in bandwidth["engine"].values())
    print(f"peak pinned bandwidth {peak_gbs:.1f} GB/s; engine best {engine_peak:.1f} GB/s "
          f"({engine_peak / peak_gbs:.3f} of peak)")

    cycles_per_ms = calibrate_spin()
    print(f"\nspin kernel: {cycles_per_ms:.0f} cycles/ms")
    item_bytes = int(args.overlap_mb * MB)
    spin_ratios = [float(r) for r in args.spin_ratios.split(",") if r.strip()]
    spin_ms = [float(s) for s in args.spin_ms.split(",") if s.strip()]
    if not spin_ratios and not spin_ms:
        spin_ratios = [1.0]
    overlap = bench_overlap(results, item_bytes, max(args.layers, args.num_slots + 1), spin_ratios, spin_ms,
                            3 if args.quick else 7, args.num_slots, cycles_per_ms, stream, peak_gbs)
    print(f"overlap: {args.layers} items of {args.overlap_mb:g} MB through {args.num_slots} slots")
    for o in overlap:
        print(f"  spin {o['spin_ms']:.3f} ms/layer: copies {o['copy_ms']:.2f} ms, compute {o['compute_ms']:.2f} ms, "
              f"overlapped {o['overlapped_ms']:.2f} ms = {o['ratio']:.3f} x max; engine {o['bw_gbs']:.1f} GB/s "
              f"during compute = {o['bw_fraction']:.3f} of peak")

    pinned = bench_pinned_ratio(results, max(8, args.pinned_items // (4 if args.quick else 1)))
    print("\npinned host bytes / registered bytes: " +
          ", ".join(f"{k} {v:.4f}" for k, v in pinned.items() if k != "engine_pinned"))
    if not pinned.get("engine_pinned"):
        notes.append("the engine's host storage was NOT pinned in this run (pinning failed)")

    # Targets, judged at the overlap point where compute and copy take the same time (the hardest case).
    balanced = min(overlap, key=lambda o: abs(o["compute_ms"] - o["copy_ms"]))
    targets = [
        (f"engine bandwidth while compute runs >= {TARGET_BW_FRACTION:.0%} of peak pinned",
         f"{balanced['bw_fraction']:.3f}", balanced["bw_fraction"] >= TARGET_BW_FRACTION),
        (f"overlapped time <= {TARGET_OVERLAP_RATIO} x max(copy, compute)", f"{balanced['ratio']:.3f}",
         balanced["ratio"] <= TARGET_OVERLAP_RATIO),
        (f"pinned bytes <= {TARGET_PINNED_RATIO} x registered (register_many)",
         f"{pinned['engine_register_many']:.4f}", pinned["engine_register_many"] <= TARGET_PINNED_RATIO),
    ]
    print("\ntargets:")
    for name, measured, ok in targets:
        print(f"  [{verdict(ok)}] {name}: {measured}")

    out_dir = args.out_dir / slug(gpu)
    csv_path = out_dir / "transfer.csv"
    results.append_csv(csv_path)
    write_markdown(out_dir / "transfer.md", results, bandwidth, overlap, pinned, peak_gbs, targets, notes)
    print(f"\nappended {len(results.rows)} rows to {csv_path}; summary in {out_dir / 'transfer.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
