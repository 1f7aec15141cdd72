"""Generate tests/vectors/iq4_nl_vectors.npz: inputs, ggml's iq4_nl bytes and ggml's dequantized floats.

    python tests/vectors/generate_iq4_nl_vectors.py --lib /path/to/libggml-base.so

Quantization is ``ggml_quantize_chunk(GGML_TYPE_IQ4_NL, ..., imatrix=NULL)``, which runs
``quantize_iq4_nl`` (the scale search with ntry = 7), the path llama-quantize takes without an imatrix.
That is *not* ``quantize_row_iq4_nl_ref``, which skips the search and writes different bytes.
Dequantization is ``dequantize_row_iq4_nl``. Only numpy is needed.

npz keys: ``<case>/input`` (n, 32) fp32; ``<case>/bytes`` (n, 18) uint8; ``<case>/dequant`` (n, 32) fp32;
``note``: a JSON string recording how the file was made.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ggml_ref import LIB_ENV, GgmlRef, find_library  # noqa: E402,F401  (find_library: the tests' entry point)

HERE = Path(__file__).resolve().parent
NPZ = HERE / "iq4_nl_vectors.npz"
SEED = 20240620

GGML_TYPE_IQ4_NL = 20
BLOCK_SIZE, BLOCK_BYTES = 32, 18
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


class Iq4NlRef:
    """ggml's iq4_nl entry points in one libggml-base.so, on (n, 32) blocks (ggml_ref.GgmlRef's bindings)."""

    def __init__(self, path: "str | os.PathLike"):
        self.path = str(path)
        self._ref = GgmlRef(path)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """(n, 32) fp32 -> (n, 18) uint8 through ggml_quantize_chunk (single-threaded, no imatrix)."""
        return self._ref.quantize(np.asarray(x, dtype=np.float32).reshape(-1, BLOCK_SIZE), "iq4_nl")

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        """(n, 18) uint8 -> (n, 32) fp32 through dequantize_row_iq4_nl."""
        return self._ref.dequantize(np.asarray(blocks, dtype=np.uint8).reshape(-1, BLOCK_BYTES), "iq4_nl", BLOCK_SIZE)


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


def _signed_zeros(g, n):
    """All-zero blocks of +-0.0, and zeros of both signs beside a few nonzeros."""
    x = np.where(g.random((n, 32)) < 0.5, -0.0, 0.0)
    some = g.random((n, 32)) < 0.1
    x[n // 2:][some[n // 2:]] = g.standard_normal(some[n // 2:].sum())
    return x


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


def _non_finite(g, n):
    """NaN and +-Inf among normal weights: ggml's NaN guards and best_index_int8(NaN) = 15 show here."""
    x = g.standard_normal((n, 32))
    for b in range(n):
        k = int(g.integers(1, 4))
        x[b, g.choice(32, size=k, replace=False)] = g.choice([np.nan, np.inf, -np.inf], k)
    return x


CASES = {
    "normal": lambda g, n: g.standard_normal((n, 32)),
    "realistic": lambda g, n: g.standard_normal((n, 32)) * np.exp(g.uniform(-6, 1, (n, 1))) * 0.02,
    "uniform": lambda g, n: g.uniform(-1, 1, (n, 32)) * 10.0 ** g.uniform(-3, 3, (n, 1)),
    "student_t3": lambda g, n: g.standard_t(3, (n, 32)),
    "outliers": _outliers,
    "sparse": lambda g, n: g.standard_normal((n, 32)) * (g.random((n, 32)) < 0.1),
    "zeros": lambda g, n: np.zeros((n, 32)),
    "signed_zeros": _signed_zeros,
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
    "non_finite": _non_finite,
}
NON_FINITE_CASES = ("non_finite",)
BLOCKS_PER_CASE = 48


def make_input(name: str, seed: int, n: int = BLOCKS_PER_CASE) -> np.ndarray:
    g = np.random.default_rng([seed, list(CASES).index(name)])
    with np.errstate(over="ignore"):
        x = np.asarray(CASES[name](g, n), dtype=np.float64).astype(np.float32)
    assert x.shape == (n, 32) and (name in NON_FINITE_CASES or np.isfinite(x).all()), name
    return x


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", help=f"path to libggml-base.so (default: ${LIB_ENV})")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    lib_path = find_library(args.lib)
    if lib_path is None:
        ap.error(f"give --lib or set {LIB_ENV}")
    ggml = Iq4NlRef(lib_path)

    arrays = {}
    for name in CASES:
        x = make_input(name, args.seed)
        with np.errstate(all="ignore"):
            blocks = ggml.quantize(x)
            arrays[f"{name}/input"] = x
            arrays[f"{name}/bytes"] = blocks
            arrays[f"{name}/dequant"] = ggml.dequantize(blocks)
    try:
        llama_cpp_python = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        llama_cpp_python = None
    note = {
        "generated_by": "tests/vectors/generate_iq4_nl_vectors.py",
        "command": f"python tests/vectors/generate_iq4_nl_vectors.py --lib <libggml-base.so> --seed {args.seed}",
        "date": datetime.date.today().isoformat(),
        "numpy": np.__version__,
        "library": lib_path.name,
        "llama_cpp_python": llama_cpp_python,
        "quantize": "ggml_quantize_chunk(GGML_TYPE_IQ4_NL=20, src, dst, 0, n, 32, imatrix=NULL)",
        "dequantize": "dequantize_row_iq4_nl(blocks, dst, n * 32)",
        "cases": list(CASES),
        "blocks_per_case": BLOCKS_PER_CASE,
    }
    arrays["note"] = np.array(json.dumps(note))
    np.savez_compressed(NPZ, **arrays)
    print(f"wrote {NPZ} ({NPZ.stat().st_size / 1e3:.1f} kB, {len(CASES) * BLOCKS_PER_CASE} blocks)")


if __name__ == "__main__":
    main()
