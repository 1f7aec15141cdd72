"""Generate tests/vectors/iq4_nl_vectors.npz: inputs, ggml's iq4_nl bytes and ggml's dequantized floats.

    python tests/vectors/generate_iq4_nl_vectors.py --lib /path/to/libggml-base.so

Quantization is ``ggml_quantize_chunk(GGML_TYPE_IQ4_NL, ..., imatrix=NULL)``, which runs
``quantize_iq4_nl`` (the scale search with ntry = 7), the path llama-quantize takes without an imatrix.
That is *not* ``quantize_row_iq4_nl_ref``, which skips the search and writes different bytes.
Dequantization is ``dequantize_row_iq4_nl``. Only numpy is needed; block_vectors.py runs ggml and writes
the file (``--out`` writes elsewhere, to compare a new run with the committed one).

npz keys: ``<case>/input`` (n, 32) fp32; ``<case>/bytes`` (n, 18) uint8; ``<case>/dequant`` (n, 32) fp32;
``note``: a JSON string recording how the file was made.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from block_vectors import BlockVectors, non_finite_blocks, signed_zero_blocks  # noqa: E402

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


# ---------------------------------------------------------------------------- input distributions
# Each takes (generator, number of blocks) and returns (n, 32) values (converted to fp32 afterwards).

def _outliers(g, n):
    """Small weights with one large value per block (most nibbles land near 0)."""
    x = g.standard_normal((n, 32)) * 0.01
    x[np.arange(n), g.integers(0, 32, n)] = g.choice([-1.0, 1.0], n) * 10.0 ** g.uniform(0, 3, n)
    return x


def _constant(g, n):
    v = g.standard_normal(n) * 10.0 ** g.uniform(-6, 4, n)
    return np.repeat(v[:, None], 32, axis=1)


def _symmetric_max(g, n):
    """+m and -m in one block: ggml takes the sign of the first it meets."""
    x = g.standard_normal((n, 32))
    m = np.abs(x).max(axis=1) * 1.5
    for b in range(n):
        i, j = g.choice(32, size=2, replace=False)
        x[b, i], x[b, j] = m[b], -m[b]
    return x


def _ties(g, n):
    """Table values and midpoints between them times powers of two: exact ties in best_index_int8."""
    mids = (KVALUES[1:] + KVALUES[:-1]) / 2
    pool = np.concatenate([KVALUES, mids, -KVALUES, -mids, [0.0]])
    return g.choice(pool, (n, 32)) * 2.0 ** g.integers(-8, 8, (n, 1))


def _eps_boundary(g, n):
    """amax just below, at and just above GROUP_MAX_EPS = 1e-15f (the all-zero cut-off)."""
    e = np.float32(1e-15)
    cands = np.array([np.nextafter(e, np.float32(0)), e, np.nextafter(e, np.float32(1))], dtype=np.float32)
    x = g.uniform(-1, 1, (n, 32)) * 1e-15
    x[np.arange(n), g.integers(0, 32, n)] = g.choice(cands, n) * g.choice([-1.0, 1.0], n)
    return x


CASES = {
    "normal": lambda g, n: g.standard_normal((n, 32)),
    "realistic": lambda g, n: g.standard_normal((n, 32)) * np.exp(g.uniform(-6, 1, (n, 1))) * 0.02,
    "uniform": lambda g, n: g.uniform(-1, 1, (n, 32)) * 10.0 ** g.uniform(-3, 3, (n, 1)),
    "student_t3": lambda g, n: g.standard_t(3, (n, 32)),
    "outliers": _outliers,
    "sparse": lambda g, n: g.standard_normal((n, 32)) * (g.random((n, 32)) < 0.1),
    "zeros": lambda g, n: np.zeros((n, 32)),
    "signed_zeros": signed_zero_blocks,
    "constant": _constant,
    "symmetric_max": _symmetric_max,
    "ties": _ties,
    "tiny_fp16_subnormal_scale": lambda g, n: g.standard_normal((n, 32)) * 10.0 ** g.uniform(-9, -4, (n, 1)),
    "tiny_below_eps": lambda g, n: g.standard_normal((n, 32)) * 10.0 ** g.uniform(-40, -14, (n, 1)),
    "eps_boundary": _eps_boundary,
    "subnormal_terms": lambda g, n: g.choice([-1.0, 1.0], (n, 32)) * 10.0 ** g.uniform(-26, -14, (n, 32)),
    "large_1e4": lambda g, n: g.standard_normal((n, 32)) * 1e4 * g.uniform(0.5, 2, (n, 1)),
    "fp16_scale_overflow": lambda g, n: g.standard_normal((n, 32)) * 10.0 ** g.uniform(5, 8, (n, 1)),
    "fp32_overflow_1e30": lambda g, n: g.standard_normal((n, 32)) * 1e30,
    "non_finite": non_finite_blocks,     # ggml's NaN guards and best_index_int8(NaN) = 15 show here
}
NON_FINITE_CASES = ("non_finite",)
VECTORS = BlockVectors("iq4_nl", CASES, NON_FINITE_CASES, blocks_per_case=48, seed=20240620)


if __name__ == "__main__":
    VECTORS.main(description=__doc__.splitlines()[0])
