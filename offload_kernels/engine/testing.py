"""Test hooks for the transfer engine: force the pinned-memory fallback, count live host arenas."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .._native import native_module


@contextlib.contextmanager
def force_pin_failure() -> Iterator[None]:
    """Within the block, every attempt to pin host memory fails as if page-locked memory had run out.

    TransferEngines registering data meanwhile fall back to pageable memory and warn
    (:class:`~offload_kernels.engine.PinnedMemoryFallbackWarning`), exactly as on a real pinning failure.
    """
    c = native_module()
    previous = c._force_pin_failure()
    c._set_force_pin_failure(True)
    try:
        yield
    finally:
        c._set_force_pin_failure(previous)


def live_host_memory() -> dict[str, int]:
    """Host arenas alive in this process across all engines: ``arenas``, ``pinned_bytes``, ``pageable_bytes``."""
    return dict(native_module().live_host_memory())
