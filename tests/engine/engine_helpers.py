"""Helpers for the transfer-engine tests: build facts, byte generators, the expected layout of multi-part
items, and a reference model of the slot state machine that the random tests compare the engine against."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from offload_kernels import _native

BUILT_WITH_CUDA = bool(getattr(_native.native_module(), "BUILT_WITH_CUDA", False))
HAS_CUDA = BUILT_WITH_CUDA and torch.cuda.is_available()
CUDA_SKIP_REASON = ("needs a CUDA device and the CUDA build of offload_kernels._C "
                    f"(built with CUDA: {BUILT_WITH_CUDA}, torch.cuda.is_available(): {torch.cuda.is_available()})")
UNDER_SANITIZER = os.environ.get("OFFLOAD_KERNELS_UNDER_SANITIZER", "") == "1"


def random_bytes(rng: np.random.Generator, nbytes: int) -> np.ndarray:
    return rng.integers(0, 256, size=nbytes, dtype=np.uint8)


def log_uniform_sizes(rng: np.random.Generator, count: int, lo: int, hi: int) -> list[int]:
    return [int(x) for x in np.exp(rng.uniform(np.log(lo), np.log(hi + 1), size=count)).astype(np.int64).clip(lo, hi)]


def expected_item_bytes(parts: list[np.ndarray]) -> np.ndarray:
    """What a slot must hold for an item made of these parts: each part on a 256-byte boundary, zero padding."""
    end = 0
    offsets = []
    for i, p in enumerate(parts):
        off = 0 if i == 0 else -(-end // 256) * 256
        offsets.append(off)
        end = off + p.nbytes
    out = np.zeros(end, dtype=np.uint8)
    for off, p in zip(offsets, parts):
        out[off:off + p.nbytes] = p.view(np.uint8).reshape(-1)
    return out


class SlotModel:
    """Python reference of the engine's slot state machine (FREE/LOADING/ACQUIRED, LRU reuse, hits)."""

    def __init__(self, num_slots: int) -> None:
        self.state = ["free"] * num_slots
        self.item: list[int | None] = [None] * num_slots
        self.freed_at = [0] * num_slots
        self.tick = 0

    def slot_of(self, h: int) -> int | None:
        return next((s for s, it in enumerate(self.item) if it == h), None)

    def item_state(self, h: int) -> str:
        s = self.slot_of(h)
        if s is None:
            return "host"
        return {"free": "resident", "loading": "prefetched", "acquired": "acquired"}[self.state[s]]

    def prefetch(self, h: int) -> str:
        """'copy', 'hit' or 'full' (prefetch must raise); raises AssertionError for 'acquired'."""
        s = self.slot_of(h)
        if s is not None:
            if self.state[s] == "acquired":
                return "acquired"
            self.state[s] = "loading"
            return "hit"
        free = [i for i in range(len(self.state)) if self.state[i] == "free"]
        if not free:
            return "full"
        victim = min(free, key=lambda i: (self.freed_at[i], i))
        self.item[victim] = h
        self.state[victim] = "loading"
        return "copy"

    def acquire(self, h: int) -> bool:
        s = self.slot_of(h)
        if s is None or self.state[s] != "loading":
            return False
        self.state[s] = "acquired"
        return True

    def _free(self, h: int, expected: str) -> bool:
        s = self.slot_of(h)
        if s is None or self.state[s] != expected:
            return False
        self.tick += 1
        self.state[s], self.freed_at[s] = "free", self.tick
        return True

    def release(self, h: int) -> bool:
        return self._free(h, "acquired")

    def cancel(self, h: int) -> bool:
        return self._free(h, "loading")

    def invalidate(self, h: int) -> str:
        """'dropped' or 'host' (nothing held it), or the state that makes the engine refuse."""
        s = self.slot_of(h)
        if s is None:
            return "host"
        if self.state[s] != "free":
            return self.state[s]
        self.item[s], self.freed_at[s] = None, 0  # FREE and empty: picked before any slot still holding an item
        return "dropped"


class Driver:
    """Runs engine operations next to a SlotModel and checks that both agree on every step: outcomes
    (copy/hit/error), item states, counters, and (through `verify`) the bytes of every acquired view."""

    def __init__(self, eng, num_slots: int, verify: Callable[[int, Any], None] | None = None) -> None:
        self.eng = eng
        self.verify = verify or self.verify_on_host
        self.model = SlotModel(num_slots)
        self.expected: dict[int, np.ndarray] = {}
        self.prefetches = self.copied_bytes = self.copies = self.hits = 0

    def add(self, handle: int, expected: np.ndarray) -> None:
        self.expected[handle] = expected
        assert self.eng.item_nbytes(handle) == expected.nbytes

    def prefetch(self, h: int) -> None:
        outcome = self.model.prefetch(h)
        if outcome == "full":
            with pytest.raises(RuntimeError, match="slots are in use"):
                self.eng.prefetch(h)
        elif outcome == "acquired":
            with pytest.raises(RuntimeError, match="is acquired"):
                self.eng.prefetch(h)
        else:
            copied = self.eng.prefetch(h)
            assert copied == (outcome == "copy"), f"engine copied={copied}, model says {outcome}"
            self.prefetches += 1
            if copied:
                self.copies += 1
                self.copied_bytes += self.expected[h].nbytes
            else:
                self.hits += 1

    def acquire(self, h: int) -> None:
        if self.model.acquire(h):
            self.verify(h, self.eng.acquire(h))
        else:
            with pytest.raises(RuntimeError):
                self.eng.acquire(h)

    def release(self, h: int) -> None:
        if self.model.release(h):
            self.eng.release(h)
        else:
            with pytest.raises(RuntimeError, match="not acquired"):
                self.eng.release(h)

    def cancel(self, h: int) -> None:
        if self.model.cancel(h):
            self.eng.cancel(h)
        else:
            with pytest.raises(RuntimeError, match="not prefetched"):
                self.eng.cancel(h)

    def invalidate(self, h: int, rng: np.random.Generator | None = None) -> None:
        """invalidate(h) as the model predicts; when accepted and `rng` is given, rewrite the item's first
        part in host storage so a stale slot would show up as wrong bytes."""
        outcome = self.model.invalidate(h)
        if outcome in ("loading", "acquired"):
            with pytest.raises(RuntimeError, match="prefetched" if outcome == "loading" else "is acquired"):
                self.eng.invalidate(h)
            return
        assert self.eng.invalidate(h) == (outcome == "dropped")
        if rng is not None:
            first = self.eng.host_views(h)[0]
            new = random_bytes(rng, first.numel())
            first.copy_(torch.from_numpy(new))
            self.expected[h] = self.expected[h].copy()
            self.expected[h][:new.nbytes] = new

    def verify_on_host(self, h: int, view) -> None:
        np.testing.assert_array_equal(view.numpy(), self.expected[h])

    def check_states(self) -> None:
        for h in self.expected:
            assert self.eng.state(h) == self.model.item_state(h), h

    def check_stats(self) -> None:
        s = self.eng.stats()
        assert s["copies"] == self.copies and s["hits"] == self.hits
        assert s["copies"] + s["hits"] == self.prefetches
        assert s["bytes_copied"] == self.copied_bytes


def register_random_items(drv: Driver, rng: np.random.Generator, count: int, max_bytes: int) -> list[int]:
    """Registers items of 1 byte to `max_bytes` (log-uniform, so small and odd sizes are common) in every
    way: the first 100 sizes with one register_many, the next 60 one by one, the rest as multi-part items
    of 1 to 4 parts. Returns the handles."""
    sizes = log_uniform_sizes(rng, count, 1, max_bytes)
    singles = [random_bytes(rng, n) for n in sizes[:160]]
    for h, src in zip(drv.eng.register_many(singles[:100]), singles[:100]):
        drv.add(h, src)
    for src in singles[100:]:
        drv.add(drv.eng.register(src), src)
    for k in range(160, count, 4):
        parts = [random_bytes(rng, n) for n in sizes[k:k + 1 + k % 4]]
        drv.add(drv.eng.register(parts), expected_item_bytes(parts))
    return list(drv.expected)


def run_random_schedule(drv: Driver, handles: list[int], pick: random.Random, steps: int,
                        rewrite: np.random.Generator | None = None) -> None:
    """Mostly the pipeline pattern (prefetch ahead, acquire, release), mixed with arbitrary and invalid steps
    that the Driver expects to be rejected. With `rewrite`, some steps invalidate an item and rewrite its
    host bytes."""
    for _ in range(steps):
        h = pick.choice(handles)
        if rewrite is not None and pick.random() < 0.1:
            drv.invalidate(h, rewrite)
            continue
        op = pick.random()
        if op < 0.4:
            drv.prefetch(h)
        elif op < 0.7:
            in_flight = [x for x in handles if drv.model.item_state(x) == "prefetched"]
            drv.acquire(pick.choice(in_flight) if in_flight and pick.random() < 0.9 else h)
        elif op < 0.95:
            held = [x for x in handles if drv.model.item_state(x) == "acquired"]
            drv.release(pick.choice(held) if held and pick.random() < 0.9 else h)
        else:
            drv.cancel(h)
