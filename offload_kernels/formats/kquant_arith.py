"""fp32 building blocks shared by the k-quant quantizers, reproducing ggml's scalar C arithmetic.

Every helper is an ordinary torch op (or a short sequence of them) whose fp32 result is the one ggml's
C code gets: divisions are real IEEE divisions (torch turns ``c / t`` into ``t.reciprocal() * c``, and
on CUDA ``t / c`` into ``t * (1/c)``, so neither form is used), constants are rounded to fp32 the way the
C compiler folds them, and ggml's ``nearest_int`` is reproduced for every input, NaN and Inf included.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch

from .rounding import nearest_int

#: ggml's GROUP_MAX_EPS: a group whose largest magnitude is below this quantizes to zeros.
GROUP_MAX_EPS = float(np.float32(1e-15))

_MAGIC = 12582912.0  # 1.5 * 2**23, ggml's nearest_int constant


class Scratch:
    """Reusable temporaries: ``take`` hands out views of slabs, which the next ``take`` calls reuse, in
    the same order, once the ``region`` they were taken in has ended. Chunk after chunk makes the same
    requests, so the slabs are allocated once (see scratch_for)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._slabs: list[torch.Tensor] = []
        self._used = 0

    def take(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if self._used == len(self._slabs):
            self._slabs.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        if self._slabs[self._used].numel() < nbytes:
            self._slabs[self._used] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        slab = self._slabs[self._used]
        self._used += 1
        return slab[:nbytes].view(dtype).view(shape)

    @contextmanager
    def region(self) -> Iterator["Scratch"]:
        """Temporaries taken inside are free for reuse when it ends (nothing taken may escape it)."""
        used = self._used
        try:
            yield self
        finally:
            self._used = used

    @property
    def nbytes(self) -> int:
        return sum(slab.numel() for slab in self._slabs)


_CPU_SCRATCH = threading.local()


def scratch_for(device: torch.device) -> Scratch:
    """The Scratch to quantize with on ``device``.

    On CPU it is one per thread and outlives the call: first-touch page faults of fresh multi-MB
    temporaries cost more than the elementwise work done in them (about 3 ms per MB on the 2-core VM
    this was tuned on, 13 us a page), and glibc returns freed large blocks to the OS. Its size is that
    of the largest phase of a CPU chunk (about 24 MB for all formats together). Other devices get a
    fresh one: their caching allocators reuse memory.
    """
    if device.type != "cpu":
        return Scratch(device)
    scratch = getattr(_CPU_SCRATCH, "scratch", None)
    if scratch is None:
        scratch = _CPU_SCRATCH.scratch = Scratch(device)
    return scratch


def f32(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """fp32 constants as a 1-D tensor on ``device`` (values already rounded the C way by the caller)."""
    return torch.tensor(np.asarray(values, dtype=np.float32), device=device)


def sequential_sum(terms: torch.Tensor, start_at_zero: bool) -> torch.Tensor:
    """terms[0] + terms[1] + ... along dim 0 in order, as ggml's ``s += t[i]`` loop (from 0.f, or
    starting at t[0]); torch.sum would reorder the additions."""
    acc = torch.zeros_like(terms[0]) if start_at_zero else terms[0].clone()
    for term in terms[0 if start_at_zero else 1:]:
        acc.add_(term)
    return acc


def sequential_dot(a: torch.Tensor, b: torch.Tensor, start_at_zero: bool) -> torch.Tensor:
    """a[0]*b[0] + a[1]*b[1] + ... along dim 0 in order, without a full-size temporary."""
    acc = torch.zeros_like(a[0]) if start_at_zero else a[0] * b[0]
    for ai, bi in zip(a[0 if start_at_zero else 1:], b[0 if start_at_zero else 1:]):
        acc.add_(ai * bi)
    return acc


def divide(numerator: float, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` as an IEEE fp32 division (``numerator`` exact in fp32)."""
    return torch.full_like(denominator, numerator).div_(denominator)


def sqrt_f32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt (sqrtf). torch's fp32 CPU sqrt is a vectorized approximation that is
    off by one ulp for about 1 in 6 inputs; the fp64 sqrt rounded to fp32 is exact (no double-rounding
    issue: 53 >= 2*24 + 2 bits)."""
    return torch.sqrt(x.double()).float()


def nearest_int_exact(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` of fp32 values as int32, for any input and on any device.

    Out-of-range inputs wrap exactly as the magic-number trick does. NaN gives 0 as in ggml: a CPU's
    NaNs (x86's default NaN from invalid operations, or the standard quiet NaN) have mantissa 0x400000,
    while CUDA's canonical NaN has a different payload and is mapped explicitly.
    """
    q = nearest_int(x)
    return q if x.device.type == "cpu" else torch.where(torch.isnan(x), 0, q)


def nearest_int_(x: torch.Tensor) -> torch.Tensor:
    """In-place nearest_int_exact of a contiguous fp32 tensor; returns the int32 view of its storage."""
    nan = None if x.device.type == "cpu" else torch.isnan(x)
    q = x.add_(_MAGIC).view(torch.int32).bitwise_and_(0x007FFFFF).sub_(0x00400000)
    return q if nan is None else q.masked_fill_(nan, 0)


def first_true(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Index of the first True (nonzero) along ``dim`` (size <= 255), or the size of ``dim`` where none is.

    amax over ``mask * (size - index)``: torch's index-returning reductions (argmax, max with indices)
    are an order of magnitude slower than amax on CPU. A bool mask is left alone; an fp32 0/1 mask (the
    fast form of comparisons on CPU, ``torch.gt(a, b, out=fp32)``) is overwritten.
    """
    size = mask.shape[dim]
    shape = [1] * mask.dim()
    shape[dim] = size
    dtype = torch.uint8 if mask.dtype == torch.bool else mask.dtype
    rank = (size - torch.arange(size, device=mask.device, dtype=dtype)).view(shape)
    key = mask.to(torch.uint8) * rank if mask.dtype == torch.bool else mask.mul_(rank)
    return size - torch.amax(key, dim=dim).long()


def to_int8(v: torch.Tensor) -> torch.Tensor:
    """C's ``(int8_t)`` of int32 values (keeps the low byte, two's complement), still as int32."""
    return ((v + 128) & 0xFF) - 128


def to_uint8(v: torch.Tensor) -> torch.Tensor:
    """C's ``(uint8_t)`` of int32 values (keeps the low byte), still as int32."""
    return v & 0xFF


def first_absmax(v: torch.Tensor, dim: int, work: "torch.Tensor | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, |value|) of largest magnitude along ``dim``, as ggml's ``if (fabsf(v) > amax)`` scan finds it.

    The scan starts from amax = 0 and compares strictly: the first of equal magnitudes wins, NaN never
    does, and where no |v| exceeds 0 both results are +0. ``work``, a buffer shaped like v, is used
    for the temporaries and promises v has no NaN (the searches' inputs are finite).
    """
    if work is None:
        mag = torch.abs(v)
        mag = torch.where(torch.isnan(mag), 0.0, mag)
    else:
        mag = torch.abs(v, out=work)
    amax = torch.amax(mag, dim=dim, keepdim=True)
    first = first_true(torch.eq(mag, amax, out=mag) if work is not None else mag == amax, dim).unsqueeze(dim)
    value = torch.where(amax > 0, torch.gather(v, dim, first), 0.0)
    return value.squeeze(dim), torch.where(amax > 0, amax, 0.0).squeeze(dim)


def lane_mask(cond: torch.Tensor) -> torch.Tensor:
    """A bool condition as an int32 bit mask (all ones where True) for ``select``."""
    return cond.to(torch.int32).neg_()


def select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, a, b)`` for 32-bit values (fp32 or int32) as a bitwise blend: exact for every
    value (NaN and Inf included) and several times faster than torch.where on CPU. ``mask`` comes from
    lane_mask."""
    ai, bi = a.view(torch.int32), b.view(torch.int32)
    return (ai ^ bi).bitwise_and_(mask).bitwise_xor_(bi).view(a.dtype)


def positive_max(v: torch.Tensor, dim: int) -> torch.Tensor:
    """ggml's ``m = 0; if (v > m) m = v`` scan along ``dim``: the largest positive value, NaN ignored, else +0."""
    m = torch.amax(torch.where(torch.isnan(v), 0.0, v), dim=dim)
    return torch.where(m > 0, m, 0.0)

