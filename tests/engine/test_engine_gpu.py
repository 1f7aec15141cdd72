"""The transfer engine's CUDA backend: the protocol with byte checks on the device, cross-stream fences,
copy/compute overlap, a hot path that never blocks the host, pinned-memory accounting and fallback, and
clean-up. Skipped without a CUDA device and the CUDA build of the extension.

No assertion here is about speed (that is bench/'s job: `offload-kernels bench transfer`). Overlap and a
non-blocking host are shown by stream state instead: a long spin kernel keeps a stream busy, and what must
(or must not) have finished while it runs is checked with stream queries. Those checks are skipped under
compute-sanitizer (OFFLOAD_KERNELS_UNDER_SANITIZER=1), which serializes GPU work; see
run_compute_sanitizer.sh.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from offload_kernels.engine import (PinnedMemoryFallbackWarning, TransferEngine, calibrate_spin,
                                    force_pin_failure, live_host_memory, spin)

from .engine_helpers import (CUDA_SKIP_REASON, HAS_CUDA, UNDER_SANITIZER, Driver, random_bytes,
                             register_random_items, run_random_schedule)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)]
concurrent = pytest.mark.skipif(UNDER_SANITIZER, reason="compute-sanitizer serializes GPU work")

MiB = 1 << 20


@pytest.fixture(scope="module")
def cycles_per_ms() -> float:
    return calibrate_spin()


def on_device(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).cuda()


class DeviceChecks:
    """Compares acquired views with the expected bytes on the consumer stream, without synchronizing, so a
    slot overwritten too early shows up as a mismatch instead of being hidden by a sync."""

    def __init__(self, expected: dict[int, np.ndarray]) -> None:
        self.expected = {h: on_device(a) for h, a in expected.items()}
        self.mismatches = torch.zeros((), dtype=torch.int64, device="cuda")
        self.checked = 0
        torch.cuda.synchronize()

    def __call__(self, h: int, view: torch.Tensor) -> None:
        assert view.device.type == "cuda" and view.dtype == torch.uint8
        assert view.numel() == self.expected[h].numel()
        self.mismatches += (view != self.expected[h]).sum()
        self.checked += 1

    def assert_clean(self) -> None:
        torch.cuda.synchronize()
        assert self.checked > 0
        assert int(self.mismatches.item()) == 0, f"{int(self.mismatches.item())} bytes differed"


@pytest.mark.parametrize("seed, num_slots", [(0, 2), (1, 3), (2, 4)])
def test_random_schedules_verified_on_device(make_engine, seed, num_slots):
    eng = make_engine("cuda", num_slots=num_slots)
    drv = Driver(eng, num_slots)
    handles = register_random_items(drv, np.random.default_rng(seed), count=160, max_bytes=4 * MiB)
    checks = DeviceChecks(drv.expected)
    drv.verify = checks
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        run_random_schedule(drv, handles, random.Random(seed), steps=2000)
    checks.assert_clean()
    drv.check_states()
    eng.synchronize()
    drv.check_stats()
    assert eng.stats()["backend"] == "cuda" and eng.stats()["pinned"] is True


def test_pipeline_with_lagging_consumer(make_engine, cycles_per_ms):
    """The consumer stream runs behind (a spin before each check): copies into a slot must wait for it."""
    rng = np.random.default_rng(3)
    sources = [random_bytes(rng, n) for n in rng.integers(1, 8 * MiB, size=24)]
    eng = make_engine("cuda", num_slots=2)
    handles = eng.register_many(sources)
    checks = DeviceChecks(dict(zip(handles, sources)))
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        eng.prefetch(handles[0])
        for i, h in enumerate(handles):
            if i + 1 < len(handles):
                eng.prefetch(handles[i + 1])
            view = eng.acquire(h)
            spin(int(cycles_per_ms * 2), compute)
            checks(h, view)
            eng.release(h)
    checks.assert_clean()
    eng.synchronize()
    assert eng.stats()["slot_wait_s"] > 0  # copies did wait for the lagging consumer


def test_default_stream_and_raw_stream_handles(make_engine):
    rng = np.random.default_rng(4)
    a_src, b_src = random_bytes(rng, 3 * MiB + 5), random_bytes(rng, 1000)
    eng = make_engine("cuda")
    a, b = eng.register_many([a_src, b_src])
    eng.prefetch(a)
    view = eng.acquire(a)  # the current (default) stream
    assert torch.equal(view.cpu(), torch.from_numpy(a_src))
    eng.release(a)
    side = torch.cuda.Stream()
    eng.prefetch(b)
    view = eng.acquire(b, stream=side.cuda_stream)  # a raw cudaStream_t
    with torch.cuda.stream(side):
        got = view.cpu()
    eng.release(b, stream=side.cuda_stream)
    assert torch.equal(got, torch.from_numpy(b_src))


def test_every_stream_that_read_a_slot_is_waited_for(make_engine, cycles_per_ms):
    """Two streams read the same resident item; the fast one releases first. The next copy into that slot
    must also wait for the slow one (slot-free fences are kept per consumer stream)."""
    rng = np.random.default_rng(5)
    x_src, y_src = random_bytes(rng, 8 * MiB), random_bytes(rng, 8 * MiB)
    eng = make_engine("cuda", num_slots=1)
    x, y = eng.register_many([x_src, y_src])
    slow_checks, fast_checks = DeviceChecks({x: x_src, y: y_src}), DeviceChecks({x: x_src, y: y_src})
    slow, fast = torch.cuda.Stream(), torch.cuda.Stream()

    eng.prefetch(x)
    with torch.cuda.stream(slow):
        view = eng.acquire(x)
        spin(int(cycles_per_ms * 50), slow)  # the slow reader reads only after 50 ms
        slow_checks(x, view)
        eng.release(x)
    assert eng.prefetch(x) is False  # hit
    with torch.cuda.stream(fast):
        fast_checks(x, eng.acquire(x))
        eng.release(x)
    assert eng.prefetch(y) is True  # overwrites the slot: must wait for slow as well as fast
    with torch.cuda.stream(fast):
        fast_checks(y, eng.acquire(y))
        eng.release(y)
    slow_checks.assert_clean()
    fast_checks.assert_clean()


def test_invalidate_waits_for_a_copy_in_flight_and_drops_the_stale_slot(make_engine, cycles_per_ms):
    """A copy held back 100 ms behind a slow consumer is cancelled; invalidate must block until it has read
    the host bytes, and the rewritten bytes must be what the next prefetch brings."""
    rng = np.random.default_rng(9)
    a_src, b_src, b_new = random_bytes(rng, 4 * MiB), random_bytes(rng, 4 * MiB), random_bytes(rng, 4 * MiB)
    eng = make_engine("cuda", num_slots=1)
    a, b = eng.register_many([a_src, b_src])
    checks = DeviceChecks({a: a_src, b: b_new})
    consumer = torch.cuda.Stream()
    with torch.cuda.stream(consumer):
        eng.prefetch(a)
        eng.acquire(a)
        spin(int(cycles_per_ms * 100), consumer)
        eng.release(a)               # the slot is free only after the spin
        assert eng.prefetch(b) is True  # its copy waits ~100 ms for the slot
        eng.cancel(b)
        assert eng.invalidate(b) is True
        # The cancelled copy waited for the spin (its slot's release); invalidate waited for that copy, so
        # the spin is over. Had invalidate returned at once, the 100 ms spin would still be running.
        assert consumer.query(), "invalidate returned before the copy in flight had landed"
        eng.host_views(b)[0].copy_(torch.from_numpy(b_new))
        assert eng.prefetch(b) is True  # not a hit on the old bytes
        checks(b, eng.acquire(b))
        eng.release(b)
    checks.assert_clean()
    assert eng.state(b) == "resident" and eng.invalidate(b) is True and eng.state(b) == "host"


@concurrent
def test_copy_completes_while_a_kernel_runs(make_engine, cycles_per_ms):
    """Evidence of overlap: a copy enqueued while a long kernel occupies the consumer stream lands while
    that kernel is still running, and its bytes are right once the consumer reads them."""
    rng = np.random.default_rng(8)
    a_src, b_src = random_bytes(rng, 16 * MiB), random_bytes(rng, 16 * MiB)
    eng = make_engine("cuda", num_slots=2)
    a, b = eng.register_many([a_src, b_src])
    checks = DeviceChecks({a: a_src, b: b_src})
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        eng.prefetch(a), eng.acquire(a), eng.release(a)     # slots allocated; a's slot free before the spin
        eng.synchronize()
        spin(int(cycles_per_ms * 500), compute)             # the consumer stream is busy for ~0.5 s
        assert eng.prefetch(b) is True                      # a copy into the other slot: nothing to wait for
        eng.synchronize()                                   # waits for copies and earlier releases only
        assert not compute.query(), "the copy did not finish while the kernel was running"
        checks(b, eng.acquire(b))
        eng.release(b)
    checks.assert_clean()


@concurrent
def test_hot_path_never_blocks_the_host(make_engine, cycles_per_ms):
    eng = make_engine("cuda", num_slots=2)
    handles = eng.register_many([np.full(16 * MiB, i, np.uint8) for i in range(3)])
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        for h in handles:  # warm up: slots allocated, each item copied once
            eng.prefetch(h), eng.acquire(h), eng.release(h)
        torch.cuda.synchronize()
        spin(int(cycles_per_ms * 300), compute)  # the consumer stream is busy for 300 ms
        for i in range(9):
            h = handles[i % 3]
            eng.prefetch(h)
            eng.acquire(h)
            eng.release(h)
            eng.stats()
        # Nine prefetch/acquire/release cycles, each depending on GPU work, were enqueued without the host
        # waiting for any of it: the 300 ms spin is still running.
        assert not compute.query(), "the host blocked on GPU work in the prefetch/acquire/release cycle"
    eng.synchronize()


@concurrent
def test_timings_are_measured(make_engine, cycles_per_ms):
    eng = make_engine("cuda", num_slots=1)
    a, b = eng.register_many([np.zeros(64 * MiB, np.uint8), np.ones(64 * MiB, np.uint8)])
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        eng.prefetch(a), eng.acquire(a), eng.release(a)
        eng.synchronize()
        eng.reset_stats()
        eng.prefetch(a)  # a hit
        eng.acquire(a)
        spin(int(cycles_per_ms * 20), compute)
        eng.release(a)  # the slot frees 20 ms from now
        eng.prefetch(b)  # its copy waits for that
        eng.acquire(b)  # and the consumer, reaching this point as the copy starts, waits for all of it
        eng.release(b)
    eng.synchronize()
    s = eng.stats()
    assert (s["copies"], s["hits"], s["bytes_copied"]) == (1, 1, 64 * MiB)
    assert s["slot_wait_s"] > 0             # the copy of b waited for the spin to free the slot
    assert s["consumer_wait_s"] > 0 and s["copy_time_s"] > 0   # every wait and copy was timed


def test_pinned_bytes_are_exact(make_engine):
    rng = np.random.default_rng(6)
    sizes = [int(x) for x in rng.integers(64 << 10, 4 * MiB, size=64)]
    before = live_host_memory()
    eng = make_engine("cuda")
    handles = eng.register_many([np.zeros(n, np.uint8) for n in sizes])
    single = eng.register(np.zeros(300_001, np.uint8))
    s = eng.stats()
    assert s["pinned"] is True
    assert all(v.is_pinned() for v in eng.host_views(handles[0]) + eng.host_views(single))  # as CUDA sees it
    assert s["registered_bytes"] == sum(sizes) + 300_001
    assert s["pinned_bytes"] == s["host_bytes"] <= 1.02 * s["registered_bytes"]
    assert live_host_memory()["pinned_bytes"] - before["pinned_bytes"] == s["pinned_bytes"]
    eng.close()
    assert live_host_memory() == before


def test_pinning_failure_falls_back_to_pageable_memory(make_engine):
    rng = np.random.default_rng(7)
    sources = [random_bytes(rng, n) for n in (5 * MiB, 12345)]
    eng = make_engine("cuda")
    with force_pin_failure(), pytest.warns(PinnedMemoryFallbackWarning, match="pageable memory.*half"):
        handles = eng.register_many(sources)
    s = eng.stats()
    assert s["pinned"] is False and s["pinned_bytes"] == 0 and s["host_bytes"] >= sum(x.nbytes for x in sources)
    assert not eng.host_views(handles[0])[0].is_pinned()
    checks = DeviceChecks(dict(zip(handles, sources)))
    for _ in range(2):
        for h in handles:
            eng.prefetch(h)
            checks(h, eng.acquire(h))
            eng.release(h)
    checks.assert_clean()
    late = eng.register(np.zeros(MiB, np.uint8))  # too big for the old arena's tail; pinned again
    assert eng.stats()["pinned_bytes"] > 0
    eng.prefetch(late), eng.acquire(late), eng.release(late)


def test_close_frees_device_and_pinned_memory(cycles_per_ms):
    torch.cuda.synchronize()
    device_before, host_before = torch.cuda.memory_allocated(), live_host_memory()
    eng = TransferEngine("cuda", num_slots=3)
    a, b = eng.register_many([np.zeros(10 * MiB, np.uint8), np.ones(MiB, np.uint8)])
    eng.prefetch(a), eng.acquire(a), eng.release(a)
    assert torch.cuda.memory_allocated() - device_before == 3 * 10 * MiB == eng.stats()["device_bytes"]
    eng.prefetch(b)
    eng.acquire(b)
    spin(int(cycles_per_ms * 20))  # close() with a slot still acquired waits for the device
    eng.close()
    assert torch.cuda.memory_allocated() == device_before
    assert live_host_memory() == host_before
    eng.close()


def test_repeated_create_close_keeps_memory_flat():
    torch.cuda.synchronize()
    device_before, host_before = torch.cuda.memory_allocated(), live_host_memory()
    for i in range(20):
        with TransferEngine("cuda", num_slots=2) as eng:
            h = eng.register(np.full(4 * MiB, i, np.uint8))
            eng.prefetch(h)
            assert int(eng.acquire(h)[-1].item()) == i
            eng.release(h)
    assert torch.cuda.memory_allocated() == device_before
    assert live_host_memory() == host_before


def test_current_device_is_left_alone(make_engine):
    device = torch.cuda.current_device()
    target = torch.cuda.device_count() - 1  # another device when there are several
    eng = make_engine(f"cuda:{target}")
    h = eng.register(b"abc" * 1000)
    eng.prefetch(h)
    with torch.cuda.device(target):
        assert bytes(eng.acquire(h).cpu().numpy()) == b"abc" * 1000
    eng.release(h, stream=torch.cuda.current_stream(target))
    eng.synchronize()
    assert torch.cuda.current_device() == device


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_stream_of_another_device_is_rejected(make_engine):
    eng = make_engine("cuda:0")
    h = eng.register(b"abc")
    eng.prefetch(h)
    other = torch.cuda.Stream(device=1)
    with pytest.raises(ValueError, match="cuda:1"):
        eng.acquire(h, stream=other)
    with pytest.raises(ValueError, match="cuda:1"):
        eng.acquire(h, stream=other.cuda_stream)  # raw handle: checked natively
    eng.acquire(h)
    eng.release(h)


def test_spin_calibration_is_plausible(cycles_per_ms):
    assert 1e5 < cycles_per_ms < 1e7  # GPU clocks are 0.1 to 10 GHz
    if UNDER_SANITIZER:
        return
    stream = torch.cuda.current_stream()
    spin(int(cycles_per_ms * 200))     # what the other tests rely on: a long spin keeps its stream busy
    assert not stream.query()
    stream.synchronize()
    assert stream.query()
