"""Where a qmatmul call's time goes on a GPU: the host's launch path against the kernels' device time.

For each (qtype, M) point on one weight shape it prints, in microseconds per call:
  host     wall time of back-to-back eager calls with no synchronization (the launch path alone, as long
           as the GPU keeps up);
  eager    do_bench of the eager call (L2 flushed before each): what a caller waits for;
  graph    the same call captured in a CUDA graph and replayed (L2 flushed): the kernels alone;
  kernels  the sum of the CUDA kernels' durations per call from torch.profiler, and their names;
  cuBLAS   torch.matmul on an fp16 weight of the same shape (eager, L2 flushed).
With --cprofile, the hottest host functions of the first point (cProfile, by own time).

    python bench/profile_qmatmul.py --shape 8192x8192 --points q4_k:1,q3_k:1,q4_k:16 [--no-autotune] [--cprofile]

A diagnostic for tuning (no CSV): the tables under bench/results/ come from `offload-kernels bench kernels`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # this checkout's package, installed or not


def kernel_time_us(fn, reps: int = 20) -> tuple[float, Counter]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total, names = 0.0, Counter()
    for event in prof.events():
        if event.device_type.name == "CUDA":
            total += getattr(event, "device_time", None) or getattr(event, "cuda_time", 0.0)
            names[event.name[:32]] += 1
    return total / reps, Counter({k: v // reps for k, v in names.items()})


def host_time_us(fn, calls: int = 200) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def _parse(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[tuple[int, int], list[tuple[str, int]]]:
    """--shape and --points, checked before anything is allocated (argparse's error names the bad value)."""
    from offload_kernels.formats import QTYPES, get_spec

    from offload_kernels.benchmarks.kernels import parse_shapes

    try:
        (n, k), = parse_shapes(args.shape)
    except ValueError:
        parser.error(f"--shape must be NxK with positive integers, got {args.shape!r}")
    points = []
    for point in args.points.split(","):
        qtype, _, m_text = point.partition(":")
        if qtype not in QTYPES or not m_text.isdigit() or int(m_text) < 1:
            parser.error(f"--points entries must be qtype:M with qtype in {', '.join(QTYPES)} and M >= 1, "
                         f"got {point!r}")
        if n < 1 or k < 1 or k % get_spec(qtype).block_size:
            parser.error(f"--shape {args.shape}: N and K must be positive and K a multiple of {qtype}'s "
                         f"{get_spec(qtype).block_size}-weight block")
        points.append((qtype, int(m_text)))
    return (n, k), points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8192x8192", help="N x K of the weight")
    parser.add_argument("--points", default="q4_k:1,q3_k:1,q4_k:16,q4_k:256", help="qtype:M,...")
    parser.add_argument("--no-autotune", action="store_true", help="heuristic configs (no tuning)")
    parser.add_argument("--cprofile", action="store_true", help="cProfile the host path of the first point")
    args = parser.parse_args()
    shape, points = _parse(parser, args)

    import torch

    if not torch.cuda.is_available():
        print("profile_qmatmul: needs a CUDA device; nothing measured.")
        return 0
    from offload_kernels.benchmarks.kernels import set_autotune
    from offload_kernels.benchmarks.results import time_cuda, time_cuda_graph
    from offload_kernels.formats import quantize
    from offload_kernels.kernels import qmatmul

    set_autotune(not args.no_autotune)
    n, k = shape
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    w16 = w.half()
    print(f"{torch.cuda.get_device_name()}, {n}x{k}, autotune {'off' if args.no_autotune else 'on'}; us per call")
    for i, (qtype, m) in enumerate(points):
        qt = quantize(w, qtype)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        fn = lambda: qmatmul(x, qt)  # noqa: E731
        host = host_time_us(fn)
        eager = time_cuda(fn).median * 1e3
        graph = time_cuda_graph(fn).median * 1e3
        kernels, names = kernel_time_us(fn)
        cublas = time_cuda(lambda: x @ w16.T).median * 1e3
        print(f"{qtype} M={m:5d}: host {host:7.1f}  eager {eager:7.1f}  graph {graph:7.1f}  kernels {kernels:7.1f}"
              f"  cuBLAS {cublas:7.1f}  graph vs cuBLAS {cublas / graph:5.2f}x  {dict(names)}", flush=True)
        if args.cprofile and i == 0:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(200):
                fn()
            profiler.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
            print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
