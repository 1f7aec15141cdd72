"""WeightStreamer's learned order: an exception mid-pass ends the pass and discards a partial order,
blocks visited more than once per pass and a root forward that runs the model several times are learned
without recording forever, and outputs always match the resident model."""

from __future__ import annotations

import copy

import pytest
import torch

from offload_kernels.model import streamer_of

from .streaming_models import D, Net, acquired, group_of, offloaded

X = torch.randn(3, D, generator=torch.Generator().manual_seed(5))


def pair(net: Net, num_slots: int = 2):
    return offloaded(copy.deepcopy(net), num_slots=num_slots), offloaded(copy.deepcopy(net), stream=False)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("num_slots", [1, 2])
@pytest.mark.parametrize("fail_at", [0, 2])
def test_forward_raising_while_learning_then_a_normal_pass(fail_at, num_slots):
    streamed, resident = pair(Net(), num_slots)
    s = streamer_of(streamed)

    def boom(*_):
        raise Boom("mid-pass")

    hook = streamed.blocks[fail_at].down.register_forward_pre_hook(boom)   # after the block's `up` ran
    with torch.no_grad(), pytest.raises(Boom):
        streamed(X)
    hook.remove()
    assert not acquired(streamed), "the aborted pass must give its slot back"
    assert s.order == [] and s._learning, "a partial order must not be kept"
    with torch.no_grad():
        expected = resident(X)
        for _ in range(3):
            assert torch.equal(streamed(X), expected)
            assert not acquired(streamed)
    assert s.order == [group_of(streamed, i) for i in range(4)]
    assert s.mispredictions == 0


def test_forward_raising_after_learning_keeps_the_order_and_releases_the_slot():
    streamed, resident = pair(Net())
    s = streamer_of(streamed)
    with torch.no_grad():
        streamed(X)
        hook = streamed.blocks[2].up.register_forward_hook(lambda *_: (_ for _ in ()).throw(Boom("x")))
        with pytest.raises(Boom):
            streamed(X)
        hook.remove()
        assert not acquired(streamed)
        assert s.order == [group_of(streamed, i) for i in range(4)]
        for _ in range(2):
            assert torch.equal(streamed(X), resident(X))


@pytest.mark.parametrize("num_slots", [1, 2, 3])
def test_a_block_visited_twice_per_pass(num_slots):
    """Block 0 runs first and again last: the cycle closes when it comes back, and the next pass still
    starts with it, so nothing is mispredicted."""
    streamed, resident = pair(Net(schedule=[0, 1, 2, 3, 0]), num_slots)
    s = streamer_of(streamed)
    with torch.no_grad():
        expected = resident(X)
        for _ in range(4):
            assert torch.equal(streamed(X), expected)
            assert not acquired(streamed)
    assert s.order == [group_of(streamed, i) for i in range(4)]
    assert s.mispredictions == 0


def test_a_block_revisited_before_all_are_seen_stays_in_the_order():
    streamed, resident = pair(Net(schedule=[0, 1, 0, 2, 3]))
    s = streamer_of(streamed)
    with torch.no_grad():
        for _ in range(4):
            assert torch.equal(streamed(X), resident(X))
    assert s.order == [group_of(streamed, i) for i in (0, 1, 0, 2, 3)]
    assert s.mispredictions == 0


def test_a_layer_called_twice_in_a_row_within_its_block():
    net = Net()
    streamed, resident = pair(net)

    def twice(block):
        return lambda x: x + block.down(torch.relu(block.up(x) + block.up(x)))

    for m in (streamed, resident):
        m.blocks[1].forward = twice(m.blocks[1])
    s = streamer_of(streamed)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(streamed(X), resident(X))
    assert s.order == [group_of(streamed, i) for i in range(4)]
    assert s._visit_uses[1] == 3 and s.mispredictions == 0


class Repeat(torch.nn.Module):
    """A root whose one forward runs the whole model several times (a decode loop inside forward)."""

    def __init__(self, net: Net, times: int) -> None:
        super().__init__()
        self.net, self.times = net, times

    def forward(self, x):
        for _ in range(self.times):
            x = self.net(x)
        return x


def test_a_root_forward_that_runs_the_model_several_times():
    streamed, resident = pair(Net())
    s = streamer_of(streamed)
    for h in s._hooks:
        h.remove()
    s._hooks.clear()
    wrapped = Repeat(streamed, 3)
    s.attach(wrapped)
    with torch.no_grad():
        expected = Repeat(resident, 3)(X)
        assert torch.equal(wrapped(X), expected)
        assert s.order == [group_of(streamed, i) for i in range(4)], "learned from the first cycle"
        copies = s.stats()["copies"]
        assert torch.equal(wrapped(X), expected)
    assert s.mispredictions == 0 and not acquired(streamed)
    assert s.stats()["copies"] > copies


def test_blocks_called_without_the_root_forward():
    """No pass boundaries at all: learning ends when the first block comes back."""
    streamed, resident = pair(Net())
    s = streamer_of(streamed)
    with torch.no_grad():
        for _ in range(3):
            a, b = X, X
            for i in range(4):
                a, b = streamed.blocks[i](a), resident.blocks[i](b)
            assert torch.equal(a, b)
        assert s.order == [group_of(streamed, i) for i in range(4)]
        assert s.mispredictions == 0
        assert torch.equal(streamed(X), resident(X))   # a root pass afterwards starts cleanly
    assert not acquired(streamed)
