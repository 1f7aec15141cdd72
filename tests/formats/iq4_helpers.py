"""What the iq4_nl and iq4_xs tests share: each format's committed ggml vectors and generator, numpy views of
its torch quantizer and dequantizer, gguf's numpy dequantizer, mismatch reports, and the live-libggml marker.

The vectors are tests/vectors/iq4_nl_vectors.npz and iq4_xs_vectors.npz (tests/vectors/generate_iq4_nl_vectors.py,
generate_iq4_xs_vectors.py). Set OFFLOAD_KERNELS_GGML_LIB to a libggml-base.so to also compare on fresh random data.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from offload_kernels.formats.iq4_nl import (
    dequantize_iq4_nl_blocks,
    dequantize_iq4_xs_blocks,
    quantize_iq4_nl_blocks,
    quantize_iq4_xs_blocks,
)

from .helpers import assert_same_floats  # noqa: F401  (re-exported for the iq4 test files)

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
sys.path.insert(0, str(VECTORS_DIR))
import generate_iq4_nl_vectors as gen_nl  # noqa: E402
import generate_iq4_xs_vectors as gen_xs  # noqa: E402
from ggml_ref import LIB_ENV, find_library  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

LIB = find_library()
live = pytest.mark.skipif(LIB is None, reason=f"set {LIB_ENV} to libggml-base.so")

#: fp16 scale bit patterns of interest: +-0, subnormals, the smallest normal, 1, 2^-5, the largest, +-Inf, NaNs.
SPECIAL_FP16 = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x0200, 0x03FF, 0x83FF, 0x0400, 0x3C00, 0x1400, 0x7BFF,
                         0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01], dtype=np.uint16)


def iq4_xs_sub_scales(blocks: np.ndarray) -> np.ndarray:
    """The eight 6-bit sub-block scales ls of each iq4_xs block, read literally from the layout."""
    scales_h = blocks[:, 2:4].copy().view(np.uint16)[:, 0].astype(np.int64)
    ls = np.empty((len(blocks), 8), dtype=np.int64)
    for ib in range(8):
        ls[:, ib] = ((blocks[:, 4 + ib // 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4)
    return ls


@dataclass(frozen=True)
class Iq4Format:
    """One format under test: its torch codec, its vector generator and committed vectors, its gguf type."""

    gen: ModuleType                       #: the tests/vectors generator module (CASES, VECTORS, ...)
    quantize: Callable[[torch.Tensor], torch.Tensor]
    dequantize: Callable[[torch.Tensor, torch.Tensor], None]
    gguf_type: GGMLQuantizationType
    qs_offset: int                        #: where the nibbles start in a block
    normal_case: str                      #: the vector case of standard-normal weights
    sub_scales: "Callable[[np.ndarray], np.ndarray] | None" = None   #: per-sub-block scales, for reports

    @property
    def name(self) -> str:
        return self.gen.VECTORS.qtype

    @property
    def block_size(self) -> int:
        return self.gen.VECTORS.block_size

    @property
    def block_bytes(self) -> int:
        return self.gen.VECTORS.block_bytes

    @cached_property
    def vectors(self) -> dict[str, np.ndarray]:
        """The committed npz: ``<case>/input``, ``<case>/bytes``, ``<case>/dequant`` (the note left out)."""
        with np.load(self.gen.VECTORS.npz) as f:
            return {k: f[k] for k in f.files if k != "note"}

    @cached_property
    def cases(self) -> list[str]:
        """The cases in the committed npz, sorted."""
        return sorted({k.split("/")[0] for k in self.vectors})

    def quantize_np(self, x: np.ndarray, device: str = "cpu") -> np.ndarray:
        return self.quantize(torch.from_numpy(x).to(device)).cpu().numpy()

    def dequantize_np(self, blocks: np.ndarray, device: str = "cpu") -> np.ndarray:
        b = torch.from_numpy(np.ascontiguousarray(blocks)).to(device)
        out = torch.empty((b.shape[0], self.block_size), dtype=torch.float32, device=device)
        self.dequantize(b, out)
        return out.cpu().numpy()

    def gguf_dequantize(self, blocks: np.ndarray) -> np.ndarray:
        """gguf's numpy dequantizer on (n, block_bytes) blocks."""
        with np.errstate(invalid="ignore", over="ignore"):      # signalling-NaN / huge scales among random bytes
            out = gguf_quants.dequantize(blocks.reshape(-1), self.gguf_type).reshape(-1, self.block_size)
        assert out.dtype == np.float32
        return out

    def random_blocks(self, g: np.random.Generator, n: int) -> np.ndarray:
        """Random bytes with fp16 scales d of every kind: normal, subnormal, +-0, the largest, +-Inf, NaN."""
        blocks = g.integers(0, 256, (n, self.block_bytes), dtype=np.uint8)
        d = blocks[:, 0:2].copy().view(np.uint16).ravel()
        pick = g.random(n) < 0.3
        d[pick] = g.choice(SPECIAL_FP16, pick.sum())
        subnormal = g.random(n) < 0.15
        d[subnormal] = d[subnormal] & 0x83FF               # exponent 0: subnormal (or zero)
        blocks[:, 0:2] = d.view(np.uint8).reshape(n, 2)
        return blocks

    def describe_mismatch(self, got: np.ndarray, expected: np.ndarray, x: np.ndarray) -> str:
        bad = np.nonzero((got != expected).any(axis=1))[0]
        if bad.size == 0:
            return "identical"
        b = int(bad[0])
        d_got, d_exp = (a[b, 0:2].copy().view(np.float16)[0] for a in (got, expected))
        scales = ""
        if self.sub_scales is not None:
            ls_got, ls_exp = (self.sub_scales(a[b:b + 1])[0].tolist() for a in (got, expected))
            scales = f"; ls got {ls_got} expected {ls_exp}"
        q0 = self.qs_offset
        qs = np.nonzero(got[b, q0:] != expected[b, q0:])[0]
        return (f"{bad.size} of {len(expected)} blocks differ; first: block {b}, input min {np.nanmin(x[b]):.6g} "
                f"max {np.nanmax(x[b]):.6g}; d got {d_got!r} expected {d_exp!r}{scales}; {qs.size} qs bytes differ "
                f"(first at {qs[:8].tolist()}: got {got[b, q0 + qs[:8]].tolist()} expected "
                f"{expected[b, q0 + qs[:8]].tolist()})")


IQ4_NL = Iq4Format(gen_nl, quantize_iq4_nl_blocks, dequantize_iq4_nl_blocks, GGMLQuantizationType.IQ4_NL,
                   qs_offset=2, normal_case="normal")
IQ4_XS = Iq4Format(gen_xs, quantize_iq4_xs_blocks, dequantize_iq4_xs_blocks, GGMLQuantizationType.IQ4_XS,
                   qs_offset=8, normal_case="nl_normal", sub_scales=iq4_xs_sub_scales)
FORMATS = (IQ4_NL, IQ4_XS)
