"""QuantizedTensor: a 2-D weight held as llama.cpp GGUF blocks, byte for byte."""

from __future__ import annotations

import operator
from typing import Sequence

import torch

from .qtypes import QTypeSpec, get_spec


class QuantizedTensor:
    """A weight of logical shape (N, K) stored as N rows of GGUF blocks.

    ``data`` is a contiguous ``torch.uint8`` tensor of shape (N, K / block_size * block_bytes): row n is
    exactly the bytes llama.cpp stores for row n of the weight. The object is a thin, validated view: it
    never copies ``data`` on construction (a memory-mapped GGUF tensor stays memory-mapped).
    """

    __slots__ = ("_data", "_spec", "_shape")

    def __init__(self, data: torch.Tensor, qtype: "str | QTypeSpec", shape: Sequence[int]):
        spec = get_spec(qtype)
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data must be a torch.uint8 tensor, got {type(data).__name__}")
        if data.dtype != torch.uint8:
            raise TypeError(f"data must have dtype torch.uint8, got {data.dtype}")
        shape = _int_dims(shape)
        if len(shape) != 2:
            raise ValueError(f"shape must be 2-D (N, K), got {shape}")
        n, k = shape
        if n <= 0 or k <= 0:
            raise ValueError(f"shape must be positive, got {shape}")
        if k % spec.block_size:
            raise ValueError(f"K={k} is not a multiple of the {spec.name} block size {spec.block_size}")
        row_bytes = spec.row_bytes(k)
        if data.dim() == 1:
            if data.numel() != n * row_bytes:
                raise ValueError(
                    f"{spec.name} tensor of shape {shape} needs {n * row_bytes} bytes "
                    f"({row_bytes} per row), got {data.numel()}")
            data = data.view(n, row_bytes)
        elif data.dim() != 2:
            raise ValueError(f"data must be 1-D or 2-D (N, row_bytes), got {data.dim()}-D")
        if tuple(data.shape) != (n, row_bytes):
            raise ValueError(
                f"{spec.name} tensor of shape {shape} needs data of shape ({n}, {row_bytes}) "
                f"({n * row_bytes} bytes), got {tuple(data.shape)} ({data.numel()} bytes)")
        if not data.is_contiguous():
            raise ValueError("data must be contiguous (rows of GGUF blocks laid end to end)")
        self._data = data
        self._spec = spec
        self._shape = torch.Size(shape)

    @classmethod
    def _from_validated(cls, data: torch.Tensor, spec: QTypeSpec,
                        shape: "tuple[int, int] | torch.Size") -> "QuantizedTensor":
        """Internal fast path, no checks: ``data`` is already a contiguous uint8 (N, row_bytes) tensor that
        matches ``spec`` and ``shape`` (a QuantizedTensor's own pieces, or checked by the caller). Saves the
        per-call validation where the same weight is rewrapped on every forward."""
        self = object.__new__(cls)
        self._data = data
        self._spec = spec
        self._shape = shape if isinstance(shape, torch.Size) else torch.Size(shape)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def data(self) -> torch.Tensor:
        return self._data

    @property
    def qtype(self) -> str:
        return self._spec.name

    @property
    def spec(self) -> QTypeSpec:
        return self._spec

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def device(self) -> torch.device:
        return self._data.device

    @property
    def nbytes(self) -> int:
        return self._data.numel()

    @property
    def numel(self) -> int:
        return self._shape[0] * self._shape[1]

    @property
    def bits_per_weight(self) -> float:
        return self._spec.bits_per_weight

    @property
    def row_bytes(self) -> int:
        return self._data.shape[1]

    # ------------------------------------------------------------------ conversions
    def to(self, device: "torch.device | str", non_blocking: bool = False) -> "QuantizedTensor":
        """The same bytes on another device (self when already there)."""
        device = torch.device(device)
        if device == self.device or (device.index is None and device.type == self.device.type):
            return self
        data = self._data.to(device, non_blocking=non_blocking)
        return QuantizedTensor._from_validated(data, self._spec, self._shape)   # .to keeps shape and contiguity

    def cpu(self) -> "QuantizedTensor":
        return self.to("cpu")

    def cuda(self, device: "int | None" = None) -> "QuantizedTensor":
        return self.to(torch.device("cuda", device) if device is not None else "cuda")

    def clone(self) -> "QuantizedTensor":
        return QuantizedTensor._from_validated(self._data.clone(memory_format=torch.contiguous_format), self._spec,
                                               self._shape)

    def index_rows(self, index: torch.Tensor) -> "QuantizedTensor":
        """Rows gathered by ``index`` (1-D integer row numbers): a row permutation is free on quantized data."""
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(index)
            if index.numel() == 0:          # [] is float32: report it as empty, not as a float index
                index = index.long()
        # A bool mask or float tensor cast to long would silently select rows 0/1 or truncated numbers.
        if index.dtype == torch.bool:
            raise TypeError("index must be integer row numbers, got a torch.bool tensor "
                            "(for a boolean mask, pass mask.nonzero().squeeze(1))")
        if index.is_floating_point() or index.is_complex():
            raise TypeError(f"index must be integer row numbers, got {index.dtype}")
        index = index.to(device=self.device, dtype=torch.long)
        if index.dim() != 1:
            raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
        rows = self._data.index_select(0, index)
        return QuantizedTensor(rows, self._spec, (index.numel(), self._shape[1]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from .dequantize import dequantize

        return dequantize(self, dtype)

    def equal(self, other: "QuantizedTensor") -> bool:
        """Same format, shape and bytes."""
        return (isinstance(other, QuantizedTensor) and other.qtype == self.qtype and other.shape == self.shape
                and torch.equal(other.data.cpu(), self._data.cpu()))

    def __repr__(self) -> str:
        n, k = self._shape
        return (f"QuantizedTensor(qtype={self.qtype}, shape=({n}, {k}), bits_per_weight={self.bits_per_weight:g}, "
                f"nbytes={self.nbytes}, device={self.device})")


def _int_dims(shape) -> tuple[int, ...]:
    """``shape`` as a tuple of Python ints: ints, numpy/torch integer scalars; not floats (2.0 or 2.5 would
    be truncated silently) nor bools (True is an int to Python, never a meant dimension)."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of two ints, got {type(shape).__name__} {shape!r}") from None
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, bool) or (isinstance(d, torch.Tensor) and d.dtype == torch.bool):
            raise TypeError(f"shape must be two ints, got bool {d!r} at dim {i} in {shape!r}")
        try:
            out.append(operator.index(d))
        except TypeError:
            raise TypeError(f"shape must be two ints, got {type(d).__name__} {d!r} at dim {i} in {shape!r}") from None
    return tuple(out)
