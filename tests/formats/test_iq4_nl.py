"""iq4_nl against ggml: committed vectors, gguf's numpy dequantizer, and a live check when libggml is around.

tests/vectors/iq4_nl_vectors.npz holds, for 19 input cases (normal, heavy tails, outliers, zeros of both
signs, constants, ties, tiny and huge magnitudes, fp32 overflow, NaN/Inf, ...), the bytes
ggml_quantize_chunk(GGML_TYPE_IQ4_NL, imatrix=NULL) wrote and the floats dequantize_row_iq4_nl read back
(tests/vectors/generate_iq4_nl_vectors.py).
Set OFFLOAD_KERNELS_GGML_LIB to a libggml-base.so to also compare on fresh random data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from offload_kernels.formats.iq4_nl import (
    GGML_TYPE_IQ4_NL,
    IQ4_NL_VALUES,
    best_index_iq4_nl,
    dequantize_iq4_nl_blocks,
    quantize_iq4_nl_blocks,
)

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
sys.path.insert(0, str(VECTORS_DIR))
import generate_iq4_nl_vectors as gen  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _load_vectors() -> dict[str, np.ndarray]:
    with np.load(VECTORS_DIR / "iq4_nl_vectors.npz") as f:
        return {k: f[k] for k in f.files if k != "note"}


VECTORS = _load_vectors()
CASES = sorted({k.split("/")[0] for k in VECTORS})


def quantize_np(x: np.ndarray, device: str = "cpu") -> np.ndarray:
    return quantize_iq4_nl_blocks(torch.from_numpy(x).to(device)).cpu().numpy()


def dequantize_np(blocks: np.ndarray, device: str = "cpu") -> np.ndarray:
    b = torch.from_numpy(np.ascontiguousarray(blocks)).to(device)
    out = torch.empty((b.shape[0], 32), dtype=torch.float32, device=device)
    dequantize_iq4_nl_blocks(b, out)
    return out.cpu().numpy()


def describe_mismatch(got: np.ndarray, expected: np.ndarray, x: np.ndarray) -> str:
    bad = np.nonzero((got != expected).any(axis=1))[0]
    if bad.size == 0:
        return "identical"
    b = int(bad[0])
    d_got, d_exp = (a[b, 0:2].copy().view(np.float16)[0] for a in (got, expected))
    qs = np.nonzero(got[b, 2:] != expected[b, 2:])[0]
    return (f"{bad.size} of {len(expected)} blocks differ; first: block {b}, input min {x[b].min():.6g} "
            f"max {x[b].max():.6g}; d got {d_got!r} expected {d_exp!r}; {qs.size} qs bytes differ "
            f"(got {got[b, 2 + qs[:8]].tolist()} expected {expected[b, 2 + qs[:8]].tolist()})")


def assert_same_floats(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Bit-for-bit equal fp32, except that any NaN matches any NaN."""
    same = (got.view(np.int32) == expected.view(np.int32)) | (np.isnan(got) & np.isnan(expected))
    if not same.all():
        i = np.unravel_index(np.argmin(same), same.shape)
        raise AssertionError(f"{what}: {(~same).sum()} of {same.size} values differ; first at {i}: "
                             f"got {got[i]!r} expected {expected[i]!r}")


# ------------------------------------------------------------------------------------- format facts

def test_table_and_type_id_match_gguf():
    assert IQ4_NL_VALUES == tuple(gguf_quants.IQ4_NL.kvalues)
    assert GGML_TYPE_IQ4_NL == int(GGMLQuantizationType.IQ4_NL) == 20
    assert tuple(gen.KVALUES.astype(int)) == IQ4_NL_VALUES
    assert list(IQ4_NL_VALUES) == sorted(IQ4_NL_VALUES)


def test_layout_low_nibble_is_weight_j_high_nibble_weight_j_plus_16():
    d = np.float16(0.5)
    blocks = np.zeros((1, 18), dtype=np.uint8)
    blocks[0, 0:2] = np.array([d]).view(np.uint8)
    lo, hi = np.arange(16), (np.arange(16) * 7 + 3) % 16
    blocks[0, 2:] = lo | (hi << 4)
    got = dequantize_np(blocks)[0]
    table = np.array(IQ4_NL_VALUES, dtype=np.float32)
    np.testing.assert_array_equal(got[:16], table[lo] * np.float32(d))
    np.testing.assert_array_equal(got[16:], table[hi] * np.float32(d))


# ------------------------------------------------------------------------------------- dequantizer

def _random_blocks(g: np.random.Generator, n: int) -> np.ndarray:
    """Random nibbles with fp16 scales of every kind: normal, subnormal, +-0, the largest, +-Inf, NaN."""
    blocks = g.integers(0, 256, (n, 18), dtype=np.uint8)
    special = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00,
                        0x7E00, 0xFE01, 0x3C00, 0x1400], dtype=np.uint16)
    d = blocks[:, 0:2].copy().view(np.uint16).ravel()
    pick = g.random(n) < 0.3
    d[pick] = g.choice(special, pick.sum())
    subnormal = g.random(n) < 0.15
    d[subnormal] = (d[subnormal] & 0x83FF)              # exponent 0: subnormal (or zero)
    blocks[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    return blocks


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_matches_gguf_numpy_on_random_bytes(device: str):
    g = np.random.default_rng(1234)
    blocks = _random_blocks(g, 20000)
    with np.errstate(invalid="ignore"):                  # signalling-NaN scales among the random bytes
        expected = gguf_quants.dequantize(blocks.reshape(-1), GGMLQuantizationType.IQ4_NL).reshape(-1, 32)
    assert expected.dtype == np.float32
    assert_same_floats(dequantize_np(blocks, device), expected, "iq4_nl dequantize vs gguf")


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_every_nibble_and_extreme_scale(device: str):
    """All 256 byte values under every fp16 bit pattern of interest, against gguf."""
    scales = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x0200, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xFBFF, 0x7C00,
                       0xFC00, 0x7E00], dtype=np.uint16)
    qs = np.arange(256, dtype=np.uint8).reshape(16, 16)
    blocks = np.zeros((len(scales) * 16, 18), dtype=np.uint8)
    blocks[:, 0:2] = np.repeat(scales, 16).view(np.uint8).reshape(-1, 2)
    blocks[:, 2:] = np.tile(qs, (len(scales), 1))
    expected = gguf_quants.dequantize(blocks.reshape(-1), GGMLQuantizationType.IQ4_NL).reshape(-1, 32)
    assert_same_floats(dequantize_np(blocks, device), expected, "iq4_nl dequantize vs gguf")


@pytest.mark.parametrize("case", CASES)
def test_dequantize_matches_ggml_floats(case: str):
    got = dequantize_np(VECTORS[f"{case}/bytes"])
    assert_same_floats(got, VECTORS[f"{case}/dequant"], f"{case} dequantize")


# ------------------------------------------------------------------------------------- quantizer

def _best_index_int8_scalar(x: np.float32) -> int:
    """ggml's best_index_int8 on one fp32 value, literally (binary search, fp32 differences)."""
    val = [np.float32(v) for v in IQ4_NL_VALUES]
    if x <= val[0]:
        return 0
    if x >= val[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(x - val[mu - 1]) < np.float32(val[mu] - x) else mu


@pytest.mark.parametrize("device", DEVICES)
def test_best_index_matches_ggml_rules(device: str):
    v = np.array(IQ4_NL_VALUES, dtype=np.float32)
    mids = (v[1:] + v[:-1]) / 2                      # exact in fp32: ties go to the upper level
    pts = np.concatenate([v, mids, v - 0.5, v + 0.5, [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 3e38, -3e38,
                                                      np.inf, -np.inf]]).astype(np.float32)
    near = np.concatenate([np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, np.float32(-np.inf))])
    g = np.random.default_rng(7)
    rand = np.concatenate([g.uniform(-140, 130, 4000), g.standard_normal(1000) * 1e-3]).astype(np.float32)
    xs = np.concatenate([pts, near, rand]).astype(np.float32)
    expected = np.array([_best_index_int8_scalar(x) for x in xs], dtype=np.uint8)
    got = best_index_iq4_nl(torch.from_numpy(xs).to(device)).cpu().numpy()
    np.testing.assert_array_equal(got, expected)
    assert int(best_index_iq4_nl(torch.tensor([float("nan")], device=device))[0]) == 15   # as ggml's search


def test_all_zero_block_is_zero_scale_and_index_of_zero():
    """scales = 0 (amax < 1e-15f), then the re-quantization with id = 0 picks best_index(0) = 8 (value 1)."""
    x = np.zeros((3, 32), dtype=np.float32)
    x[1] = -0.0
    x[2, 5] = 9e-16
    got = quantize_np(x)
    assert (got[:, 0:2] == 0).all()
    assert (got[:, 2:] == 0x88).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_quantize_matches_ggml_bytes(case: str, device: str):
    x = VECTORS[f"{case}/input"]
    expected = VECTORS[f"{case}/bytes"]
    got = quantize_np(x, device)
    assert got.shape == expected.shape and got.dtype == np.uint8
    if not np.array_equal(got, expected):
        pytest.fail(f"{case} on {device}: " + describe_mismatch(got, expected, x))


def test_vectors_cover_the_cases():
    assert CASES == sorted(gen.CASES)
    for case in CASES:
        assert VECTORS[f"{case}/input"].shape == (gen.BLOCKS_PER_CASE, 32)
        assert VECTORS[f"{case}/bytes"].shape == (gen.BLOCKS_PER_CASE, 18)


def test_quantize_input_dtypes_and_layout():
    x = VECTORS["normal/input"]
    expected = VECTORS["normal/bytes"]
    t = torch.from_numpy(x)
    assert np.array_equal(quantize_iq4_nl_blocks(t.double()).numpy(), expected)  # exact fp32 values
    wide = torch.zeros((x.shape[0], 64))
    wide[:, ::2] = t
    assert np.array_equal(quantize_iq4_nl_blocks(wide[:, ::2]).numpy(), expected)  # non-contiguous
    assert quantize_iq4_nl_blocks(torch.zeros((0, 32))).shape == (0, 18)
    with pytest.raises(ValueError):
        quantize_iq4_nl_blocks(torch.zeros((4, 16)))


def test_round_trip_error_is_small():
    x = torch.from_numpy(VECTORS["normal/input"])
    out = torch.empty_like(x)
    dequantize_iq4_nl_blocks(quantize_iq4_nl_blocks(x), out)
    rel = ((out - x).norm(dim=1) / x.norm(dim=1)).max().item()
    assert rel < 0.15


# ------------------------------------------------------------------------------------ live, with libggml

_LIB = gen.find_library()
live = pytest.mark.skipif(_LIB is None, reason=f"set {gen.LIB_ENV} to libggml-base.so")


@live
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(gen.CASES))
def test_live_random_blocks_match_ggml(case: str, device: str):
    ggml = gen.Iq4NlRef(_LIB)
    seed = int(np.random.SeedSequence().entropy % 2**32)
    x = gen.make_input(case, seed, n=4096)
    with np.errstate(all="ignore"):
        expected = ggml.quantize(x)
        expected_floats = ggml.dequantize(expected)
    got = quantize_np(x, device)
    if not np.array_equal(got, expected):
        pytest.fail(f"{case} on {device} (seed {seed}): " + describe_mismatch(got, expected, x))
    assert_same_floats(dequantize_np(expected, device), expected_floats, f"{case} dequantize (seed {seed})")
