"""The GEMV's word-wide decode (layout 3), read back weight by weight: with x rows that are
unit vectors (fp32), y[m, n] = W[n, k_m] * 1.0 plus products with +0.0, which the fp32 accumulator sums
exactly, so each call returns whole columns of the weight as the kernel decoded them.

* q4_0, q5_0, q8_0, q3_k and q6_k: every weight (u - offset) * scale is exact (so is the FFMA's addend), so
  the columns equal the gguf package's dequantized fp32 weight (llama.cpp's formulas) bit for bit; so do
  iq4_nl's and iq4_xs's (d times a table value, times iq4_xs's integer sub-block scale: exact) and mxfp4's
  (a table value times a power of two, over every exponent byte whose weights stay finite, the subnormal
  scales of bytes 0 and 1 included; its 17-byte blocks start at every alignment, read as unaligned words);
* q2_k, q4_k and q5_k: the min is folded into the FFMA's addend -(192 s + dmin m), rounded once: within
  2**-24 of that addend (plus the weight's own rounding) of gguf's dequantized weight; q4_1 and q5_1 likewise
  with the addend m - 192 d.

And the byte permutes: the prmt selectors the GPU code uses, emulated from the PTX ISA's definition, give
the same bits as the shifts the interpreter runs.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import triton.language as tl
from gguf import quants

from offload_kernels.formats import QTYPES, QuantizedTensor, get_spec
from offload_kernels.formats.iq4_nl import IQ4_NL_VALUES
from offload_kernels.formats.mxfp4 import MXFP4_VALUES
from offload_kernels.kernels import configs, poison_outputs
from offload_kernels.kernels.decode import BLOCK32_QTYPES
from offload_kernels.kernels.gemv import gemv
from offload_kernels.kernels.runtime import INTERPRETER

from .helpers import random_qtensor, seed_of

TOKENS = 4      # columns read back per call: layout 3 runs up to GEMV3_MAX_BLOCK_M tokens
EXACT = ("q4_0", "q5_0", "q8_0", "iq4_nl", "q3_k", "q6_k", "iq4_xs", "mxfp4")
#: Columns read back: one 256-weight step, and for the 32-weight block formats a block past it (the step that
#: runs past the end of the row).
K_READ = dict.fromkeys(BLOCK32_QTYPES, 288)
FOLDED_MIN = ("q2_k", "q4_k", "q5_k")
FOLDED_MIN_BLOCK32 = ("q4_1", "q5_1")


def _decoded_by_gemv(qt: QuantizedTensor, device) -> torch.Tensor:
    n, k = qt.shape
    cols = []
    for k0 in range(0, k, TOKENS):
        x = torch.zeros(TOKENS, k, device=device)
        x[torch.arange(TOKENS), k0 + torch.arange(TOKENS)] = 1.0
        with poison_outputs():
            out = torch.full((TOKENS, n), float("nan"), device=device)
        gemv(x, qt, None, out, split_k=1, layout=3)
        cols.append(out.cpu())
    return torch.cat(cols).T


@pytest.fixture
def layout3_ran(gemv_layouts_ran):
    """Fails the test unless every GEMV launch used layout 3 (the heuristic falls back where it cannot)."""
    yield
    assert gemv_layouts_ran and set(gemv_layouts_ran) == {3}, gemv_layouts_ran


@pytest.fixture(params=[False, True], ids=["weight_axis_last", "weight_axis_first"])
def weight_axis_first(request, monkeypatch):
    """Both tile orders of layout 3 (gemv._WEIGHT_AXIS_FIRST: Triton 3.6 compiles one, 3.7+ the other); the
    interpreter runs either, a compiled kernel only the installed Triton's."""
    module = importlib.import_module("offload_kernels.kernels.gemv")
    if request.param != bool(module._WEIGHT_AXIS_FIRST) and not INTERPRETER:
        pytest.skip("compiled kernels use the installed Triton's tile order only")
    monkeypatch.setattr(module, "_WEIGHT_AXIS_FIRST", tl.constexpr(request.param))


@pytest.mark.parametrize("qtype", EXACT)
def test_weights_exact(qtype, device, layout3_ran, weight_axis_first):
    _check_exact(qtype, device)


@pytest.mark.parametrize("qtype", FOLDED_MIN)
def test_weights_within_the_folded_min_rounding(qtype, device, layout3_ran, weight_axis_first):
    _check_folded_min(qtype, device)


@pytest.mark.parametrize("qtype", FOLDED_MIN_BLOCK32)
def test_block32_weights_within_the_folded_min_rounding(qtype, device, layout3_ran, weight_axis_first):
    _check_folded_min_block32(qtype, device)


@pytest.mark.gpu
def test_prmt_decode_on_the_gpu(layout3_ran):
    """The same read-backs in the GPU suite's quick stage (`pytest -m gpu`): there the byte permute runs as
    PTX prmt, where the tests above (on CPU) check the interpreter's shifts."""
    for qtype in EXACT:
        _check_exact(qtype, torch.device("cuda"))
    for qtype in FOLDED_MIN:
        _check_folded_min(qtype, torch.device("cuda"))
    for qtype in FOLDED_MIN_BLOCK32:
        _check_folded_min_block32(qtype, torch.device("cuda"))


def _gguf_weight(qt: QuantizedTensor) -> torch.Tensor:
    """The fp32 weight as the gguf package's numpy dequantizer (llama.cpp's formulas) makes it."""
    data = qt.data.cpu().numpy()
    return torch.from_numpy(quants.dequantize(data, qt.spec.ggml_type).reshape(tuple(qt.shape)).astype(np.float32))


def _check_exact(qtype, device):
    g = torch.Generator().manual_seed(seed_of("gemv3", qtype))
    qt = random_qtensor(qtype, 40, K_READ.get(qtype, 256), g, device=device)
    if qtype == "mxfp4":        # every exponent byte up to 252: 12 * 2**(252 - 128) is finite, 253's 6 is not
        raw = qt.data.cpu().clone()
        raw.view(-1, qt.spec.block_bytes)[:, 0] = torch.randint(0, 253, (raw.numel() // qt.spec.block_bytes,),
                                                                dtype=torch.uint8, generator=g)
        qt = QuantizedTensor(raw.to(device), qtype, qt.shape)
    got = _decoded_by_gemv(qt, device)
    assert torch.equal(got, _gguf_weight(qt))


#: Where a q2_k / q4_k / q5_k block's quants start and end (q4_k/q5_k: after d, dmin, 12 scale bytes and q5_k's
#: 32 fifth-bit bytes; q2_k: after its 16 scale bytes, before d and dmin), and the byte whose quants are all 1.
QUANTS = {"q2_k": (16, 80, 0x55), "q4_k": (16, 144, 0x11), "q5_k": (48, 176, 0x11)}
#: Where the bytes that are neither d, dmin nor the scales are: zero quants (q5_k: fifth bits too).
OTHER_BYTES = {"q2_k": (16, 80), "q4_k": (16, 144), "q5_k": (16, 176)}


def _check_folded_min(qtype, device):
    g = torch.Generator().manual_seed(seed_of("gemv3", qtype))
    qt = random_qtensor(qtype, 40, 256, g, device=device)
    got = _decoded_by_gemv(qt, device).double()
    w = _gguf_weight(qt).double()
    # s (d * sc) and dmin * m of every weight's sub-block, from the same blocks with every quant set to 0
    # and to 1 (w = u * s - dmin * m)
    raw = qt.data.cpu().clone()
    blocks = raw.view(-1, get_spec(qtype).block_bytes)
    lo, hi = OTHER_BYTES[qtype]
    blocks[:, lo:hi] = 0
    minus_min = _gguf_weight(QuantizedTensor(raw.clone(), qtype, qt.shape)).double()
    lo, hi, ones = QUANTS[qtype]
    blocks[:, lo:hi] = ones
    s = _gguf_weight(QuantizedTensor(raw, qtype, qt.shape)).double() - minus_min
    bound = 2.0 ** -24 * (192 * s.abs() + minus_min.abs()) + 2.0 ** -24 * w.abs() + 2.0 ** -24 * s.abs()
    excess = (got - w).abs() - bound
    assert excess.max() <= 0, f"{int((excess > 0).sum())} weights beyond the bound, worst by {excess.max():.3g}"


def _check_folded_min_block32(qtype, device):
    """q4_1/q5_1: the weight u * d + m comes from fma(1.5 + u/128, 128 d, round(m - 192 d)): within 2**-24 of
    the addend of the exact value, which is within 2**-24 of gguf's (once rounded) weight, plus its own rounding."""
    g = torch.Generator().manual_seed(seed_of("gemv3", qtype))
    qt = random_qtensor(qtype, 40, K_READ[qtype], g, device=device)
    got = _decoded_by_gemv(qt, device).double()
    w = _gguf_weight(qt).double()
    blocks = qt.data.cpu().view(-1, get_spec(qtype).block_bytes)
    d = blocks[:, 0:2].contiguous().view(torch.float16).double().repeat_interleave(32).view(qt.shape)
    m = blocks[:, 2:4].contiguous().view(torch.float16).double().repeat_interleave(32).view(qt.shape)
    bound = (2.0 ** -24 * (192 * d.abs() + m.abs()) + 2.0 ** -23 * w.abs()) * (1 + 2.0 ** -20)
    excess = (got - w).abs() - bound
    assert excess.max() <= 0, f"{int((excess > 0).sum())} weights beyond the bound, worst by {excess.max():.3g}"


def _prmt(a: np.ndarray, b: int, selector: int) -> np.ndarray:
    """PTX prmt.b32 (default mode): result byte i is byte (selector nibble i & 7) of the eight bytes b:a
    (a = bytes 0-3), or, when the nibble's bit 3 is set, that byte's sign bit replicated."""
    pool = np.stack([(a >> (8 * j)) & 0xFF for j in range(4)] + [np.full_like(a, (b >> (8 * j)) & 0xFF)
                                                                  for j in range(4)])
    out = np.zeros_like(a)
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = pool[nibble & 7]
        if nibble & 8:
            byte = np.where(byte & 0x80, 0xFF, 0)
        out |= byte << (8 * i)
    return out


def test_byte_permute_matches_the_interpreter_bits():
    v = np.random.default_rng(0).integers(0, 2 ** 32, 4096, dtype=np.uint64)
    for q in range(4):
        want = (((v >> (8 * q)) & 0xFF) << 16) | 0x3F000000          # _f32_with_byte at 16, no prmt
        assert np.array_equal(_prmt(v, 0x3F000000, 0x7054 | (q << 8)), want)
    # with bytes 0xC0 | u the bits are the fp32 1.5 + u / 128
    u = np.arange(64, dtype=np.uint64)
    bits = _prmt(0xC0 | u, 0x3F000000, 0x7054).astype(np.uint32)
    assert np.array_equal(bits.view(np.float32), (1.5 + u / 128).astype(np.float32))
    # _f32_with_byte(v, q, _ONE_BITS, 8) (q8_0): byte q into bits 8-15 of 1.0, i.e. 1 + byte / 32768
    for q in range(4):
        want = (((v >> (8 * q)) & 0xFF) << 8) | 0x3F800000
        assert np.array_equal(_prmt(v, 0x3F800000, 0x7604 | (q << 4)), want)
    ub = np.arange(256, dtype=np.uint64)
    bits = _prmt(ub, 0x3F800000, 0x7604).astype(np.uint32)
    assert np.array_equal(bits.view(np.float32), (1 + ub / 32768).astype(np.float32))


def _prmt_any(a: int, b: int, selector: np.ndarray) -> np.ndarray:
    """PTX prmt.b32 (default mode) of constant sources a, b under per-element selectors (nibbles 0..7)."""
    pool = [(a >> (8 * j)) & 0xFF for j in range(4)] + [(b >> (8 * j)) & 0xFF for j in range(4)]
    out = np.zeros_like(selector)
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        assert (nibble < 8).all()
        out |= np.asarray(pool, dtype=np.int64)[nibble] << (8 * i)
    return out


@pytest.mark.parametrize("qtype", ["iq4_nl", "mxfp4"])
def test_table_word_lookup_matches_the_table(qtype):
    """gemv._nl_bytes's selector arithmetic, run through prmt as the PTX ISA defines it, looks up every
    combination of four nibbles as the format's table values + 128 (IQ4_NL_VALUES; MXFP4_VALUES, its doubled
    E2M1 values) (the interpreter runs the same arithmetic with gemv._byte_permute's shifts, which the
    read-back tests above check)."""
    gemv_module = importlib.import_module("offload_kernels.kernels.gemv")
    prefix, values = {"iq4_nl": ("_IQ4_NL", IQ4_NL_VALUES), "mxfp4": ("_MXFP4", MXFP4_VALUES)}[qtype]
    lo_words = [w & 0xFFFFFFFF for w in getattr(gemv_module, f"{prefix}_UNSIGNED_LO")]
    hi_words = [w & 0xFFFFFFFF for w in getattr(gemv_module, f"{prefix}_UNSIGNED_HI")]
    nibbles = np.arange(1 << 16, dtype=np.int64)
    n = sum(((nibbles >> (4 * k)) & 0xF) << (8 * k) for k in range(4))          # one nibble per byte
    c = n & 0x07070707
    sel = c | (c >> 4)
    sel = (sel & 0xFF) | ((sel >> 8) & 0xFF00)
    lo = _prmt_any(*lo_words, sel)
    hi = _prmt_any(*hi_words, sel)
    upper = ((n >> 3) & 0x01010101) * 0xFF
    got = (hi & upper) | (lo & ~upper & 0xFFFFFFFF)
    table = np.asarray(values) + 128
    want = sum(table[(nibbles >> (4 * k)) & 0xF] << (8 * k) for k in range(4))
    assert np.array_equal(got, want)


def test_word_loads_need_aligned_bytes(device):
    g = torch.Generator().manual_seed(3)
    for qtype in QTYPES:
        qt = random_qtensor(qtype, 8, 256, g, device=device)
        align = 4 if qtype in ("q2_k", "q4_k", "q5_k", "iq4_xs") else 1 if qtype == "mxfp4" else 2
        assert configs.gemv_word_loads(qt)
        flat = torch.empty(qt.nbytes + 16, dtype=torch.uint8, device=device)
        for offset in range(1, 4):
            moved = QuantizedTensor(flat[offset:offset + qt.nbytes].view(qt.data.shape), qtype, qt.shape)
            assert configs.gemv_word_loads(moved) == (offset % align == 0)
