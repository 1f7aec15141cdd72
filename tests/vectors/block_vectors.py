"""What the iq4_nl and iq4_xs vector generators share: one ggml type's ``<qtype>_vectors.npz``.

``generate_iq4_nl_vectors.py`` and ``generate_iq4_xs_vectors.py`` each name their input cases and a
:class:`BlockVectors`; this module runs ggml on them and writes the file. For every case the npz holds
``<case>/input`` (n, block_size) fp32, ``<case>/bytes`` (n, block_bytes) uint8, the bytes
``ggml_quantize_chunk(type, ..., imatrix=NULL)`` wrote, and ``<case>/dequant`` (n, block_size) fp32, the
floats ``dequantize_row_<qtype>`` read back from them; ``note`` is a JSON string recording how the file
was made. Only numpy is needed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ggml_ref import GGML_TYPES, LIB_ENV, GgmlRef, find_library  # noqa: E402

HERE = Path(__file__).resolve().parent


def signed_zero_blocks(g: np.random.Generator, n: int) -> np.ndarray:
    """(n, 32) all-zero blocks of +-0.0 (first half), and zeros of both signs beside a few nonzeros (second half)."""
    x = np.where(g.random((n, 32)) < 0.5, -0.0, 0.0)
    some = g.random((n, 32)) < 0.1
    x[n // 2:][some[n // 2:]] = g.standard_normal(some[n // 2:].sum())
    return x


def non_finite_blocks(g: np.random.Generator, n: int) -> np.ndarray:
    """(n, 32) standard-normal blocks with one to three NaN / +-Inf weights each."""
    x = g.standard_normal((n, 32))
    for b in range(n):
        k = int(g.integers(1, 4))
        x[b, g.choice(32, size=k, replace=False)] = g.choice([np.nan, np.inf, -np.inf], k)
    return x


class BlockRef:
    """ggml's quantizer and dequantizer of one type in one libggml-base.so, on (n, block_size) blocks."""

    def __init__(self, path: "str | os.PathLike", qtype: str):
        self.path = str(path)
        self.qtype = qtype
        _, self.block_size, self.block_bytes = GGML_TYPES[qtype]
        self._ref = GgmlRef(path)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """(n, block_size) fp32 -> (n, block_bytes) uint8 through ggml_quantize_chunk (single-threaded, no
        imatrix)."""
        return self._ref.quantize(np.asarray(x, dtype=np.float32).reshape(-1, self.block_size), self.qtype)

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        """(n, block_bytes) uint8 -> (n, block_size) fp32 through dequantize_row_<qtype>."""
        blocks = np.asarray(blocks, dtype=np.uint8).reshape(-1, self.block_bytes)
        return self._ref.dequantize(blocks, self.qtype, self.block_size)


@dataclass(frozen=True)
class BlockVectors:
    """One ggml type's vector file, tests/vectors/<qtype>_vectors.npz, written by
    tests/vectors/generate_<qtype>_vectors.py."""

    qtype: str                    #: a ggml_ref.GGML_TYPES name
    cases: dict[str, Callable[[np.random.Generator, int], np.ndarray]]   #: name -> (g, n) -> (n, block_size)
    non_finite_cases: tuple[str, ...]    #: the cases whose inputs may hold NaN / Inf
    blocks_per_case: int
    seed: int

    @property
    def type_id(self) -> int:
        return GGML_TYPES[self.qtype][0]

    @property
    def block_size(self) -> int:
        return GGML_TYPES[self.qtype][1]

    @property
    def block_bytes(self) -> int:
        return GGML_TYPES[self.qtype][2]

    @property
    def npz(self) -> Path:
        return HERE / f"{self.qtype}_vectors.npz"

    @property
    def script(self) -> str:
        return f"tests/vectors/generate_{self.qtype}_vectors.py"

    def ref(self, lib_path: "str | os.PathLike") -> BlockRef:
        return BlockRef(lib_path, self.qtype)

    def make_input(self, name: str, seed: int, n: "int | None" = None) -> np.ndarray:
        """Case ``name``'s (n, block_size) fp32 input, n = blocks_per_case unless given."""
        n = self.blocks_per_case if n is None else n
        g = np.random.default_rng([seed, list(self.cases).index(name)])
        with np.errstate(over="ignore"):
            x = np.asarray(self.cases[name](g, n), dtype=np.float64).astype(np.float32)
        assert x.shape == (n, self.block_size) and (name in self.non_finite_cases or np.isfinite(x).all()), name
        return x

    def generate(self, ggml: BlockRef, seed: int) -> dict[str, np.ndarray]:
        """Every case's input, ggml's bytes and ggml's floats, keyed as in the npz."""
        arrays = {}
        for name in self.cases:
            x = self.make_input(name, seed)
            with np.errstate(all="ignore"):
                blocks = ggml.quantize(x)
                arrays[f"{name}/input"] = x
                arrays[f"{name}/bytes"] = blocks
                arrays[f"{name}/dequant"] = ggml.dequantize(blocks)
        return arrays

    def note(self, lib_path: Path, seed: int) -> dict:
        try:
            llama_cpp_python = metadata.version("llama_cpp_python")
        except metadata.PackageNotFoundError:
            llama_cpp_python = None
        return {
            "generated_by": self.script,
            "command": f"python {self.script} --lib <libggml-base.so> --seed {seed}",
            "date": datetime.date.today().isoformat(),
            "numpy": np.__version__,
            "library": lib_path.name,
            "llama_cpp_python": llama_cpp_python,
            "quantize": f"ggml_quantize_chunk(GGML_TYPE_{self.qtype.upper()}={self.type_id}, src, dst, 0, n, "
                        f"{self.block_size}, imatrix=NULL)",
            "dequantize": f"dequantize_row_{self.qtype}(blocks, dst, n * {self.block_size})",
            "cases": list(self.cases),
            "blocks_per_case": self.blocks_per_case,
        }

    def main(self, argv=None, description: "str | None" = None) -> None:
        """The generator's command line: ``--lib``, ``--seed``, and ``--out`` (default: the committed file)."""
        ap = argparse.ArgumentParser(description=description)
        ap.add_argument("--lib", help=f"path to libggml-base.so (default: ${LIB_ENV})")
        ap.add_argument("--seed", type=int, default=self.seed)
        ap.add_argument("--out", type=Path, default=self.npz, help=f"where to write (default: {self.npz.name})")
        args = ap.parse_args(argv)
        lib_path = find_library(args.lib)
        if lib_path is None:
            ap.error(f"give --lib or set {LIB_ENV}")
        arrays = self.generate(self.ref(lib_path), args.seed)
        arrays["note"] = np.array(json.dumps(self.note(lib_path, args.seed)))
        np.savez_compressed(args.out, **arrays)
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.1f} kB, "
              f"{len(self.cases) * self.blocks_per_case} blocks of {self.block_size} weights)")
