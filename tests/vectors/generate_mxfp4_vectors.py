"""Generate tests/vectors/mxfp4_vectors.npz: inputs, ggml's mxfp4 bytes and ggml's dequantized floats.

    python tests/vectors/generate_mxfp4_vectors.py --lib /path/to/libggml-base.so

Quantization is ``ggml_quantize_chunk(GGML_TYPE_MXFP4, ..., imatrix=NULL)``, i.e. ``quantize_row_mxfp4_ref``;
dequantization ``dequantize_row_mxfp4``. Only numpy is needed; block_vectors.py runs ggml and writes the file
(``--out`` writes elsewhere, to compare a new run with the committed one). The cases aim at what the format's
quantizer does differently from the others: its exponent comes from fp32 ``floorf(log2f(amax))``, so block maxima
just below a power of two (where log2f rounds up to the integer), the subnormal range (exponents below 0, which the
uint8 cast wraps) and the top of fp32 are covered, and ties between grid points.

npz keys: ``<case>/input`` (n, 32) fp32; ``<case>/bytes`` (n, 17) uint8; ``<case>/dequant`` (n, 32) fp32;
``note``: a JSON string recording how the file was made.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from block_vectors import BlockVectors, non_finite_blocks, signed_zero_blocks  # noqa: E402

#: ggml's kvalues_mxfp4 (the E2M1 values doubled)
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float64)


def below_power_of_two(g, n, k_low=-126, k_high=128):
    """Blocks whose largest magnitude is 2**k * (1 - j * 2**-24), j = 1..400: the fp32 values just below a power
    of two, where log2f's rounding decides the exponent (the rest of the block smaller, either sign)."""
    k = g.integers(k_low, k_high, n)
    j = g.integers(1, 400, n)
    amax = np.ldexp(1.0 - j * 2.0 ** -24, k)
    x = g.uniform(-1, 1, (n, 32)) * amax[:, None]
    x[np.arange(n), g.integers(0, 32, n)] = amax * g.choice([-1.0, 1.0], n)
    return x


def _powers_of_two(g, n):
    """Exact powers of two (and their neighbours above) as block maxima."""
    k = g.integers(-126, 128, n)
    amax = np.ldexp(1.0 + g.choice([0, 1, 2], n) * 2.0 ** -23, k)
    x = g.uniform(-1, 1, (n, 32)) * amax[:, None]
    x[np.arange(n), g.integers(0, 32, n)] = amax * g.choice([-1.0, 1.0], n)
    return x


def _ties(g, n):
    """Grid values and the midpoints between neighbouring ones, times the block's scale: exact ties."""
    grid = np.unique(KVALUES)
    pool = np.concatenate([grid, (grid[1:] + grid[:-1]) / 2])
    x = g.choice(pool, (n, 32)) * np.ldexp(1.0, g.integers(-20, 20, (n, 1)))
    x[:, 0] = 12.0 * np.ldexp(1.0, g.integers(-20, 20, n))      # fixes the exponent the others tie against
    return x


def _subnormal(g, n):
    """Maxima from 2**-149 to 2**-120: fp32 subnormals, and exponents floor(log2 amax) + 125 below 0."""
    amax = np.ldexp(1.0, g.integers(-149, -119, n)) * g.uniform(1, 2, n)
    return g.uniform(-1, 1, (n, 32)) * amax[:, None]


CASES = {
    "normal": lambda g, n: g.standard_normal((n, 32)),
    "realistic": lambda g, n: g.standard_normal((n, 32)) * np.exp(g.uniform(-6, 1, (n, 1))) * 0.02,
    "uniform": lambda g, n: g.uniform(-1, 1, (n, 32)) * 10.0 ** g.uniform(-6, 6, (n, 1)),
    "student_t3": lambda g, n: g.standard_t(3, (n, 32)),
    "sparse": lambda g, n: g.standard_normal((n, 32)) * (g.random((n, 32)) < 0.1),
    "zeros": lambda g, n: np.zeros((n, 32)),
    "signed_zeros": signed_zero_blocks,
    "constant": lambda g, n: np.repeat((g.standard_normal(n) * 10.0 ** g.uniform(-6, 4, n))[:, None], 32, axis=1),
    "ties": _ties,
    "below_power_of_two": below_power_of_two,
    "powers_of_two": _powers_of_two,
    "subnormal": _subnormal,
    "huge": lambda g, n: g.uniform(-1, 1, (n, 32)) * 10.0 ** g.uniform(30, 38.5, (n, 1)),
    "non_finite": non_finite_blocks,     # NaN never enters amax; an Inf makes the exponent cast wrap to 0
}
NON_FINITE_CASES = ("non_finite",)
VECTORS = BlockVectors("mxfp4", CASES, NON_FINITE_CASES, blocks_per_case=128, seed=20261124)


if __name__ == "__main__":
    VECTORS.main(description=__doc__.splitlines()[0])
