"""Generate tests/vectors/iq4_xs_vectors.npz: inputs, ggml's iq4_xs bytes and ggml's dequantized floats.

    python tests/vectors/generate_iq4_xs_vectors.py --lib /path/to/libggml-base.so

Quantization is ``ggml_quantize_chunk(GGML_TYPE_IQ4_XS, ..., imatrix=NULL)``, which runs
``quantize_iq4_xs`` -> ``quantize_row_iq4_nl_impl(QK_K = 256, 32, ..., ntry = 7)`` per super-block (the
path llama-quantize takes without an imatrix). Dequantization is ``dequantize_row_iq4_xs``. Only numpy
is needed; block_vectors.py runs ggml and writes the file, as for iq4_nl (``--out`` writes elsewhere).

The input cases are iq4_nl's (generate_iq4_nl_vectors.CASES; eight of its 32-weight blocks make one
super-block, so per-block magnitudes there become per-sub-block magnitudes here) plus cases aimed at the
super-block scale: sub-blocks of very different magnitudes, zero and below-1e-15 sub-blocks, sub-block
scales of equal magnitude and opposite sign (first-wins ties, the +32 -> 31 clamp), exact power-of-two
ratios between sub-blocks (nearest_int ties at +-0.5), one overflowing or non-finite sub-block among normal
ones.

npz keys: ``<case>/input`` (n, 256) fp32; ``<case>/bytes`` (n, 136) uint8; ``<case>/dequant`` (n, 256)
fp32; ``note``: a JSON string recording how the file was made.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate_iq4_nl_vectors as nl  # noqa: E402
from block_vectors import BlockVectors  # noqa: E402

BLOCK_SIZE = 256   # weights per super-block (QK_K)
SUB = 8   # 32-weight sub-blocks per super-block


# ---------------------------------------------------------------------------- input distributions
# Each takes (generator, number of super-blocks) and returns (n, 256) values (converted to fp32 afterwards).

def _from_iq4_nl(name):
    def make(g, n):
        return np.asarray(nl.CASES[name](g, n * SUB), dtype=np.float64).reshape(n, BLOCK_SIZE)
    return make


def _subblock_scaled(g, n, log10_lo, log10_hi):
    x = g.standard_normal((n, SUB, 32)) * 10.0 ** g.uniform(log10_lo, log10_hi, (n, SUB, 1))
    return x.reshape(n, BLOCK_SIZE)


def _mixed_magnitudes(g, n):
    """Sub-blocks of magnitudes 1e-6..1e3 within one super-block (small ones get ls near 32)."""
    return _subblock_scaled(g, n, -6, 3)


def _zero_subblocks(g, n):
    """Normal super-blocks with some sub-blocks all zero or below GROUP_MAX_EPS (scale 0 -> ls = 32)."""
    x = g.standard_normal((n, SUB, 32)) * 10.0 ** g.uniform(-2, 2, (n, 1, 1))
    kind = g.integers(0, 4, (n, SUB))
    x[kind == 0] = 0.0
    x[kind == 1] *= 1e-17
    return x.reshape(n, BLOCK_SIZE)


def _opposite_sign_max(g, n):
    """Each sub-block's largest element is +-M (random sign) for one M per super-block: scales of equal or
    nearly equal magnitude and both signs, so the first one wins and the other sign clamps +32 to 31."""
    x = g.standard_normal((n, SUB, 32))
    m = np.abs(x).max(axis=(1, 2)) * 1.5
    pos = g.integers(0, 32, (n, SUB))
    sign = g.choice([-1.0, 1.0], (n, SUB))
    jitter = np.where(g.random((n, SUB)) < 0.5, 1.0, 1.0 + g.uniform(-0.05, 0.05, (n, SUB)))
    x[np.arange(n)[:, None], np.arange(SUB)[None, :], pos] = m[:, None] * sign * jitter
    return x.reshape(n, BLOCK_SIZE)


def _repeated_subblock(g, n):
    """One 32-weight block repeated 8 times, some copies negated: exactly equal |scales|, opposite signs."""
    b = g.standard_normal((n, 1, 32)) * 10.0 ** g.uniform(-3, 3, (n, 1, 1))
    sign = g.choice([-1.0, 1.0], (n, SUB, 1))
    return (b * sign).reshape(n, BLOCK_SIZE)


def _pow2_subblocks(g, n):
    """One block times +-2^-k (k = 0, 1, 5, 6, 7) per sub-block: the sub-block scales scale exactly, so
    id * scales[ib] lands on (or one rounding off) +-32, +-16, +-1, +-0.5 (a nearest_int tie), +-0.25."""
    b = g.standard_normal((n, 1, 32)) * 10.0 ** g.uniform(-3, 3, (n, 1, 1))
    k = g.choice([0, 1, 5, 6, 6, 6, 7], (n, SUB, 1))
    k[:, 0] = 0
    return (b * g.choice([-1.0, 1.0], (n, SUB, 1)) * 2.0 ** -k).reshape(n, BLOCK_SIZE)


def _constant_superblock(g, n):
    v = g.standard_normal(n) * 10.0 ** g.uniform(-6, 4, n)
    return np.repeat(v[:, None], BLOCK_SIZE, axis=1)


def _one_huge_subblock(g, n):
    """Normal sub-blocks beside one at 1e10..1e21 (fp32 overflow in w*q*x or x*x: Inf / NaN sub-block scales)."""
    x = g.standard_normal((n, SUB, 32))
    k = g.integers(0, SUB, n)
    x[np.arange(n), k] *= 10.0 ** g.uniform(10, 21, (n, 1))
    return x.reshape(n, BLOCK_SIZE)


def _one_non_finite_subblock(g, n):
    """NaN / +-Inf in one sub-block, the others normal (or tiny, so that sub-block's amax stays < 1e-15)."""
    x = g.standard_normal((n, SUB, 32))
    for b in range(n):
        k = int(g.integers(0, SUB))
        if g.random() < 0.3:
            x[b, k] *= 1e-17
        m = int(g.integers(1, 4))
        x[b, k, g.choice(32, size=m, replace=False)] = g.choice([np.nan, np.inf, -np.inf], m)
    return x.reshape(n, BLOCK_SIZE)


CASES = {f"nl_{name}": _from_iq4_nl(name) for name in nl.CASES}
CASES.update({
    "mixed_magnitudes": _mixed_magnitudes,
    "zero_subblocks": _zero_subblocks,
    "opposite_sign_max": _opposite_sign_max,
    "repeated_subblock": _repeated_subblock,
    "pow2_subblocks": _pow2_subblocks,
    "constant_superblock": _constant_superblock,
    "one_huge_subblock": _one_huge_subblock,
    "one_non_finite_subblock": _one_non_finite_subblock,
})
NON_FINITE_CASES = tuple(f"nl_{name}" for name in nl.NON_FINITE_CASES) + ("one_non_finite_subblock",)
VECTORS = BlockVectors("iq4_xs", CASES, NON_FINITE_CASES, blocks_per_case=8, seed=20240623)


if __name__ == "__main__":
    VECTORS.main(description=__doc__.splitlines()[0])
