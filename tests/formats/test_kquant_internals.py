"""The k-quant quantizers' building blocks, and invariances the ggml vectors do not pin down.

Byte-exactness against ggml itself is tested in test_quantize_ggml_vectors.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload_kernels.formats import kquant_arith as ka
from offload_kernels.formats import quantize_kquants as qk
from offload_kernels.formats.kquant_search import search_qkx2

K_QUANTIZERS = {"q2_k": qk.quantize_q2_k_blocks, "q3_k": qk.quantize_q3_k_blocks, "q4_k": qk.quantize_q4_k_blocks,
                "q5_k": qk.quantize_q5_k_blocks, "q6_k": qk.quantize_q6_k_blocks}


def _blocks(nb: int, seed: int = 0) -> torch.Tensor:
    """LLM-like weights with a few zero groups and outliers, as (nb, 256) fp32."""
    g = np.random.default_rng(seed)
    w = g.standard_normal((nb, 256)) * np.exp(g.uniform(-3, 1, (nb, 1))) * 0.02
    w[::5, 32:64] = 0.0
    w[::7, 100] *= 80.0
    return torch.from_numpy(w.astype(np.float32))


@pytest.mark.parametrize("qtype", sorted(K_QUANTIZERS))
def test_chunking_does_not_change_bytes(qtype, monkeypatch):
    x = _blocks(37)
    whole = K_QUANTIZERS[qtype](x)
    monkeypatch.setitem(qk._CPU_CHUNK_BLOCKS, qtype, 5)          # 8 chunks, the last one short
    assert torch.equal(K_QUANTIZERS[qtype](x), whole)


@pytest.mark.parametrize("qtype", sorted(K_QUANTIZERS))
def test_non_contiguous_input(qtype):
    x = _blocks(12)
    strided = torch.empty(12, 512)[:, ::2]
    strided.copy_(x)
    assert torch.equal(K_QUANTIZERS[qtype](strided), K_QUANTIZERS[qtype](x))


def test_scratch_is_released_and_bounded():
    x = _blocks(3000)
    scratch = ka.scratch_for(torch.device("cpu"))
    for quantize in K_QUANTIZERS.values():
        quantize(x)
        assert scratch._used == 0                                 # every temporary went back
    assert scratch.nbytes < 32 * 2**20


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", sorted(K_QUANTIZERS))
def test_cuda_matches_cpu(qtype):
    x = torch.cat([_blocks(300, seed=1), _blocks(3, seed=2) * 1e-38, _blocks(3, seed=3) * 1e30,
                   torch.zeros(2, 256), torch.full((2, 256), -0.0)])
    assert torch.equal(K_QUANTIZERS[qtype](x.cuda()).cpu(), K_QUANTIZERS[qtype](x))


def test_sqrt_f32_is_correctly_rounded():
    v = np.random.default_rng(0).uniform(0, 1e6, 200_000).astype(np.float32)
    expected = np.sqrt(v)                                          # numpy's float32 sqrt is IEEE
    assert np.array_equal(ka.sqrt_f32(torch.from_numpy(v)).numpy(), expected)


def _nearest_int_reference(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int, bit for bit (NaN: x86's default NaN has mantissa 0x400000, giving 0)."""
    bits = (v.astype(np.float32) + np.float32(12582912.0)).view(np.int32)
    return np.where(np.isnan(v), 0, (bits & 0x007FFFFF) - 0x00400000).astype(np.int32)


def test_nearest_int_exact_and_in_place():
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 3.49999, 4194303.0, 5e6, 8388608.0, -3e7, 1e30, np.inf,
                      -np.inf, np.nan, -0.0], dtype=np.float32)
        expected = _nearest_int_reference(v)
    assert np.array_equal(ka.nearest_int_exact(torch.from_numpy(v)).numpy(), expected)
    assert np.array_equal(ka.nearest_int_(torch.from_numpy(v.copy())).numpy(), expected)


def test_select_is_bitwise():
    a = torch.tensor([float("nan"), -0.0, 1.0, float("inf")])
    b = torch.tensor([2.0, 0.0, float("nan"), -1.0])
    mask = ka.lane_mask(torch.tensor([True, True, False, False]))
    got = ka.select(mask, a, b).view(torch.int32)
    assert torch.equal(got, torch.stack([a[0], a[1], b[2], b[3]]).view(torch.int32))


def test_first_absmax_follows_ggmls_scan():
    v = torch.tensor([[1.0, -3.0, 3.0, 2.0],                      # first of equal magnitudes wins
                      [0.0, -0.0, 0.0, 0.0],                       # nothing above 0: +0
                      [float("nan"), -1.0, 0.5, float("nan")]])    # NaN never wins
    value, mag = ka.first_absmax(v, dim=1)
    assert value.tolist() == [-3.0, 0.0, -1.0] and mag.tolist() == [3.0, 0.0, 1.0]
    assert not torch.signbit(value[1])


def test_first_true():
    mask = torch.tensor([[False, True, False], [True, True, False], [False, True, False]])
    assert ka.first_true(mask, dim=0).tolist() == [1, 0, 3]
    assert ka.first_true(mask.float(), dim=0).tolist() == [1, 0, 3]


def test_sequential_sum_keeps_ggmls_order():
    terms = torch.tensor([[1e8], [1.0], [-1e8], [1.0]])
    # ((1e8 + 1) - 1e8) + 1 = 1 in fp32 (1e8 + 1 rounds to 1e8); any pairwise order gives 2
    assert ka.sequential_sum(terms, start_at_zero=True).item() == 1.0


def test_roundf_is_c_roundf_on_random_bit_patterns():
    """rounding.roundf against C's roundf (half away from zero), computed in float64 where |x| + 0.5 is
    exact: random fp32 bit patterns (every exponent, subnormals, inf, NaN), ties, and values just below a
    tie, where adding 0.5 in fp32 would round up."""
    from offload_kernels.formats.rounding import roundf

    g = np.random.default_rng(7)
    bits = g.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    below_half = np.nextafter(np.float32(0.5), np.float32(0))
    special = np.array([0.5, -0.5, 1.5, -2.5, below_half, -below_half, 0.0, -0.0, np.inf, -np.inf, 8388607.5,
                        -8388607.5, 2.0**24 + 2, 1e-45, -1e-45], dtype=np.float32)
    x = np.concatenate([bits.view(np.float32), special, np.arange(-64, 64, 0.25, dtype=np.float32)])
    with np.errstate(invalid="ignore"):
        a = np.abs(x.astype(np.float64))
        expected = np.where(np.isfinite(x), np.copysign(np.floor(a + 0.5), x), x).astype(np.float32)
    got = roundf(torch.from_numpy(x)).numpy()
    nan = np.isnan(x)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))   # signed zeros too


def _nearest_int_scalar(v: np.float32) -> int:
    bits = int(np.array(v + np.float32(12582912.0), dtype=np.float32).view(np.int32))
    return (bits & 0x007FFFFF) - 0x00400000


def _make_qkx2_quants_scalar(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """ggml's make_qkx2_quants transcribed line by line in numpy fp32 scalars: (scale, -min, L)."""
    f = np.float32
    lo, hi, sum_w = x[0], x[0], w[0]
    sum_x = sum_w * x[0]
    for i in range(1, len(x)):
        lo = x[i] if x[i] < lo else lo
        hi = x[i] if x[i] > hi else hi
        sum_w += w[i]
        sum_x += w[i] * x[i]
    lo = f(0) if lo > 0 else lo
    if hi == lo:
        return f(0), -lo, [0] * len(x)

    def error(scale, the_min, quants):
        err = f(0)
        for xi, wi, li in zip(x, w, quants):
            diff = scale * f(li) + the_min - xi
            err += wi * (abs(diff) if use_mad else diff * diff)
        return err

    def quantize(iscale, the_min):
        return [max(0, min(nmax, _nearest_int_scalar(iscale * (xi - the_min)))) for xi in x]

    iscale = f(nmax) / (hi - lo)
    scale = f(1) / iscale
    quants = quantize(iscale, lo)
    best = error(scale, lo, quants)
    for step in range(nstep + 1):
        iscale = (f(rmin) + f(rdelta) * f(step) + f(nmax)) / (hi - lo)
        aux = quantize(iscale, lo)
        sum_l = sum_l2 = sum_xl = f(0)
        for xi, wi, li in zip(x, w, aux):
            sum_l += wi * f(li)
            sum_l2 += wi * f(li) * f(li)
            sum_xl += wi * f(li) * xi
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min, this_scale = f(0), sum_xl / sum_l2
            cur = error(this_scale, this_min, aux)
            if cur < best:
                quants, best, scale, lo = aux, cur, this_scale, this_min
    return scale, -lo, quants


@pytest.mark.parametrize("npos, nmax, rmin, nstep, use_mad, abs_weights", [(16, 3, -0.5, 15, True, True),    # q2_k
                                                                            (16, 3, -0.5, 15, False, True),
                                                                            (32, 15, -1.0, 20, True, False),
                                                                            (32, 15, -1.0, 20, False, False)])  # q4_k
def test_search_qkx2_matches_a_scalar_transcription(npos, nmax, rmin, nstep, use_mad, abs_weights):
    """search_qkx2 (either error measure, 16- or 32-weight groups) against make_qkx2_quants run one group
    at a time in numpy fp32: the vectorized steps keep ggml's order and its running min."""
    g = np.random.default_rng(npos + nmax + int(use_mad))
    x = g.standard_normal((96, npos)) * 10.0 ** g.uniform(-3, 3, (96, 1))
    x[::7] = np.abs(x[::7])                                        # all-positive groups: min clamped to 0
    x[1::9] = 0.0
    x[2::11, 3:] = x[2::11, :1]                                    # nearly flat
    x = x.astype(np.float32)
    w = np.abs(x) if abs_weights else np.abs(x) + np.float32(0.25)
    scale, the_min, quants = search_qkx2(torch.from_numpy(x.T.copy()), torch.from_numpy(w.T.copy()), nmax, rmin,
                                         0.1, nstep, ka.Scratch(torch.device("cpu")), use_mad=use_mad)
    for j in range(x.shape[0]):
        ref_scale, ref_min, ref_quants = _make_qkx2_quants_scalar(x[j], w[j], nmax, rmin, 0.1, nstep, use_mad)
        assert scale[j].numpy().view(np.int32) == np.float32(ref_scale).view(np.int32), j
        assert the_min[j].numpy().view(np.int32) == np.float32(ref_min).view(np.int32), j
        assert quants[:, j].tolist() == [float(q) for q in ref_quants], j
