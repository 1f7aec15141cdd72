"""dequantize is bit-exact with llama.cpp's dequantize_row_* (via gguf's faithful numpy dequantizers)."""

import zlib

import numpy as np
import pytest
import torch
from gguf import quants

from offload_kernels.formats import QTYPES, QuantizedTensor, dequantize, dequantize_blocks, get_spec

from .helpers import random_blocks


def gguf_reference(qt: QuantizedTensor) -> np.ndarray:
    return quants.dequantize(qt.data.numpy(), qt.spec.ggml_type).reshape(tuple(qt.shape)).astype(np.float32)


def assert_bits_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    ours_bits = ours.numpy().view(np.uint32)
    ref_bits = ref.view(np.uint32)
    bad = np.argwhere(ours_bits != ref_bits)
    assert bad.size == 0, (f"{len(bad)} values differ; first at {tuple(bad[0])}: ours {ours.numpy()[tuple(bad[0])]!r} "
                           f"vs llama.cpp {ref[tuple(bad[0])]!r}")


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("shape_blocks", [(1, 1), (3, 2), (17, 5)])
def test_random_blocks_bit_exact(qtype, shape_blocks):
    spec = get_spec(qtype)
    n, kb = shape_blocks
    g = torch.Generator().manual_seed(zlib.crc32(f"{qtype}-{n}-{kb}".encode()))
    qt = random_blocks(qtype, n, kb * spec.block_size, g)
    assert_bits_equal(dequantize(qt), gguf_reference(qt))


@pytest.mark.parametrize("qtype", QTYPES)
def test_subnormal_and_extreme_scales(qtype):
    """Scales across the whole finite fp16 range, subnormals included."""
    spec = get_spec(qtype)
    g = torch.Generator().manual_seed(7)
    for max_exp in (0, 1, 15, 30):
        qt = random_blocks(qtype, 4, 2 * spec.block_size, g, max_exponent=max_exp)
        assert_bits_equal(dequantize(qt), gguf_reference(qt))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_dtype_is_rounded_fp32(qtype, dtype):
    spec = get_spec(qtype)
    qt = random_blocks(qtype, 5, spec.block_size * 2, torch.Generator().manual_seed(3), max_exponent=14)
    out = dequantize(qt, dtype)
    assert out.dtype == dtype and out.shape == qt.shape
    torch.testing.assert_close(out, dequantize(qt).to(dtype), rtol=0, atol=0, equal_nan=True)


def test_large_tensor_crosses_chunks():
    """More weights than one decode step: the chunked loop must cover every block."""
    qt = random_blocks("q4_k", 2, 256 * 4200, torch.Generator().manual_seed(11))
    assert_bits_equal(dequantize(qt), gguf_reference(qt))


def test_dequantize_blocks_matches_tensor_path():
    qt = random_blocks("q6_k", 3, 512, torch.Generator().manual_seed(5))
    blocks = qt.data.view(-1, 210)
    assert torch.equal(dequantize_blocks(blocks, "q6_k").view(3, 512), dequantize(qt))
    with pytest.raises(ValueError, match="q6_k blocks must be uint8 of shape"):
        dequantize_blocks(blocks[:, :200], "q6_k")


def test_dequantize_rejects_bad_input():
    with pytest.raises(TypeError, match="QuantizedTensor"):
        dequantize(torch.zeros(4, 32))
    qt = random_blocks("q8_0", 1, 32, torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="dtype must be one of"):
        dequantize(qt, torch.int32)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.complex64,
                                   getattr(torch, "float8_e4m3fn", None), "float32", None])
def test_dequantize_blocks_checks_dtype(dtype):
    """Only float32/float16/bfloat16/float64 outputs: an integer (or fp8) one would truncate every value."""
    blocks = random_blocks("q4_0", 2, 64, torch.Generator().manual_seed(6)).data.view(-1, 18)
    with pytest.raises(TypeError, match="dtype must be one of"):
        dequantize_blocks(blocks, "q4_0", dtype)
    qt = QuantizedTensor(blocks.reshape(2, 36), "q4_0", (2, 64))
    with pytest.raises(TypeError, match="dtype must be one of"):
        dequantize(qt, dtype)


def test_dequantize_blocks_rejects_non_tensor():
    with pytest.raises(TypeError, match="torch.uint8 tensor"):
        dequantize_blocks(bytes(18), "q4_0")
