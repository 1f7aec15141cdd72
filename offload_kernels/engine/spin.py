"""A busy-wait CUDA kernel: synthetic compute of a chosen length for overlap tests and benchmarks."""

from __future__ import annotations

import statistics

import torch

from .._native import native_module


def _require_cuda() -> None:
    if not native_module().BUILT_WITH_CUDA:
        raise RuntimeError("the spin kernel needs the CUDA build of offload_kernels._C; this one is host-only")
    if not torch.cuda.is_available():
        raise RuntimeError("the spin kernel needs a CUDA device, and torch sees none")


def spin(cycles: int, stream: torch.cuda.Stream | None = None) -> None:
    """Enqueue a one-thread kernel that busy-waits ``cycles`` SM clock cycles on ``stream``.

    ``stream`` defaults to the current stream. The kernel occupies one SM, so it leaves the copy engines and
    the rest of the GPU free: it stands in for a layer's compute when measuring copy/compute overlap.
    """
    _require_cuda()
    if stream is None:
        stream = torch.cuda.current_stream()
    native_module().spin(int(cycles), int(stream.cuda_stream), int(stream.device.index or 0))


def calibrate_spin(device: torch.device | int | str | None = None, target_ms: float = 20.0,
                   repeats: int = 5) -> float:
    """SM clock cycles per millisecond of :func:`spin` on ``device``, measured with CUDA events.

    Times two kernel lengths (about ``target_ms`` and half of it) and divides the cycle difference by the
    time difference, which cancels the fixed launch cost; returns the median of ``repeats`` such estimates.
    """
    _require_cuda()
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"calibrate_spin needs a CUDA device, got {dev}")
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev)

        def timed(cycles: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            spin(cycles, stream)
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end)

        timed(1000)  # load the module and warm up
        rough = 1_000_000 / max(timed(1_000_000), 1e-3)  # cycles/ms, launch cost included
        long_cycles = int(rough * target_ms)
        estimates = []
        for _ in range(max(1, repeats)):
            t_long, t_short = timed(long_cycles), timed(long_cycles // 2)
            estimates.append((long_cycles - long_cycles // 2) / max(t_long - t_short, 1e-6))
        return float(statistics.median(estimates))
