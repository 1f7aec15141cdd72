"""Generate tests/vectors/ggml_quant_vectors.npz: inputs, ggml's quantized bytes and ggml's dequantized floats.

    python tests/vectors/generate_ggml_vectors.py --lib /path/to/libggml-base.so

The library is the ``libggml-base.so`` llama-cpp-python builds (``site-packages/llama_cpp/lib``); only
numpy is needed, so any Python runs this. Quantization is ``ggml_quantize_chunk`` with a NULL importance
matrix (the ``quantize_row_*_ref`` path of llama-quantize), dequantization ``dequantize_row_*``.
A JSON note next to the .npz records the library version and how the file was made.

npz keys: ``<case>/input`` (rows, cols) fp32; ``<case>/<qtype>/bytes`` (rows, row_bytes) uint8;
``<case>/<qtype>/dequant`` (rows, cols) fp32.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ggml_ref import GGML_TYPES, GgmlRef, find_library  # noqa: E402

HERE = Path(__file__).resolve().parent
NPZ = HERE / "ggml_quant_vectors.npz"
NOTE = HERE / "ggml_quant_vectors.json"
SEED = 20240601
QTYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


def _normal(g, shape, scale=1.0):
    return g.standard_normal(shape) * scale


def _zero_groups(g, shape):
    """Normal weights with whole 16- and 32-weight groups (and one 256-block per row) set to exactly 0."""
    w = g.standard_normal(shape)
    rows, cols = shape
    for r in range(rows):
        for _ in range(4):
            size = int(g.choice([16, 32]))
            start = int(g.integers(0, cols // size)) * size
            w[r, start:start + size] = 0.0
        block = int(g.integers(0, cols // 256)) * 256
        w[r, block:block + 256] = 0.0
    return w


def _one_outlier(g, shape):
    """Small weights with one large value per 256-block (most group scales round to 0 against it)."""
    w = g.standard_normal(shape) * 0.01
    rows, cols = shape
    for r in range(rows):
        for b in range(0, cols, 256):
            w[r, b + int(g.integers(0, 256))] = float(g.choice([-50.0, 50.0]))
    return w


def _heavy_tails(g, shape):
    """Student-t (3 dof) with 0.5% of the weights spiked 100x."""
    w = g.standard_t(3, shape)
    w[g.random(shape) < 0.005] *= 100.0
    return w


def _realistic(g, shape):
    """LLM-like: normal rows whose scale varies over two orders of magnitude."""
    return g.standard_normal(shape) * np.exp(g.uniform(-3.0, 1.0, size=(shape[0], 1))) * 0.02


def _group_scales(g, shape):
    """Normal weights whose 16-weight groups are scaled from 1e-3 to 1e3 (wildly different group scales)."""
    w = g.standard_normal(shape)
    return w * np.repeat(10.0 ** g.uniform(-3, 3, size=(shape[0], shape[1] // 16)), 16, axis=1)


def _sparse(g, shape):
    """Mostly exact zeros, about two nonzeros per 16 weights."""
    return g.standard_normal(shape) * (g.random(shape) < 0.12)


def _signed_zeros(g, shape):
    """Blocks of -0.0, of mixed +-0.0, and -0.0 groups next to nonzero ones (ggml's running maxima start
    at +0, so the sign of an all-zero block's scale is not the sign of its first element)."""
    w = g.standard_normal(shape)
    w[0] = -0.0
    w[1] = np.where(g.random(shape[1]) < 0.5, -0.0, 0.0)
    w[2, ::2] = -0.0
    for r in range(3, shape[0]):
        for start in range(0, shape[1], 64):
            if g.random() < 0.5:
                w[r, start:start + 32] = -0.0
    return w


def _constant_rows(g, shape):
    values = np.array([0.37, -2.5, 1e-3, -7.0, 3.0, -0.125])
    return np.repeat(values[np.arange(shape[0]) % len(values)][:, None], shape[1], axis=1)


def _ties(g, shape):
    """Small integers times powers of two: many exact .5 ties in nearest_int/roundf."""
    ints = g.integers(-8, 8, size=shape).astype(np.float64)
    return ints * 2.0 ** g.integers(-3, 2, size=(shape[0], 1))


def _tiny_mixed_signs(g, shape, scale):
    return g.standard_normal(shape) * scale


def _block_edges(g, shape):
    """32-weight block edge cases, one kind per block in turn: the largest magnitude with both signs (either
    first), a zero minimum whose first zero is -0.0 or +0.0, a constant block, and tiny blocks next to huge
    ones (1e-4 / 1e4 in one row)."""
    w = g.standard_normal(shape)
    blocks = w.reshape(-1, 32)                      # a view: writes land in w
    for b, block in enumerate(blocks):
        kind = b % 6
        i, j = g.choice(32, size=2, replace=False)
        m = float(np.abs(block).max()) * 1.5
        if kind == 0:                               # +m and -m: ggml keeps the first it meets
            block[i], block[j] = m, -m
        elif kind == 1:                             # nonnegative with zeros of both signs, -0.0 first
            block[:] = np.abs(block)
            block[min(i, j)], block[max(i, j)] = -0.0, 0.0
        elif kind == 2:                             # the same with +0.0 first
            block[:] = np.abs(block)
            block[min(i, j)], block[max(i, j)] = 0.0, -0.0
        elif kind == 3:                             # constant (d = 0), negative or positive
            block[:] = g.choice([-1.75, 0.3])
        elif kind == 4:
            block *= 1e-4
        else:
            block *= 1e4
    return w


# name -> (shape, generator). Magnitudes 1e-38 and below include fp32 subnormals; 3e38 sits at the top
# of fp32, where ggml's own arithmetic overflows (kept: we match ggml there too).
CASES = {
    "normal": ((8, 1024), lambda g, s: _normal(g, s)),
    "realistic": ((16, 1024), _realistic),
    "heavy_tails": ((8, 1024), _heavy_tails),
    "uniform": ((8, 1024), lambda g, s: g.uniform(-1.0, 1.0, s)),
    "all_positive": ((4, 512), lambda g, s: np.abs(g.standard_normal(s)) + 0.05),
    "all_negative": ((4, 512), lambda g, s: -np.abs(g.standard_normal(s))),
    "zero_rows": ((2, 512), lambda g, s: np.zeros(s)),
    "constant_rows": ((6, 512), _constant_rows),
    "signed_zeros": ((4, 512), _signed_zeros),
    "zero_groups": ((8, 1024), _zero_groups),
    "one_outlier": ((4, 1024), _one_outlier),
    "group_scales": ((4, 1024), _group_scales),
    "sparse": ((4, 1024), _sparse),
    "ties": ((8, 512), _ties),
    "tiny_1e-6": ((4, 512), lambda g, s: _tiny_mixed_signs(g, s, 1e-6)),
    "tiny_1e-20": ((4, 512), lambda g, s: _tiny_mixed_signs(g, s, 1e-20)),
    "tiny_1e-38": ((4, 512), lambda g, s: _tiny_mixed_signs(g, s, 1e-38)),
    "tiny_1e-42": ((2, 512), lambda g, s: _tiny_mixed_signs(g, s, 1e-42)),
    "huge_1e10": ((4, 512), lambda g, s: _normal(g, s, 1e10)),
    "huge_1e15": ((4, 512), lambda g, s: _normal(g, s, 1e15)),
    "huge_1e18": ((4, 512), lambda g, s: _normal(g, s, 1e18)),
    "overflow_1e30": ((2, 512), lambda g, s: _normal(g, s, 1e30)),
    "overflow_fp32_max": ((2, 512), lambda g, s: np.where(g.random(s) < 0.5, -1.0, 1.0) * 3.4e38
                                                     * g.uniform(0.5, 1.0, s)),
    "block_edges": ((4, 768), _block_edges),
}


def make_input(name: str, rng_seed: int) -> np.ndarray:
    shape, gen = CASES[name]
    g = np.random.default_rng([rng_seed, list(CASES).index(name)])
    with np.errstate(over="ignore"):
        w = np.asarray(gen(g, shape), dtype=np.float64).astype(np.float32)
    assert np.isfinite(w).all(), name
    return w


def _library_versions(lib_path: Path) -> dict:
    """What the build says about itself: llama-cpp-python's version and ggml's cmake package info."""
    info = {"library": lib_path.name}
    try:
        info["llama_cpp_python"] = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        pass
    cmake = lib_path.parent.parent.parent / "lib" / "cmake" / "ggml" / "ggml-config.cmake"
    if cmake.is_file():
        text = cmake.read_text()
        for key in ("GGML_VERSION", "GGML_BUILD_COMMIT"):
            m = re.search(rf'set\({key} "([^"]*)"\)', text)
            if m:
                info[key.lower()] = m.group(1)
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", help="path to libggml-base.so (default: $OFFLOAD_KERNELS_GGML_LIB)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    lib_path = find_library(args.lib)
    if lib_path is None:
        ap.error("give --lib or set OFFLOAD_KERNELS_GGML_LIB")
    ggml = GgmlRef(lib_path)

    arrays = {}
    for name in CASES:
        w = make_input(name, args.seed)
        arrays[f"{name}/input"] = w
        for qtype in QTYPES:
            with np.errstate(all="ignore"):        # ggml overflows to Inf/NaN in the overflow cases
                blocks = ggml.quantize(w, qtype)
                arrays[f"{name}/{qtype}/bytes"] = blocks
                arrays[f"{name}/{qtype}/dequant"] = ggml.dequantize(blocks, qtype, w.shape[1])
    np.savez_compressed(NPZ, **arrays)

    note = {
        "file": NPZ.name,
        "generated_by": "tests/vectors/generate_ggml_vectors.py",
        "command": f"python tests/vectors/generate_ggml_vectors.py --lib <libggml-base.so> --seed {args.seed}",
        "date": datetime.date.today().isoformat(),
        "numpy": np.__version__,
        "seed": args.seed,
        "ggml": _library_versions(lib_path),
        "quantize": "ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix=NULL): quantize_row_<type>_ref",
        "dequantize": "dequantize_row_<type>(blocks, dst, nrows * n_per_row)",
        "ggml_types": {q: {"id": t, "block_size": b, "block_bytes": n} for q, (t, b, n) in GGML_TYPES.items()},
        "cases": {name: list(shape) for name, (shape, _) in CASES.items()},
        "blocks_per_qtype": {q: sum(s[0] * s[1] for s, _ in CASES.values()) // GGML_TYPES[q][1] for q in QTYPES},
    }
    NOTE.write_text(json.dumps(note, indent=2) + "\n")
    print(f"wrote {NPZ} ({NPZ.stat().st_size / 1e6:.2f} MB) and {NOTE}")


if __name__ == "__main__":
    main()
