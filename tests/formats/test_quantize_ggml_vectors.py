"""Quantize and dequantize against ggml itself: committed vectors, plus a live check when libggml is around.

tests/vectors/ggml_quant_vectors.npz holds, for 24 input cases (normal, LLM-like, heavy tails, zeros,
constants, ties, tiny/subnormal and huge magnitudes, 32-weight block edge cases, ...), the bytes ggml's
reference quantizers wrote and the floats ggml's dequantizers read back from them (see
tests/vectors/generate_ggml_vectors.py). Set OFFLOAD_KERNELS_GGML_LIB to a libggml-base.so to also
compare on fresh random data (and on random edge-case blocks of the 32- and 256-weight formats).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import offload_kernels
from offload_kernels.formats import QuantizedTensor, get_spec, quantize_blocks

from .helpers import assert_same_floats

quantize_module = importlib.import_module("offload_kernels.formats.quantize")   # the module, not the function

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
sys.path.insert(0, str(VECTORS_DIR))
from ggml_ref import GgmlRef, find_library  # noqa: E402

QTYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")

# (name, first byte, end) of every field of a block, from ggml-common.h
FIELDS = {
    "q4_0": (("d", 0, 2), ("qs", 2, 18)),
    "q4_1": (("d", 0, 2), ("m", 2, 4), ("qs", 4, 20)),
    "q5_0": (("d", 0, 2), ("qh", 2, 6), ("qs", 6, 22)),
    "q5_1": (("d", 0, 2), ("m", 2, 4), ("qh", 4, 8), ("qs", 8, 24)),
    "q8_0": (("d", 0, 2), ("qs", 2, 34)),
    "q2_k": (("scales", 0, 16), ("qs", 16, 80), ("d", 80, 82), ("dmin", 82, 84)),
    "q3_k": (("hmask", 0, 32), ("qs", 32, 96), ("scales", 96, 108), ("d", 108, 110)),
    "q4_k": (("d", 0, 2), ("dmin", 2, 4), ("scales", 4, 16), ("qs", 16, 144)),
    "q5_k": (("d", 0, 2), ("dmin", 2, 4), ("scales", 4, 16), ("qh", 16, 48), ("qs", 48, 176)),
    "q6_k": (("ql", 0, 128), ("qh", 128, 192), ("scales", 192, 208), ("d", 208, 210)),
}


def _load_vectors() -> dict[str, np.ndarray]:
    with np.load(VECTORS_DIR / "ggml_quant_vectors.npz") as f:
        return {k: f[k] for k in f.files}


VECTORS = _load_vectors()
CASES = sorted({k.split("/")[0] for k in VECTORS})


def describe_mismatch(qtype: str, got: np.ndarray, expected: np.ndarray, w: np.ndarray) -> str:
    """Where the first differing block differs, field by field, and what its input looked like."""
    spec = get_spec(qtype)
    got_b = got.reshape(-1, spec.block_bytes)
    exp_b = expected.reshape(-1, spec.block_bytes)
    bad = np.nonzero((got_b != exp_b).any(axis=1))[0]
    if bad.size == 0:
        return "identical"
    b = int(bad[0])
    blocks_per_row = w.shape[1] // spec.block_size
    x = w.reshape(-1, spec.block_size)[b]
    lines = [f"{bad.size} of {len(exp_b)} blocks differ; first: block {b} (row {b // blocks_per_row}, "
             f"block {b % blocks_per_row} of the row), input min {x.min():.6g} max {x.max():.6g}"]
    for name, lo, hi in FIELDS[qtype]:
        diff = np.nonzero(got_b[b, lo:hi] != exp_b[b, lo:hi])[0]
        if diff.size:
            lines.append(f"  {name}: {diff.size} bytes differ, first at {name}[{diff[0]}]: "
                         f"got {got_b[b, lo + diff[:8]].tolist()} expected {exp_b[b, lo + diff[:8]].tolist()}")
    return "\n".join(lines)


def fp16_fields_finite(qtype: str, blocks: np.ndarray) -> bool:
    """Whether every fp16 scale (d, dmin, m) of these blocks is finite."""
    blocks = blocks.reshape(-1, get_spec(qtype).block_bytes)
    for name, lo, hi in FIELDS[qtype]:
        if name in ("d", "dmin", "m"):
            if not np.isfinite(blocks[:, lo:hi].copy().view(np.float16)).all():
                return False
    return True


def quantize_like_ggml(w: np.ndarray, qtype: str, expected: np.ndarray) -> np.ndarray:
    """Our bytes for w through the public quantize(); through the block level where quantize() refuses
    the weight on purpose (magnitudes where ggml's arithmetic overflows, or an fp16 scale that does)."""
    t = torch.from_numpy(w)
    refused = (not fp16_fields_finite(qtype, expected)
               or float(np.abs(w).max()) > getattr(quantize_module, "MAX_ABS_WEIGHT", float("inf")))
    if not refused:
        return offload_kernels.quantize(t, qtype).data.numpy()
    spec = get_spec(qtype)
    return quantize_blocks(t, qtype).view(w.shape[0], spec.row_bytes(w.shape[1])).numpy()


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("case", CASES)
def test_quantize_matches_ggml_bytes(case: str, qtype: str):
    w = VECTORS[f"{case}/input"]
    expected = VECTORS[f"{case}/{qtype}/bytes"]
    got = quantize_like_ggml(w, qtype, expected)
    assert got.shape == expected.shape
    if not np.array_equal(got, expected):
        pytest.fail(f"{case}/{qtype}: " + describe_mismatch(qtype, got, expected, w))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("case", CASES)
def test_dequantize_matches_ggml_floats(case: str, qtype: str):
    w = VECTORS[f"{case}/input"]
    blocks = torch.from_numpy(VECTORS[f"{case}/{qtype}/bytes"])
    got = offload_kernels.dequantize(QuantizedTensor(blocks, qtype, w.shape)).numpy()
    assert_same_floats(got, VECTORS[f"{case}/{qtype}/dequant"], f"{case}/{qtype} dequantize")


def test_field_table_matches_the_specs():
    """FIELDS (used to refuse and to explain mismatches) agrees with QTypeSpec: sizes and fp16 offsets."""
    for qtype, fields in FIELDS.items():
        spec = get_spec(qtype)
        assert sum(hi - lo for _, lo, hi in fields) == spec.block_bytes
        assert sorted(lo for name, lo, _ in fields if name in ("d", "dmin", "m")) == sorted(spec.fp16_offsets)


def test_vectors_cover_every_qtype_and_case():
    for case in CASES:
        for qtype in QTYPES:
            assert f"{case}/{qtype}/bytes" in VECTORS and f"{case}/{qtype}/dequant" in VECTORS
    assert len(CASES) >= 20


# ------------------------------------------------------------------------------------ live, with libggml

_LIB = find_library()
live = pytest.mark.skipif(_LIB is None, reason="set OFFLOAD_KERNELS_GGML_LIB to libggml-base.so")


def _fresh_weights(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    shape = (64, 1024)
    spikes = g.standard_t(4, shape)
    spikes[g.random(shape) < 0.003] *= 100.0
    return {
        "realistic": (g.standard_normal(shape) * np.exp(g.uniform(-4, 1, (shape[0], 1))) * 0.02),
        "heavy_tails": spikes,
        "ties": g.integers(-16, 16, shape) * 2.0 ** g.integers(-6, 0, (shape[0], 1)),
        "sparse": g.standard_normal(shape) * (g.random(shape) < 0.1),
    }


@live
@pytest.mark.parametrize("qtype", QTYPES)
def test_live_random_weights_match_ggml(qtype: str):
    ggml = GgmlRef(_LIB)
    seed = int(np.random.SeedSequence().entropy % 2**32)
    for name, w in _fresh_weights(seed).items():
        w = w.astype(np.float32)
        expected = ggml.quantize(w, qtype)
        got = quantize_like_ggml(w, qtype, expected)
        if not np.array_equal(got, expected):
            pytest.fail(f"{name}/{qtype} (seed {seed}): " + describe_mismatch(qtype, got, expected, w))
        dq = offload_kernels.dequantize(QuantizedTensor(torch.from_numpy(expected), qtype, w.shape)).numpy()
        assert_same_floats(dq, ggml.dequantize(expected, qtype, w.shape[1]), f"{name}/{qtype} (seed {seed})")


BLOCK32_QTYPES = tuple(q for q in QTYPES if get_spec(q).block_size == 32)


def _block_edge_weights(g: np.random.Generator, blocks: int = 4096) -> np.ndarray:
    """32-weight blocks of random kinds at random scales (1e-44 to 1e30): +-max pairs in either order, zero
    minima of either sign, constants, exact .5 ties, one outlier, mixed signs and all-one-sign blocks."""
    x = g.standard_normal((blocks, 32))
    kind = g.integers(0, 8, blocks)
    rows = np.arange(blocks)
    i, j = g.integers(0, 32, (2, blocks))
    amax = np.abs(x).max(axis=1) * g.choice([1.0, 2.0], blocks)
    pair = kind == 0
    sign = g.choice([-1.0, 1.0], blocks)
    x[rows[pair], i[pair]] = sign[pair] * amax[pair]
    x[rows[pair], j[pair]] = -sign[pair] * amax[pair]
    zero_min = kind == 1
    x[zero_min] = np.abs(x[zero_min])
    x[rows[zero_min], i[zero_min]] = 0.0
    x[rows[zero_min], j[zero_min]] = -0.0
    x[kind == 2] = g.choice([-1.0, 0.0, -0.0, 0.25, 3.0], (int((kind == 2).sum()), 1))
    x[kind == 3] = g.integers(-16, 17, (int((kind == 3).sum()), 32)) / 8.0
    outlier = kind == 4
    x[outlier] *= 1e-3
    x[rows[outlier], i[outlier]] = sign[outlier] * 5.0
    x[kind == 5] = np.abs(x[kind == 5]) * sign[kind == 5, None]
    x *= 10.0 ** g.uniform(-44, 30, (blocks, 1)) * (kind < 6)[:, None] + (kind >= 6)[:, None]
    return x.reshape(-1, 1024)


@live
@pytest.mark.parametrize("qtype", BLOCK32_QTYPES)
def test_live_block_edges_match_ggml(qtype: str):
    """Fresh random edge-case blocks for the 32-weight formats: ggml's min/max and absmax scans (which of
    equal values wins, signed zeros), its truncations and clamps, and overflowing or subnormal scales."""
    _check_fresh_weights_against_ggml(qtype, _block_edge_weights, "block edges")


def _check_fresh_weights_against_ggml(qtype: str, make_weights, label: str) -> None:
    """Quantize fresh ``make_weights(rng)`` (non-finite values zeroed) with ggml and with us: the bytes must be
    identical and our dequantization ggml's, bit for bit. The seed is in the failure message."""
    ggml = GgmlRef(_LIB)
    seed = int(np.random.SeedSequence().entropy % 2**32)
    with np.errstate(all="ignore"):
        w = make_weights(np.random.default_rng(seed)).astype(np.float32)
    w[~np.isfinite(w)] = 0.0
    with np.errstate(all="ignore"):
        expected = ggml.quantize(w, qtype)
    got = quantize_like_ggml(w, qtype, expected)
    if not np.array_equal(got, expected):
        pytest.fail(f"{label}/{qtype} (seed {seed}): " + describe_mismatch(qtype, got, expected, w))
    with np.errstate(all="ignore"):
        dq = offload_kernels.dequantize(QuantizedTensor(torch.from_numpy(expected), qtype, w.shape)).numpy()
        assert_same_floats(dq, ggml.dequantize(expected, qtype, w.shape[1]), f"{label}/{qtype} (seed {seed})")


SUPERBLOCK_QTYPES = tuple(q for q in QTYPES if get_spec(q).block_size == 256)


def _superblock_edge_weights(g: np.random.Generator, blocks: int = 2048) -> np.ndarray:
    """256-weight blocks of random kinds at random scales (1e-44 to 1e12): normal, uniform, heavy-tailed,
    constant blocks, whole 16-weight groups of zeros, one outlier per block, all positive, all negative,
    16-weight groups at scales far apart, and exact .5 ties."""
    x = g.standard_normal((blocks, 256))
    kind = g.integers(0, 10, blocks)
    rows = np.arange(blocks)
    x[kind == 1] = g.uniform(-1.0, 1.0, (int((kind == 1).sum()), 256))
    x[kind == 2] = g.standard_t(2, (int((kind == 2).sum()), 256))
    x[kind == 3] = g.choice([-1.75, -0.0, 0.0, 0.3, 3.0], (int((kind == 3).sum()), 1))
    groups = x.reshape(blocks, 16, 16)                             # a view
    groups[(kind == 4)[:, None] & (g.random((blocks, 16)) < 0.4)] = 0.0
    outlier = kind == 5
    x[outlier] *= 1e-3
    x[rows[outlier], g.integers(0, 256, blocks)[outlier]] = g.choice([-5.0, 5.0], int(outlier.sum()))
    x[kind == 6] = np.abs(x[kind == 6]) + g.choice([0.0, 0.05], (int((kind == 6).sum()), 1))
    x[kind == 7] = -np.abs(x[kind == 7])
    groups[kind == 8] *= 10.0 ** g.uniform(-3, 3, (int((kind == 8).sum()), 16, 1))
    x[kind == 9] = g.integers(-8, 9, (int((kind == 9).sum()), 256)) / 4.0
    scaled = g.random(blocks) < 0.5                                # the others keep magnitudes around 1
    x[scaled] *= 10.0 ** g.uniform(-44, 12, (int(scaled.sum()), 1))
    return x.reshape(-1, 1024)


@live
@pytest.mark.parametrize("qtype", SUPERBLOCK_QTYPES)
def test_live_superblock_edges_match_ggml(qtype: str):
    """Fresh random 256-weight blocks of many kinds for the k-quants: flat and all-zero groups (the searches'
    early returns), block scales that round to zero or go subnormal, one-sided blocks (the min clamp)."""
    _check_fresh_weights_against_ggml(qtype, _superblock_edge_weights, "superblock edges")
