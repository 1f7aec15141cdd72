"""The transfer-engine protocol on the host backend (runs everywhere, in both builds of the extension)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload_kernels.engine import TransferEngine

from .engine_helpers import expected_item_bytes, random_bytes


def cycle(eng: TransferEngine, h: int) -> np.ndarray:
    """prefetch/acquire/release; returns a copy of the bytes the slot held."""
    eng.prefetch(h)
    view = eng.acquire(h)
    data = view.numpy().copy()
    eng.release(h)
    return data


def test_register_accepts_every_host_buffer_type(make_engine):
    eng = make_engine("cpu")
    t = torch.arange(-500, 500, dtype=torch.bfloat16)
    arr = np.arange(777, dtype=np.float64).reshape(7, 111)
    sources = {
        "tensor": (t, t.view(torch.uint8).numpy()),
        "bool tensor": (torch.tensor([True, False, True]), np.array([1, 0, 1], np.uint8)),
        "numpy 2-D": (arr, arr.view(np.uint8).reshape(-1)),
        "bytes": (b"\x00\x01hello", np.frombuffer(b"\x00\x01hello", np.uint8)),
        "bytearray": (bytearray(range(200)), np.arange(200, dtype=np.uint8)),
        "memoryview of float array": (memoryview(np.ones((3, 5), np.float32)), np.ones(15, np.float32).view(np.uint8)),
        "0-d tensor": (torch.tensor(3.5), np.array([3.5], np.float32).view(np.uint8)),
    }
    for name, (src, expected) in sources.items():
        h = eng.register(src)
        assert eng.item_nbytes(h) == expected.nbytes, name
        assert eng.item_parts(h) == [(0, expected.nbytes)], name
        np.testing.assert_array_equal(cycle(eng, h), expected, err_msg=name)


def test_register_copies_the_bytes_so_the_source_can_change(make_engine):
    eng = make_engine("cpu")
    src = torch.arange(4096, dtype=torch.int32)
    h = eng.register(src)
    original = src.clone()
    src.fill_(-1)
    assert torch.equal(torch.from_numpy(cycle(eng, h)).view(torch.int32), original)


def test_multi_part_items_are_aligned_and_zero_padded(make_engine):
    rng = np.random.default_rng(1)
    eng = make_engine("cpu", num_slots=2)
    parts = [random_bytes(rng, n) for n in (1, 255, 256, 257, 1000, 3)]
    h = eng.register([torch.from_numpy(parts[0]), parts[1], bytes(parts[2]), bytearray(parts[3]),
                      memoryview(parts[4]), parts[5]])
    expected = expected_item_bytes(parts)
    assert eng.item_nbytes(h) == expected.nbytes
    offsets = [off for off, _ in eng.item_parts(h)]
    assert offsets == [0, 256, 512, 768, 1280, 2304]
    assert all(off % 256 == 0 for off in offsets)
    assert [n for _, n in eng.item_parts(h)] == [p.nbytes for p in parts]
    view = (eng.prefetch(h), eng.acquire(h))[1]
    np.testing.assert_array_equal(view.numpy(), expected)
    for (off, n), p in zip(eng.item_parts(h), parts):  # each part sliced back out of the view
        np.testing.assert_array_equal(view[off:off + n].numpy(), p)
    eng.release(h)
    assert eng.stats()["registered_bytes"] == sum(p.nbytes for p in parts)


def test_register_many_returns_handles_in_order(make_engine):
    rng = np.random.default_rng(2)
    eng = make_engine("cpu", num_slots=3)
    items = [random_bytes(rng, n) for n in (10, 70_000, 3, 129_000)]
    handles = eng.register_many([items[0], [items[1], items[2]], torch.from_numpy(items[3])])
    assert len(handles) == 3 and len(set(handles)) == 3
    np.testing.assert_array_equal(cycle(eng, handles[0]), items[0])
    np.testing.assert_array_equal(cycle(eng, handles[1]), expected_item_bytes([items[1], items[2]]))
    np.testing.assert_array_equal(cycle(eng, handles[2]), items[3])


def test_view_is_uint8_on_engine_device_with_item_size(make_engine):
    eng = make_engine("cpu")
    small, big = eng.register(b"abc"), eng.register(bytes(5000))
    eng.prefetch(small)
    view = eng.acquire(small)
    assert view.dtype == torch.uint8 and view.dim() == 1 and view.device == torch.device("cpu")
    assert view.numel() == 3 and eng.slot_bytes == 5000
    eng.release(small)
    assert eng.device == torch.device("cpu") and eng.backend == "host" and eng.num_slots == 2


def test_hits_lru_and_states(make_engine):
    eng = make_engine("cpu", num_slots=2)
    a, b, c = (eng.register(bytes([i]) * 100) for i in range(3))
    assert [eng.state(h) for h in (a, b, c)] == ["host"] * 3
    assert eng.prefetch(a) is True
    assert eng.state(a) == "prefetched"
    assert eng.prefetch(a) is False  # already prefetched: a hit, no second copy
    eng.acquire(a)
    assert eng.state(a) == "acquired"
    eng.release(a)
    assert eng.state(a) == "resident"
    assert eng.prefetch(a) is False  # still in its slot: hit
    eng.acquire(a), eng.release(a)
    assert eng.prefetch(b) is True  # the never-used slot is preferred over a's
    eng.acquire(b), eng.release(b)
    assert eng.prefetch(c) is True  # evicts a: released before b
    assert eng.state(a) == "host" and eng.state(b) == "resident"
    eng.acquire(c), eng.release(c)
    s = eng.stats()
    assert (s["copies"], s["hits"]) == (3, 2)
    assert s["bytes_copied"] == 300


def test_cancel_frees_the_slot_and_keeps_the_item(make_engine):
    eng = make_engine("cpu", num_slots=1)
    a, b = eng.register(b"a" * 10), eng.register(b"b" * 10)
    eng.prefetch(a)
    with pytest.raises(RuntimeError, match="all 1 slots are in use"):
        eng.prefetch(b)
    eng.cancel(a)
    assert eng.state(a) == "resident"
    assert eng.prefetch(a) is False
    assert bytes(eng.acquire(a).numpy()) == b"a" * 10
    eng.release(a)
    assert eng.prefetch(b) is True
    assert bytes(eng.acquire(b).numpy()) == b"b" * 10
    eng.release(b)


def test_slots_grow_for_a_larger_item_when_idle(make_engine):
    eng = make_engine("cpu", num_slots=2)
    small = eng.register(bytes(1000))
    eng.prefetch(small), eng.acquire(small), eng.release(small)
    assert eng.stats()["device_bytes"] == 2 * 1000
    big_src = np.random.default_rng(3).integers(0, 256, 50_000, dtype=np.uint8)
    big = eng.register(big_src)
    np.testing.assert_array_equal(cycle(eng, big), big_src)
    assert eng.slot_bytes == 50_000 and eng.stats()["device_bytes"] == 2 * 50_000
    assert eng.state(small) == "host"  # the old slot memory went away with its contents
    np.testing.assert_array_equal(cycle(eng, small), np.zeros(1000, np.uint8))


def test_fixed_slot_bytes_allocates_up_front(make_engine):
    eng = make_engine("cpu", num_slots=3, slot_bytes=4096)
    s = eng.stats()
    assert (s["slot_bytes"], s["device_bytes"], s["num_slots"]) == (4096, 3 * 4096, 3)
    h = eng.register(bytes(range(256)) * 16)
    assert cycle(eng, h).tobytes() == bytes(range(256)) * 16


def test_stats_counters_and_reset(make_engine):
    eng = make_engine("cpu", num_slots=2)
    handles = [eng.register(bytes(n)) for n in (100, 200, 300)]
    for h in handles + handles[-1:]:
        cycle(eng, h)
    s = eng.stats()
    assert s["copies"] == 3 and s["hits"] == 1
    assert s["bytes_copied"] == 600
    assert s["copy_time_s"] >= 0 and s["consumer_wait_s"] >= 0 and s["slot_wait_s"] == 0
    assert s["backend"] == "host" and s["pinned"] is False and s["pinned_bytes"] == 0
    assert s["registered_bytes"] == 600 and s["items"] == 3
    eng.reset_stats()
    s = eng.stats()
    assert (s["copies"], s["hits"], s["bytes_copied"], s["copy_time_s"]) == (0, 0, 0, 0.0)
    assert s["registered_bytes"] == 600  # memory figures are not counters


def test_host_engine_ignores_pin_and_never_warns(make_engine, recwarn):
    eng = make_engine("cpu", pin=True)
    eng.register(bytes(100_000))
    assert eng.stats()["pinned"] is False
    assert not [w for w in recwarn.list if "pin" in str(w.message)]


def test_context_manager_repr_and_idempotent_close():
    with TransferEngine("cpu", num_slots=2) as eng:
        h = eng.register(b"xyz")
        assert "backend=host" in repr(eng) and "num_slots=2" in repr(eng)
        assert cycle(eng, h).tobytes() == b"xyz"
    assert eng.closed
    assert "closed" in repr(eng)
    eng.close()
    eng.close()


def test_close_with_slots_still_in_use():
    eng = TransferEngine("cpu", num_slots=2)
    a, b = eng.register(bytes(10)), eng.register(bytes(20_000_000))
    eng.prefetch(a), eng.acquire(a), eng.prefetch(b)  # one acquired, one copying
    eng.close()
    assert eng.closed and eng.stats()["host_bytes"] == 0


def test_synchronize_waits_for_queued_copies(make_engine):
    eng = make_engine("cpu", num_slots=4)
    handles = [eng.register(bytes(2_000_000)) for _ in range(4)]
    for h in handles:
        eng.prefetch(h)
    eng.synchronize()
    s = eng.stats()
    assert s["copies"] == 4 and s["copy_time_s"] > 0
    for h in handles:
        eng.acquire(h)
        eng.release(h)
    # everything had landed: acquiring waited for nothing
    assert eng.stats()["consumer_wait_s"] == s["consumer_wait_s"]


def test_host_views_are_the_stored_parts_and_share_storage(make_engine):
    rng = np.random.default_rng(8)
    parts = [random_bytes(rng, n) for n in (300, 1, 4096)]
    eng = make_engine("cpu")
    h = eng.register([torch.from_numpy(p.copy()) for p in parts])
    views = eng.host_views(h)
    assert [v.dtype for v in views] == [torch.uint8] * 3 and all(v.device.type == "cpu" for v in views)
    for v, p in zip(views, parts):
        np.testing.assert_array_equal(v.numpy(), p)
    views[2][:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)  # the one host copy: later copies carry it
    expected = expected_item_bytes([parts[0], parts[1], np.concatenate([[1, 2, 3, 4], parts[2][4:]]).astype(np.uint8)])
    np.testing.assert_array_equal(cycle(eng, h), expected)
