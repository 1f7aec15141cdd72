"""Launch plumbing shared by the kernel families: interpreter detection, launch counters, debug
poisoning of outputs, and capture-safe autotuned launches.
"""

from __future__ import annotations

import contextlib
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

#: Autotuning on first use of each shape (set OFFLOAD_KERNELS_AUTOTUNE=0 to always launch the heuristic
#: configs: no benchmarking, no per-config compiles; also what happens under the interpreter).
AUTOTUNE: bool = os.environ.get("OFFLOAD_KERNELS_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")

#: Launch counters, by kernel variant. "gemv"/"gemm" count launches with split_k == 1,
#: "gemv_splitk"/"gemm_splitk" those with split_k > 1, "dequant" the standalone dequantize kernel.
#: Python-side counts: a CUDA graph replay does not count again.
KERNEL_VARIANTS = ("gemv", "gemv_splitk", "gemm", "gemm_splitk", "dequant")
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
_placeholders: dict[torch.device, torch.Tensor] = {}


def split_k_workspace(out: torch.Tensor, split_k: "int | None") -> torch.Tensor:
    """The fp32 buffer split-K programs atomically add into, for an (M, N) ``out`` (split_k None: not known
    yet, the autotuner may try any, and its config pre-hook zeroes the buffer before each try). For a known
    split > 1 the buffer comes zeroed from here (the same device work as the pre-hook's memset, without the
    host-side pre-hook call and its argument dict per launch). An fp32 ``out`` is its own workspace, zeroed
    here for a split > 1. Without a K split the kernels
    store straight into ``out`` and never touch the workspace: a cached one-element fp32 placeholder then
    keeps the kernel signature (and so its compiled binary) the same, with no (M, N) allocation per call."""
    if out.dtype == torch.float32:
        if split_k is not None and split_k > 1:
            out.zero_()
        return out
    if split_k == 1:
        ws = _placeholders.get(out.device)
        if ws is None:
            ws = torch.empty(1, dtype=torch.float32, device=out.device)    # never read nor written
            if not capturing(out.device):       # not from a CUDA graph's private memory pool
                _placeholders[out.device] = ws
        return ws
    if split_k is None:
        return torch.empty(out.shape, dtype=torch.float32, device=out.device)
    return torch.zeros(out.shape, dtype=torch.float32, device=out.device)


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
           late_args: "Callable[[triton.Config | None], dict[str, Any]] | None" = None,
           run_pre_hook: bool = True) -> triton.Config:
    """Launch ``tuner`` (a triton.autotune-wrapped kernel) on ``args`` (all passed by name).

    With ``tune`` and a real GPU, the first call per key autotunes (benchmarking every pruned config) and
    remembers the winner; later calls launch the remembered config directly. Without ``tune``, under the
    interpreter, or during CUDA graph capture for a key not tuned yet, the ``heuristic`` config is launched
    (benchmarking inside a capture would break it). Returns the config that ran; its ``pre_hook`` (e.g.
    zeroing a split-K workspace) runs right before the kernel, on the current stream of ``device``.

    ``late_args(config)``, if given, returns arguments that depend on the config about to run (a split-K
    workspace sized for it); it gets None when the autotuner is about to benchmark every config.
    ``run_pre_hook=False`` skips the pre-hook on direct launches, for callers whose ``late_args`` already
    did its work (the autotuner still runs it around each benchmarked config).
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
        if run_pre_hook and config.pre_hook is not None:
            config.pre_hook({**args, **meta})
        tuner.fn[grid](**args, **meta)
        return config


def launch_split_k(tuner: Any, grid: Callable[[dict], tuple], args: dict[str, Any], key: tuple,
                   heuristic: Callable[[], triton.Config], *, tune: bool, out: torch.Tensor) -> int:
    """:func:`launch` for the split-K kernels (GEMV, GEMM): a program stores into ``out`` when K is not split
    and atomically adds into the fp32 workspace ``ws_ptr`` otherwise. The workspace is sized for the config
    that runs, comes zeroed (see split_k_workspace: so the configs' zeroing pre-hook is needed only while
    autotuning) and is cast into ``out`` afterwards. Returns the split that ran."""
    ws = out

    def workspace(config: "triton.Config | None") -> dict[str, Any]:
        nonlocal ws
        ws = split_k_workspace(out, None if config is None else config.kwargs["split_k"])
        return {"ws_ptr": ws}

    config = launch(tuner, grid, args, key, heuristic, tune=tune, device=out.device, late_args=workspace,
                    run_pre_hook=False)
    split = config.kwargs["split_k"]
    if split > 1 and ws is not out:
        out.copy_(ws)
    return split


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
