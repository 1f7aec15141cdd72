"""OffloadedLinear: the nn.Linear contract over GGUF bytes, state_dict round trips, clear errors."""

import pytest
import torch
from torch import nn

from offload_kernels import OffloadedLinear, dequantize, quantize
from offload_kernels.formats import QTYPES, get_spec

# Activations in (tolerance on relative Frobenius error vs float64 math on the dequantized weight).
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def reference(x, layer):
    w = layer.dequantized_weight(torch.float64)
    y = x.double() @ w.T
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(256, 48, bias=True)


@pytest.mark.parametrize("qtype", QTYPES)
def test_from_linear_matches_float64_reference(linear, qtype):
    layer = OffloadedLinear.from_linear(linear, qtype)
    assert layer.weight.dtype == torch.uint8 and layer.qtype == qtype
    assert layer.quantized_weight().equal(quantize(linear.weight, qtype))
    x = torch.randn(5, 256)
    assert rel_err(layer(x), reference(x, layer)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_leading_dims_and_dtypes(linear, dtype, lead):
    layer = OffloadedLinear.from_linear(linear, "q4_k")
    x = torch.randn(*lead, 7, 256).to(dtype)
    y = layer(x)
    assert y.shape == (*lead, 7, 48) and y.dtype == dtype
    assert rel_err(y, reference(x, layer)) < TOL[dtype]


def test_no_bias_and_bias_dtype_follow_input():
    torch.manual_seed(1)
    lin = nn.Linear(64, 16, bias=False)
    layer = OffloadedLinear.from_linear(lin, "q8_0")
    assert layer.bias is None
    x = torch.randn(4, 64)
    assert rel_err(layer(x), reference(x, layer)) < 1e-5
    lin_b = nn.Linear(64, 16).to(torch.bfloat16)
    layer_b = OffloadedLinear.from_linear(lin_b, "q8_0")
    assert layer_b.bias.dtype == torch.bfloat16
    assert layer_b(x).dtype == torch.float32


def test_quantization_error_vs_float_linear(linear):
    """End to end: the quantized layer stays close to the original float layer (lossy, SNR-style bound)."""
    x = torch.randn(16, 256)
    for qtype, tol in (("q8_0", 0.02), ("q6_k", 0.05), ("q4_k", 0.15), ("q3_k", 0.3)):
        layer = OffloadedLinear.from_linear(linear, qtype)
        with torch.no_grad():
            assert rel_err(layer(x), linear(x).double()) < tol, qtype


def test_repr_shows_format_and_placement(linear):
    r = repr(OffloadedLinear.from_linear(linear, "q3_k"))
    assert "qtype=q3_k" in r and "bits_per_weight=3.4375" in r and "placement=resident" in r and "in_features=256" in r


@pytest.mark.parametrize("qtype", ["q4_k", "q6_k"])
def test_state_dict_round_trip_into_fresh_module(linear, qtype):
    layer = OffloadedLinear.from_linear(linear, qtype)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_format", "bias"} and sd["weight"].dtype == torch.uint8
    fresh = OffloadedLinear(256, 48, bias=True, qtype=qtype)
    fresh.load_state_dict(sd)
    assert fresh.quantized_weight().equal(layer.quantized_weight())
    x = torch.randn(3, 256)
    assert torch.equal(fresh(x), layer(x))


def test_loading_another_qtype_adopts_it(linear):
    layer = OffloadedLinear.from_linear(linear, "q6_k")
    fresh = OffloadedLinear(256, 48, qtype="q4_0")
    fresh.load_state_dict(layer.state_dict())
    assert fresh.qtype == "q6_k" and fresh.quantized_weight().equal(layer.quantized_weight())


def test_loading_a_plain_linear_checkpoint_quantizes_it(linear):
    fresh = OffloadedLinear(256, 48, qtype="q4_k")
    fresh.load_state_dict(linear.state_dict())
    assert fresh.quantized_weight().equal(quantize(linear.weight, "q4_k"))
    assert torch.equal(fresh.bias, linear.bias.detach())


def test_safetensors_round_trip(tmp_path, linear):
    from safetensors.torch import load_file, save_file

    layer = OffloadedLinear.from_linear(linear, "q5_k")
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    fresh = OffloadedLinear(256, 48, qtype="q5_k")
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert fresh.quantized_weight().equal(layer.quantized_weight())


def test_state_dict_errors_are_reported(linear):
    layer = OffloadedLinear.from_linear(linear, "q4_k")
    sd = layer.state_dict()
    wrong = OffloadedLinear(256, 32, qtype="q4_k")
    with pytest.raises(RuntimeError, match=r"weight_format shape \(48, 256\) does not match \(32, 256\)"):
        wrong.load_state_dict(sd)
    bad = dict(sd, weight=sd["weight"][:, :-1].contiguous())
    with pytest.raises(RuntimeError, match="do not match q4_k"):
        OffloadedLinear(256, 48, qtype="q4_k").load_state_dict(bad)
    with pytest.raises(RuntimeError, match="float weight of shape"):
        OffloadedLinear(256, 48, qtype="q4_k").load_state_dict({"weight": torch.zeros(48, 512), "bias": torch.zeros(48)})


def test_construction_errors():
    with pytest.raises(ValueError, match="in_features=100 is not a multiple of the q4_k block size 256"):
        OffloadedLinear(100, 8, qtype="q4_k")
    with pytest.raises(ValueError, match="unknown qtype"):
        OffloadedLinear(256, 8, qtype="q4")
    with pytest.raises(ValueError, match="positive"):
        OffloadedLinear(256, 0)
    with pytest.raises(TypeError, match="nn.Linear"):
        OffloadedLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="not a multiple of the q8_0 block size 32"):
        OffloadedLinear.from_linear(nn.Linear(40, 8), "q8_0")
    qt = quantize(torch.randn(8, 32), "q8_0")
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(8,\)"):
        OffloadedLinear.from_quantized(qt, torch.zeros(9))
    with pytest.raises(TypeError, match="QuantizedTensor"):
        OffloadedLinear.from_quantized(torch.zeros(8, 34, dtype=torch.uint8))


def test_forward_errors(linear):
    layer = OffloadedLinear.from_linear(linear, "q8_0")
    with pytest.raises(ValueError, match="last dimension must be in_features=256"):
        layer(torch.randn(2, 255))
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        layer(torch.ones(2, 256, dtype=torch.int64))
    with pytest.raises(ValueError, match="input is on meta but this layer's weight is on cpu"):
        layer(torch.empty(2, 256, device="meta"))


def test_from_quantized_uses_the_bytes_without_copy():
    qt = quantize(torch.randn(16, 64), "q4_0")
    layer = OffloadedLinear.from_quantized(qt)
    assert layer.weight.data_ptr() == qt.data.data_ptr()
    assert torch.equal(layer.dequantized_weight(), dequantize(qt))
    assert get_spec(layer.qtype).bits_per_weight == layer.bits_per_weight
