"""The Triton dequantize kernel is bit-exact with the torch reference dequantizer (itself bit-exact with
llama.cpp): fp32 values bit for bit, fp16/bf16 equal to the fp32 values rounded to that dtype."""

from __future__ import annotations

import pytest
import torch

from offload_kernels import kernels
from offload_kernels.formats import QTYPES, dequantize, get_spec

from .conftest import HAS_CUDA
from .helpers import random_bytes_qtensor, seed_of

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 inf

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if HAS_CUDA else (torch.float32, torch.float16)


def assert_bits_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    int_view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[ref.dtype]
    a, b = ours.cpu().view(int_view), ref.cpu().view(int_view)
    bad = (a != b).nonzero()
    if bad.numel():
        at = tuple(bad[0].tolist())
        raise AssertionError(f"{bad.shape[0]} values differ; first at {at}: triton {ours.cpu()[at].item()!r} "
                             f"vs torch {ref.cpu()[at].item()!r}")


@pytest.mark.parametrize("n,blocks", [(1, 1), (37, 3), (70, 9)])
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_bit_exact_random_blocks(qtype, dtype, n, blocks, device):
    """Random bytes (every quant pattern, scales over the whole finite fp16 range incl. subnormals; fp16
    outputs may overflow to inf, identically) into a NaN-poisoned output: bit-identical to torch."""
    k = blocks * get_spec(qtype).block_size
    qt = random_bytes_qtensor(qtype, n, k, torch.Generator().manual_seed(seed_of(qtype, n, blocks)))
    expected = dequantize(qt, dtype)
    out = torch.full((n, k), float("nan"), dtype=dtype, device=device)
    kernels.reset_launch_counts()
    got = kernels.dequantize_triton(qt.to(device), dtype, out=out)
    assert got is out
    assert kernels.launch_counts()["dequant"] == 1
    assert_bits_equal(got, expected)


@pytest.mark.parametrize("qtype", QTYPES)
def test_default_dtype_and_allocation(qtype, device):
    qt = random_bytes_qtensor(qtype, 5, get_spec(qtype).block_size * 2, torch.Generator().manual_seed(3)).to(device)
    with kernels.poison_outputs():
        got = kernels.dequantize_triton(qt)
    assert got.dtype == torch.float16 and got.shape == (5, qt.shape[1]) and got.device == qt.device
    assert_bits_equal(got, dequantize(qt.cpu(), torch.float16))


def test_argument_errors(device):
    qt = random_bytes_qtensor("q4_0", 4, 64, torch.Generator().manual_seed(0)).to(device)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        kernels.dequantize_triton(qt.data)
    with pytest.raises(TypeError, match="dtype"):
        kernels.dequantize_triton(qt, torch.float64)
    with pytest.raises(ValueError, match=r"contiguous \(4, 64\)"):
        kernels.dequantize_triton(qt, torch.float32, out=torch.empty(4, 65, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.dequantize_triton(qt, torch.float32, out=torch.empty(64, 4, device=device).t())
    with pytest.raises(ValueError, match="contiguous"):
        kernels.dequantize_triton(qt, torch.float32, out=torch.empty(4, 64, dtype=torch.float16, device=device))


@pytest.mark.skipif(HAS_CUDA, reason="interpreter-only behaviour")
def test_bfloat16_refused_by_the_interpreter():
    qt = random_bytes_qtensor("q4_0", 4, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="interpreter cannot compute in bfloat16"):
        kernels.dequantize_triton(qt, torch.bfloat16)
