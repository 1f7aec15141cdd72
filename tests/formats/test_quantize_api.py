"""quantize(): input validation, dtype/device handling, lossy quality; the 32-weight formats against gguf's
quantizers."""

import zlib

import numpy as np
import pytest
import torch
from gguf import quants
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_kernels.formats import QTYPES, dequantize, get_spec, quantize, quantize_blocks

from .helpers import DISTRIBUTIONS, weights

# Signal-to-noise floors (dB) of quantize -> dequantize on normal data; ggml's reference quantizers
# give roughly q3_k 14, q4_0 19, q4_k 21, q5_k 27, q6_k 32, q8_0 42, and on the data below q2_k 10.6
# (10.5-10.6 on other normal samples), q4_1 22, q5_0 27, q5_1 28, iq4_nl 22, iq4_xs 22 (a few dB of
# margin below).
MIN_SNR_DB = {"q2_k": 8.0, "q3_k": 11.0, "q4_0": 17.0, "q4_1": 19.0, "q4_k": 19.0, "q5_0": 24.0, "q5_1": 25.0,
              "q5_k": 25.0, "q6_k": 30.0, "q8_0": 39.0, "iq4_nl": 19.0, "iq4_xs": 19.0, "mxfp4": 17.5}


def snr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(10 * torch.log10(w.double().pow(2).sum() / (w.double() - w_hat.double()).pow(2).sum()))


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_legacy_formats_match_gguf_quantizers(qtype, distribution):
    """gguf's numpy quantizers of the 32-weight formats reproduce ggml's reference on these weights (they
    part from it around signed zeros: which zero a block's max/min scan keeps); ours must give the same
    bytes."""
    w = weights(distribution, 12, 256, seed=zlib.crc32(distribution.encode()) % 1000)
    if distribution == "huge" and len(get_spec(qtype).fp16_offsets) == 2:
        w /= 4        # the block min itself is an fp16 field of q4_1/q5_1: keep it below 65504
    ours = quantize(w, qtype).data.numpy()
    ref = quants.quantize(w.numpy(), get_spec(qtype).ggml_type)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("qtype", QTYPES)
def test_quality_on_normal_weights(qtype):
    w = weights("normal", 16, 1024, seed=1)
    qt = quantize(w, qtype)
    assert qt.shape == w.shape and qt.qtype == qtype
    assert snr_db(w, dequantize(qt)) >= MIN_SNR_DB[qtype]


@pytest.mark.parametrize("qtype", QTYPES)
def test_zero_weight_round_trips_to_zero(qtype):
    w = torch.zeros(2, get_spec(qtype).block_size)
    assert torch.count_nonzero(dequantize(quantize(w, qtype))) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_quantize_their_fp32_value(dtype):
    w = weights("normal", 4, 256, seed=2).to(dtype)
    for qtype in ("q4_0", "q6_k"):
        assert quantize(w, qtype).equal(quantize(w.float(), qtype))


def test_non_contiguous_and_grad_inputs():
    w = weights("normal", 256, 8, seed=3).t()       # (8, 256) non-contiguous view
    assert quantize(w, "q8_0").equal(quantize(w.contiguous(), "q8_0"))
    p = torch.nn.Parameter(weights("normal", 2, 32, seed=4))
    assert quantize(p, "q4_0").equal(quantize(p.detach(), "q4_0"))


@pytest.mark.parametrize(
    "w, qtype, exc, match",
    [
        (torch.zeros(4, 256), "iq2_xxs", ValueError, "unknown qtype"),
        (torch.zeros(256), "q4_k", ValueError, "must be 2-D"),
        (torch.zeros(2, 2, 256), "q4_k", ValueError, "must be 2-D"),
        (torch.zeros(4, 128), "q4_k", ValueError, "K=128 .* not a multiple of the q4_k block size 256"),
        (torch.zeros(4, 48), "q8_0", ValueError, "not a multiple of the q8_0 block size 32"),
        (torch.zeros(4, 256, dtype=torch.int32), "q4_k", TypeError, "floating point"),
        (torch.zeros(0, 256), "q4_k", ValueError, "non-empty"),
        (np.zeros((4, 256), dtype=np.float32), "q4_k", TypeError, "torch.Tensor"),
        (torch.zeros(4, 256, device="meta"), "q4_k", ValueError, "meta"),
    ],
)
def test_rejects_bad_input(w, qtype, exc, match):
    with pytest.raises(exc, match=match):
        quantize(w, qtype)


@pytest.mark.parametrize("qtype", QTYPES)
def test_rejects_weights_whose_scale_overflows_fp16(qtype):
    w = torch.ones(2, 256)
    w[1, 3] = 3e7 if get_spec(qtype).block_size == 32 else 1e14
    if get_spec(qtype).fp16_offsets:
        with pytest.raises(ValueError, match=f"too large for {qtype}: the fp16 scale of block 0 in row 1 overflows"):
            quantize(w, qtype)
    else:       # mxfp4's scale is a power of two from 2**-127 to 2**127: no fp16 field to overflow
        # 3e7 takes the block's top grid value 12 * 2**(24 - 3): ggml's exponent (floor(log2 amax) - 2) clips
        # magnitudes above 1.5 times their power of two
        assert float(dequantize(quantize(w, qtype))[1, 3]) == 1.5 * 2 ** 24
    w[1, 3] = 3e38
    with pytest.raises(ValueError, match=f"too large for {qtype}: max |w| = 3e\\+38 exceeds"):
        quantize(w, qtype)


@settings(max_examples=40, deadline=None)
@given(qtype=st.sampled_from(QTYPES), row=st.integers(0, 2), col=st.integers(0, 255),
       bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_rejects_non_finite_anywhere(qtype, row, col, bad):
    w = torch.randn(3, 256)
    w[row, col] = bad
    with pytest.raises(ValueError, match=f"NaN or Inf \\(first at row {row}, column {col}\\)"):
        quantize(w, qtype)


@settings(max_examples=30, deadline=None)
@given(qtype=st.sampled_from(QTYPES), n=st.integers(1, 6), blocks=st.integers(1, 3), scale=st.floats(1e-3, 1e3))
def test_shapes_and_scale_property(qtype, n, blocks, scale):
    """Any valid shape quantizes to exactly N * K/QK * block_bytes bytes, with bounded relative error."""
    spec = get_spec(qtype)
    w = torch.randn(n, blocks * spec.block_size, generator=torch.Generator().manual_seed(n * 7 + blocks)) * scale
    qt = quantize(w, qtype)
    assert qt.data.shape == (n, blocks * spec.block_bytes)
    assert snr_db(w, dequantize(qt)) >= MIN_SNR_DB[qtype] - 6   # small samples: looser floor


FP8_DTYPES = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
              if hasattr(torch, name)]


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
def test_fp8_weights_are_refused(dtype):
    """fp8 values are meaningless without their checkpoint's scales: a TypeError that says so, not garbage
    bytes or an error from deep inside torch."""
    w = weights("normal", 2, 256, seed=5).to(dtype)
    for qtype in ("q4_0", "q4_k"):
        with pytest.raises(TypeError, match=r"float8.*not supported.*scales"):
            quantize(w, qtype)
    with pytest.raises(TypeError, match=r"float8.*not supported"):
        quantize_blocks(w.reshape(-1, 32), "q4_0")


def test_quantize_blocks_rejects_non_float_input():
    with pytest.raises(TypeError, match="floating point"):
        quantize_blocks(torch.zeros(2, 32, dtype=torch.int32), "q8_0")
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_blocks(np.zeros((2, 32), dtype=np.float32), "q8_0")
