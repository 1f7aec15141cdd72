"""Test data for the format tests: random GGUF blocks and weights of several distributions."""

from __future__ import annotations

import numpy as np
import torch

from offload_kernels.formats import QuantizedTensor, get_spec

def random_blocks(qtype: str, n: int, k: int, generator: torch.Generator, max_exponent: int = 30) -> QuantizedTensor:
    """Uniformly random bytes, except that fp16 scale fields are forced finite (exponent < 31).

    These are blocks llama.cpp's quantizers never write (any scale/quant combination), which the
    dequantizer must still decode exactly.
    """
    spec = get_spec(qtype)
    raw = torch.randint(0, 256, (n, spec.row_bytes(k)), dtype=torch.uint8, generator=generator)
    blocks = raw.view(-1, spec.block_bytes)
    for off in spec.fp16_offsets:
        half = blocks[:, off:off + 2].contiguous().view(torch.int16).squeeze(1)
        exponent = (half >> 10) & 0x1F
        exponent = torch.remainder(exponent, max_exponent + 1)       # 0..max_exponent: finite, subnormals included
        half = (half & ~(0x1F << 10)) | (exponent << 10)
        blocks[:, off:off + 2] = half.view(torch.uint8).view(-1, 2)
    return QuantizedTensor(raw, spec, (n, k))


def weights(distribution: str, n: int, k: int, seed: int) -> torch.Tensor:
    """An (n, k) fp32 weight drawn from a named distribution."""
    g = np.random.default_rng(seed)
    if distribution == "normal":
        w = g.standard_normal((n, k))
    elif distribution == "realistic":      # per-row scales vary over two orders of magnitude
        w = g.standard_normal((n, k)) * np.exp(g.uniform(-3, 1, size=(n, 1))) * 0.02
    elif distribution == "heavy_tails":    # Student-t plus rare 100x outliers
        w = g.standard_t(3, (n, k))
        mask = g.random((n, k)) < 0.002
        w[mask] *= 100
    elif distribution == "uniform":
        w = g.uniform(-1, 1, (n, k))
    elif distribution == "positive":
        w = np.abs(g.standard_normal((n, k))) + 0.1
    elif distribution == "zeros_and_constants":
        w = g.standard_normal((n, k))
        w[0::4] = 0.0
        w[1::4] = 0.37
        w[2::4] = -2.5
    elif distribution == "tiny":
        w = g.standard_normal((n, k)) * 1e-8
    elif distribution == "huge":         # as large as fp16 block scales allow
        w = g.standard_normal((n, k)) * 3e4
    else:
        raise ValueError(distribution)
    return torch.from_numpy(w.astype(np.float32))


DISTRIBUTIONS = ("normal", "realistic", "heavy_tails", "uniform", "positive", "zeros_and_constants", "tiny", "huge")


def assert_same_floats(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Bit-for-bit equal fp32, except that any NaN matches any NaN (payloads are not part of the format)."""
    nan_got, nan_exp = np.isnan(got), np.isnan(expected)
    same = (got.view(np.int32) == expected.view(np.int32)) | (nan_got & nan_exp)
    if not same.all():
        i = np.unravel_index(np.argmin(same), same.shape)
        raise AssertionError(f"{what}: {(~same).sum()} of {same.size} values differ; first at {i}: "
                             f"got {got[i]!r} expected {expected[i]!r}")
