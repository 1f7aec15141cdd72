"""QuantizedTensor validates on construction and behaves like a small tensor wrapper."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_kernels.formats import QTYPES, QuantizedTensor, get_spec

from .helpers import random_blocks


@pytest.mark.parametrize("qtype", QTYPES)
def test_properties_and_repr(qtype):
    spec = get_spec(qtype)
    qt = random_blocks(qtype, 3, spec.block_size * 2, torch.Generator().manual_seed(0))
    assert qt.qtype == qtype and qt.shape == torch.Size([3, spec.block_size * 2])
    assert qt.nbytes == 3 * 2 * spec.block_bytes == qt.data.numel()
    assert qt.bits_per_weight == pytest.approx(8 * spec.block_bytes / spec.block_size)
    assert qt.device == torch.device("cpu") and qt.row_bytes == 2 * spec.block_bytes
    r = repr(qt)
    assert qtype in r and "shape=(3," in r and "bits_per_weight" in r


def test_bits_per_weight_table():
    expected = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "q2_k": 2.625, "q3_k": 3.4375,
                "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "iq4_nl": 4.5, "iq4_xs": 4.25, "mxfp4": 4.25}
    assert {q: get_spec(q).bits_per_weight for q in QTYPES} == expected


def test_flat_data_is_viewed_not_copied():
    data = torch.zeros(2 * 18 * 4, dtype=torch.uint8)
    qt = QuantizedTensor(data, "q4_0", (2, 128))
    assert qt.data.shape == (2, 72) and qt.data.data_ptr() == data.data_ptr()


def test_to_same_device_returns_self_and_clone_copies():
    qt = random_blocks("q4_k", 1, 256, torch.Generator().manual_seed(1))
    assert qt.to("cpu") is qt
    c = qt.clone()
    assert c.equal(qt) and c.data.data_ptr() != qt.data.data_ptr()


def test_index_rows_permutes_whole_rows():
    qt = random_blocks("q3_k", 4, 512, torch.Generator().manual_seed(2))
    perm = torch.tensor([2, 0, 3, 1])
    p = qt.index_rows(perm)
    assert torch.equal(p.data, qt.data[perm]) and p.shape == qt.shape
    assert torch.equal(p.dequantize(), qt.dequantize()[perm])


@pytest.mark.parametrize("qtype", ["Q4_K", " q4_k ", "q4_K"])
def test_qtype_names_are_normalized(qtype):
    qt = QuantizedTensor(torch.zeros(1, 144, dtype=torch.uint8), qtype, (1, 256))
    assert qt.qtype == "q4_k"


@pytest.mark.parametrize(
    "data, qtype, shape, exc, match",
    [
        (torch.zeros(1, 144, dtype=torch.uint8), "q9_k", (1, 256), ValueError, "unknown qtype 'q9_k'"),
        (torch.zeros(1, 144, dtype=torch.uint8), 4, (1, 256), TypeError, "qtype must be a string"),
        (torch.zeros(1, 144, dtype=torch.int8), "q4_k", (1, 256), TypeError, "dtype torch.uint8"),
        (b"\x00" * 144, "q4_k", (1, 256), TypeError, "torch.uint8 tensor"),
        (torch.zeros(1, 144, dtype=torch.uint8), "q4_k", (1, 200), ValueError, "not a multiple of the q4_k block size 256"),
        (torch.zeros(1, 144, dtype=torch.uint8), "q4_k", (1, 256, 1), ValueError, "must be 2-D"),
        (torch.zeros(1, 143, dtype=torch.uint8), "q4_k", (1, 256), ValueError, r"needs data of shape \(1, 144\)"),
        (torch.zeros(143, dtype=torch.uint8), "q4_k", (1, 256), ValueError, "needs 144 bytes"),
        (torch.zeros(2, 144, dtype=torch.uint8), "q4_k", (1, 256), ValueError, "needs data of shape"),
        (torch.zeros(1, 1, 144, dtype=torch.uint8), "q4_k", (1, 256), ValueError, "1-D or 2-D"),
        (torch.zeros(2, 288, dtype=torch.uint8)[:, :144], "q4_k", (2, 256), ValueError, "contiguous"),
        (torch.zeros(1, 144, dtype=torch.uint8), "q4_k", (0, 256), ValueError, "positive"),
    ],
)
def test_construction_rejects(data, qtype, shape, exc, match):
    with pytest.raises(exc, match=match):
        QuantizedTensor(data, qtype, shape)


@settings(max_examples=60, deadline=None)
@given(qtype=st.sampled_from(QTYPES), n=st.integers(1, 5), blocks=st.integers(1, 4), extra=st.integers(-3, 3))
def test_byte_count_must_match_exactly(qtype, n, blocks, extra):
    spec = get_spec(qtype)
    k = blocks * spec.block_size
    nbytes = n * spec.row_bytes(k) + extra
    data = torch.zeros(max(nbytes, 1), dtype=torch.uint8)
    if extra == 0:
        assert QuantizedTensor(data, qtype, (n, k)).nbytes == nbytes
    else:
        with pytest.raises(ValueError, match=f"needs {n * spec.row_bytes(k)} bytes"):
            QuantizedTensor(data, qtype, (n, k))


@pytest.mark.parametrize("index", [torch.tensor([True, False, True, False]), [True, False],
                                   torch.tensor([0.0, 2.0]), torch.tensor([1.5]), [0.0, 1.0],
                                   torch.tensor([0, 1], dtype=torch.complex64)],
                         ids=["bool_tensor", "bool_list", "float_tensor", "fractional", "float_list", "complex"])
def test_index_rows_rejects_bool_and_float_indices(index):
    """A bool mask or float tensor silently cast to long would gather rows 0/1 or truncated row numbers."""
    qt = random_blocks("q4_0", 4, 64, torch.Generator().manual_seed(3))
    with pytest.raises(TypeError, match="index must be integer row numbers"):
        qt.index_rows(index)


@pytest.mark.parametrize("index", [[2, 0], np.array([2, 0]), torch.tensor([2, 0], dtype=torch.int32),
                                   torch.tensor([2, 0], dtype=torch.uint8)], ids=["list", "numpy", "int32", "uint8"])
def test_index_rows_accepts_integer_indices(index):
    qt = random_blocks("q4_0", 4, 64, torch.Generator().manual_seed(4))
    assert torch.equal(qt.index_rows(index).data, qt.data[[2, 0]])


@pytest.mark.parametrize("shape", [(1.0, 256), (1, 256.0), (1, 256.5), (True, 256), (1, np.float64(256)),
                                   (np.float32(1), 256), (torch.tensor(1.0), 256), (torch.tensor(True), 256),
                                   (1, "256")],
                         ids=["float_n", "float_k", "fractional_k", "bool_n", "np_float_k", "np_float32_n",
                              "torch_float_n", "torch_bool_n", "str_k"])
def test_construction_rejects_non_int_dims(shape):
    with pytest.raises(TypeError, match=r"shape must be two ints, got \w+ .* at dim \d"):
        QuantizedTensor(torch.zeros(1, 144, dtype=torch.uint8), "q4_k", shape)


def test_construction_accepts_integer_scalars():
    for shape in [(np.int64(1), np.int32(256)), (torch.tensor(1), 256), torch.Size([1, 256])]:
        assert QuantizedTensor(torch.zeros(1, 144, dtype=torch.uint8), "q4_k", shape).shape == (1, 256)
    with pytest.raises(TypeError, match="sequence of two ints"):
        QuantizedTensor(torch.zeros(1, 144, dtype=torch.uint8), "q4_k", 256)
