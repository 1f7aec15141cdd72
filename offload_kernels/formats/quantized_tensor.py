"""QuantizedTensor: a 2-D weight held as llama.cpp GGUF blocks, byte for byte."""

from __future__ import annotations

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
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise TypeError(f"shape must be a sequence of two ints, got {shape!r}") from None
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
        return QuantizedTensor(self._data.to(device, non_blocking=non_blocking), self._spec, self._shape)

    def cpu(self) -> "QuantizedTensor":
        return self.to("cpu")

    def cuda(self, device: "int | None" = None) -> "QuantizedTensor":
        return self.to(torch.device("cuda", device) if device is not None else "cuda")

    def clone(self) -> "QuantizedTensor":
        return QuantizedTensor(self._data.clone(), self._spec, self._shape)

    def index_rows(self, index: torch.Tensor) -> "QuantizedTensor":
        """Rows gathered by ``index``: a row permutation is free on quantized data."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
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
