"""iq4_nl and iq4_xs alike against ggml: committed vectors, gguf's numpy dequantizer, and a live check when
libggml is around (OFFLOAD_KERNELS_GGML_LIB). What only one format has is in test_iq4_nl.py / test_iq4_xs.py;
the vectors and the shared helpers are described in iq4_helpers.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .iq4_helpers import DEVICES, FORMATS, LIB, Iq4Format, assert_same_floats, live

BY_FORMAT = pytest.mark.parametrize("fmt", FORMATS, ids=[f.name for f in FORMATS])
VECTOR_CASES = pytest.mark.parametrize(
    "fmt, case", [pytest.param(f, c, id=f"{f.name}-{c}") for f in FORMATS for c in f.cases])
GENERATOR_CASES = pytest.mark.parametrize(
    "fmt, case", [pytest.param(f, c, id=f"{f.name}-{c}") for f in FORMATS for c in sorted(f.gen.CASES)])

#: weights per live test: 4096 iq4_nl blocks, 512 iq4_xs super-blocks
LIVE_WEIGHTS = 4096 * 32


# ------------------------------------------------------------------------------------- committed vectors

@BY_FORMAT
def test_vectors_cover_the_cases(fmt: Iq4Format):
    spec = fmt.gen.VECTORS
    assert fmt.cases == sorted(spec.cases)
    for case in fmt.cases:
        assert fmt.vectors[f"{case}/input"].shape == (spec.blocks_per_case, fmt.block_size)
        assert fmt.vectors[f"{case}/bytes"].shape == (spec.blocks_per_case, fmt.block_bytes)
        assert fmt.vectors[f"{case}/dequant"].shape == (spec.blocks_per_case, fmt.block_size)


@VECTOR_CASES
def test_dequantize_matches_ggml_floats(fmt: Iq4Format, case: str):
    got = fmt.dequantize_np(fmt.vectors[f"{case}/bytes"])
    assert_same_floats(got, fmt.vectors[f"{case}/dequant"], f"{fmt.name} {case} dequantize")


@pytest.mark.parametrize("device", DEVICES)
@VECTOR_CASES
def test_quantize_matches_ggml_bytes(fmt: Iq4Format, case: str, device: str):
    x = fmt.vectors[f"{case}/input"]
    expected = fmt.vectors[f"{case}/bytes"]
    got = fmt.quantize_np(x, device)
    assert got.shape == expected.shape and got.dtype == np.uint8
    if not np.array_equal(got, expected):
        pytest.fail(f"{fmt.name} {case} on {device}: " + fmt.describe_mismatch(got, expected, x))


@BY_FORMAT
def test_quantize_input_dtypes_and_layout(fmt: Iq4Format):
    x = fmt.vectors[f"{fmt.normal_case}/input"]
    expected = fmt.vectors[f"{fmt.normal_case}/bytes"]
    t = torch.from_numpy(x)
    assert np.array_equal(fmt.quantize(t.double()).numpy(), expected)          # exact fp32 values
    wide = torch.zeros((x.shape[0], 2 * fmt.block_size))
    wide[:, ::2] = t
    assert np.array_equal(fmt.quantize(wide[:, ::2]).numpy(), expected)        # non-contiguous
    assert fmt.quantize(torch.zeros((0, fmt.block_size))).shape == (0, fmt.block_bytes)
    b = fmt.block_size
    for bad in sorted({(4, 16), (4, 32), (4, b // 2), (b,), (2, 2, b)} - {(4, b)}):
        with pytest.raises(ValueError):
            fmt.quantize(torch.zeros(bad))


@BY_FORMAT
def test_round_trip_error_is_small(fmt: Iq4Format):
    x = torch.from_numpy(fmt.vectors[f"{fmt.normal_case}/input"])
    out = torch.empty_like(x)
    fmt.dequantize(fmt.quantize(x), out)
    rel = ((out - x).norm(dim=1) / x.norm(dim=1)).max().item()
    assert rel < 0.15


# ------------------------------------------------------------------------------------- gguf's dequantizer

@pytest.mark.parametrize("device", DEVICES)
@BY_FORMAT
def test_dequantize_matches_gguf_numpy_on_random_bytes(fmt: Iq4Format, device: str):
    blocks = fmt.random_blocks(np.random.default_rng(1234), 20000)
    assert_same_floats(fmt.dequantize_np(blocks, device), fmt.gguf_dequantize(blocks),
                       f"{fmt.name} dequantize vs gguf")


# ------------------------------------------------------------------------------------ live, with libggml

@live
@pytest.mark.parametrize("device", DEVICES)
@GENERATOR_CASES
def test_live_random_blocks_match_ggml(fmt: Iq4Format, case: str, device: str):
    ggml = fmt.gen.VECTORS.ref(LIB)
    seed = int(np.random.SeedSequence().entropy % 2**32)
    x = fmt.gen.VECTORS.make_input(case, seed, n=LIVE_WEIGHTS // fmt.block_size)
    with np.errstate(all="ignore"):
        expected = ggml.quantize(x)
        expected_floats = ggml.dequantize(expected)
    got = fmt.quantize_np(x, device)
    if not np.array_equal(got, expected):
        pytest.fail(f"{fmt.name} {case} on {device} (seed {seed}): " + fmt.describe_mismatch(got, expected, x))
    assert_same_floats(fmt.dequantize_np(expected, device), expected_floats,
                       f"{fmt.name} {case} dequantize (seed {seed})")


@live
@BY_FORMAT
def test_live_random_bytes_dequantize_like_ggml(fmt: Iq4Format):
    ggml = fmt.gen.VECTORS.ref(LIB)
    blocks = fmt.random_blocks(np.random.default_rng(), 20000)
    with np.errstate(all="ignore"):
        expected = ggml.dequantize(blocks)
    assert_same_floats(fmt.dequantize_np(blocks), expected, f"{fmt.name} dequantize vs ggml on random bytes")
