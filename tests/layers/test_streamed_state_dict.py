"""load_state_dict into OffloadedLinear, streamed and resident: new bytes reach the engine's pinned storage
and no device slot serves the old ones; a state dict whose weight and weight_format disagree with each
other or with the layer is refused before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from offload_kernels import OffloadedLinear, quantize
from offload_kernels.model import streamer_of

from .streaming_models import D, Net, acquired, offloaded

K = 256  # in_features of the single-layer tests (a multiple of the k-quant block)

X = torch.randn(3, D, generator=torch.Generator().manual_seed(5))


def run(model, passes=3):
    with torch.no_grad():
        return [model(X) for _ in range(passes)]


def assert_aliases_engine_storage(model):
    """Every streamed layer's buffer is still the engine's one host copy of its bytes."""
    s = streamer_of(model)
    for gi, group in enumerate(s.groups):
        views = s.engine.host_views(s.handles[gi])
        for pi, layer in enumerate(group):
            assert layer.weight.data_ptr() == views[pi].data_ptr()


@pytest.mark.parametrize("num_slots", [1, 2, 3])
@pytest.mark.parametrize("assign", [False, True])
def test_streamed_model_uses_the_loaded_weights(assign, num_slots):
    old, new = offloaded(Net(seed=0), num_slots=num_slots), Net(seed=1)
    fresh_streamed = offloaded(copy.deepcopy(new), num_slots=num_slots)
    fresh_resident = offloaded(copy.deepcopy(new), stream=False)
    run(old)                                  # learned, and the next pass's first groups prefetched
    old.load_state_dict({k: v.clone() for k, v in fresh_resident.state_dict().items()}, assign=assign)
    assert_aliases_engine_storage(old)
    expected = run(fresh_resident, 1)[0]
    assert torch.equal(run(fresh_streamed, 1)[0], expected)
    for y in run(old):
        assert torch.equal(y, expected)
    assert not acquired(old)


@pytest.mark.parametrize("assign", [False, True])
def test_streamed_model_quantizes_a_float_checkpoint_into_its_storage(assign):
    model, source = offloaded(Net(seed=0)), Net(seed=2)
    run(model)
    model.load_state_dict(source.state_dict(), assign=assign)
    assert_aliases_engine_storage(model)
    expected = run(offloaded(copy.deepcopy(source), stream=False), 1)[0]
    for y in run(model, 2):
        assert torch.equal(y, expected)


def test_loading_the_models_own_state_dict_changes_nothing():
    model = offloaded(Net(seed=0))
    before = run(model, 2)[1]
    model.load_state_dict(model.state_dict())
    assert torch.equal(run(model, 1)[0], before)


def test_loading_during_a_forward_is_refused_for_the_group_in_use():
    model, other = offloaded(Net(seed=0)), offloaded(Net(seed=1), stream=False)
    target = model.blocks[1].down
    before = target.weight.clone()
    errors = []

    def load_inside(*_):
        try:
            target.load_state_dict(other.blocks[1].down.state_dict())
        except RuntimeError as exc:
            errors.append(str(exc))

    hook = model.blocks[1].up.register_forward_hook(load_inside)
    run(model, 1)
    hook.remove()
    assert errors and "while a forward pass is using its group" in errors[0]
    assert torch.equal(target.weight, before) and not acquired(model)


# ---------------------------------------------------------------- weight / weight_format consistency

@pytest.fixture
def lin():
    torch.manual_seed(0)
    return nn.Linear(K, 48)


def single_streamed(layer: OffloadedLinear) -> nn.Module:
    """``layer`` in a one-block model whose block streams."""
    from offload_kernels.model.streaming import WeightStreamer

    root = nn.Sequential(layer)
    streamer = WeightStreamer([[layer]], torch.device("cpu"), num_slots=1)
    streamer.attach(root)
    root._offload_streamer = streamer
    return root


def layer_state(layer):
    return layer.qtype, layer.weight.clone(), layer.weight_format.clone(), layer.weight.data_ptr()


def assert_unchanged(layer, state):
    qtype, weight, fmt, ptr = state
    assert layer.qtype == qtype and torch.equal(layer.weight, weight) and torch.equal(layer.weight_format, fmt)
    assert layer.weight.data_ptr() == ptr


@pytest.mark.parametrize("streamed", [False, True])
def test_weight_format_only_load_of_the_same_format_is_accepted(lin, streamed):
    layer = OffloadedLinear.from_linear(lin, "q4_k")
    root = single_streamed(layer) if streamed else layer
    x = torch.randn(2, K)
    y = layer(x)
    layer.load_state_dict({"weight_format": layer.weight_format.clone()}, strict=False)
    assert layer.qtype == "q4_k" and torch.equal(layer(x), y)
    del root


@pytest.mark.parametrize("streamed", [False, True])
def test_weight_format_only_load_of_another_format_is_refused(lin, streamed):
    layer = OffloadedLinear.from_linear(lin, "q4_k")
    root = single_streamed(layer) if streamed else layer
    other = OffloadedLinear.from_linear(lin, "q4_0")   # same bytes per row as q4_k at in_features=K
    state = layer_state(layer)
    with pytest.raises(RuntimeError, match="weight_format says q4_0 but the layer holds q4_k bytes"):
        layer.load_state_dict({"weight_format": other.weight_format}, strict=False)
    assert_unchanged(layer, state)
    del root


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("assign", [False, True])
def test_bytes_of_another_qtype_with_their_format_switch_the_layer(lin, streamed, assign):
    """q4_0 bytes have q4_k's size here: a streamed layer can switch too (its storage fits them)."""
    layer = OffloadedLinear.from_linear(lin, "q4_k")
    root = single_streamed(layer) if streamed else layer
    x = torch.randn(2, K)
    layer(x)
    expected = OffloadedLinear.from_linear(lin, "q4_0")
    layer.load_state_dict({k: v.clone() for k, v in expected.state_dict().items()}, assign=assign)
    assert layer.qtype == "q4_0" and torch.equal(layer.weight_format, expected.weight_format)
    assert layer.quantized_weight().equal(expected.quantized_weight())
    for _ in range(2):
        assert torch.equal(layer(x), expected(x))
    if streamed:
        assert_aliases_engine_storage(root)


def test_resident_layer_adopts_a_qtype_of_another_size(lin):
    layer = OffloadedLinear.from_linear(lin, "q4_k")
    expected = OffloadedLinear.from_linear(lin, "q6_k")
    layer.load_state_dict(expected.state_dict())
    x = torch.randn(2, K)
    assert layer.qtype == "q6_k" and torch.equal(layer(x), expected(x))


@pytest.mark.parametrize("streamed", [False, True])
def test_bytes_that_do_not_fit_the_format_are_refused(lin, streamed):
    layer = OffloadedLinear.from_linear(lin, "q4_k")
    root = single_streamed(layer) if streamed else layer
    state = layer_state(layer)
    q6 = OffloadedLinear.from_linear(lin, "q6_k").state_dict()
    with pytest.raises(RuntimeError, match=r"do not match q4_k \(48, 256\)"):   # q6_k bytes, q4_k tag
        layer.load_state_dict(dict(q6, weight_format=layer.weight_format.clone()))
    with pytest.raises(RuntimeError, match="do not match q4_k"):                 # right size, wrong dtype
        layer.load_state_dict(dict(layer.state_dict(), weight=layer.weight.to(torch.int16)))
    with pytest.raises(RuntimeError, match="do not match q4_k"):                 # no tag: the layer's format
        layer.load_state_dict({"weight": q6["weight"], "bias": q6["bias"]}, strict=False)
    with pytest.raises(RuntimeError, match="invalid weight_format"):
        layer.load_state_dict(dict(q6, weight_format=torch.tensor([999, 48, 256])))
    assert_unchanged(layer, state)
    del root


def test_streamed_layer_refuses_a_qtype_of_another_size_and_keeps_its_slot(lin):
    layer = OffloadedLinear.from_linear(lin, "q4_k")
    root = single_streamed(layer)
    x = torch.randn(2, K)
    y = layer(x)
    s = streamer_of(root)
    eng_state = s.engine.state(s.handles[0])
    state = layer_state(layer)
    with pytest.raises(RuntimeError, match="cannot change a streamed layer's qtype from q4_k to q6_k"):
        layer.load_state_dict(OffloadedLinear.from_linear(lin, "q6_k").state_dict())
    assert_unchanged(layer, state)
    assert s.engine.state(s.handles[0]) == eng_state and torch.equal(layer(x), y)


def test_streamed_layer_loads_plain_bytes_without_a_format(lin):
    layer = OffloadedLinear.from_linear(lin, "q8_0")
    root = single_streamed(layer)
    x = torch.randn(2, K)
    layer(x)
    torch.manual_seed(9)
    new = quantize(torch.randn(48, K), "q8_0")
    layer.load_state_dict({"weight": new.data}, strict=False)
    assert torch.equal(layer(x), OffloadedLinear.from_quantized(new, layer.bias.detach().clone())(x))
    del root


# ---------------------------------------------------------------- a refused load changes nothing

def full_state(layer):
    """Everything a load could change, and the layer's output."""
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(3))
    bias = None if layer.bias is None else layer.bias.detach().clone()
    return layer_state(layer), bias, x, layer(x)


def assert_fully_unchanged(layer, snapshot):
    state, bias, x, y = snapshot
    assert_unchanged(layer, state)
    assert (layer.bias is None) == (bias is None)
    if bias is not None:
        assert torch.equal(layer.bias, bias) and layer.bias.dtype == bias.dtype
    assert torch.equal(layer(x), y)


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("qtype", ["q4_k", "q4_0", "q6_k"])   # same format, same size, another size (refused
                                                               # anyway by a streamed layer: both reported)
def test_a_bad_bias_refuses_the_whole_load(lin, streamed, assign, qtype):
    """The bias is checked with the weight: before, a streamed layer's bytes (and a resident layer's, torch
    going on past the bias error) were already replaced when the bias was refused."""
    layer = OffloadedLinear.from_linear(lin, "q4_k")
    root = single_streamed(layer) if streamed else layer
    snapshot = full_state(layer)
    torch.manual_seed(4)
    source = OffloadedLinear.from_linear(nn.Linear(K, 48), qtype).state_dict()
    bad_biases = [(torch.zeros(49), "bias of shape"), (torch.zeros(48, 1), "bias of shape"),
                  (torch.zeros(48, dtype=torch.int32), "bias dtype"), (torch.zeros(48, device="meta"), "meta"),
                  ([0.0] * 48, "bias must be a tensor")]
    if assign:
        bad_biases.append((torch.zeros(48, dtype=torch.float64), "bias dtype"))
    for bias, message in bad_biases:
        for sd in (dict(source, bias=bias), {"bias": bias}):
            with pytest.raises(RuntimeError, match=message):
                layer.load_state_dict(sd, assign=assign, strict=False)
            assert_fully_unchanged(layer, snapshot)
    if streamed:
        assert_aliases_engine_storage(root)


def test_a_bias_for_a_layer_without_one_is_only_unexpected(lin):
    layer = OffloadedLinear.from_linear(nn.Linear(K, 48, bias=False), "q4_k")
    sd = dict(OffloadedLinear.from_linear(lin, "q4_k").state_dict(), bias=torch.zeros(7))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        layer.load_state_dict(sd)
    assert layer.load_state_dict(sd, strict=False).unexpected_keys == ["bias"]


class CopyFails(torch.Tensor):
    """Bytes that cannot be copied anywhere (a failing device copy)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.clone, torch.Tensor.cpu, torch.Tensor.cuda,
                    torch.Tensor.contiguous):
            raise RuntimeError("injected copy failure")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("assign", [False, True])
def test_a_failing_copy_during_a_qtype_switch_leaves_the_layer_unchanged(lin, assign):
    layer = OffloadedLinear.from_linear(lin, "q4_k")
    snapshot = full_state(layer)
    q6 = OffloadedLinear.from_linear(lin, "q6_k").state_dict()
    if not assign:                          # assign=True takes the tensor as is: nothing is copied
        with pytest.raises(RuntimeError, match="could not copy the q6_k bytes.*injected copy failure"):
            layer.load_state_dict(dict(q6, weight=q6["weight"].as_subclass(CopyFails)))
        assert_fully_unchanged(layer, snapshot)
    with pytest.raises(RuntimeError, match="weight is a meta tensor"):       # no bytes to copy at all
        layer.load_state_dict(dict(q6, weight=q6["weight"].to("meta")), assign=assign)
    assert_fully_unchanged(layer, snapshot)
    layer.load_state_dict(q6, assign=assign)                                 # and a good load still works
    assert layer.qtype == "q6_k" and torch.equal(layer(snapshot[2]), OffloadedLinear.from_linear(lin, "q6_k")(
        snapshot[2]))


@pytest.mark.parametrize("streamed", [False, True])
def test_a_float_weight_is_quantized_to_the_format_beside_it(lin, streamed):
    """A float weight with a weight_format: quantized to the qtype the format names (it used to be
    quantized to the layer's qtype, the format silently ignored); a format of another shape is refused."""
    layer = OffloadedLinear.from_linear(lin, "q4_k")
    root = single_streamed(layer) if streamed else layer
    x = torch.randn(2, K)
    torch.manual_seed(6)
    source = nn.Linear(K, 48)
    q4_0 = OffloadedLinear.from_linear(source, "q4_0")     # q4_k's size at in_features=K: a streamed layer fits it
    layer.load_state_dict(dict(source.state_dict(), weight_format=q4_0.weight_format))
    assert layer.qtype == "q4_0" and torch.equal(layer.weight_format, q4_0.weight_format)
    assert layer.quantized_weight().equal(q4_0.quantized_weight()) and torch.equal(layer(x), q4_0(x))
    snapshot = full_state(layer)
    wrong_shape = torch.tensor([int(q4_0.quantized_weight().spec.ggml_type), 48, 2 * K])
    with pytest.raises(RuntimeError, match=r"weight_format shape \(48, 512\) does not match \(48, 256\)"):
        layer.load_state_dict(dict(source.state_dict(), weight_format=wrong_shape))
    assert_fully_unchanged(layer, snapshot)
    q6 = OffloadedLinear.from_linear(source, "q6_k")
    sd = dict(source.state_dict(), weight_format=q6.weight_format)
    if streamed:
        with pytest.raises(RuntimeError, match="cannot change a streamed layer's qtype from q4_0 to q6_k"):
            layer.load_state_dict(sd)
        assert_fully_unchanged(layer, snapshot)
        assert_aliases_engine_storage(root)
    else:
        layer.load_state_dict(sd)
        assert layer.qtype == "q6_k" and layer.quantized_weight().equal(q6.quantized_weight())
