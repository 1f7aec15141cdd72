"""Host memory accounting of the transfer engine: exact-size storage, nothing left behind after close."""

from __future__ import annotations

import ctypes
import gc

import numpy as np
import pytest

from offload_kernels import _native
from offload_kernels.engine import TransferEngine, force_pin_failure, live_host_memory

from .engine_helpers import log_uniform_sizes, random_bytes

PAGE = 4096


def rss_bytes() -> int:
    """Resident set size after returning free heap memory to the OS (so allocator caching is not counted)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def test_register_many_is_exact_size(make_engine):
    rng = np.random.default_rng(0)
    sizes = log_uniform_sizes(rng, 100, 64 << 10, 4 << 20)
    eng = make_engine("cpu")
    eng.register_many([np.zeros(n, np.uint8) for n in sizes])
    s = eng.stats()
    assert s["registered_bytes"] == sum(sizes)
    assert s["host_bytes"] <= 1.02 * s["registered_bytes"]
    # one arena: payload + < 256 bytes of alignment per item + < 1 page
    assert s["host_bytes"] < sum(sizes) + 256 * len(sizes) + PAGE
    assert live_host_memory()["arenas"] >= 1


def test_register_rounds_to_a_page_not_a_power_of_two(make_engine):
    eng = make_engine("cpu")
    n = (3 << 20) // 2 + 1  # torch's pinned allocator would reserve 2 MiB for this
    eng.register(np.zeros(n, np.uint8))
    assert eng.stats()["host_bytes"] == -(-n // PAGE) * PAGE


def test_single_registrations_of_large_items_stay_within_two_percent(make_engine):
    rng = np.random.default_rng(1)
    eng = make_engine("cpu")
    for n in log_uniform_sizes(rng, 50, 200 << 10, 8 << 20):
        eng.register(np.zeros(n, np.uint8))
    s = eng.stats()
    assert s["host_bytes"] <= 1.02 * s["registered_bytes"]


def test_small_registrations_share_pages(make_engine):
    eng = make_engine("cpu")
    for i in range(100):
        eng.register(bytes([i]) * 10)
    # each item starts on a 256-byte boundary: 100 items fit in 25,600 bytes, i.e. 7 pages, not 100
    assert eng.stats()["host_bytes"] <= 7 * PAGE


def test_close_frees_every_host_byte():
    before = live_host_memory()
    eng = TransferEngine("cpu", num_slots=3)
    handles = eng.register_many([bytes(n) for n in (10, 100_000, 3_000_000)])
    handles.append(eng.register(bytes(5_000_000)))
    for h in handles:
        eng.prefetch(h), eng.acquire(h), eng.release(h)
    during = live_host_memory()
    assert during["pageable_bytes"] - before["pageable_bytes"] == eng.stats()["host_bytes"] > 8_000_000
    eng.close()
    assert live_host_memory() == before
    s = eng.stats()
    assert (s["host_bytes"], s["pinned_bytes"], s["device_bytes"], s["registered_bytes"]) == (0, 0, 0, 0)
    with pytest.raises(RuntimeError, match="closed"):
        eng.item_nbytes(handles[0])


def test_an_engine_dropped_without_close_frees_its_memory():
    before = live_host_memory()
    eng = TransferEngine("cpu")
    h = eng.register(bytes(1_000_000))
    eng.prefetch(h)  # a copy may still be in flight when the engine goes away
    del eng
    gc.collect()
    assert live_host_memory() == before


def test_host_views_outlive_close_and_then_free_their_storage():
    before = live_host_memory()
    eng = TransferEngine("cpu")
    h = eng.register([bytes(range(256)) * 40, b"tail"])
    views = eng.host_views(h)
    eng.close()
    assert live_host_memory()["pageable_bytes"] > before["pageable_bytes"]  # held by the views
    assert bytes(views[0][:256].numpy()) == bytes(range(256)) and bytes(views[1].numpy()) == b"tail"
    del views
    gc.collect()
    assert live_host_memory() == before


def test_repeated_create_close_does_not_grow_the_process():
    payload = random_bytes(np.random.default_rng(2), 8 << 20)

    def one_cycle():
        with TransferEngine("cpu", num_slots=2) as eng:
            a, b = eng.register_many([payload, payload[: 1 << 20]])
            for h in (a, b, a):
                eng.prefetch(h)
                assert eng.acquire(h)[-1] == payload[eng.item_nbytes(h) - 1]
                eng.release(h)

    for _ in range(3):  # warm up allocator caches
        one_cycle()
    baseline, live_before = rss_bytes(), live_host_memory()
    for _ in range(40):  # leaking a cycle's 9 MiB of host storage or 16 MiB of slots would add 360+ MiB
        one_cycle()
    growth = rss_bytes() - baseline
    assert growth < 64 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 40 create/close cycles"
    assert live_host_memory() == live_before


def test_force_pin_failure_hook_toggles_and_restores():
    native = _native.native_module()
    assert native._force_pin_failure() is False
    with force_pin_failure():
        assert native._force_pin_failure() is True
        with force_pin_failure():
            assert native._force_pin_failure() is True
        assert native._force_pin_failure() is True
        # the host backend never pins, so the hook changes nothing for it
        with TransferEngine("cpu") as eng:
            eng.register(bytes(100_000))
            assert eng.stats()["pinned"] is False
    assert native._force_pin_failure() is False
