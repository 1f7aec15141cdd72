"""Host-to-device transfer benchmark of offload_kernels' TransferEngine, on one CUDA device.

* bandwidth (GB/s) of a host-to-device copy for 1 MB to 1 GB: a pageable torch copy, torch
  ``pin_memory()`` + ``non_blocking``, CuPy from pinned memory (an independent ceiling; skipped if CuPy is
  missing), and the engine (prefetch + acquire of an item that is not resident);
* copy/compute overlap: a pipelined sweep over ``--layers`` items (prefetch the next, acquire this one,
  run the synthetic spin kernel, release) against the same sweep without compute and the compute alone,
  reported as overlapped time / max(copy time, compute time), plus the engine's copy bandwidth while the
  compute runs as a fraction of the peak pinned bandwidth measured in the same run;
* pinned host bytes / registered bytes for the engine and for torch's ``pin_memory()``.

Every figure is a median with p20/p80 over repetitions, or a ratio. Rows are appended to
``<results>/<gpu-slug>/transfer.csv``; ``transfer.md`` summarizes this run and ``transfer.png`` plots it.
Without a CUDA device (or with a host-only build of the extension) it says so and exits 0.

    offload-kernels bench transfer                 # full run (about two minutes on an H100)
    offload-kernels bench transfer --quick         # sizes up to 64 MB, fewer repetitions
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import numpy as np

from .results import (GB, Recorder, RunInfo, Stats, Target, add_output_argument, cuda_unavailable_reason,
                      markdown_table, median_of, parse_list, plot_quietly, print_targets, results_dir, time_events,
                      write_summary)

MB = 1_000_000

# Targets printed as PASS/FAIL (informational; nothing asserts them).
TARGET_BW_FRACTION = 0.95    # engine bandwidth while compute runs / peak pinned bandwidth
TARGET_OVERLAP_RATIO = 1.05  # overlapped time / max(copy time, compute time)
TARGET_PINNED_RATIO = 1.02   # pinned host bytes / registered bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes-mb", default="1,4,16,64,256,1024", help="copy sizes in MB (1e6 bytes)")
    parser.add_argument("--reps", type=int, default=0, help="repetitions per measurement (default: by size)")
    parser.add_argument("--overlap-mb", type=float, default=64, help="item size of the overlap sweep, MB")
    parser.add_argument("--layers", type=int, default=16, help="items in the overlap sweep")
    parser.add_argument("--num-slots", type=int, default=2, help="engine slots in the overlap sweep")
    parser.add_argument("--spin-ratios", default="0.5,1,2",
                        help="spin kernel length per layer as multiples of one item's copy time")
    parser.add_argument("--spin-ms", default="", help="extra spin lengths per layer in ms (comma-separated)")
    parser.add_argument("--pinned-items", type=int, default=128, help="items in the pinned-bytes comparison")
    parser.add_argument("--quick", action="store_true", help="sizes up to 64 MB, fewer repetitions")
    add_output_argument(parser)


def gbps(nbytes: int, times_ms: list[float]) -> list[float]:
    return [nbytes / (t * 1e-3) / GB for t in times_ms]


# --------------------------------------------------------------------------- bandwidth providers
def bw_torch_pageable(size: int, reps: int, stream) -> list[float]:
    import torch

    src = torch.ones(size, dtype=torch.uint8)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    return gbps(size, time_events(lambda: dst.copy_(src), reps, stream=stream))


def bw_torch_pinned(size: int, reps: int, stream) -> list[float]:
    import torch

    src = torch.ones(size, dtype=torch.uint8).pin_memory()
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    return gbps(size, time_events(lambda: dst.copy_(src, non_blocking=True), reps, stream=stream))


def bw_cupy_pinned(size: int, reps: int, stream=None) -> list[float]:
    import cupy

    pinned = cupy.cuda.alloc_pinned_memory(size)
    host = np.frombuffer(pinned, dtype=np.uint8, count=size)
    host[:] = 1
    dst = cupy.empty(size, dtype=cupy.uint8)
    cp_stream = cupy.cuda.Stream(non_blocking=True)
    out = []
    for i in range(reps + 2):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(cp_stream)
        cupy.cuda.runtime.memcpyAsync(dst.data.ptr, host.ctypes.data, size, cupy.cuda.runtime.memcpyHostToDevice,
                                      cp_stream.ptr)
        end.record(cp_stream)
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

        return gbps(size, time_events(once, reps, stream=stream))


PROVIDERS: dict[str, Callable[[int, int, object], list[float]]] = {
    "torch_pageable": bw_torch_pageable, "torch_pinned": bw_torch_pinned, "engine": bw_engine,
    "cupy_pinned": bw_cupy_pinned}
PINNED_PROVIDERS = ("torch_pinned", "cupy_pinned")


def have_cupy(notes: list[str]) -> bool:
    try:
        import cupy  # noqa: F401

        return True
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip CuPy"
        notes.append(f"CuPy unavailable ({type(exc).__name__}: {exc}); its pinned-memory ceiling was skipped.")
        print(f"note: {notes[-1]}")
        return False


def bench_bandwidth(rec: Recorder, sizes: list[int], args, stream, notes: list[str]) -> dict[str, dict[int, Stats]]:
    import torch

    providers = [p for p in PROVIDERS if p != "cupy_pinned" or have_cupy(notes)]
    bandwidth: dict[str, dict[int, Stats]] = {p: {} for p in providers}
    print("\nhost-to-device bandwidth, GB/s: median [p20, p80]")
    for size in sizes:
        reps = args.reps or int(np.clip(2 * 1024 * MB // size, 5, 30 if args.quick else 50))
        if args.quick:
            reps = min(reps, 10)
        line = [f"{size / MB:>7g} MB:"]
        for name in list(providers):
            try:
                values = PROVIDERS[name](size, reps, stream)
            except Exception as exc:  # noqa: BLE001 - only the independent CuPy ceiling may drop out
                if name != "cupy_pinned":
                    raise
                notes.append(f"CuPy failed ({type(exc).__name__}: {exc}); its ceiling was skipped.")
                print(f"note: {notes[-1]}")
                providers.remove(name)
                continue
            s = bandwidth[name][size] = rec.add("h2d_bandwidth", name, size, values, "GB/s")
            line.append(f"{name} {s.median:6.1f} [{s.p20:.1f}, {s.p80:.1f}]")
        print("  ".join(line))
        torch.cuda.empty_cache()
    return {p: v for p, v in bandwidth.items() if v}


# --------------------------------------------------------------------------- overlap
def bench_overlap(rec: Recorder, item_bytes: int, layers: int, spin_ratios: list[float], spin_ms_fixed: list[float],
                  reps: int, num_slots: int, cycles_per_ms: float, stream, peak_gbs: float) -> list[dict[str, float]]:
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
        copy_ms = median_of(sweep(0, True)[0] for _ in range(reps))
        per_copy_ms = copy_ms / (layers - 1)
        for spin_ms in [r * per_copy_ms for r in spin_ratios] + list(spin_ms_fixed):
            cycles = int(cycles_per_ms * spin_ms)
            compute_ms = median_of(sweep(cycles, False)[0] for _ in range(reps))
            both = [sweep(cycles, True) for _ in range(reps)]
            reference = max(copy_ms, compute_ms)
            x = round(spin_ms, 4)
            ratio = rec.add("overlap_time_ratio", "engine", x, [t / reference for t, _ in both], "ratio")
            bw = rec.add("overlap_bandwidth", "engine", x, [b for _, b in both], "GB/s")
            frac = rec.add("overlap_bandwidth_fraction", "engine", x, [b / peak_gbs for _, b in both],
                           "fraction of peak pinned")
            summary.append({"spin_ms": spin_ms, "copy_ms": copy_ms, "compute_ms": compute_ms,
                            "overlapped_ms": median_of(t for t, _ in both), "ratio": ratio.median,
                            "bw_gbs": bw.median, "bw_fraction": frac.median})
    return summary


# --------------------------------------------------------------------------- pinned bytes
def bench_pinned_ratio(rec: Recorder, count: int) -> dict[str, float]:
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
            rec.add("pinned_bytes_ratio", provider, float(registered), [value], "ratio")
    return out


# --------------------------------------------------------------------------- report
def summary_body(bandwidth: dict[str, dict[int, Stats]], overlap: list[dict], pinned: dict[str, float],
                 peak_gbs: float) -> list[str]:
    sizes = sorted({s for p in bandwidth.values() for s in p})
    cell = lambda v: f"{v.median:.1f} [{v.p20:.1f}, {v.p80:.1f}]" if v else "-"  # noqa: E731
    body = ["## Host-to-device bandwidth (GB/s, median [p20, p80])", ""]
    body += markdown_table(["size", *bandwidth], [[f"{s / MB:g} MB", *(cell(v.get(s)) for v in bandwidth.values())]
                                                  for s in sizes])
    body += [f"Peak pinned bandwidth in this run: {peak_gbs:.1f} GB/s", "",
             "## Copy/compute overlap (engine, pipelined sweep)", ""]
    body += markdown_table(
        ["spin per layer (ms)", "copies (ms)", "compute (ms)", "overlapped (ms)", "overlapped / max",
         "GB/s during compute", "fraction of peak"],
        [[f"{o['spin_ms']:.3f}", f"{o['copy_ms']:.2f}", f"{o['compute_ms']:.2f}", f"{o['overlapped_ms']:.2f}",
          f"{o['ratio']:.3f}", f"{o['bw_gbs']:.1f}", f"{o['bw_fraction']:.3f}"] for o in overlap])
    body += ["## Pinned host bytes / registered bytes", ""]
    body += markdown_table(["provider", "ratio"], [[k, f"{v:.4f}"] for k, v in pinned.items() if k != "engine_pinned"])
    return body


def evaluate_targets(overlap: list[dict], pinned: dict[str, float]) -> list[Target]:
    """Judged at the overlap point where compute and copy take the same time (the hardest case)."""
    balanced = min(overlap, key=lambda o: abs(o["compute_ms"] - o["copy_ms"]))
    return [
        Target(f"engine bandwidth while compute runs >= {TARGET_BW_FRACTION:.0%} of peak pinned",
               f"{balanced['bw_fraction']:.3f}", balanced["bw_fraction"] >= TARGET_BW_FRACTION),
        Target(f"overlapped time <= {TARGET_OVERLAP_RATIO} x max(copy, compute)", f"{balanced['ratio']:.3f}",
               balanced["ratio"] <= TARGET_OVERLAP_RATIO),
        Target(f"pinned bytes <= {TARGET_PINNED_RATIO} x registered (register_many)",
               f"{pinned['engine_register_many']:.4f}", pinned["engine_register_many"] <= TARGET_PINNED_RATIO),
    ]


def run(args: argparse.Namespace) -> int:
    reason = cuda_unavailable_reason(engine=True)
    if reason is not None:
        print(f"bench transfer: needs CUDA ({reason}); nothing measured.")
        return 0
    import torch

    from offload_kernels.engine import calibrate_spin

    sizes = [int(s * MB) for s in parse_list(args.sizes_mb, float)]
    if args.quick:
        sizes = [s for s in sizes if s <= 64 * MB] or sizes[:1]
    run_info = RunInfo.collect("cuda")
    rec = Recorder(run_info)
    notes: list[str] = []
    stream = torch.cuda.Stream()
    print(f"bench transfer: {run_info.describe()}")

    bandwidth = bench_bandwidth(rec, sizes, args, stream, notes)
    peak_gbs = max(s.median for p in PINNED_PROVIDERS if p in bandwidth for s in bandwidth[p].values())
    engine_peak = max(s.median for s in bandwidth["engine"].values())
    print(f"peak pinned bandwidth {peak_gbs:.1f} GB/s; engine best {engine_peak:.1f} GB/s "
          f"({engine_peak / peak_gbs:.3f} of peak)")

    cycles_per_ms = calibrate_spin()
    print(f"\nspin kernel: {cycles_per_ms:.0f} cycles/ms")
    spin_ratios, spin_ms = parse_list(args.spin_ratios, float), parse_list(args.spin_ms, float)
    if not spin_ratios and not spin_ms:
        spin_ratios = [1.0]
    layers = max(args.layers, args.num_slots + 1)
    overlap = bench_overlap(rec, int(args.overlap_mb * MB), layers, spin_ratios, spin_ms, 3 if args.quick else 7,
                            args.num_slots, cycles_per_ms, stream, peak_gbs)
    print(f"overlap: {layers} items of {args.overlap_mb:g} MB through {args.num_slots} slots")
    for o in overlap:
        print(f"  spin {o['spin_ms']:.3f} ms/layer: copies {o['copy_ms']:.2f} ms, compute {o['compute_ms']:.2f} ms, "
              f"overlapped {o['overlapped_ms']:.2f} ms = {o['ratio']:.3f} x max; engine {o['bw_gbs']:.1f} GB/s "
              f"during compute = {o['bw_fraction']:.3f} of peak")

    pinned = bench_pinned_ratio(rec, max(8, args.pinned_items // (4 if args.quick else 1)))
    print("\npinned host bytes / registered bytes: " +
          ", ".join(f"{k} {v:.4f}" for k, v in pinned.items() if k != "engine_pinned"))
    if not pinned.get("engine_pinned"):
        notes.append("the engine's host storage was NOT pinned in this run (pinning failed)")
    targets = evaluate_targets(overlap, pinned)
    print_targets(targets)

    out_dir = results_dir(args.out, run_info.slug)
    rec.write(out_dir / "transfer.csv")
    plot_quietly(out_dir / "transfer.csv", notes)
    write_summary(out_dir / "transfer.md", "Transfer benchmark", run_info,
                  summary_body(bandwidth, overlap, pinned, peak_gbs), targets, notes)
    print(f"\nappended {len(rec.rows)} rows to {out_dir / 'transfer.csv'}; summary in {out_dir / 'transfer.md'}")
    return 0
