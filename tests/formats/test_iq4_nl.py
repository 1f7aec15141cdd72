"""iq4_nl's own checks: the table, the block layout, every nibble under every scale of interest, ggml's
best_index_int8 and the all-zero block.

tests/vectors/iq4_nl_vectors.npz holds, for 19 input cases (normal, heavy tails, outliers, zeros of both
signs, constants, ties, tiny and huge magnitudes, fp32 overflow, NaN/Inf, ...), the bytes
ggml_quantize_chunk(GGML_TYPE_IQ4_NL, imatrix=NULL) wrote and the floats dequantize_row_iq4_nl read back
(tests/vectors/generate_iq4_nl_vectors.py); test_iq4_formats.py checks iq4_nl and iq4_xs against them,
against gguf's numpy dequantizer, and live against libggml when OFFLOAD_KERNELS_GGML_LIB is set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from offload_kernels.formats.iq4_nl import GGML_TYPE_IQ4_NL, IQ4_NL_VALUES, best_index_iq4_nl

from .iq4_helpers import DEVICES, IQ4_NL, SPECIAL_FP16, assert_same_floats, gen_nl


# ------------------------------------------------------------------------------------- format facts

def test_table_and_type_id_match_gguf():
    assert IQ4_NL_VALUES == tuple(gguf_quants.IQ4_NL.kvalues)
    assert GGML_TYPE_IQ4_NL == int(GGMLQuantizationType.IQ4_NL) == 20
    assert tuple(gen_nl.KVALUES.astype(int)) == IQ4_NL_VALUES
    assert list(IQ4_NL_VALUES) == sorted(IQ4_NL_VALUES)
    assert gen_nl.VECTORS.type_id == 20 and (gen_nl.VECTORS.block_size, gen_nl.VECTORS.block_bytes) == (32, 18)


def test_layout_low_nibble_is_weight_j_high_nibble_weight_j_plus_16():
    d = np.float16(0.5)
    blocks = np.zeros((1, 18), dtype=np.uint8)
    blocks[0, 0:2] = np.array([d]).view(np.uint8)
    lo, hi = np.arange(16), (np.arange(16) * 7 + 3) % 16
    blocks[0, 2:] = lo | (hi << 4)
    got = IQ4_NL.dequantize_np(blocks)[0]
    table = np.array(IQ4_NL_VALUES, dtype=np.float32)
    np.testing.assert_array_equal(got[:16], table[lo] * np.float32(d))
    np.testing.assert_array_equal(got[16:], table[hi] * np.float32(d))


# ------------------------------------------------------------------------------------- dequantizer

@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_every_nibble_and_extreme_scale(device: str):
    """All 256 byte values under every fp16 bit pattern of interest, against gguf."""
    qs = np.arange(256, dtype=np.uint8).reshape(16, 16)
    blocks = np.zeros((len(SPECIAL_FP16) * 16, 18), dtype=np.uint8)
    blocks[:, 0:2] = np.repeat(SPECIAL_FP16, 16).view(np.uint8).reshape(-1, 2)
    blocks[:, 2:] = np.tile(qs, (len(SPECIAL_FP16), 1))
    assert_same_floats(IQ4_NL.dequantize_np(blocks, device), IQ4_NL.gguf_dequantize(blocks),
                       "iq4_nl dequantize vs gguf")


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
    got = IQ4_NL.quantize_np(x)
    assert (got[:, 0:2] == 0).all()
    assert (got[:, 2:] == 0x88).all()
