"""Misuse of the transfer engine raises a clear exception, changes nothing, and leaves the engine usable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload_kernels.engine import TransferEngine

from .engine_helpers import BUILT_WITH_CUDA, HAS_CUDA


@pytest.fixture
def eng(make_engine):
    return make_engine("cpu", num_slots=2)


def snapshot(eng: TransferEngine, handles: list[int]) -> tuple:
    s = eng.stats()
    keys = ("copies", "hits", "bytes_copied", "items", "registered_bytes", "host_bytes", "device_bytes")
    return tuple(s[k] for k in keys), tuple(eng.state(h) for h in handles)


def assert_still_works(eng: TransferEngine) -> None:
    """A full register/prefetch/acquire/release round trip with byte verification, sized to fit the slots
    as they are (they cannot grow while the test holds some of them)."""
    size = min(1234, eng.slot_bytes) if eng.slot_bytes else 1234
    payload = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
    h = eng.register(payload)
    for _ in range(2):  # a copy, then a hit
        eng.prefetch(h)
        np.testing.assert_array_equal(eng.acquire(h).numpy(), payload)
        eng.release(h)


def check_misuse(eng, handles, exc, match, fn, *args, roundtrip=True):
    """`fn(*args)` raises `exc` matching `match`, leaves counters, memory and item states as they were, and
    (with `roundtrip`, i.e. when a slot is free) the engine still moves bytes correctly."""
    before = snapshot(eng, handles)
    with pytest.raises(exc, match=match):
        fn(*args)
    assert snapshot(eng, handles) == before, "a rejected call changed the engine's state"
    if roundtrip:
        assert_still_works(eng)


def test_acquire_without_prefetch(eng):
    h = eng.register(b"x" * 100)
    check_misuse(eng, [h], RuntimeError, "never prefetched, or evicted", eng.acquire, h)


def test_acquire_after_eviction(eng):
    a, b, c = (eng.register(bytes([i]) * 64) for i in range(3))
    for h in (a, b, c):  # a is evicted to make room for c
        eng.prefetch(h), eng.acquire(h), eng.release(h)
    assert eng.state(a) == "host"
    check_misuse(eng, [a, b, c], RuntimeError, "evicted", eng.acquire, a)


def test_acquire_of_resident_but_released_item_needs_a_prefetch(eng):
    h = eng.register(b"abc")
    eng.prefetch(h), eng.acquire(h), eng.release(h)
    check_misuse(eng, [h], RuntimeError, "needs its own prefetch", eng.acquire, h)


def test_double_acquire(eng):
    h = eng.register(b"abc")
    eng.prefetch(h)
    eng.acquire(h)
    check_misuse(eng, [h], RuntimeError, "already acquired", eng.acquire, h)
    eng.release(h)


def test_prefetch_of_acquired_item(eng):
    h = eng.register(b"abc")
    eng.prefetch(h)
    eng.acquire(h)
    check_misuse(eng, [h], RuntimeError, "is acquired; release it", eng.prefetch, h)
    eng.release(h)


def test_double_release(eng):
    h = eng.register(b"abc")
    eng.prefetch(h), eng.acquire(h), eng.release(h)
    check_misuse(eng, [h], RuntimeError, "not acquired", eng.release, h)


def test_release_of_prefetched_or_host_item(eng):
    a, b = eng.register(b"a"), eng.register(b"b")
    eng.prefetch(a)
    check_misuse(eng, [a, b], RuntimeError, r"not acquired \(it is prefetched\)", eng.release, a)
    check_misuse(eng, [a, b], RuntimeError, r"not acquired \(it is host\)", eng.release, b)
    eng.cancel(a)


def test_cancel_of_unprefetched_item(eng):
    h = eng.register(b"abc")
    check_misuse(eng, [h], RuntimeError, "not prefetched", eng.cancel, h)


def test_all_slots_in_use_raises_instead_of_deadlocking(eng):
    a, b, c = (eng.register(bytes([i]) * 10) for i in range(3))
    eng.prefetch(a)
    eng.acquire(a)
    eng.prefetch(b)
    check_misuse(eng, [a, b, c], RuntimeError,
                 r"all 2 slots are in use \(1 prefetched, 1 acquired\): release one first or use more slots",
                 eng.prefetch, c, roundtrip=False)
    eng.release(a)
    assert eng.prefetch(c) is True  # a's slot is free again
    eng.acquire(b), eng.release(b), eng.acquire(c), eng.release(c)


@pytest.mark.parametrize("bad", [12345, -1, 2**63, 2**70, (1 << 32) | 0])
def test_unknown_handles(eng, bad):
    h = eng.register(b"abc")
    for method in (eng.prefetch, eng.acquire, eng.release, eng.cancel, eng.item_nbytes, eng.item_parts, eng.state,
                   eng.host_views):
        check_misuse(eng, [h], ValueError, "handle", method, bad)


def test_handle_of_another_engine(make_engine, eng):
    other = make_engine("cpu")
    foreign = other.register(b"other")
    mine = eng.register(b"mine")
    check_misuse(eng, [mine], ValueError, "another engine", eng.prefetch, foreign)
    other.prefetch(foreign)
    assert bytes(other.acquire(foreign).numpy()) == b"other"
    other.release(foreign)


@pytest.mark.parametrize("bad", ["1", 1.0, None, True, [1], object()])
def test_handles_of_the_wrong_type(eng, bad):
    h = eng.register(b"abc")
    for method in (eng.prefetch, eng.acquire, eng.release, eng.item_nbytes, eng.state):
        check_misuse(eng, [h], TypeError, "handle", method, bad)


def test_numpy_integer_handles_are_accepted(eng):
    h = eng.register(b"abc")
    eng.prefetch(np.int64(h))
    assert bytes(eng.acquire(np.uint64(h)).numpy()) == b"abc"
    eng.release(h)


@pytest.mark.parametrize("data, exc, match", [
    (torch.arange(12.0).reshape(3, 4).t(), ValueError, "not contiguous"),
    (np.arange(12.0).reshape(3, 4).T, ValueError, "non-contiguous numpy"),
    (memoryview(bytes(range(10)))[::2], ValueError, "non-contiguous memoryview"),
    (torch.empty(0), ValueError, r"empty \(0 bytes\)"),
    (np.empty((3, 0)), ValueError, r"empty \(0 bytes\)"),
    (b"", ValueError, r"empty \(0 bytes\)"),
    ([], ValueError, "empty list"),
    ([b"ok", b""], ValueError, r"part 1 of the item is empty"),
    ("text", TypeError, "of type str"),
    (42, TypeError, "of type int"),
    ({"a": b"x"}, TypeError, "of type dict"),
    ([[b"nested"]], TypeError, "cannot be nested"),
    (np.array([object()]), TypeError, "Python objects"),
    (torch.empty(4, device="meta"), ValueError, "tensor on meta"),
    (torch.eye(3).to_sparse(), TypeError, "sparse"),
])
def test_register_rejects_bad_data(eng, data, exc, match):
    check_misuse(eng, [], exc, match, eng.register, data)


def test_register_many_rejects_everything_if_one_item_is_bad(eng):
    check_misuse(eng, [], ValueError, r"item 2 is empty", eng.register_many, [b"a", b"b", b"", b"d"])
    check_misuse(eng, [], TypeError, "register_many takes a list", eng.register_many, b"abc")
    check_misuse(eng, [], ValueError, "empty", eng.register_many, [])


def test_item_larger_than_fixed_slots(make_engine):
    eng = make_engine("cpu", num_slots=2, slot_bytes=1000)
    h = eng.register(bytes(1000))
    check_misuse(eng, [h], ValueError, "needs 1001 bytes but the slots hold 1000 bytes", eng.register, bytes(1001))
    # parts count with their alignment padding: 600 + pad to 768 + 300 > 1000
    check_misuse(eng, [h], ValueError, "needs 1068 bytes", eng.register, [bytes(600), bytes(300)])


def test_item_larger_than_slots_in_use(eng):
    h = eng.register(bytes(500))
    eng.prefetch(h)
    eng.acquire(h)
    check_misuse(eng, [h], ValueError, "cannot grow while 1 of them are in use", eng.register, bytes(501))
    eng.release(h)
    big = eng.register(bytes(501))  # no slot in use: accepted, slots grow at the next prefetch
    eng.prefetch(big), eng.acquire(big), eng.release(big)
    assert eng.slot_bytes == 501


def test_streams_are_rejected_by_the_host_backend(eng):
    h = eng.register(b"abc")
    eng.prefetch(h)
    check_misuse(eng, [h], ValueError, "has no streams", eng.acquire, h, 1234)
    eng.acquire(h)
    check_misuse(eng, [h], ValueError, "has no streams", eng.release, h, object())
    eng.release(h)


def test_every_call_after_close_raises(make_engine):
    eng = make_engine("cpu")
    h = eng.register(b"abc")
    eng.close()
    calls = [(eng.register, b"x"), (eng.register_many, [b"x"]), (eng.prefetch, h), (eng.acquire, h),
             (eng.release, h), (eng.cancel, h), (eng.item_nbytes, h), (eng.item_parts, h), (eng.state, h),
             (eng.host_views, h),
             (eng.synchronize,), (eng.reset_stats,)]
    for fn, *args in calls:
        with pytest.raises(RuntimeError, match="closed"):
            fn(*args)
    assert eng.stats()["host_bytes"] == 0  # stats still answers, with nothing left


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"num_slots": 0}, ValueError, "num_slots must be >= 1"),
    ({"num_slots": -3}, ValueError, "num_slots must be >= 1"),
    ({"num_slots": "2"}, TypeError, "num_slots must be an int"),
    ({"num_slots": 2.0}, TypeError, "num_slots must be an int"),
    ({"slot_bytes": 0}, ValueError, "slot_bytes must be >= 1"),
    ({"slot_bytes": 1.5}, TypeError, "slot_bytes must be an int"),
    ({"device": "meta"}, ValueError, "'cuda' or 'cpu'"),
    ({"device": "not-a-device"}, ValueError, "invalid device"),
    ({"device": 3.0}, TypeError, "device must be"),
])
def test_constructor_rejects_bad_arguments(kwargs, exc, match):
    args = {"device": "cpu", **kwargs}
    with pytest.raises(exc, match=match):
        TransferEngine(**args)


@pytest.mark.skipif(torch.cuda.is_available() and BUILT_WITH_CUDA, reason="a CUDA device is usable here")
def test_cuda_engine_without_a_usable_gpu_names_the_reason():
    expected = "torch sees no CUDA device" if BUILT_WITH_CUDA else "built host-only"
    for device in ("cuda", "cuda:0", torch.device("cuda"), 0):
        with pytest.raises(RuntimeError, match=expected):
            TransferEngine(device=device)


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is usable here")
def test_spin_helpers_need_cuda():
    from offload_kernels.engine import calibrate_spin, spin
    for call in (lambda: spin(1000), calibrate_spin):
        with pytest.raises(RuntimeError, match="host-only|torch sees none"):
            call()


@pytest.mark.skipif(BUILT_WITH_CUDA, reason="checks the host-only build")
def test_host_only_build_has_no_spin_kernel():
    from offload_kernels import _native
    with pytest.raises(RuntimeError, match="host-only"):
        _native.native_module().spin(1000, 0, 0)
