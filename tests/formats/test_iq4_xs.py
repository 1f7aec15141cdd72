"""iq4_xs's own checks: type and sizes, the super-block layout, every sub-block scale and nibble under every
d of interest, shape checks, what the committed vectors exercise, and the sub-block scale search.

tests/vectors/iq4_xs_vectors.npz holds, for iq4_nl's 19 input cases (eight of its blocks per super-block)
and 8 super-block cases (sub-blocks of very different magnitudes, zero sub-blocks, equal and opposite
sub-block scales, one overflowing or non-finite sub-block, ...), the bytes
ggml_quantize_chunk(GGML_TYPE_IQ4_XS, imatrix=NULL) wrote and the floats dequantize_row_iq4_xs read back
(tests/vectors/generate_iq4_xs_vectors.py); test_iq4_formats.py checks iq4_nl and iq4_xs against them,
against gguf's numpy dequantizer, and live against libggml when OFFLOAD_KERNELS_GGML_LIB is set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from offload_kernels.formats.iq4_nl import (
    GGML_TYPE_IQ4_XS,
    IQ4_NL_VALUES,
    IQ4_XS_BLOCK_BYTES,
    IQ4_XS_BLOCK_SIZE,
    dequantize_iq4_xs_blocks,
    iq4_nl_scales,
    quantize_iq4_nl_blocks,
)

from .iq4_helpers import DEVICES, HAS_CUDA, IQ4_XS, SPECIAL_FP16, assert_same_floats, gen_xs
from .iq4_helpers import iq4_xs_sub_scales as sub_scales


# ------------------------------------------------------------------------------------- format facts

def test_type_id_and_sizes_match_gguf():
    assert GGML_TYPE_IQ4_XS == int(GGMLQuantizationType.IQ4_XS) == 23
    assert GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_XS] == (IQ4_XS_BLOCK_SIZE, IQ4_XS_BLOCK_BYTES) == (256, 136)
    assert gen_xs.VECTORS.type_id == 23 and (gen_xs.VECTORS.block_size, gen_xs.VECTORS.block_bytes) == (256, 136)
    assert gen_xs.BLOCK_SIZE == 256


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
    assert_same_floats(IQ4_XS.dequantize_np(block)[0], expected.reshape(-1), "layout")
    assert_same_floats(IQ4_XS.gguf_dequantize(block)[0], expected.reshape(-1), "layout (gguf)")


# ------------------------------------------------------------------------------------- dequantizer

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
    blocks = np.repeat(base[None], len(SPECIAL_FP16), axis=0)
    blocks[:, :, 0:2] = SPECIAL_FP16.view(np.uint8).reshape(-1, 1, 2)
    blocks = blocks.reshape(-1, 136)
    assert_same_floats(IQ4_XS.dequantize_np(blocks, device), IQ4_XS.gguf_dequantize(blocks),
                       "iq4_xs dequantize vs gguf")


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

def test_vectors_exercise_the_super_block_paths():
    """The committed bytes contain what the super-block code has to get right."""
    blocks = np.concatenate([IQ4_XS.vectors[f"{c}/bytes"] for c in IQ4_XS.cases])
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
    got = IQ4_XS.quantize_np(x)
    assert (got[:, 0:2] == [0x00, 0x80]).all()
    assert (got[:, 2:4] == [0xAA, 0xAA]).all()
    assert (got[:, 4:8] == 0).all()
    assert (got[:, 8:] == 0x88).all()


def test_sub_block_scales_are_iq4_nl_scales():
    """The sub-block scale search is iq4_nl's: iq4_nl stores fp16(scale) of a 32-weight block, and a
    super-block of one block repeated 8 times stores d = fp16(-scale/32) with l = -32 (ls = 0) everywhere."""
    x = torch.from_numpy(IQ4_XS.vectors["nl_normal/input"][:, :32].copy())
    scale = iq4_nl_scales(x)
    nl_d = quantize_iq4_nl_blocks(x)[:, 0:2].contiguous().view(torch.float16)[:, 0]
    assert torch.equal(nl_d, scale.to(torch.float16))
    got = IQ4_XS.quantize_np(x.repeat(1, 8).numpy())
    assert (sub_scales(got) == 0).all()
    np.testing.assert_array_equal(got[:, 0:2].copy().view(np.float16)[:, 0], (-scale / 32).to(torch.float16).numpy())


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("case", sorted(gen_xs.CASES))
def test_cuda_matches_cpu(case: str):
    x = gen_xs.VECTORS.make_input(case, 97, n=512)
    cpu = IQ4_XS.quantize_np(x, "cpu")
    cuda = IQ4_XS.quantize_np(x, "cuda")
    if not np.array_equal(cuda, cpu):
        pytest.fail(f"{case}: cuda vs cpu: " + IQ4_XS.describe_mismatch(cuda, cpu, x))
    assert_same_floats(IQ4_XS.dequantize_np(cpu, "cuda"), IQ4_XS.dequantize_np(cpu, "cpu"),
                       f"{case} dequantize cuda vs cpu")
