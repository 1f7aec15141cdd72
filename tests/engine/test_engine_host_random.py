"""Random workloads through the host backend, checked byte for byte and against a reference model of the
slot state machine: seeded random schedules over hundreds of items, a hypothesis state machine, and a
stress loop of thousands of cycles."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from offload_kernels.engine import TransferEngine

from .engine_helpers import Driver, log_uniform_sizes, random_bytes, register_random_items, run_random_schedule


@pytest.mark.parametrize("seed, num_slots", [(0, 2), (1, 3), (2, 4)])
def test_random_schedules_over_hundreds_of_items(make_engine, seed, num_slots):
    eng = make_engine("cpu", num_slots=num_slots)
    drv = Driver(eng, num_slots)
    handles = register_random_items(drv, np.random.default_rng(seed), count=240, max_bytes=3 << 20)
    assert len(handles) == 180
    run_random_schedule(drv, handles, random.Random(seed), steps=3000)
    drv.check_states()
    drv.check_stats()
    assert drv.copies > 200 and drv.hits > 0


def test_pipeline_sweeps_every_item(make_engine):
    """The model-loading pattern: prefetch item i+1 before using item i, over every item, twice."""
    rng = np.random.default_rng(11)
    sizes = log_uniform_sizes(rng, 200, 1, 2 << 20)
    sources = [random_bytes(rng, n) for n in sizes]
    eng = make_engine("cpu", num_slots=2)
    handles = eng.register_many(sources)
    for _ in range(2):
        eng.prefetch(handles[0])
        for i, h in enumerate(handles):
            if i + 1 < len(handles):
                eng.prefetch(handles[i + 1])
            np.testing.assert_array_equal(eng.acquire(h).numpy(), sources[i])
            eng.release(h)
    s = eng.stats()
    assert s["copies"] == 400 and s["hits"] == 0
    assert s["bytes_copied"] == 2 * sum(sizes)


def test_stress_thousands_of_cycles(make_engine):
    rng = np.random.default_rng(5)
    sources = [random_bytes(rng, n) for n in (1, 7, 255, 256, 4097, 65_537, 100_003)]
    eng = make_engine("cpu", num_slots=3)
    handles = eng.register_many(sources)
    order = rng.integers(0, len(handles), size=6000)
    copies = hits = copied_bytes = 0
    for n, i in enumerate(order):
        copied = eng.prefetch(handles[i])
        copies += copied
        hits += not copied
        copied_bytes += sources[i].nbytes if copied else 0
        view = eng.acquire(handles[i])
        if n % 50 == 0:
            np.testing.assert_array_equal(view.numpy(), sources[i])
        else:  # cheap spot checks: first and last byte
            assert view[0] == sources[i][0] and view[-1] == sources[i][-1]
        eng.release(handles[i])
    s = eng.stats()
    assert (s["copies"], s["hits"]) == (copies, hits)
    assert s["copies"] + s["hits"] == len(order)
    assert s["bytes_copied"] == copied_bytes
    assert hits > 0 and copies > 0


@settings(max_examples=40, stateful_step_count=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
class EngineMachine(RuleBasedStateMachine):
    """Hypothesis drives arbitrary operation sequences; the Driver checks each one against the model."""

    @initialize(num_slots=st.integers(1, 4),
                sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=6),
                seed=st.integers(0, 2**16))
    def setup(self, num_slots, sizes, seed):
        rng = np.random.default_rng(seed)
        self.eng = TransferEngine("cpu", num_slots=num_slots)
        self.drv = Driver(self.eng, num_slots)
        sources = [random_bytes(rng, n) for n in sizes]
        for h, src in zip(self.eng.register_many(sources), sources):
            self.drv.add(h, src)
        self.handles = list(self.drv.expected)

    @rule(i=st.integers(0, 5))
    def prefetch(self, i):
        self.drv.prefetch(self.handles[i % len(self.handles)])

    @rule(i=st.integers(0, 5))
    def acquire(self, i):
        self.drv.acquire(self.handles[i % len(self.handles)])

    @rule(i=st.integers(0, 5))
    def release(self, i):
        self.drv.release(self.handles[i % len(self.handles)])

    @rule(i=st.integers(0, 5))
    def cancel(self, i):
        self.drv.cancel(self.handles[i % len(self.handles)])

    @precondition(lambda self: hasattr(self, "eng"))
    @invariant()
    def agrees_with_model(self):
        self.drv.check_states()
        self.drv.check_stats()

    def teardown(self):
        if hasattr(self, "eng"):
            self.eng.close()


TestEngineStateMachine = EngineMachine.TestCase
