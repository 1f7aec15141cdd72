"""Test data and checks for the kernel tests: quantized weights of several kinds, activations of several
distributions, and the float64 reference y = x @ W.T + b on the dequantized weight."""

from __future__ import annotations

import math

import torch

from offload_kernels.formats import QuantizedTensor, dequantize, get_spec, quantize

# Relative Frobenius error bounds against the float64 reference.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def random_qtensor(qtype: str, n: int, k: int, gen: torch.Generator, *, scale: float = 2e-3,
                   device: "torch.device | str" = "cpu") -> QuantizedTensor:
    """Uniformly random quant bytes (every bit pattern a block can hold) with the fp16 scale fields (d,
    dmin) replaced by random values in [scale/10, scale] with random signs (mxfp4's exponent byte by powers of
    two from scale/16 to scale), so products stay in fp16 range."""
    spec = get_spec(qtype)
    raw = torch.randint(0, 256, (n, spec.row_bytes(k)), dtype=torch.uint8, generator=gen)
    blocks = raw.view(-1, spec.block_bytes)
    for off in spec.fp16_offsets:
        mag = scale * (0.1 + 0.9 * torch.rand(blocks.shape[0], generator=gen))
        sign = torch.where(torch.rand(blocks.shape[0], generator=gen) < 0.5, -1.0, 1.0)
        blocks[:, off:off + 2] = (mag * sign).to(torch.float16).view(torch.uint8).view(-1, 2)
    if spec.name == "mxfp4":
        top = 128 + math.floor(math.log2(scale))                 # d = 2**(e - 128) <= scale
        blocks[:, 0] = torch.randint(top - 4, top + 1, (blocks.shape[0],), dtype=torch.uint8, generator=gen)
    return QuantizedTensor(raw.to(device), spec, (n, k))


def random_bytes_qtensor(qtype: str, n: int, k: int, gen: torch.Generator) -> QuantizedTensor:
    """Random bytes with finite fp16 scale fields over the whole finite range (subnormals included): the
    bit-exactness stress for the dequantize kernel (fp16 outputs may overflow to inf, identically)."""
    spec = get_spec(qtype)
    raw = torch.randint(0, 256, (n, spec.row_bytes(k)), dtype=torch.uint8, generator=gen)
    blocks = raw.view(-1, spec.block_bytes)
    for off in spec.fp16_offsets:
        hi = blocks[:, off + 1]
        exponent = ((hi >> 2) & 0x1F) % 31                      # 31 would be inf/NaN
        blocks[:, off + 1] = (hi & 0x83) | (exponent << 2)
    return QuantizedTensor(raw, spec, (n, k))


def quantized_from_weights(qtype: str, n: int, k: int, gen: torch.Generator, distribution: str) -> QuantizedTensor:
    """A weight drawn from ``distribution`` and quantized by the package's quantizer."""
    w = activations((n, k), gen, distribution) * 0.05
    return quantize(w, qtype)


def activations(shape: tuple[int, ...], gen: torch.Generator, distribution: str = "normal") -> torch.Tensor:
    """fp32 values of a named distribution."""
    if distribution == "normal":
        return torch.randn(shape, generator=gen)
    if distribution == "uniform":
        return torch.rand(shape, generator=gen) * 2 - 1
    if distribution == "heavy_tails":       # Cauchy-like ratio, clipped so fp16 cannot overflow
        return (torch.randn(shape, generator=gen) / (torch.rand(shape, generator=gen) + 0.05)).clamp(-200, 200)
    if distribution == "positive":          # one sign: no cancellation, large sums
        return torch.rand(shape, generator=gen) + 0.5
    if distribution == "outliers":          # mostly small, a few channels 100x larger (LLM activations)
        x = torch.randn(shape, generator=gen) * 0.1
        x[..., ::37] *= 100
        return x
    raise ValueError(distribution)


DISTRIBUTIONS = ("normal", "uniform", "heavy_tails", "positive", "outliers")


def reference(x: torch.Tensor, qt: QuantizedTensor, bias: "torch.Tensor | None") -> torch.Tensor:
    """float64 x @ W.T + b on the exactly dequantized weight (computed on x's device)."""
    w = dequantize(qt.to(x.device), torch.float32).double()
    y = x.detach().double() @ w.T
    if bias is not None:
        y = y + bias.detach().double()
    return y


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.detach().double().to(ref.device)
    assert torch.isfinite(y).all(), f"{int((~torch.isfinite(y)).sum())} non-finite outputs (unwritten or overflowed)"
    return float((y - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_close(y: torch.Tensor, x: torch.Tensor, qt: QuantizedTensor, bias: "torch.Tensor | None") -> None:
    assert y.dtype == x.dtype, f"output dtype {y.dtype} != input dtype {x.dtype}"
    assert tuple(y.shape) == (*x.shape[:-1], qt.shape[0])
    err = relative_error(y, reference(x, qt, bias))
    tol = TOLERANCE[x.dtype]
    assert err <= tol, f"relative Frobenius error {err:.3e} > {tol:g}"


def seed_of(*parts) -> int:
    """A stable seed from test parameters (Python's str hash is salted per process)."""
    h = 0
    for ch in repr(parts):
        h = (h * 131 + ord(ch)) % (2 ** 31 - 1)
    return h
