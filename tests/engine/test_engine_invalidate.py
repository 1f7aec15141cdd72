"""invalidate(h): rewriting an item's host bytes never lets a slot serve the old ones, a copy still in flight
is waited for, and the calls it refuses (prefetched, acquired) change nothing."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from .engine_helpers import Driver, random_bytes, register_random_items, run_random_schedule
from .test_engine_misuse import check_misuse


def cycle(eng, h) -> np.ndarray:
    eng.prefetch(h)
    out = eng.acquire(h).numpy().copy()
    eng.release(h)
    return out


def rewrite(eng, h, payload: bytes) -> None:
    """Overwrite the start of item h's first part in host storage."""
    eng.host_views(h)[0][:len(payload)].copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))


def test_resident_item_is_copied_again_after_invalidate(make_engine):
    eng = make_engine("cpu", num_slots=2)
    h = eng.register(b"old!" * 50)
    assert bytes(cycle(eng, h)) == b"old!" * 50
    assert eng.state(h) == "resident"
    assert eng.invalidate(h) is True
    assert eng.state(h) == "host"
    rewrite(eng, h, b"new!" * 50)
    assert eng.prefetch(h) is True  # a copy, not a hit on the stale slot
    assert bytes(eng.acquire(h).numpy()) == b"new!" * 50
    eng.release(h)
    assert eng.invalidate(h) is True and eng.invalidate(h) is False  # the second finds nothing to drop
    s = eng.stats()
    assert (s["copies"], s["hits"]) == (2, 0)


def test_without_invalidate_the_slot_serves_stale_bytes(make_engine):
    """Why invalidate exists: a rewrite alone leaves the resident slot's old bytes as a hit."""
    eng = make_engine("cpu", num_slots=1)
    h = eng.register(b"a" * 64)
    cycle(eng, h)
    rewrite(eng, h, b"b" * 64)
    assert bytes(cycle(eng, h)) == b"a" * 64


def test_the_emptied_slot_is_reused_before_evicting_a_valid_one(make_engine):
    """After invalidate(a), the next copy goes into a's emptied slot, not into the least recently released
    slot that still holds a valid item."""
    eng = make_engine("cpu", num_slots=2)
    a, b, c = (eng.register(bytes([i]) * 32) for i in range(3))
    cycle(eng, b), cycle(eng, a)          # b released first: plain LRU would evict b next
    assert eng.invalidate(a) is True
    cycle(eng, c)
    assert eng.state(b) == "resident" and eng.state(c) == "resident"
    assert eng.prefetch(b) is False       # still a hit
    eng.acquire(b), eng.release(b)


def test_invalidate_of_an_item_in_no_slot_is_a_no_op(make_engine):
    eng = make_engine("cpu", num_slots=1)
    a, b = eng.register(b"a" * 10), eng.register(b"b" * 10)
    assert eng.invalidate(a) is False  # never copied, and before any slot memory exists
    cycle(eng, a), cycle(eng, b)       # b evicts a
    assert eng.state(a) == "host" and eng.invalidate(a) is False
    assert eng.state(b) == "resident" and eng.prefetch(b) is False  # b's slot untouched


def test_invalidate_waits_for_a_cancelled_copy_in_flight(make_engine):
    """A cancelled prefetch's copy keeps reading the host bytes; invalidate returns only once it landed,
    also when the slot was handed to another item meanwhile."""
    eng = make_engine("cpu", num_slots=1)
    big, other = eng.register(bytes(96 << 20)), eng.register(b"x" * 100)
    eng.prefetch(big)
    eng.cancel(big)
    eng.prefetch(other)               # takes the slot: big is in no slot, but its copy may still run
    assert eng.state(big) == "host"
    assert eng.invalidate(big) is False
    s = eng.stats()
    assert s["copy_time_s"] > 0       # the worker had finished (and timed) the copy by then
    eng.acquire(other), eng.release(other)
    rewrite(eng, big, b"\x07" * 1000)
    out = cycle(eng, big)
    assert (out[:1000] == 7).all() and (out[1000:] == 0).all()


def test_invalidate_is_refused_while_prefetched_or_acquired(make_engine):
    eng = make_engine("cpu", num_slots=2)
    h, other = eng.register(b"h" * 300), eng.register(b"o" * 300)
    eng.prefetch(h)
    check_misuse(eng, [h, other], RuntimeError, "is prefetched: cancel", eng.invalidate, h)
    eng.acquire(h)
    check_misuse(eng, [h, other], RuntimeError, "is acquired: release it", eng.invalidate, h, roundtrip=False)
    eng.release(h)
    assert eng.state(h) == "resident" and eng.invalidate(h) is True


def test_invalidate_rejects_bad_handles_and_a_closed_engine(make_engine):
    eng = make_engine("cpu")
    h = eng.register(b"abc")
    with pytest.raises(ValueError, match="unknown handle"):
        eng.invalidate(-1)
    with pytest.raises(TypeError, match="handle"):
        eng.invalidate("1")
    other = make_engine("cpu")
    with pytest.raises(ValueError, match="another engine"):
        other.invalidate(h)
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.invalidate(h)


def test_multi_part_item_rewritten_part_by_part(make_engine):
    rng = np.random.default_rng(3)
    parts = [random_bytes(rng, n) for n in (700, 3, 5000)]
    eng = make_engine("cpu", num_slots=2)
    h = eng.register(parts)
    cycle(eng, h)
    new = [random_bytes(rng, p.nbytes) for p in parts]
    eng.invalidate(h)
    for view, p in zip(eng.host_views(h), new):
        view.copy_(torch.from_numpy(p))
    out = cycle(eng, h)
    for (off, n), p in zip(eng.item_parts(h), new):
        np.testing.assert_array_equal(out[off:off + n], p)


@pytest.mark.parametrize("seed, num_slots", [(0, 1), (1, 2), (2, 3)])
def test_random_schedules_with_rewrites(make_engine, seed, num_slots):
    """The reference-model schedules with invalidate-and-rewrite steps mixed in: every acquired view must
    carry the item's latest bytes."""
    eng = make_engine("cpu", num_slots=num_slots)
    drv = Driver(eng, num_slots)
    handles = register_random_items(drv, np.random.default_rng(seed), count=200, max_bytes=1 << 18)
    run_random_schedule(drv, handles, random.Random(seed), steps=3000, rewrite=np.random.default_rng(seed + 100))
    drv.check_states()
    drv.check_stats()
