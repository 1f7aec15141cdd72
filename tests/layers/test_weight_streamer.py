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


def passes_match_in_block_order(streamed, resident, s, passes: int = 4) -> None:
    """``passes`` forwards equal the resident model's and leave no slot acquired; the learned order is the
    four blocks in turn, with nothing mispredicted."""
    with torch.no_grad():
        expected = resident(X)
        for _ in range(passes):
            assert torch.equal(streamed(X), expected)
            assert not acquired(streamed)
    assert s.order == [group_of(streamed, i) for i in range(4)]
    assert s.mispredictions == 0


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("num_slots", [1, 2, 3])
def test_a_block_visited_twice_per_pass(num_slots):
    """Block 0 runs first and again last: the cycle closes when it comes back, and the next pass still
    starts with it, so nothing is mispredicted."""
    streamed, resident = pair(Net(schedule=[0, 1, 2, 3, 0]), num_slots)
    s = streamer_of(streamed)
    passes_match_in_block_order(streamed, resident, s)


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


# ------------------------------------------------------------ a forward that raises, Exception or not
# torch runs always_call forward hooks only for an Exception: the pass boundaries must survive a
# KeyboardInterrupt (or any other BaseException) raised anywhere in the forward, as well as an Exception.

class Abort(BaseException):
    pass


def raise_once(exc_type):
    left = [1]

    def hook(*_):
        if left[0]:
            left[0] -= 1
            raise exc_type("mid-pass")
    return hook


@pytest.mark.parametrize("exc_type", [Boom, KeyboardInterrupt, Abort])
@pytest.mark.parametrize("num_slots", [1, 2])
@pytest.mark.parametrize("fail_at", [0, 2])
def test_interrupt_while_learning_then_normal_passes(exc_type, fail_at, num_slots):
    streamed, resident = pair(Net(), num_slots)
    s = streamer_of(streamed)
    hook = streamed.blocks[fail_at].down.register_forward_pre_hook(raise_once(exc_type))
    with torch.no_grad(), pytest.raises(exc_type):
        streamed(X)
    hook.remove()
    assert not acquired(streamed), "the interrupted pass must give its slot back"
    assert s.order == [] and s._learning, "a partial order must not be kept"
    passes_match_in_block_order(streamed, resident, s)


@pytest.mark.parametrize("exc_type", [Boom, KeyboardInterrupt, Abort])
def test_interrupt_after_learning_then_normal_passes_and_a_load(exc_type):
    streamed, resident = pair(Net())
    s = streamer_of(streamed)
    with torch.no_grad():
        streamed(X)
        hook = streamed.blocks[2].up.register_forward_hook(raise_once(exc_type))   # a layer that raises
        with pytest.raises(exc_type):
            streamed(X)
        hook.remove()
        assert not acquired(streamed), "the interrupted group must be released"
        assert s.order == [group_of(streamed, i) for i in range(4)]
        for _ in range(3):
            assert torch.equal(streamed(X), resident(X))
        assert s.mispredictions == 0
        other = offloaded(Net(seed=1), stream=False)
        streamed.load_state_dict(other.state_dict())     # was refused: "while a forward pass is using its group"
        for _ in range(2):
            assert torch.equal(streamed(X), other(X))
    assert s.mispredictions == 0 and not acquired(streamed)


class Recursive(Net):
    """A root that calls itself: the nested call is part of the outer pass."""

    def forward(self, x, depth=0):
        x = self.blocks[0](x) if depth == 0 else x
        if depth == 0:
            return self(x, depth=1)
        for i in range(1, len(self.blocks)):
            x = self.blocks[i](x)
        return x


def test_nested_calls_of_the_root_are_one_pass():
    streamed, resident = pair(Recursive())
    s = streamer_of(streamed)
    hook = streamed.blocks[2].down.register_forward_pre_hook(raise_once(KeyboardInterrupt))
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        streamed(X)                          # interrupted inside the nested call
    hook.remove()
    assert not acquired(streamed) and s._learning and s.order == []
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(streamed(X), resident(X))
    assert s.order == [group_of(streamed, i) for i in range(4)], "one pass: learned when the outer call returned"
    assert s.mispredictions == 0 and not acquired(streamed)


# ------------------------------------------------------------ the forward wrapper itself

def test_wrapper_keeps_the_signature_and_close_removes_it():
    import inspect

    streamed, _ = pair(Net())
    s = streamer_of(streamed)
    assert "forward" in streamed.__dict__
    assert inspect.signature(streamed.forward) == inspect.signature(Net().forward)
    assert streamed.forward.__name__ == "forward" and streamed.forward.__doc__ == Net.forward.__doc__
    s.close()
    assert "forward" not in streamed.__dict__
    assert not streamed._forward_hooks and not streamed._forward_pre_hooks
    with torch.no_grad():
        streamed(X)


def test_a_forward_set_on_the_instance_is_wrapped_and_restored():
    """Like accelerate's hooks: an instance-level forward is called through the wrapper and put back."""
    net = Net()
    calls = []
    own = net.forward

    def logged(x):
        calls.append(1)
        return own(x)

    net.forward = logged
    streamed = offloaded(net)
    s = streamer_of(streamed)
    with torch.no_grad():
        for _ in range(2):
            streamed(X)
    assert calls == [1, 1] and s.order == [group_of(streamed, i) for i in range(4)]
    s.close()
    assert streamed.__dict__["forward"] is logged


def test_the_wrapper_does_not_keep_the_model_alive():
    import gc
    import weakref

    streamed, _ = pair(Net())
    ref = weakref.ref(streamed)
    gc.disable()
    try:
        del streamed
        assert ref() is None, "the model is freed without waiting for the cycle collector"
    finally:
        gc.enable()


# ------------------------------------------------------------ transformers: generate() through the wrapper

def test_generate_with_the_wrapper_and_after_an_interrupt():
    transformers = pytest.importorskip("transformers")
    from offload_kernels import offload
    from offload_kernels.model.offload import select_linears
    from offload_kernels.model.planner import budget_for_resident_fraction

    def tiny(seed=0):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(cfg).eval()

    def offload_tiny(model, fraction_resident):
        sel = select_linears(model, "q8_0")
        budget = budget_for_resident_fraction(sel.specs, sel.fixed_bytes, fraction_resident)
        offload(model, "q8_0", gpu_budget=budget, device="cpu", progress=False, measure=False)
        return model

    streamed, resident = offload_tiny(tiny(), 0.3), offload_tiny(tiny(), 1.0)
    s = streamer_of(streamed)
    assert s is not None and streamer_of(resident) is None
    import inspect
    assert "input_ids" in inspect.signature(streamed.forward).parameters
    ids = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = resident.generate(ids, **kw)
    layer = s.groups[-1][0]                 # a streamed layer of the last group
    for interrupt_at in (1, 3):             # the prefill, while learning; a decode step, after it
        calls = {"n": 0}

        def interrupt(*_):
            calls["n"] += 1
            if calls["n"] == interrupt_at:
                raise KeyboardInterrupt

        hook = layer.register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            streamed.generate(ids, **kw)
        hook.remove()
        assert not acquired(streamed)
        for _ in range(2):
            assert torch.equal(streamed.generate(ids, **kw), expected)
        assert not acquired(streamed)
        assert s.order == list(range(len(s.groups))) and s.mispredictions == 0
    streamed.load_state_dict(resident.state_dict())


def test_interrupt_inside_the_release_that_begins_a_pass():
    """A group left held by a layer called outside the root forward is released when the next pass begins;
    an interrupt raised by that release must not leave a pass open that nothing closes (which broke every
    later forward and refused every load)."""
    streamed, resident = pair(Net())
    s = streamer_of(streamed)
    with torch.no_grad():
        streamed(X)
        streamed.blocks[0].up(X)             # one layer of block 0 outside the root forward: its group stays held
        release, left = s.engine.release, [1]

        def interrupted_once(handle):
            if left[0]:
                left[0] -= 1
                raise KeyboardInterrupt("during release")
            return release(handle)

        s.engine.release = interrupted_once
        with pytest.raises(KeyboardInterrupt):
            streamed(X)
        for _ in range(3):
            assert torch.equal(streamed(X), resident(X))
            assert not acquired(streamed), "each pass must end and give its last group back"
        other = offloaded(Net(seed=1), stream=False)
        streamed.load_state_dict(other.state_dict())
        assert torch.equal(streamed(X), other(X))
