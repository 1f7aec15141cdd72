"""The 32-weight formats (q4_0, q4_1, q5_0, q5_1, q8_0): field placement, ggml's scan and clamp rules,
fp16 refusals, chunking and CUDA, case by case.

Byte-exactness against ggml itself is tested in test_quantize_ggml_vectors.py; the expected bytes here are
derived by hand from ggml's reference code (quantize_row_<type>_ref, dequantize_row_<type>).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from gguf import quants

from offload_kernels.formats import QuantizedTensor, dequantize, dequantize_blocks, get_spec, quantize, quantize_blocks

quantize_module = importlib.import_module("offload_kernels.formats.quantize")   # the module, not the function

LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
WITH_MIN = ("q4_1", "q5_1")
FIVE_BIT = ("q5_0", "q5_1")


def f16_bytes(v: float) -> list[int]:
    return list(np.array([v], dtype=np.float32).astype(np.float16).view(np.uint8))


def split(qtype: str, block: np.ndarray) -> dict:
    """One block's fields from ggml-common.h: d and m as their fp16 bytes, qh as a uint32, qs as bytes, and
    the 32 quants (nibble | fifth bit << 4) read back by the layout rules, independently of the decoders."""
    block = np.asarray(block, dtype=np.uint8)
    d_at, m_at, qh_at, qs_at = {"q4_0": (0, None, None, 2), "q4_1": (0, 2, None, 4),
                                "q5_0": (0, None, 2, 6), "q5_1": (0, 2, 4, 8)}[qtype]
    qs = block[qs_at:qs_at + 16]
    qh = int.from_bytes(bytes(block[qh_at:qh_at + 4]), "little") if qh_at is not None else 0
    q = [((int(qs[j % 16]) >> (4 * (j // 16))) & 15) | (((qh >> j) & 1) << 4) for j in range(32)]
    return {"d": list(block[d_at:d_at + 2]), "m": list(block[m_at:m_at + 2]) if m_at is not None else None,
            "qh": qh, "qs": list(qs), "q": q}


def gguf_dequantize(qtype: str, blocks: torch.Tensor) -> np.ndarray:
    with np.errstate(all="ignore"):
        return quants.dequantize(blocks.numpy(), get_spec(qtype).ggml_type).reshape(-1, 32).astype(np.float32)


def assert_bits_equal(got: torch.Tensor, expected: np.ndarray) -> None:
    got = got.numpy()
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), (got, expected)


# ------------------------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_each_weight_reads_its_own_nibble_and_fifth_bit(qtype):
    """Block j has only weight j's quant at its maximum (nibble 15 and, for q5, bit j of qh): qs[j] low
    nibble for j < 16, qs[j - 16] high nibble otherwise."""
    spec = get_spec(qtype)
    blocks = torch.zeros(32, spec.block_bytes, dtype=torch.uint8)
    d, m = 0.5, -2.0
    _, m_at, qh_at, qs_at = {"q4_0": (0, None, None, 2), "q4_1": (0, 2, None, 4),
                             "q5_0": (0, None, 2, 6), "q5_1": (0, 2, 4, 8)}[qtype]
    for j in range(32):
        blocks[j, 0:2] = torch.tensor(f16_bytes(d))
        if m_at is not None:
            blocks[j, m_at:m_at + 2] = torch.tensor(f16_bytes(m))
        blocks[j, qs_at + j % 16] = 0x0F if j < 16 else 0xF0
        if qh_at is not None:
            blocks[j, qh_at:qh_at + 4] = torch.tensor(list((1 << j).to_bytes(4, "little")))
    top, offset = (31, 16) if qtype in FIVE_BIT else (15, 8)
    if qtype in WITH_MIN:
        expected = np.full((32, 32), m, dtype=np.float32)
        np.fill_diagonal(expected, top * d + m)
    else:
        expected = np.full((32, 32), -offset * d, dtype=np.float32)
        np.fill_diagonal(expected, (top - offset) * d)
    got = dequantize_blocks(blocks, qtype)
    assert_bits_equal(got, expected)
    assert_bits_equal(got, gguf_dequantize(qtype, blocks))


@pytest.mark.parametrize("qtype", FIVE_BIT)
def test_fifth_bit_alone(qtype):
    """qh with one bit set and zero nibbles: only that weight's quant is 16."""
    spec = get_spec(qtype)
    blocks = torch.zeros(32, spec.block_bytes, dtype=torch.uint8)
    qh_at = 2 if qtype == "q5_0" else 4
    for j in range(32):
        blocks[j, 0:2] = torch.tensor(f16_bytes(1.0))
        blocks[j, qh_at:qh_at + 4] = torch.tensor(list((1 << j).to_bytes(4, "little")))
    expected = np.eye(32, dtype=np.float32) * 16 - (16 if qtype == "q5_0" else 0)
    got = dequantize_blocks(blocks, qtype)
    assert_bits_equal(got, expected.astype(np.float32))
    assert_bits_equal(got, gguf_dequantize(qtype, blocks))


# --------------------------------------------------------------------------------------------- quantize


def test_q5_1_fifth_bit_of_a_single_weight():
    """min 0, max 31: d = 1 and weight j (31) is the only quant >= 16, so qh is 1 << j."""
    for j in range(32):
        x = torch.zeros(1, 32)
        x[0, j] = 31.0
        f = split("q5_1", quantize_blocks(x, "q5_1")[0])
        assert f["d"] == f16_bytes(1.0) and f["m"] == f16_bytes(0.0)
        assert f["qh"] == 1 << j
        assert f["q"] == [31 if i == j else 0 for i in range(32)]


def test_q5_0_fifth_bit_of_a_single_weight():
    """-16 at k sets d = -16 / -16 = 1; then q = trunc(x + 16.5): -5 -> 11, -16 -> 0, 3 -> 19 (bit 4 set)."""
    for j in range(32):
        k = (j + 7) % 32
        x = torch.full((1, 32), -5.0)
        x[0, k], x[0, j] = -16.0, 3.0
        f = split("q5_0", quantize_blocks(x, "q5_0")[0])
        assert f["d"] == f16_bytes(1.0)
        assert f["qh"] == 1 << j
        assert f["q"] == [19 if i == j else 0 if i == k else 11 for i in range(32)]


@pytest.mark.parametrize("qtype", WITH_MIN)
def test_negative_min(qtype):
    """All-negative blocks: m is the (negative) block min, d = (max - min) / nmax."""
    nmax = 15 if qtype == "q4_1" else 31
    g = np.random.default_rng(1)
    x = g.permutation(np.linspace(-3.0, -1.0, 32, dtype=np.float32))[None, :]
    blocks = quantize_blocks(torch.from_numpy(x), qtype)
    f = split(qtype, blocks[0])
    assert f["m"] == f16_bytes(-3.0)
    assert f["d"] == f16_bytes(float(np.float32(2.0) / np.float32(nmax)))
    assert f["q"][int(np.argmin(x))] == 0 and f["q"][int(np.argmax(x))] == nmax
    assert np.array_equal(blocks.numpy(), quants.quantize(x, get_spec(qtype).ggml_type))
    err = (dequantize_blocks(blocks, qtype).numpy() - x).max()
    assert err <= 2.0 / nmax


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q5_0", "q5_1"])
@pytest.mark.parametrize("value", [-1.75, 0.3, 1e-3, 0.0, -0.0])
def test_constant_blocks(qtype, value):
    """d = 0 for q4_1/q5_1 (max == min) with m = the value and quants 0; q4_0/q5_0 put the value at quant 0,
    d = value / -offset. All-zero blocks: q4_0/q5_0's d is (+0 from the scan) / -offset = -0.0, id = 0,
    and every quant is the offset; q4_1/q5_1 keep the sign of the zero in m."""
    offset = 16 if qtype == "q5_0" else 8
    x = torch.full((2, 32), value)
    blocks = quantize_blocks(x, qtype)
    f = split(qtype, blocks[0])
    if qtype in WITH_MIN:
        assert f["d"] == [0, 0] and f["m"] == f16_bytes(value)
        assert f["q"] == [0] * 32 and f["qh"] == 0
    elif value == 0:
        assert f["d"] == f16_bytes(-0.0) and f["q"] == [offset] * 32
    else:
        assert f["d"] == f16_bytes(value / -offset) and f["q"] == [0] * 32 and f["qh"] == 0
    decoded = dequantize_blocks(blocks, qtype)
    assert torch.equal(decoded, decoded[:1, :1].expand(2, 32))
    assert float(decoded[0, 0]) == pytest.approx(value, rel=1e-3, abs=0)


@pytest.mark.parametrize("qtype", WITH_MIN)
def test_zero_min_keeps_the_sign_of_the_first_zero(qtype):
    """ggml's scan (v < min) keeps the first of equal minima: with -0.0 and +0.0 both in a nonnegative
    block, m is whichever comes first."""
    x = torch.rand(4, 32, generator=torch.Generator().manual_seed(0)) + 0.5
    x[0, 3], x[0, 20] = -0.0, 0.0
    x[1, 3], x[1, 20] = 0.0, -0.0
    x[2, 0], x[2, 31] = -0.0, -0.0
    x[3, 31] = -0.0
    blocks = quantize_blocks(x, qtype)
    assert [split(qtype, b)["m"] for b in blocks] == [[0, 0x80], [0, 0], [0, 0x80], [0, 0x80]]
    # Everywhere in a block (torch's amin alone returns the wrong zero for ~40% of these)
    g = torch.Generator().manual_seed(1)
    n = 2000
    x = torch.rand(n, 32, generator=g) + 0.5
    pos, neg = torch.randint(0, 32, (2, n), generator=g)
    x[torch.arange(n), pos] = 0.0
    x[torch.arange(n), neg] = -0.0
    m_high_byte = quantize_blocks(x, qtype)[:, 3]
    assert torch.equal(m_high_byte, torch.where(neg <= pos, 0x80, 0).to(torch.uint8))


@pytest.mark.parametrize("qtype", WITH_MIN)
def test_all_zero_block_of_mixed_signs(qtype):
    """ggml's max and min are both the block's first element, so d = (max - min) / nmax is +0 whatever the
    signs of the other zeros; m takes the first element's sign."""
    x = torch.zeros(2, 32)
    x[0, 1::2] = -0.0                                 # +0 first
    x[1, 0::3] = -0.0                                 # -0 first
    f = [split(qtype, b) for b in quantize_blocks(x, qtype)]
    assert [b["d"] for b in f] == [[0, 0], [0, 0]] and [b["m"] for b in f] == [[0, 0], [0, 0x80]]
    assert all(b["q"] == [0] * 32 for b in f)
    # Random sign patterns (torch's amax returns -0.0 for about a quarter of these)
    negative = torch.randint(0, 2, (1000, 32), generator=torch.Generator().manual_seed(0)).bool()
    blocks = quantize_blocks(torch.where(negative, -0.0, 0.0), qtype)
    assert not blocks[:, :2].any()
    assert torch.equal(blocks[:, 3], torch.where(negative[:, 0], 0x80, 0).to(torch.uint8))
    assert not blocks[:, 4:].any()


@pytest.mark.parametrize("first_sign", [1.0, -1.0])
def test_q5_0_largest_magnitude_with_both_signs(first_sign):
    """+a and -a in one block: d = (the first of them) / -16; that one quantizes to 0 and the other to 32,
    clamped to 31."""
    x = torch.linspace(-1.0, 1.0, 32).reshape(1, 32)
    x[0, 5], x[0, 9] = 2.0 * first_sign, -2.0 * first_sign
    f = split("q5_0", quantize_blocks(x, "q5_0")[0])
    assert f["d"] == f16_bytes(2.0 * first_sign / -16)
    assert f["q"][5] == 0 and f["q"][9] == 31


def test_rows_mixing_huge_and_tiny_blocks():
    """Every block gets its own scale: a row of 1e4, 1, 1e-4 and 1e-30 blocks quantizes each as if alone,
    and as gguf's numpy quantizers (ggml's arithmetic) do."""
    g = np.random.default_rng(3)
    scales = np.array([1e4, 1.0, 1e-4, 1e-30, 3e3, 1e-2, 1e-30, 1.0], dtype=np.float64)
    x = (g.standard_normal((3, 8, 32)) * scales[None, :, None]).astype(np.float32).reshape(3, 256)
    for qtype in LEGACY:
        got = quantize(torch.from_numpy(x), qtype)
        assert np.array_equal(got.data.numpy(), quants.quantize(x, get_spec(qtype).ggml_type)), qtype
        alone = quantize_blocks(torch.from_numpy(x.reshape(-1, 32)), qtype)
        assert torch.equal(got.data.view(-1, get_spec(qtype).block_bytes), alone)
        err = np.abs(dequantize(got).numpy() - x).reshape(3, 8, 32).max(axis=(0, 2))
        normal = scales >= 1e-2                        # larger blocks: error bounded by their own scale
        assert (err[normal] < 0.5 * scales[normal]).all(), (qtype, err)


@pytest.mark.parametrize("qtype, field, block", [
    ("q4_1", "m", [7e4] * 32),                          # constant: d = 0, m = inf
    ("q5_1", "m", [-7e4] + [-6.99e4] * 31),             # d small, m = -inf
    ("q4_1", "d", [0.0] * 31 + [1e6]),                  # d = 1e6 / 15 > 65504, m = 0
    ("q5_1", "d", [0.0] * 31 + [3e6]),
    ("q5_0", "d", [1.0] * 31 + [2e6]),                  # d = 2e6 / -16
])
def test_fp16_overflow_of_d_or_m_is_refused(qtype, field, block):
    """ggml writes an infinite fp16 d or m; quantize() refuses the weight, naming the block."""
    spec = get_spec(qtype)
    assert len(spec.fp16_offsets) == (2 if qtype in WITH_MIN else 1)
    w = torch.ones(2, 96)
    w[1, 32:64] = torch.tensor(block)
    with pytest.raises(ValueError, match=f"too large for {qtype}: the fp16 scale of block 1 in row 1 overflows"):
        quantize(w, qtype)
    f = split(qtype, quantize_blocks(w, qtype)[4])     # the block level writes what ggml writes
    overflowed = np.array(f[field], dtype=np.uint8).view(np.float16)[0]
    assert np.isinf(overflowed)


@pytest.mark.parametrize("qtype", WITH_MIN)
def test_largest_finite_min_is_accepted(qtype):
    """65519 rounds to fp16's largest finite 65504; 65520 rounds to inf."""
    quantize(torch.full((1, 32), 65519.0), qtype)
    with pytest.raises(ValueError, match="overflows"):
        quantize(torch.full((1, 32), -65520.0), qtype)


@pytest.mark.parametrize("qtype", LEGACY)
def test_chunking_does_not_change_bytes(qtype, monkeypatch):
    x = torch.randn(37 * 32, generator=torch.Generator().manual_seed(4)) * torch.logspace(-3, 3, 37 * 32)
    whole = quantize_blocks(x, qtype)
    monkeypatch.setattr(quantize_module, "_CPU_LEGACY_CHUNK_WEIGHTS", 5 * 32)   # 8 chunks, the last one short
    assert torch.equal(quantize_blocks(x, qtype), whole)


def _edge_blocks() -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(400, 32, generator=g)
    x[:40] *= 1e-39                                   # subnormal d: 1/d overflows
    x[40:60] *= 1e-44
    x[60:80] *= 1e30
    x[80:90] = 0.0
    x[90:100] = -0.0
    x[100:110, 7] = -x[100:110].abs().amax(dim=1)     # +-max in one block
    x[100:110, 3] = -x[100:110, 7]
    x[110:130] = x[110:130].abs()
    x[110:130, 5] = -0.0
    x[120:130, 2] = 0.0
    x[130:140] = torch.randint(-16, 16, (10, 32), generator=g).float() / 4     # .5 ties after scaling
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", LEGACY)
def test_cuda_matches_cpu(qtype):
    """Same bytes on CUDA: its division by a Python scalar would be a multiply by the reciprocal, and its
    reductions visit elements in another order (which zero amin/amax return)."""
    g = torch.Generator().manual_seed(10)
    many = torch.randn(100_000, 32, generator=g) * 10.0 ** (torch.rand(100_000, 1, generator=g) * 12 - 8)
    x = torch.cat([_edge_blocks(), many])
    blocks = quantize_blocks(x, qtype)
    assert torch.equal(quantize_blocks(x.cuda(), qtype).cpu(), blocks)
    cpu = dequantize_blocks(blocks, qtype)
    cuda = dequantize_blocks(blocks.cuda(), qtype).cpu()
    same = (cuda.view(torch.int32) == cpu.view(torch.int32)) | (cuda.isnan() & cpu.isnan())
    assert bool(same.all())


@pytest.mark.parametrize("qtype", LEGACY)
def test_edge_blocks_decode_like_gguf(qtype):
    """Whatever the quantizer wrote for the edge blocks (inf scales included), the decoder reads like gguf's."""
    blocks = quantize_blocks(_edge_blocks(), qtype)
    got = dequantize_blocks(blocks, qtype).numpy()
    ref = gguf_dequantize(qtype, blocks)
    same = (got.view(np.int32) == ref.view(np.int32)) | (np.isnan(got) & np.isnan(ref))
    assert same.all()


def test_quantized_tensor_of_new_formats_round_trips():
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    for qtype in ("q4_1", "q5_0", "q5_1"):
        qt = quantize(w, qtype)
        assert isinstance(qt, QuantizedTensor) and qt.data.shape == (3, 2 * get_spec(qtype).block_bytes)
        assert torch.equal(qt.dequantize(), dequantize(qt))
