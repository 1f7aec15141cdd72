"""mxfp4 (gpt-oss's expert format) against ggml: committed vectors, gguf's numpy dequantizer, and a live check when
libggml is around (OFFLOAD_KERNELS_GGML_LIB). The vectors are tests/vectors/mxfp4_vectors.npz
(tests/vectors/generate_mxfp4_vectors.py): ggml's bytes and floats for 14 input cases, among them block maxima just
below powers of two (where fp32 log2f decides the exponent), the subnormal range and non-finite weights."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from offload_kernels.formats import dequantize, get_spec, quantize
from offload_kernels.formats.mxfp4 import (MXFP4_VALUES, dequantize_mxfp4_blocks, e8m0_half_to_f32,
                                           quantize_mxfp4_blocks)

from .helpers import assert_same_floats, weights

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
sys.path.insert(0, str(VECTORS_DIR))
import generate_mxfp4_vectors as gen  # noqa: E402
from ggml_ref import LIB_ENV, find_library  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LIB = find_library()
live = pytest.mark.skipif(LIB is None, reason=f"set {LIB_ENV} to libggml-base.so")

with np.load(gen.VECTORS.npz) as _f:
    VECTORS = {k: _f[k] for k in _f.files if k != "note"}
CASES = sorted({k.split("/")[0] for k in VECTORS})


def quantize_np(x: np.ndarray, device: str = "cpu") -> np.ndarray:
    return quantize_mxfp4_blocks(torch.from_numpy(x).to(device)).cpu().numpy()


def dequantize_np(blocks: np.ndarray, device: str = "cpu") -> np.ndarray:
    b = torch.from_numpy(np.ascontiguousarray(blocks)).to(device)
    out = torch.empty((b.shape[0], 32), dtype=torch.float32, device=device)
    dequantize_mxfp4_blocks(b, out)
    return out.cpu().numpy()


def describe_mismatch(got: np.ndarray, expected: np.ndarray, x: np.ndarray) -> str:
    bad = np.nonzero((got != expected).any(axis=1))[0]
    if bad.size == 0:
        return "identical"
    b = int(bad[0])
    qs = np.nonzero(got[b, 1:] != expected[b, 1:])[0]
    return (f"{bad.size} of {len(expected)} blocks differ; first: block {b}, input min {np.nanmin(x[b]):.9g} max "
            f"{np.nanmax(x[b]):.9g}; e got {got[b, 0]} expected {expected[b, 0]}; qs bytes {qs[:8].tolist()} got "
            f"{got[b, 1 + qs[:8]].tolist()} expected {expected[b, 1 + qs[:8]].tolist()}")


# ------------------------------------------------------------------------------------- format facts

def test_table_layout_and_type_id_match_gguf():
    assert MXFP4_VALUES == tuple(gguf_quants.MXFP4.kvalues)
    assert tuple(gen.KVALUES.astype(int)) == MXFP4_VALUES
    spec = get_spec("mxfp4")
    assert spec.ggml_type == GGMLQuantizationType.MXFP4 == gen.VECTORS.type_id == 39
    assert (spec.block_size, spec.block_bytes, spec.bits_per_weight) == (32, 17, 4.25)
    assert get_spec(GGMLQuantizationType.MXFP4) is spec


def test_every_exponent_byte_is_the_halved_power_of_two():
    e = torch.arange(256, dtype=torch.uint8)
    got = e8m0_half_to_f32(e).tolist()
    assert got == [math.ldexp(1.0, i - 128) for i in range(256)]       # 2**-128 and 2**-127 are fp32 subnormals


def test_layout_low_nibble_is_weight_j_high_nibble_weight_j_plus_16():
    blocks = np.zeros((1, 17), dtype=np.uint8)
    blocks[0, 0] = 130                                                  # d = 2**2
    lo, hi = np.arange(16), (np.arange(16) * 7 + 3) % 16
    blocks[0, 1:] = lo | (hi << 4)
    got = dequantize_np(blocks)[0]
    table = np.array(MXFP4_VALUES, dtype=np.float32) * 4
    np.testing.assert_array_equal(got[:16], table[lo])
    np.testing.assert_array_equal(got[16:], table[hi])


# ------------------------------------------------------------------------------------- committed vectors

def test_vectors_cover_the_cases():
    assert CASES == sorted(gen.CASES)
    for case in CASES:
        assert VECTORS[f"{case}/bytes"].shape == (gen.VECTORS.blocks_per_case, 17)


@pytest.mark.parametrize("case", CASES)
def test_dequantize_matches_ggml_floats(case: str):
    assert_same_floats(dequantize_np(VECTORS[f"{case}/bytes"]), VECTORS[f"{case}/dequant"], f"mxfp4 {case}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_quantize_matches_ggml_bytes(case: str, device: str):
    x, expected = VECTORS[f"{case}/input"], VECTORS[f"{case}/bytes"]
    got = quantize_np(x, device)
    if not np.array_equal(got, expected):
        pytest.fail(f"mxfp4 {case} on {device}: " + describe_mismatch(got, expected, x))


# ------------------------------------------------------------------------------------- gguf, and the API

@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_matches_gguf_numpy_on_random_bytes(device: str):
    """Every exponent byte (0 and 1: subnormal scales; 255: products that overflow to Inf) with random codes."""
    g = np.random.default_rng(1234)
    blocks = g.integers(0, 256, (20000, 17), dtype=np.uint8)
    blocks[:256, 0] = np.arange(256)
    with np.errstate(over="ignore"):
        expected = gguf_quants.dequantize(blocks.reshape(-1), GGMLQuantizationType.MXFP4).reshape(-1, 32)
    assert_same_floats(dequantize_np(blocks, device), expected, "mxfp4 dequantize vs gguf")


@pytest.mark.parametrize("distribution", ["normal", "realistic", "heavy_tails"])
def test_quantize_api_is_the_block_quantizer_and_lands_on_each_blocks_grid(distribution: str):
    w = weights(distribution, 6, 320, seed=7)
    qt = quantize(w, "mxfp4")
    assert qt.qtype == "mxfp4" and qt.data.shape == (6, 10 * 17)
    assert torch.equal(qt.data.reshape(-1, 17), quantize_mxfp4_blocks(w.reshape(-1, 32)))
    d = e8m0_half_to_f32(qt.data.reshape(-1, 17)[:, 0])
    codes = dequantize(qt).reshape(-1, 32) / d[:, None]
    assert set(codes.unique().tolist()) <= set(float(v) for v in MXFP4_VALUES)
    # the largest magnitude of a block lies within a quarter of its octave of the block's top grid value
    top = 12 * d
    amax = w.reshape(-1, 32).abs().amax(dim=1)
    assert bool(((amax >= top * 2 / 3) & (amax < top * 4 / 3)).all())


# ------------------------------------------------------------------------------------ live, with libggml

@live
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(gen.CASES))
def test_live_random_blocks_match_ggml(case: str, device: str):
    ggml = gen.VECTORS.ref(LIB)
    seed = int(np.random.SeedSequence().entropy % 2**32)
    x = gen.VECTORS.make_input(case, seed, n=4096)
    with np.errstate(all="ignore"):
        expected = ggml.quantize(x)
        expected_floats = ggml.dequantize(expected)
    got = quantize_np(x, device)
    if not np.array_equal(got, expected):
        pytest.fail(f"mxfp4 {case} on {device} (seed {seed}): " + describe_mismatch(got, expected, x))
    assert_same_floats(dequantize_np(expected, device), expected_floats, f"mxfp4 {case} dequantize (seed {seed})")


@live
def test_live_exponent_of_every_maximum_near_a_power_of_two():
    """The 600 fp32 values just below, the two just above and the power of two itself, for every exponent from
    the smallest subnormal up: ggml's floorf(log2f(amax)) exponent byte, wrap-around included."""
    ggml = gen.VECTORS.ref(LIB)
    k = np.arange(-149, 128)
    below = np.ldexp(1.0 - np.arange(600)[None, :] * 2.0 ** -24, k[:, None]).astype(np.float32).ravel()
    amax = np.concatenate([below, np.nextafter(below, np.float32(np.inf)),
                           np.nextafter(np.nextafter(below, np.float32(np.inf)), np.float32(np.inf))])
    x = np.zeros((amax.size, 32), dtype=np.float32)
    x[:, 7] = amax
    x[::2, 7] *= -1
    expected = ggml.quantize(x)
    got = quantize_np(x)
    if not np.array_equal(got, expected):
        pytest.fail("mxfp4 maxima near powers of two: " + describe_mismatch(got, expected, x))


@live
def test_live_random_bytes_dequantize_like_ggml():
    ggml = gen.VECTORS.ref(LIB)
    blocks = np.random.default_rng().integers(0, 256, (20000, 17), dtype=np.uint8)
    with np.errstate(all="ignore"):
        expected = ggml.dequantize(blocks)
    assert_same_floats(dequantize_np(blocks), expected, "mxfp4 dequantize vs ggml on random bytes")
