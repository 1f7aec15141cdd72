"""iq4_xs against ggml: committed vectors, gguf's numpy dequantizer, and a live check when libggml is around.

tests/vectors/iq4_xs_vectors.npz holds, for iq4_nl's 19 input cases (eight of its blocks per super-block)
and 7 super-block cases (sub-blocks of very different magnitudes, zero sub-blocks, equal and opposite
sub-block scales, one overflowing or non-finite sub-block, ...), the bytes
ggml_quantize_chunk(GGML_TYPE_IQ4_XS, imatrix=NULL) wrote and the floats dequantize_row_iq4_xs read back
(tests/vectors/generate_iq4_xs_vectors.py).
Set OFFLOAD_KERNELS_GGML_LIB to a libggml-base.so to also compare on fresh random data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from offload_kernels.formats.iq4_nl import (
    GGML_TYPE_IQ4_XS,
    IQ4_NL_VALUES,
    IQ4_XS_BLOCK_BYTES,
    IQ4_XS_BLOCK_SIZE,
    dequantize_iq4_xs_blocks,
    iq4_nl_scales,
    quantize_iq4_nl_blocks,
    quantize_iq4_xs_blocks,
)

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
sys.path.insert(0, str(VECTORS_DIR))
import generate_iq4_xs_vectors as gen  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _load_vectors() -> dict[str, np.ndarray]:
    with np.load(VECTORS_DIR / "iq4_xs_vectors.npz") as f:
        return {k: f[k] for k in f.files if k != "note"}


VECTORS = _load_vectors()
CASES = sorted({k.split("/")[0] for k in VECTORS})


def quantize_np(x: np.ndarray, device: str = "cpu") -> np.ndarray:
    return quantize_iq4_xs_blocks(torch.from_numpy(x).to(device)).cpu().numpy()


def dequantize_np(blocks: np.ndarray, device: str = "cpu") -> np.ndarray:
    b = torch.from_numpy(np.ascontiguousarray(blocks)).to(device)
    out = torch.empty((b.shape[0], 256), dtype=torch.float32, device=device)
    dequantize_iq4_xs_blocks(b, out)
    return out.cpu().numpy()


def sub_scales(blocks: np.ndarray) -> np.ndarray:
    """The eight 6-bit sub-block scales ls of each block, read literally from the layout."""
    scales_h = blocks[:, 2:4].copy().view(np.uint16)[:, 0].astype(np.int64)
    ls = np.empty((len(blocks), 8), dtype=np.int64)
    for ib in range(8):
        ls[:, ib] = ((blocks[:, 4 + ib // 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4)
    return ls


def describe_mismatch(got: np.ndarray, expected: np.ndarray, x: np.ndarray) -> str:
    bad = np.nonzero((got != expected).any(axis=1))[0]
    if bad.size == 0:
        return "identical"
    b = int(bad[0])
    d_got, d_exp = (a[b, 0:2].copy().view(np.float16)[0] for a in (got, expected))
    ls_got, ls_exp = sub_scales(got[b:b + 1])[0], sub_scales(expected[b:b + 1])[0]
    qs = np.nonzero(got[b, 8:] != expected[b, 8:])[0]
    return (f"{bad.size} of {len(expected)} super-blocks differ; first: block {b}, input min {np.nanmin(x[b]):.6g} "
            f"max {np.nanmax(x[b]):.6g}; d got {d_got!r} expected {d_exp!r}; ls got {ls_got.tolist()} expected "
            f"{ls_exp.tolist()}; {qs.size} qs bytes differ (first at {qs[:8].tolist()}: got "
            f"{got[b, 8 + qs[:8]].tolist()} expected {expected[b, 8 + qs[:8]].tolist()})")


def assert_same_floats(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Bit-for-bit equal fp32, except that any NaN matches any NaN."""
    same = (got.view(np.int32) == expected.view(np.int32)) | (np.isnan(got) & np.isnan(expected))
    if not same.all():
        i = np.unravel_index(np.argmin(same), same.shape)
        raise AssertionError(f"{what}: {(~same).sum()} of {same.size} values differ; first at {i}: "
                             f"got {got[i]!r} expected {expected[i]!r}")


def gguf_dequantize(blocks: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):      # signalling-NaN / huge scales among random bytes
        out = gguf_quants.dequantize(blocks.reshape(-1), GGMLQuantizationType.IQ4_XS).reshape(-1, 256)
    assert out.dtype == np.float32
    return out


# ------------------------------------------------------------------------------------- format facts

def test_type_id_and_sizes_match_gguf():
    assert GGML_TYPE_IQ4_XS == int(GGMLQuantizationType.IQ4_XS) == 23
    assert GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_XS] == (IQ4_XS_BLOCK_SIZE, IQ4_XS_BLOCK_BYTES) == (256, 136)
    assert gen.GGML_TYPE_IQ4_XS == 23 and (gen.BLOCK_SIZE, gen.BLOCK_BYTES) == (256, 136)


def test_layout_scales_and_nibbles():
    """ls = (scales_l[ib/2] >> 4*(ib%2)) & 15 | ((scales_h >> 2*ib) & 3) << 4; dl = d*(ls-32); qs[16*ib + j]
    holds weight 32*ib + j (low nibble) and 32*ib + 16 + j (high), each dl * kvalues_iq4nl[nibble]."""
    g = np.random.default_rng(5)
    d = np.float16(0.375)
    ls = np.array([0, 63, 32, 17, 45, 31, 33, 5])
    lo, hi = g.integers(0, 16, (8, 16)), g.integers(0, 16, (8, 16))
    block = np.zeros((1, 136), dtype=np.uint8)
    block[0, 0:2] = np.array([d]).view(np.uint8)
    scales_h = sum(int(ls[ib] >> 4) << (2 * ib) for ib in range(8))
    block[0, 2:4] = np.array([scales_h], dtype="<u2").view(np.uint8)
    block[0, 4:8] = (ls[0::2] & 15) | ((ls[1::2] & 15) << 4)
    block[0, 8:] = (lo | (hi << 4)).reshape(-1)
    assert sub_scales(block)[0].tolist() == ls.tolist()
    table = np.array(IQ4_NL_VALUES, dtype=np.float32)
    expected = np.empty((8, 32), dtype=np.float32)
    for ib in range(8):
        dl = np.float32(d) * np.float32(ls[ib] - 32)
        expected[ib, :16] = dl * table[lo[ib]]
        expected[ib, 16:] = dl * table[hi[ib]]
    assert_same_floats(dequantize_np(block)[0], expected.reshape(-1), "layout")
    assert_same_floats(gguf_dequantize(block)[0], expected.reshape(-1), "layout (gguf)")


# ------------------------------------------------------------------------------------- dequantizer

_SPECIAL_FP16 = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x0200, 0x03FF, 0x83FF, 0x0400, 0x3C00, 0x1400, 0x7BFF,
                          0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01], dtype=np.uint16)


def _random_blocks(g: np.random.Generator, n: int) -> np.ndarray:
    """Random bytes with fp16 d of every kind: normal, subnormal, +-0, the largest, +-Inf, NaN."""
    blocks = g.integers(0, 256, (n, 136), dtype=np.uint8)
    d = blocks[:, 0:2].copy().view(np.uint16).ravel()
    pick = g.random(n) < 0.3
    d[pick] = g.choice(_SPECIAL_FP16, pick.sum())
    subnormal = g.random(n) < 0.15
    d[subnormal] = d[subnormal] & 0x83FF               # exponent 0: subnormal (or zero)
    blocks[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    return blocks


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_matches_gguf_numpy_on_random_bytes(device: str):
    blocks = _random_blocks(np.random.default_rng(4321), 20000)
    assert_same_floats(dequantize_np(blocks, device), gguf_dequantize(blocks), "iq4_xs dequantize vs gguf")


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_every_scale_nibble_and_extreme_d(device: str):
    """Every ls (0..63) in every sub-block position and every qs byte, under each fp16 d of interest."""
    rows = []
    for k in range(64):
        b = np.zeros(136, dtype=np.uint8)
        ls = (np.arange(8) * 9 + k) % 64                    # each sub-block position sees all 64 values
        b[2:4] = np.array([sum(int(ls[i] >> 4) << (2 * i) for i in range(8))], dtype="<u2").view(np.uint8)
        b[4:8] = (ls[0::2] & 15) | ((ls[1::2] & 15) << 4)
        b[8:] = (np.arange(128) + 2 * k) % 256
        rows.append(b)
    base = np.stack(rows)
    blocks = np.repeat(base[None], len(_SPECIAL_FP16), axis=0)
    blocks[:, :, 0:2] = _SPECIAL_FP16.view(np.uint8).reshape(-1, 1, 2)
    blocks = blocks.reshape(-1, 136)
    assert_same_floats(dequantize_np(blocks, device), gguf_dequantize(blocks), "iq4_xs dequantize vs gguf")


@pytest.mark.parametrize("case", CASES)
def test_dequantize_matches_ggml_floats(case: str):
    assert_same_floats(dequantize_np(VECTORS[f"{case}/bytes"]), VECTORS[f"{case}/dequant"], f"{case} dequantize")


def test_dequantize_rejects_bad_shapes_and_dtypes():
    b = torch.zeros((2, 136), dtype=torch.uint8)
    out = torch.empty((2, 256))
    dequantize_iq4_xs_blocks(b, out)
    with pytest.raises(ValueError):
        dequantize_iq4_xs_blocks(torch.zeros((2, 18), dtype=torch.uint8), out)
    with pytest.raises(ValueError):
        dequantize_iq4_xs_blocks(b.to(torch.int16), out)
    with pytest.raises(ValueError):
        dequantize_iq4_xs_blocks(b, torch.empty((2, 32)))
    with pytest.raises(ValueError):
        dequantize_iq4_xs_blocks(b, torch.empty((2, 256), dtype=torch.float16))
    with pytest.raises(ValueError):
        dequantize_iq4_xs_blocks(b, torch.empty((3, 256)))


# ------------------------------------------------------------------------------------- quantizer

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
        assert VECTORS[f"{case}/input"].shape == (gen.BLOCKS_PER_CASE, 256)
        assert VECTORS[f"{case}/bytes"].shape == (gen.BLOCKS_PER_CASE, 136)
        assert VECTORS[f"{case}/dequant"].shape == (gen.BLOCKS_PER_CASE, 256)


def test_vectors_exercise_the_super_block_paths():
    """The committed bytes contain what the super-block code has to get right."""
    blocks = np.concatenate([VECTORS[f"{c}/bytes"] for c in CASES])
    ls = sub_scales(blocks)
    d = blocks[:, 0:2].copy().view(np.float16)[:, 0]
    assert (ls == 0).any(axis=1).sum() > 50               # the largest sub-block scale: l = -32
    assert (ls == 63).any()                               # opposite sign, clamped 32 -> 31
    assert ((ls == 32) & (ls.min(axis=1, keepdims=True) == 0)).any()   # zero sub-blocks beside others
    assert np.isinf(d).any() and (d == 0).any() and (np.abs(d[d != 0]) < 6.1e-5).any()


def test_all_zero_super_block():
    """max_scale stays +0, so d = -0/32 = -0.0 (fp16 bytes 00 80); id = 0 gives l = 0 (ls = 32 in every
    sub-block: scales_l 0x00, scales_h 0xAAAA), and best_index(0) = 8 for every weight."""
    x = np.zeros((3, 256), dtype=np.float32)
    x[1] = -0.0
    x[2, 77] = 9e-16                                       # below GROUP_MAX_EPS: the same
    got = quantize_np(x)
    assert (got[:, 0:2] == [0x00, 0x80]).all()
    assert (got[:, 2:4] == [0xAA, 0xAA]).all()
    assert (got[:, 4:8] == 0).all()
    assert (got[:, 8:] == 0x88).all()


def test_sub_block_scales_are_iq4_nl_scales():
    """The sub-block scale search is iq4_nl's: iq4_nl stores fp16(scale) of a 32-weight block, and a
    super-block of one block repeated 8 times stores d = fp16(-scale/32) with l = -32 (ls = 0) everywhere."""
    x = torch.from_numpy(VECTORS["nl_normal/input"][:, :32].copy())
    scale = iq4_nl_scales(x)
    nl_d = quantize_iq4_nl_blocks(x)[:, 0:2].contiguous().view(torch.float16)[:, 0]
    assert torch.equal(nl_d, scale.to(torch.float16))
    got = quantize_np(x.repeat(1, 8).numpy())
    assert (sub_scales(got) == 0).all()
    np.testing.assert_array_equal(got[:, 0:2].copy().view(np.float16)[:, 0], (-scale / 32).to(torch.float16).numpy())


def test_quantize_input_dtypes_and_layout():
    x = VECTORS["nl_normal/input"]
    expected = VECTORS["nl_normal/bytes"]
    t = torch.from_numpy(x)
    assert np.array_equal(quantize_iq4_xs_blocks(t.double()).numpy(), expected)   # exact fp32 values
    wide = torch.zeros((x.shape[0], 512))
    wide[:, ::2] = t
    assert np.array_equal(quantize_iq4_xs_blocks(wide[:, ::2]).numpy(), expected)  # non-contiguous
    assert quantize_iq4_xs_blocks(torch.zeros((0, 256))).shape == (0, 136)
    for bad in (torch.zeros((4, 32)), torch.zeros(256), torch.zeros((2, 2, 256))):
        with pytest.raises(ValueError):
            quantize_iq4_xs_blocks(bad)


def test_round_trip_error_is_small():
    x = torch.from_numpy(VECTORS["nl_normal/input"])
    out = torch.empty_like(x)
    dequantize_iq4_xs_blocks(quantize_iq4_xs_blocks(x), out)
    rel = ((out - x).norm(dim=1) / x.norm(dim=1)).max().item()
    assert rel < 0.15


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("case", sorted(gen.CASES))
def test_cuda_matches_cpu(case: str):
    x = gen.make_input(case, 97, n=512)
    cpu = quantize_np(x, "cpu")
    cuda = quantize_np(x, "cuda")
    if not np.array_equal(cuda, cpu):
        pytest.fail(f"{case}: cuda vs cpu: " + describe_mismatch(cuda, cpu, x))
    assert_same_floats(dequantize_np(cpu, "cuda"), dequantize_np(cpu, "cpu"), f"{case} dequantize cuda vs cpu")


# ------------------------------------------------------------------------------------ live, with libggml

_LIB = gen.find_library()
live = pytest.mark.skipif(_LIB is None, reason=f"set {gen.LIB_ENV} to libggml-base.so")


@live
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(gen.CASES))
def test_live_random_blocks_match_ggml(case: str, device: str):
    ggml = gen.Iq4XsRef(_LIB)
    seed = int(np.random.SeedSequence().entropy % 2**32)
    x = gen.make_input(case, seed, n=512)
    with np.errstate(all="ignore"):
        expected = ggml.quantize(x)
        expected_floats = ggml.dequantize(expected)
    got = quantize_np(x, device)
    if not np.array_equal(got, expected):
        pytest.fail(f"{case} on {device} (seed {seed}): " + describe_mismatch(got, expected, x))
    assert_same_floats(dequantize_np(expected, device), expected_floats, f"{case} dequantize (seed {seed})")


@live
def test_live_random_bytes_dequantize_like_ggml():
    ggml = gen.Iq4XsRef(_LIB)
    blocks = _random_blocks(np.random.default_rng(), 20000)
    with np.errstate(all="ignore"):
        expected = ggml.dequantize(blocks)
    assert_same_floats(dequantize_np(blocks), expected, "iq4_xs dequantize vs ggml on random bytes")
