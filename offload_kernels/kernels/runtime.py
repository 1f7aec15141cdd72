"""Launch plumbing shared by the kernel families: interpreter detection, launch counters, debug
poisoning of outputs, and capture-safe autotuned launches.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Any, Callable, Iterator

import torch
import triton


@triton.jit
def _probe_kernel():
    pass


#: True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1 was set before triton was
#: imported): kernels then run on CPU tensors, one program at a time, in numpy.
INTERPRETER: bool = type(_probe_kernel).__name__ == "InterpretedFunction"


def triton_version() -> tuple[int, int]:
    """The installed Triton's (major, minor) version, for the few code-generation differences the kernels
    work around."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


#: Autotuning on first use of each shape (set OFFLOAD_KERNELS_AUTOTUNE=0 to always launch the heuristic
#: configs: no benchmarking, no per-config compiles; also what happens under the interpreter).
AUTOTUNE: bool = os.environ.get("OFFLOAD_KERNELS_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")

#: Launch counters, by kernel variant. "gemv"/"gemm" count launches with split_k == 1,
#: "gemv_splitk"/"gemm_splitk" those with split_k > 1, "dequant" the standalone dequantize kernel,
#: "expert_gemv"/"expert_gemv_splitk" the grouped expert GEMV and "expert_gemm"/"expert_gemm_splitk" the
#: grouped expert GEMM (qmatmul_experts).
#: Python-side counts: a CUDA graph replay does not count again.
KERNEL_VARIANTS = ("gemv", "gemv_splitk", "gemm", "gemm_splitk", "dequant", "expert_gemv", "expert_gemv_splitk",
                   "expert_gemm", "expert_gemm_splitk")
_counts = dict.fromkeys(KERNEL_VARIANTS, 0)
_counts_lock = threading.Lock()


def count_launch(variant: str) -> None:
    with _counts_lock:
        _counts[variant] += 1


def launch_counts() -> dict[str, int]:
    """How many times each Triton kernel variant was launched since the last reset (a copy)."""
    with _counts_lock:
        return dict(_counts)


def reset_launch_counts() -> None:
    """Zero the launch counters."""
    with _counts_lock:
        for key in _counts:
            _counts[key] = 0


# ------------------------------------------------------------------------------------------ poisoning
_poison = threading.local()


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Debug mode: buffers the kernels must fully overwrite are allocated filled with NaN instead of left
    uninitialized, so an element a kernel forgot to write shows up as NaN instead of as stale memory."""
    previous = getattr(_poison, "enabled", False)
    _poison.enabled = enabled
    try:
        yield
    finally:
        _poison.enabled = previous


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer the caller promises to overwrite entirely (NaN-filled under poison_outputs())."""
    if getattr(_poison, "enabled", False):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ split-K
#: Workspaces up to this size are kept from call to call (per device and stream, zeroed once: every split-K
#: launch leaves its workspace and tile counters zero again, see epilogue.py); larger ones are allocated
#: zeroed per call. A mid-M GEMM split needs M x N fp32: 7.3 MB at M = 64, N = 28672.
PERSISTENT_WORKSPACE_BYTES = 64 << 20
#: Streams whose workspaces are kept (the least recently used dropped first).
PERSISTENT_WORKSPACE_STREAMS = 8

_placeholders: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
# (device, stream) -> [workspace, counters, (shape, view) of the last call], in the order of last use
_workspaces: dict[tuple[torch.device, int], list] = {}


def _current_stream_key(device: torch.device) -> int:
    """The raw handle of ``device``'s current stream, the one the next launch and allocation use (0 on the
    CPU, where the interpreter runs programs one after the other)."""
    if device.type != "cuda":
        return 0
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None
                                              else torch.cuda.current_device())


def split_k_buffers(out: torch.Tensor, split_k: "int | None", tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 workspace (shaped like the (M, N) ``out``) and the int32 per-tile arrival counters (at
    least ``tiles``) of a split-K launch, both zero (split_k None: not known yet, the autotuner may try any
    split). The kernels leave them zero, so outside CUDA graph capture they are kept per device and current
    stream (two streams never share one; work on one stream runs in order) and reused without a memset.
    Inside a capture they are allocated zeroed per call, from the graph's own pool: each graph then owns
    its buffers, and a replay never races eager calls or other graphs. Without a K split the kernels never
    touch either: cached one-element placeholders keep the kernel signature (and so its compiled binary)
    the same, with no (M, N) allocation per call."""
    device = out.device
    if split_k == 1:
        bufs = _placeholders.get(device)
        if bufs is None:
            bufs = (torch.empty(1, dtype=torch.float32, device=device),     # never read nor written
                    torch.empty(1, dtype=torch.int32, device=device))
            if not capturing(device):       # not from a CUDA graph's private memory pool
                _placeholders[device] = bufs
        return bufs
    numel = out.numel()
    if capturing(device) or numel * 4 > PERSISTENT_WORKSPACE_BYTES:
        return (torch.zeros(out.shape, dtype=torch.float32, device=device),
                torch.zeros(tiles, dtype=torch.int32, device=device))
    key = (device, _current_stream_key(device))
    kept = _workspaces.pop(key, None)       # re-inserted below: the dict's order is the order of last use
    if kept is None or kept[0].numel() < numel or kept[1].numel() < tiles:
        # Grown on (and so owned by) the stream that uses them; the old ones are freed in its order.
        have = (0, 0) if kept is None else (kept[0].numel(), kept[1].numel())
        kept = [torch.zeros(max(numel, have[0]), dtype=torch.float32, device=device),
                torch.zeros(max(tiles, have[1]), dtype=torch.int32, device=device), None]
    _workspaces[key] = kept
    if len(_workspaces) > PERSISTENT_WORKSPACE_STREAMS:    # the least recently used stream's go first
        del _workspaces[next(iter(_workspaces))]
    view = kept[2]                  # (shape, the (M, N) view): reused while the shape repeats
    if view is None or view[0] != out.shape:
        view = kept[2] = (out.shape, kept[0][:numel].view(out.shape))
    return view[1], kept[1]


def release_workspaces() -> None:
    """Free the kept split-K workspaces (the next split-K call allocates again)."""
    _workspaces.clear()
    _placeholders.clear()


# ------------------------------------------------------------------------------------------ devices
NOMINAL_SM_COUNT = 132  # an H100 SXM: what the heuristics assume when no GPU is visible (interpreter)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return NOMINAL_SM_COUNT


_sm_cache: dict[int, int] = {}


def _cuda_sm_count(index: int) -> int:
    if index not in _sm_cache:
        _sm_cache[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_cache[index]


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ------------------------------------------------------------------------------------------ launches
# Best configs found by the autotuners, keyed by (kernel, tuning key, argument dtypes). Kept here rather
# than read back from triton's Autotuner cache so that the "is it tuned?" question (asked during CUDA
# graph capture, where benchmarking is impossible) has the same answer on every Triton version.
_tuned: dict[tuple, triton.Config] = {}
_tuners: dict[int, Any] = {}      # the autotuners launch() has tuned with (forget_tuned_configs)


def tuning_key(name: str, args: dict[str, Any], key_names: tuple[str, ...]) -> tuple:
    """Our cache key: at least as fine as the Autotuner's (its key values plus every tensor's dtype)."""
    # dtype objects, not their names, and getattr rather than isinstance: this runs on every launch.
    dtypes = tuple([getattr(v, "dtype", None) for v in args.values()])
    return (name, *[args[k] for k in key_names], dtypes)


_NO_DEVICE_SWITCH = contextlib.nullcontext()


def _on_device(device: torch.device) -> Any:
    """torch.cuda.device(device), or a no-op when it is already current (the common case: entering
    torch.cuda.device costs two device queries per launch, which add up over hundreds of layers)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NO_DEVICE_SWITCH
    return torch.cuda.device(device)


def _launch_kwargs(config: triton.Config) -> dict[str, Any]:
    """config.all_kwargs(), computed once per config object (tuned configs launch on every call)."""
    meta = getattr(config, "_offload_kernels_kwargs", None)
    if meta is None:
        meta = config.all_kwargs()
        try:
            config._offload_kernels_kwargs = meta
        except AttributeError:      # a Triton whose Config takes no new attributes: recompute each time
            pass
    return meta


def launch(tuner: Any, grid: Callable[[dict], tuple], args: dict[str, Any], key: tuple,
           heuristic: Callable[[], triton.Config], *, tune: bool, device: torch.device,
           late_args: "Callable[[triton.Config | None], dict[str, Any]] | None" = None) -> triton.Config:
    """Launch ``tuner`` (a triton.autotune-wrapped kernel) on ``args`` (all passed by name).

    With ``tune`` and a real GPU, the first call per key autotunes (benchmarking every pruned config) and
    remembers the winner; later calls launch the remembered config directly. Without ``tune``, under the
    interpreter, or during CUDA graph capture for a key not tuned yet, the ``heuristic`` config is launched
    (benchmarking inside a capture would break it). Returns the config that ran; its ``pre_hook``, if any,
    runs right before the kernel, on the current stream of ``device``.

    ``late_args(config)``, if given, returns arguments that depend on the config about to run (a split-K
    workspace sized for it); it gets None when the autotuner is about to benchmark every config.
    """
    # Triton launches on the current device: make it the tensors' device (its current stream is used).
    with _on_device(device):
        tune = tune and AUTOTUNE and not INTERPRETER
        config = _tuned.get(key) if tune else None
        if config is None:
            if tune and not capturing(device):
                if late_args is not None:
                    args = {**args, **late_args(None)}
                tuner[grid](**args)
                config = tuner.best_config
                _tuned[key] = config
                _tuners[id(tuner)] = tuner
                return config
            config = heuristic()
        if late_args is not None:
            args = {**args, **late_args(config)}
        meta = _launch_kwargs(config)
        if config.pre_hook is not None:
            config.pre_hook({**args, **meta})
        tuner.fn[grid](**args, **meta)
        return config


def launch_split_k(tuner: Any, grid: Callable[[dict], tuple], args: dict[str, Any], key: tuple,
                   heuristic: Callable[[], triton.Config], *, tune: bool, out: torch.Tensor) -> int:
    """:func:`launch` for the split-K kernels (GEMV, GEMM): a program stores into ``out`` when K is not split;
    otherwise the tile's last program does, after summing the partial tiles in the fp32 workspace ``ws_ptr``
    (arrivals counted in ``cnt_ptr``, one per output tile: the grid's programs over its split_k; see
    split_k_buffers). One kernel launch either way. Returns the split that ran."""

    def tiles(config: triton.Config) -> int:
        return math.prod(grid(config.kwargs)) // config.kwargs["split_k"]

    def buffers(config: "triton.Config | None") -> dict[str, Any]:
        if config is None:      # the autotuner is about to try every config: room for the most tiles,
            # the heuristic's included (the pruners fall back to it when they keep nothing)
            ws, cnt = split_k_buffers(out, None, max([tiles(c) for c in tuner.configs] + [tiles(heuristic())]))
        else:
            ws, cnt = split_k_buffers(out, config.kwargs["split_k"], tiles(config))
        return {"ws_ptr": ws, "cnt_ptr": cnt}

    config = launch(tuner, grid, args, key, heuristic, tune=tune, device=out.device, late_args=buffers)
    return config.kwargs["split_k"]


def forget_tuned_configs() -> None:
    """Drop every remembered autotuning result (the next call per key tunes again): ours, and the one
    Triton's Autotuner keeps per key (``.cache``), which would otherwise answer without benchmarking."""
    _tuned.clear()
    for tuner in _tuners.values():
        cache = getattr(tuner, "cache", None)
        if isinstance(cache, dict):
            cache.clear()
    _tuners.clear()


def is_tuned(key: tuple) -> bool:
    return key in _tuned
