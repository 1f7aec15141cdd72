"""Measured hardware ceilings: host-to-device link, device memory (HBM) and matmul throughput.

Every prediction this package prints is a ratio to one of these, measured on the machine at hand.
On a machine without a GPU the "link" is a host memcpy and "HBM" is host memory: the CPU path's
equivalents, so the same planner runs everywhere.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..units import default_device


@dataclass(frozen=True)
class Hardware:
    """Ceilings in bytes/s and FLOP/s, plus device memory, all measured (or given by the user)."""

    device: str
    link_bytes_per_s: float        # pinned host -> device copy
    hbm_bytes_per_s: float         # device memory copy bandwidth (read + write counted once each)
    matmul_flops: float            # dense half-precision matmul (fp32 on CPU)
    memory_bytes: int | None = None
    name: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def median_seconds(fn, device: "torch.device | str", repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one untimed warm-up call.

    On CUDA each call is bracketed by events after a synchronize, so queued earlier work is not counted
    and the asynchronous work ``fn`` launches is.
    """
    device = torch.device(device)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(device)      # device's stream, even when another is current
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_link_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of a host-to-device copy from pinned memory (a host memcpy on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return nbytes / median_seconds(lambda: dst.copy_(src, non_blocking=True), device, repeats)
    nbytes = min(nbytes, 64 << 20)
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return nbytes / median_seconds(lambda: dst.copy_(src), device, repeats)


def measure_memory_bandwidth(device: torch.device, nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes/s of a device-to-device copy, counting the bytes read plus the bytes written."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 64 << 20)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), device, repeats)


def measure_matmul_flops(device: torch.device, size: int = 8192, repeats: int = 5) -> float:
    """FLOP/s of a dense square matmul: fp16 (tensor cores) on CUDA, fp32 on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        dtype = torch.float16
    else:
        dtype, size = torch.float32, min(size, 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / median_seconds(lambda: a @ b, device, repeats)


_CACHE: dict[str, Hardware] = {}


def measure_hardware(device: "torch.device | str | None" = None, refresh: bool = False) -> Hardware:
    """Measure (once per process, then cached) the ceilings of ``device`` (default: cuda if present)."""
    device = default_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if refresh or key not in _CACHE:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            name, mem = props.name, int(props.total_memory)
        else:
            name, mem = "cpu", None
        _CACHE[key] = Hardware(key, measure_link_bandwidth(device), measure_memory_bandwidth(device),
                               measure_matmul_flops(device), mem, name)
    return _CACHE[key]
