"""TransferEngine: stream registered host bytes into a small ring of device slots, overlapping copies with
compute.

The native core (``offload_kernels._C.TransferEngineCore``, in ``csrc/engine``) owns host storage, the slot
state machine and the copy backend. This wrapper validates Python inputs, owns the slot memory (torch
tensors, so torch's allocator and memory statistics see it) and turns slots into tensor views.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import numpy as np
import torch

from .._native import native_module
from ._host_data import HostPart, item_parts

_MAX_HANDLE = 2**63 - 1


class PinnedMemoryFallbackWarning(RuntimeWarning):
    """Host storage could not be page-locked and lives in pageable memory instead."""


def _resolve_device(device: Any) -> torch.device:
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"device must be 'cuda', 'cpu', a torch.device or a CUDA ordinal, not {device!r}")
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"TransferEngine runs on 'cuda' or 'cpu' (the host backend), not {dev}")
    if not native_module().BUILT_WITH_CUDA:
        raise RuntimeError(
            f"device={str(dev)!r} needs the CUDA build of offload_kernels._C, but this one was built host-only "
            "(no nvcc at build time, or OFFLOAD_KERNELS_NO_CUDA=1). Rebuild it with a CUDA toolkit, or use "
            "device='cpu'.")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device={str(dev)!r}: torch sees no CUDA device (torch {torch.__version__}, CUDA "
                           f"{torch.version.cuda}). Use device='cpu' for the host backend.")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"device cuda:{index} does not exist ({torch.cuda.device_count()} CUDA device(s) visible)")
    return torch.device("cuda", index)


def _handle(h: Any) -> int:
    if isinstance(h, bool):
        raise TypeError(f"a handle is an int returned by register(), not {h!r}")
    try:
        value = operator.index(h)
    except TypeError:
        raise TypeError(f"a handle is an int returned by register(), not {type(h).__name__}") from None
    if not 0 <= value <= _MAX_HANDLE:
        raise ValueError(f"unknown handle {value}")
    return value


class TransferEngine:
    """Streams registered host bytes into a ring of device slots on a dedicated copy stream.

    Items (quantized weights, or any bytes) are copied once into exact-size host storage, page-locked on
    CUDA, and from there into ``num_slots`` device slots on demand. The protocol per use of an item::

        eng.prefetch(h)            # enqueue the copy into a free slot (no copy if h is still in one)
        view = eng.acquire(h)      # the current stream waits for the copy; returns the slot's bytes
        ...compute with view...
        eng.release(h)             # the slot is reusable once the stream's work so far is done

    Prefetching the next item before computing with this one overlaps its copy with the compute. Nothing
    on this path blocks the host on CUDA: copy-done and slot-free are CUDA events that streams wait on.

    Slot states: FREE (may still hold an item: a later prefetch of it is a hit) -> prefetched (LOADING) ->
    acquired -> released (FREE). Rules:

    * every ``acquire`` needs its own ``prefetch``; an item is acquired at most once at a time (acquire of
      an acquired item raises; release it first);
    * ``prefetch`` takes the least recently released FREE slot; if every slot is prefetched or acquired it
      raises ``RuntimeError`` rather than wait (it would wait forever);
    * ``cancel(h)`` undoes a prefetch that will not be acquired;
    * ``invalidate(h)`` before rewriting ``h``'s host bytes (see :meth:`host_views`), so no slot serves the
      old ones.

    Misuse raises ``ValueError``/``TypeError`` (bad argument) or ``RuntimeError`` (wrong state) before
    anything changes, and the engine stays usable. Methods may be called from one thread at a time.

    Args:
        device: ``"cuda"``, ``"cuda:N"``, a ``torch.device`` or ``"cpu"``. ``"cpu"`` selects the host backend:
            the same protocol with host slots filled by a worker thread (for machines without a GPU);
            ``acquire`` blocks until the copy is done and streams must be ``None``.
        num_slots: number of slots (>= 1; 2 double-buffers).
        slot_bytes: fixed slot size. ``None`` sizes the slots for the largest registered item, allocating
            them at the first prefetch and growing them when a larger item is registered while no slot is
            in use.
        pin: page-lock host storage (CUDA only; the host backend ignores it). If pinning fails the bytes stay
            in pageable memory and a :class:`PinnedMemoryFallbackWarning` says what that costs.
    """

    def __init__(self, device: str | torch.device | int = "cuda", num_slots: int = 2,
                 slot_bytes: int | None = None, pin: bool = True) -> None:
        self._core = None
        self._closed = False
        self._slots: list[torch.Tensor] | None = None
        self._slot_capacity = 0  # bytes per slot of the attached slot memory
        c = native_module()
        if isinstance(num_slots, bool) or not isinstance(num_slots, int):
            raise TypeError(f"num_slots must be an int, not {type(num_slots).__name__}")
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if slot_bytes is not None:
            if isinstance(slot_bytes, bool) or not isinstance(slot_bytes, int):
                raise TypeError(f"slot_bytes must be an int or None, not {type(slot_bytes).__name__}")
            if slot_bytes < 1:
                raise ValueError(f"slot_bytes must be >= 1, got {slot_bytes}")
        self._device = _resolve_device(device)
        self._cuda = self._device.type == "cuda"
        self._item_nbytes: dict[int, int] = {}
        self._needed_slot_bytes = slot_bytes or 0  # fixed size, or the largest item registered so far
        self._fixed_slot_bytes = slot_bytes is not None
        self._core = c.TransferEngineCore("cuda" if self._cuda else "host",
                                          self._device.index if self._cuda else -1, num_slots, slot_bytes or 0,
                                          bool(pin))
        if slot_bytes is not None:
            self._allocate_slots(slot_bytes)

    # ------------------------------------------------------------------ registration

    def register(self, data: Any) -> int:
        """Copy ``data`` into host storage as one item and return its handle.

        ``data`` is a contiguous CPU tensor (any dtype; its bytes are taken), a numpy array, ``bytes``,
        ``bytearray`` or ``memoryview``, or a list/tuple of those: one item whose parts are laid out one
        after another, each starting on a 256-byte boundary (see :meth:`item_parts`). The source may be
        freed afterwards.
        """
        return self._register([item_parts(data, "the item")])[0]

    def register_many(self, items: list[Any] | tuple[Any, ...]) -> list[int]:
        """Register several items in one exact-size host allocation; returns their handles in order.

        Each element is what :meth:`register` accepts. This is the normal path for a model's weights: one
        allocation of their total size (plus at most 255 bytes of alignment per part and one page).
        """
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"register_many takes a list or tuple of items, not {type(items).__name__}")
        if not items:
            raise ValueError("register_many: the list of items is empty")
        return self._register([item_parts(item, f"item {i}") for i, item in enumerate(items)])

    def _register(self, items: list[list[HostPart]]) -> list[int]:
        core = self._open_core()
        handles = core.register_items([[(p.address, p.nbytes) for p in parts] for parts in items])
        del items  # the sources were needed only until the native copy returned
        for h in handles:
            self._item_nbytes[h] = n = core.item_nbytes(h)
            if not self._fixed_slot_bytes:
                self._needed_slot_bytes = max(self._needed_slot_bytes, n)
        reason = core.take_pin_failure()
        if reason:
            warnings.warn(
                f"TransferEngine could not pin host memory ({reason}); the bytes stay in pageable memory. "
                "Copies from it are synchronous staging copies at roughly half the bandwidth, and they do not "
                "overlap compute. Free host memory or register less data to get pinned storage back.",
                PinnedMemoryFallbackWarning, stacklevel=3)
        return handles

    def item_nbytes(self, h: int) -> int:
        """Bytes of item ``h`` as copied to a slot: its parts plus the alignment padding between them."""
        return self._open_core().item_nbytes(_handle(h))

    def item_parts(self, h: int) -> list[tuple[int, int]]:
        """``(offset, nbytes)`` of each part of item ``h`` within its slot view."""
        return [tuple(p) for p in self._open_core().item_parts(_handle(h))]

    def host_views(self, h: int) -> list[torch.Tensor]:
        """The bytes of each part of item ``h`` in the engine's host storage, as 1-D ``torch.uint8`` CPU
        tensors (pinned memory on CUDA). Callers can drop their own copy of the data and keep these: there is
        then a single host copy.

        The views share the storage: writing into them changes what later copies carry. Call
        :meth:`invalidate` before writing: it waits for copies in flight and drops a slot's stale copy of the
        item. They keep their storage alive, so they stay valid after
        :meth:`close`, which then frees that storage only once the last view is gone.
        """
        h = _handle(h)
        core = self._open_core()
        whole = torch.from_numpy(np.frombuffer(core.item_host_bytes(h), dtype=np.uint8))
        return [whole[off:off + n] for off, n in core.item_parts(h)]

    def state(self, h: int) -> str:
        """Where item ``h`` is: ``"host"`` (in no slot), ``"resident"`` (in a FREE slot: prefetch is a hit),
        ``"prefetched"`` or ``"acquired"``."""
        return self._open_core().item_state(_handle(h))

    # ------------------------------------------------------------------ protocol

    def prefetch(self, h: int) -> bool:
        """Enqueue the copy of item ``h`` into a free slot; returns ``True`` if a copy was enqueued and
        ``False`` on a hit (``h`` already in a slot, or already prefetched).

        Does not wait for the copy (except from pageable memory after a pinning failure, which CUDA stages
        synchronously). Raises ``RuntimeError`` when every slot is prefetched or acquired. The first prefetch
        allocates auto-sized slots, and one after a larger item was registered replaces them, waiting for
        the work that used the old ones: not a steady-state cost.
        """
        h = _handle(h)
        core = self._open_core()
        if self._slots is None or self._needed_slot_bytes > self._slot_capacity:
            core.check_handle(h)  # a bad handle must not cost the resident slots
            self._replace_slots(core)
        return core.prefetch(h)

    def acquire(self, h: int, stream: Any = None) -> torch.Tensor:
        """Make ``stream`` wait for item ``h``'s copy and return its slot as a 1-D ``torch.uint8`` view of
        exactly :meth:`item_nbytes` bytes on the engine's device.

        ``stream`` defaults to the current CUDA stream (a ``torch.cuda.Stream`` of the engine's device, or a
        raw ``cudaStream_t`` int); the host backend takes ``None`` and blocks until the copy is done. The view
        is valid, on that stream, until :meth:`release`; treat it as read-only (writing into it would corrupt
        later hits).
        """
        h = _handle(h)
        core = self._open_core()
        slot = core.acquire(h, self._stream_handle(stream))
        return self._slots[slot][: self._item_nbytes[h]]

    def release(self, h: int, stream: Any = None) -> None:
        """Give item ``h``'s slot back: it is reused once the work enqueued on ``stream`` so far is done."""
        h = _handle(h)
        self._open_core().release(h, self._stream_handle(stream))

    def cancel(self, h: int) -> None:
        """Undo a :meth:`prefetch` of ``h`` that will not be acquired (e.g. after an exception). The slot
        becomes FREE and keeps the item, so a later prefetch of it is still a hit."""
        self._open_core().cancel(_handle(h))

    def invalidate(self, h: int) -> bool:
        """Prepare item ``h``'s host bytes for rewriting (through :meth:`host_views`): waits until no enqueued
        copy reads host memory any more, and makes a slot still holding ``h`` forget it, so the next
        :meth:`prefetch` copies the new bytes instead of serving the old ones as a hit. Returns ``True`` if a
        slot held ``h``.

        Call it before writing, and prefetch ``h`` only after the write. Raises ``RuntimeError`` if ``h`` is
        prefetched (:meth:`cancel` it first) or acquired (:meth:`release` it first). Not a steady-state call:
        on CUDA it blocks until the copy stream is idle.
        """
        return bool(self._open_core().invalidate(_handle(h)))

    # ------------------------------------------------------------------ bookkeeping

    def stats(self) -> dict[str, Any]:
        """Counters and memory accounting.

        ``bytes_copied``, ``copies``, ``hits`` (prefetches that needed no copy), ``copy_time_s`` (time the
        copies took), ``consumer_wait_s`` (time consumer streams stalled in acquire waiting for copies),
        ``slot_wait_s`` (time copies stalled waiting for their slot to be released), ``pinned_bytes``,
        ``host_bytes`` (pinned or not), ``registered_bytes`` (payload bytes registered), ``device_bytes``
        (slot memory), ``items``, ``num_slots``, ``slot_bytes``, ``backend`` (``"cuda"``/``"host"``),
        ``pinned`` (host storage is page-locked). Counters cover everything since :meth:`reset_stats`; CUDA
        timings include the measurements whose events have completed (call :meth:`synchronize` first for all
        of them). Works after :meth:`close` (memory figures are then 0).
        """
        if self._core is None:
            raise RuntimeError("this TransferEngine failed to initialize")
        return dict(self._core.stats())

    def reset_stats(self) -> None:
        """Zero the counters and timings (memory figures are not counters and stay)."""
        self._open_core().reset_stats()

    def synchronize(self) -> None:
        """Block until every enqueued copy and every released slot's consumer work is done."""
        self._open_core().synchronize()

    def close(self) -> None:
        """Wait for in-flight work, then free every pinned host byte and all slot memory. Idempotent.

        If slots are still acquired, their consumers' streams are unknown, so close waits for the whole
        device. Views obtained from :meth:`acquire` keep their slot's memory alive until they are dropped.
        """
        core = self._core
        if core is None or self._closed:
            return
        self._closed = True
        try:
            core.close()
        finally:
            self._slots = None
            self._slot_capacity = 0
            self._item_nbytes.clear()

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing can be reported from a finalizer
            pass

    @property
    def device(self) -> torch.device:
        """The device the slots live on (``cuda:N``, or ``cpu`` for the host backend)."""
        return self._device

    @property
    def backend(self) -> str:
        """``"cuda"`` or ``"host"``."""
        return "cuda" if self._cuda else "host"

    @property
    def num_slots(self) -> int:
        return self._core.num_slots

    @property
    def slot_bytes(self) -> int:
        """Size of each slot; 0 while auto-sized slots are not allocated yet."""
        return int(self.stats()["slot_bytes"]) if self.closed else int(self._core.slot_bytes())

    @property
    def closed(self) -> bool:
        return self._core is None or self._closed

    def __repr__(self) -> str:
        if self._core is None:
            return "TransferEngine(<failed to initialize>)"
        if self._closed:
            return f"TransferEngine(device={self._device}, closed)"
        s = self.stats()
        return (f"TransferEngine(device={self._device}, backend={s['backend']}, num_slots={s['num_slots']}, "
                f"slot_bytes={s['slot_bytes']}, items={s['items']}, registered_bytes={s['registered_bytes']}, "
                f"pinned={s['pinned']})")

    # ------------------------------------------------------------------ internals

    def _open_core(self):
        if self._closed or self._core is None:
            raise RuntimeError("this TransferEngine is closed")
        return self._core

    def _stream_handle(self, stream: Any) -> int:
        if not self._cuda:
            if stream is not None:
                raise ValueError("a host (device='cpu') TransferEngine has no streams: pass stream=None")
            return 0
        if stream is None:
            return int(torch.cuda.current_stream(self._device).cuda_stream)
        if isinstance(stream, bool):
            raise TypeError("stream must be a torch.cuda.Stream, a cudaStream_t int or None")
        if isinstance(stream, int):
            return stream  # a raw handle; the native side checks its device
        handle = getattr(stream, "cuda_stream", None)
        if handle is None:
            raise TypeError(f"stream must be a torch.cuda.Stream, a cudaStream_t int or None, not "
                            f"{type(stream).__name__}")
        stream_device = getattr(stream, "device", None)
        if stream_device is not None and torch.device(stream_device) != self._device:
            raise ValueError(f"the stream is on {stream_device} but this TransferEngine is on {self._device}")
        return int(handle)

    def _replace_slots(self, core) -> None:
        """(Re)allocate the slots for the largest registered item. Not a steady-state path: replacing
        memory waits for the copies and consumers that may still use the old slots."""
        if self._slots is not None:
            core.detach_slots()  # raises while a slot is in use
            self._slots = None
            self._slot_capacity = 0
        self._allocate_slots(core.slot_bytes_needed())

    def _allocate_slots(self, nbytes: int) -> None:
        core = self._core
        # Slots are allocated on first use, which may come inside a torch.func transform (jvp, vmap, grad):
        # without the guard its factory functions would return functorch wrappers, which have no storage.
        with torch._C._DisableFuncTorch():
            if self._cuda:
                with torch.cuda.device(self._device):
                    slots = [torch.empty(nbytes, dtype=torch.uint8, device=self._device)
                             for _ in range(core.num_slots)]
                    alloc_stream = int(torch.cuda.current_stream(self._device).cuda_stream)
            else:
                slots = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(core.num_slots)]
                alloc_stream = 0
        core.attach_slots([t.data_ptr() for t in slots], nbytes, alloc_stream)
        self._slots = slots
        self._slot_capacity = nbytes
