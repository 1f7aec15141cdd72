"""Loads the native extension ``offload_kernels._C`` and reports how it was built.

Importing the package never fails because of the extension: if it is missing or broken, the error is
kept and raised only when something that needs it (the transfer engine) is used.
"""

from __future__ import annotations

from typing import Any

try:
    from . import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: BaseException | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _IMPORT_ERROR = exc


def native_module():
    """The extension module, or an ImportError that says how to build it."""
    if _C is None:
        raise ImportError(
            "offload_kernels._C (the native transfer engine) is not built or failed to import: "
            f"{_IMPORT_ERROR}. Reinstall with `pip install -e .` (set OFFLOAD_KERNELS_NO_CUDA=1 for a "
            "host-only build)."
        )
    return _C


def info() -> dict[str, Any]:
    """How the package was built and what it can see: extension flavour, CUDA devices, torch, Triton."""
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                           "torch_cuda_available": torch.cuda.is_available()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:  # pragma: no cover - triton is a dependency on Linux
        out["triton"] = f"unavailable ({exc})"
    if _C is None:
        out.update(extension="not importable", extension_error=str(_IMPORT_ERROR), built_with_cuda=False,
                   devices=[], device_error="extension not importable")
        return out
    ri = _C.query_runtime_info()
    out.update(
        extension="built with CUDA" if ri.built_with_cuda else "built host-only",
        built_with_cuda=bool(ri.built_with_cuda),
        cuda_runtime_version=ri.cuda_runtime_version,
        cuda_driver_version=ri.cuda_driver_version,
        device_count=ri.device_count,
        device_error=ri.device_error,
        devices=[
            {"index": d.index, "name": d.name, "total_memory": d.total_memory,
             "compute_capability": f"{d.major}.{d.minor}", "multiprocessors": d.multiprocessors}
            for d in ri.devices
        ],
    )
    return out
