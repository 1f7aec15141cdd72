"""GGUF file I/O through the ``gguf`` package: memory-mapped reads, writes with metadata.

Reading never dequantizes and never loads the file into RAM: every tensor is a torch view of the
file's pages (numpy memmap in copy-on-write mode, so a stray write changes a private page, never the
file, and never faults). Quantized tensors come back as :class:`QuantizedTensor` over the file bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from .qtypes import QTYPES, get_spec, is_supported_ggml_type
from .quantized_tensor import QuantizedTensor


class GGUFError(ValueError):
    """A GGUF file is unreadable, truncated, corrupt or holds something this package does not support."""


# Float/int tensor types that come back as plain torch tensors.
_PLAIN_TYPES: dict[GGMLQuantizationType, torch.dtype] = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
    GGMLQuantizationType.F64: torch.float64,
    GGMLQuantizationType.I8: torch.int8,
    GGMLQuantizationType.I16: torch.int16,
    GGMLQuantizationType.I32: torch.int32,
    GGMLQuantizationType.I64: torch.int64,
}
_TORCH_TO_GGML = {torch.float32: GGMLQuantizationType.F32, torch.float16: GGMLQuantizationType.F16,
                  torch.bfloat16: GGMLQuantizationType.BF16, torch.float64: GGMLQuantizationType.F64,
                  torch.int8: GGMLQuantizationType.I8, torch.int16: GGMLQuantizationType.I16,
                  torch.int32: GGMLQuantizationType.I32, torch.int64: GGMLQuantizationType.I64}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where a tensor lives in the file and what it is. ``shape`` is in torch order (ne0 last)."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    nbytes: int
    offset: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name.lower()

    @property
    def is_quantized(self) -> bool:
        return self.ggml_type not in _PLAIN_TYPES

    @property
    def is_supported(self) -> bool:
        return not self.is_quantized or is_supported_ggml_type(self.ggml_type)


class GGUFFile:
    """A GGUF file opened for reading: metadata, tensor infos, and zero-copy tensor views.

    >>> with GGUFFile("model.gguf") as f:
    ...     qt = f.tensor("blk.0.attn_q.weight")   # QuantizedTensor over the mapped bytes
    """

    def __init__(self, path: "str | os.PathLike[str]"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        size = self.path.stat().st_size
        try:
            reader = GGUFReader(self.path, mode="c")
        except Exception as exc:  # the gguf package raises many kinds on malformed input
            raise GGUFError(f"{self.path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
        self._reader = reader
        self._infos: dict[str, GGUFTensorInfo] = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            info = GGUFTensorInfo(t.name, GGMLQuantizationType(t.tensor_type), shape, int(t.n_bytes),
                                  int(t.data_offset))
            if info.offset + info.nbytes > size or t.data.nbytes != info.nbytes:
                raise GGUFError(f"{self.path}: truncated file: tensor {t.name!r} needs bytes "
                                f"[{info.offset}, {info.offset + info.nbytes}) but the file has {size}")
            self._infos[t.name] = info
        self._metadata: dict[str, Any] | None = None

    # ------------------------------------------------------------------ metadata
    @property
    def metadata(self) -> dict[str, Any]:
        """All key/value metadata as Python values (the GGUF header fields excluded)."""
        if self._metadata is None:
            md = {}
            for name, field in self._reader.fields.items():
                if name.startswith("GGUF."):
                    continue
                try:
                    md[name] = field.contents()
                except Exception as exc:
                    raise GGUFError(f"{self.path}: corrupt metadata field {name!r}: {exc}") from exc
            self._metadata = md
        return self._metadata

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    # ------------------------------------------------------------------ tensors
    @property
    def tensor_infos(self) -> dict[str, GGUFTensorInfo]:
        return dict(self._infos)

    def info(self, name: str) -> GGUFTensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def raw_bytes(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a 1-D uint8 view of the file."""
        info = self.info(name)
        arr = self._reader.data[info.offset:info.offset + info.nbytes]
        return torch.from_numpy(arr.view(np.uint8))

    def tensor(self, name: str) -> "QuantizedTensor | torch.Tensor":
        """A zero-copy view: a QuantizedTensor (rows = all leading dims) or a plain torch tensor."""
        info = self.info(name)
        raw = self.raw_bytes(name)
        if not info.is_quantized:
            return raw.view(_PLAIN_TYPES[info.ggml_type]).view(info.shape)
        if not is_supported_ggml_type(info.ggml_type):
            raise GGUFError(f"{self.path}: tensor {name!r} has type {info.ggml_type.name}, which is not "
                            f"supported (supported quantized types: {', '.join(QTYPES)})")
        k = info.shape[-1]
        n = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return QuantizedTensor(raw, get_spec(info.ggml_type), (n, k))

    def tensors(self) -> dict[str, "QuantizedTensor | torch.Tensor"]:
        return {name: self.tensor(name) for name in self._infos}

    def close(self) -> None:
        """Drop this object's reference to the mapping; views already handed out keep it alive."""
        self._reader = None  # type: ignore[assignment]

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, architecture={self.architecture!r}, tensors={len(self._infos)})"


def read_gguf(path: "str | os.PathLike[str]") -> tuple[dict[str, Any], dict[str, "QuantizedTensor | torch.Tensor"]]:
    """(metadata, tensors) of a GGUF file; tensors are memory-mapped views, nothing is dequantized."""
    f = GGUFFile(path)
    return f.metadata, f.tensors()


def _metadata_value(value: Any) -> tuple[Any, GGUFValueType, "GGUFValueType | None"]:
    """(value, type, array sub-type) for a metadata value; (value, GGUFValueType) tuples pass through."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], GGUFValueType):
        v, vtype = value
        sub = None
        if vtype == GGUFValueType.ARRAY and len(v):
            sub = _metadata_value(v[0])[1]
        return v, vtype, sub
    if isinstance(value, (bool, np.bool_)):
        return bool(value), GGUFValueType.BOOL, None
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if 0 <= v < 2**32:
            return v, GGUFValueType.UINT32, None
        if -2**31 <= v < 2**31:
            return v, GGUFValueType.INT32, None
        return v, (GGUFValueType.UINT64 if v >= 0 else GGUFValueType.INT64), None
    if isinstance(value, (float, np.floating)):
        return float(value), GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return value, GGUFValueType.STRING, None
    if isinstance(value, (bytes, bytearray)):
        return list(value), GGUFValueType.ARRAY, GGUFValueType.UINT8
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value.tolist() if isinstance(value, np.ndarray) else value)
        if not items:
            raise ValueError("empty metadata arrays cannot be written (GGUF needs an element type)")
        first = _metadata_value(items[0])
        sub = first[1]
        if sub == GGUFValueType.UINT32 and any(isinstance(i, (int, np.integer)) and i < 0 for i in items):
            sub = GGUFValueType.INT32
        if sub == GGUFValueType.UINT32:
            sub = GGUFValueType.INT32 if all(int(i) < 2**31 for i in items) else GGUFValueType.UINT32
        return items, GGUFValueType.ARRAY, sub
    raise TypeError(f"cannot store metadata value of type {type(value).__name__} in GGUF")


def write_gguf(path: "str | os.PathLike[str]", tensors: Mapping[str, "QuantizedTensor | torch.Tensor"],
               metadata: Mapping[str, Any] | None = None, architecture: str = "llama") -> Path:
    """Write tensors (QuantizedTensors keep their exact bytes; plain tensors their dtype) and metadata.

    ``metadata`` values are Python scalars, strings or lists (types inferred: int -> uint32/int32,
    float -> float32), or ``(value, gguf.GGUFValueType)`` to choose the type exactly. The GGUF
    ``general.architecture`` key is set from ``architecture``.
    """
    path = Path(path)
    prepared: list[tuple[str, np.ndarray, GGMLQuantizationType | None]] = []
    for name, t in tensors.items():  # validate everything before creating the file
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if isinstance(t, QuantizedTensor):
            prepared.append((name, t.data.detach().cpu().contiguous().numpy(), t.spec.ggml_type))
        elif isinstance(t, torch.Tensor):
            if t.dtype not in _TORCH_TO_GGML:
                raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in GGUF")
            c = t.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:  # numpy has no bf16: write the raw bytes, typed BF16
                arr = c.view(torch.uint8).numpy().reshape(*c.shape[:-1], c.shape[-1] * 2) if c.dim() else \
                    c.reshape(1).view(torch.uint8).numpy()
                prepared.append((name, arr, GGMLQuantizationType.BF16))
            else:
                prepared.append((name, c.numpy(), None))
        else:
            raise TypeError(f"tensor {name!r}: expected QuantizedTensor or torch.Tensor, got {type(t).__name__}")
    kv = [(k, *_metadata_value(v)) for k, v in (metadata or {}).items() if k != "general.architecture"]

    writer = GGUFWriter(path, architecture)
    try:
        for key, value, vtype, sub in kv:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for name, arr, raw_dtype in prepared:
            writer.add_tensor(name, arr, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
