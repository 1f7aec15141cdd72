"""GGUF file I/O through the ``gguf`` package: memory-mapped reads, writes with metadata.

Reading never dequantizes and never loads the file into RAM: every tensor is a torch view of the
file's pages (numpy memmap in copy-on-write mode, so a stray write changes a private page, never the
file, and never faults). Quantized tensors come back as :class:`QuantizedTensor` over the file bytes.

Models split by llama.cpp's gguf-split (``name-00001-of-00003.gguf`` ...: the first part holds the metadata,
every part some tensors, each its ``split.no``, ``split.count`` and ``split.tensors.count``) open as one file
from the path of their first part, as llama.cpp opens them.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

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
    part: int = 0          # which file of a split model holds it (0: the first, or the only one)

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
        first = _open_reader_at(self.path)
        self._infos: dict[str, GGUFTensorInfo] = {}
        self.parts: list[Path] = _split_parts(self.path, first)      # [path] unless split
        self._readers = [first] + [_open_reader_at(p) for p in self.parts[1:]]
        for i, (part, reader) in enumerate(zip(self.parts, self._readers)):
            if i:
                _check_split_part(part, reader, i, len(self.parts))
            self._add_tensors(part, reader, i)
        if len(self.parts) > 1:
            expected = _split_field(first, SPLIT_TENSORS_COUNT)
            if expected is not None and expected != len(self._infos):
                raise GGUFError(f"{self.path}: split.tensors.count is {expected} but the {len(self.parts)} parts hold "
                                f"{len(self._infos)} tensors")
        self._reader = first
        self._metadata: dict[str, Any] | None = None

    def _add_tensors(self, part: Path, reader: GGUFReader, index: int) -> None:
        size = part.stat().st_size
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            info = GGUFTensorInfo(t.name, GGMLQuantizationType(t.tensor_type), shape, int(t.n_bytes),
                                  int(t.data_offset), index)
            if info.offset + info.nbytes > size or t.data.nbytes != info.nbytes:
                raise GGUFError(f"{part}: truncated file: tensor {t.name!r} needs bytes "
                                f"[{info.offset}, {info.offset + info.nbytes}) but the file has {size}")
            if t.name in self._infos:
                raise GGUFError(f"{part}: tensor {t.name!r} is also in {self.parts[self._infos[t.name].part]}")
            self._infos[t.name] = info

    # ------------------------------------------------------------------ metadata
    @property
    def closed(self) -> bool:
        return self._reader is None

    def _open_reader(self) -> GGUFReader:
        """The reader, or a clear error once :meth:`close` has dropped it (not a crash deep in numpy)."""
        if self._reader is None:
            raise ValueError(f"{self.path}: GGUFFile is closed (open it again to read metadata or tensors)")
        return self._reader

    @property
    def metadata(self) -> dict[str, Any]:
        """All key/value metadata as Python values (the GGUF header fields excluded)."""
        reader = self._open_reader()
        if self._metadata is None:
            md = {}
            for name, field in reader.fields.items():
                if name.startswith("GGUF.") or name in SPLIT_KEYS:     # the split is this object's business
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
        """The tensor's bytes as a 1-D uint8 view of the file (of the part holding it)."""
        self._open_reader()
        info = self.info(name)
        arr = self._readers[info.part].data[info.offset:info.offset + info.nbytes]
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
        self._open_reader()
        return {name: self.tensor(name) for name in self._infos}

    def close(self) -> None:
        """Drop this object's reference to the mapping; views already handed out keep it alive.

        Afterwards metadata and tensor reads raise ValueError; tensor infos stay available.
        """
        self._reader = None  # type: ignore[assignment]
        self._readers = []
        self._metadata = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"GGUFFile({str(self.path)!r}, closed)"
        return f"GGUFFile({str(self.path)!r}, architecture={self.architecture!r}, tensors={len(self._infos)})"


SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT = "split.no", "split.count", "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT)
#: gguf-split's part names: <prefix>-00001-of-00003.gguf
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _open_reader_at(path: Path) -> GGUFReader:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path, mode="c")
    except Exception as exc:  # the gguf package raises many kinds on malformed input
        raise GGUFError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def _split_field(reader: GGUFReader, key: str) -> "int | None":
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GGUFError(f"{reader.path}: metadata {key} must be a non-negative integer, got {value!r}")
    return value


def _split_parts(path: Path, first: GGUFReader) -> list[Path]:
    """The files of the model whose first part (or only file) is ``path``, in order."""
    count, no = _split_field(first, SPLIT_COUNT), _split_field(first, SPLIT_NO)
    if not count or count == 1:
        return [path]
    m = _SPLIT_NAME.match(path.name)
    if no != 0:
        first_name = f"{m.group('prefix')}-00001-of-{count:05d}.gguf" if m else "its first part"
        raise GGUFError(f"{path}: this is part {(no or 0) + 1} of a model split in {count}; open the first part "
                        f"({first_name})")
    if m is None or int(m.group("no")) != 1 or int(m.group("count")) != count:
        raise GGUFError(f"{path}: the first of {count} split parts must be named <prefix>-00001-of-{count:05d}.gguf "
                        f"(gguf-split's names), so that the other parts can be found")
    return [path.with_name(f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _check_split_part(path: Path, reader: GGUFReader, index: int, count: int) -> None:
    no, n = _split_field(reader, SPLIT_NO), _split_field(reader, SPLIT_COUNT)
    if (no, n) != (index, count):
        raise GGUFError(f"{path}: expected split part {index + 1} of {count}, but its metadata says split.no={no}, "
                        f"split.count={n}")


def check_split_max_tensors(split_max_tensors: Any) -> None:
    """ValueError unless ``split_max_tensors`` is a non-negative int (0: one file)."""
    if isinstance(split_max_tensors, bool) or not isinstance(split_max_tensors, int) or split_max_tensors < 0:
        raise ValueError(f"split_max_tensors must be a non-negative int, got {split_max_tensors!r}")


def read_gguf(path: "str | os.PathLike[str]") -> tuple[dict[str, Any], dict[str, "QuantizedTensor | torch.Tensor"]]:
    """(metadata, tensors) of a GGUF file; tensors are memory-mapped views, nothing is dequantized."""
    f = GGUFFile(path)
    return f.metadata, f.tensors()


_INT_RANGES = {
    GGUFValueType.UINT8: (0, 2**8 - 1), GGUFValueType.INT8: (-2**7, 2**7 - 1),
    GGUFValueType.UINT16: (0, 2**16 - 1), GGUFValueType.INT16: (-2**15, 2**15 - 1),
    GGUFValueType.UINT32: (0, 2**32 - 1), GGUFValueType.INT32: (-2**31, 2**31 - 1),
    GGUFValueType.UINT64: (0, 2**64 - 1), GGUFValueType.INT64: (-2**63, 2**63 - 1),
}
# Inferred integer array element types, narrowest first (llama.cpp reads token types etc. as int32).
_INT_ARRAY_TYPES = (GGUFValueType.INT32, GGUFValueType.UINT32, GGUFValueType.INT64, GGUFValueType.UINT64)
_MAX_TENSOR_NAME = 63          # llama.cpp's GGML_MAX_NAME is 64 bytes including the terminating NUL


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_float(v: Any) -> bool:
    return isinstance(v, (float, np.floating))


def _is_sequence(v: Any) -> bool:
    return isinstance(v, (list, tuple, np.ndarray, bytes, bytearray))


def _scalar(key: str, value: Any, vtype: GGUFValueType) -> Any:
    """``value`` checked (type and range) and converted for a GGUF scalar of type ``vtype``.

    Everything the writer would otherwise reject deep inside (struct.error, OverflowError, a bad
    encoding) is caught here, with the key in the message, before the output file exists.
    """
    if vtype in _INT_RANGES:
        if not _is_int(value):
            raise TypeError(f"metadata {key!r}: {vtype.name} needs an integer, got {type(value).__name__}")
        lo, hi = _INT_RANGES[vtype]
        if not lo <= int(value) <= hi:
            raise ValueError(f"metadata {key!r}: {int(value)} is out of range for {vtype.name} [{lo}, {hi}]")
        return int(value)
    if vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        if not (_is_int(value) or _is_float(value)):
            raise TypeError(f"metadata {key!r}: {vtype.name} needs a number, got {type(value).__name__}")
        try:
            v = float(value)
            struct.pack("<f" if vtype == GGUFValueType.FLOAT32 else "<d", v)
        except OverflowError:
            raise ValueError(f"metadata {key!r}: {value!r} is out of range for {vtype.name}"
                             + (" (pass (value, GGUFValueType.FLOAT64))" if vtype == GGUFValueType.FLOAT32
                                else "")) from None
        return v
    if vtype == GGUFValueType.BOOL:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"metadata {key!r}: BOOL needs a bool, got {type(value).__name__}")
        return bool(value)
    if vtype == GGUFValueType.STRING:
        if not isinstance(value, str):
            raise TypeError(f"metadata {key!r}: STRING needs a str, got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"metadata {key!r}: string is not encodable as UTF-8 ({exc.reason})") from None
        return value
    raise TypeError(f"metadata {key!r}: {vtype.name} is not a scalar type (nested arrays are not supported)")


def _int_type(key: str, values: list) -> GGUFValueType:
    lo, hi = min(values), max(values)
    for t in _INT_ARRAY_TYPES:
        if _INT_RANGES[t][0] <= lo and hi <= _INT_RANGES[t][1]:
            return t
    raise ValueError(f"metadata {key!r}: integers in [{lo}, {hi}] do not fit any GGUF integer type")


def _array(key: str, value: Any, elem: "GGUFValueType | None") -> tuple[list, GGUFValueType, GGUFValueType]:
    if isinstance(value, (bytes, bytearray)):
        items, elem = list(value), elem or GGUFValueType.UINT8
    elif isinstance(value, np.ndarray):
        items = value.tolist()
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise TypeError(f"metadata {key!r}: an ARRAY needs a list, tuple, bytes or numpy array, "
                        f"got {type(value).__name__}")
    if not items:
        raise ValueError(f"metadata {key!r}: empty arrays cannot be written (GGUF needs an element type)")
    if any(_is_sequence(i) or isinstance(i, Mapping) for i in items):
        raise TypeError(f"metadata {key!r}: nested arrays are not supported")
    if elem is None:
        if all(isinstance(i, (bool, np.bool_)) for i in items):
            elem = GGUFValueType.BOOL
        elif all(isinstance(i, str) for i in items):
            elem = GGUFValueType.STRING
        elif all(_is_int(i) for i in items):
            elem = _int_type(key, [int(i) for i in items])
        elif all(_is_int(i) or _is_float(i) for i in items):
            elem = GGUFValueType.FLOAT32
        else:
            kinds = sorted({type(i).__name__ for i in items})
            raise TypeError(f"metadata {key!r}: array elements must all be bool, all str or all numbers, "
                            f"got {', '.join(kinds)}")
    elif elem == GGUFValueType.ARRAY:
        raise TypeError(f"metadata {key!r}: nested arrays are not supported")
    return [_scalar(f"{key}[{i}]", item, elem) for i, item in enumerate(items)], GGUFValueType.ARRAY, elem


def _metadata_value(key: str, value: Any) -> tuple[Any, GGUFValueType, "GGUFValueType | None"]:
    """(value, type, array element type) for a metadata value, checked so that writing it cannot fail.

    ``(value, GGUFValueType.X)`` chooses the type: a scalar of type X, or for a sequence value an array
    of X elements (``ARRAY``: element type inferred).
    """
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], GGUFValueType):
        v, vtype = value
        if vtype == GGUFValueType.ARRAY:
            return _array(key, v, None)
        if _is_sequence(v) and not (isinstance(v, (bytes, bytearray)) and vtype == GGUFValueType.STRING):
            return _array(key, v, vtype)
        return _scalar(key, v, vtype), vtype, None
    if isinstance(value, (bool, np.bool_)):
        return bool(value), GGUFValueType.BOOL, None
    if _is_int(value):
        v = int(value)
        if 0 <= v < 2**32:
            vtype = GGUFValueType.UINT32
        elif -2**31 <= v < 0:
            vtype = GGUFValueType.INT32
        else:
            vtype = GGUFValueType.UINT64 if v >= 0 else GGUFValueType.INT64
        return _scalar(key, v, vtype), vtype, None
    if _is_float(value):
        return _scalar(key, value, GGUFValueType.FLOAT32), GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return _scalar(key, value, GGUFValueType.STRING), GGUFValueType.STRING, None
    if _is_sequence(value):
        return _array(key, value, None)
    raise TypeError(f"metadata {key!r}: cannot store metadata value of type {type(value).__name__} in GGUF")


def _prepare_tensor(name: Any, t: Any, shape: "Sequence[int] | None" = None,
                    ) -> tuple[str, np.ndarray, "GGMLQuantizationType | None"]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
    if len(name.encode("utf-8", "replace")) > _MAX_TENSOR_NAME:
        raise ValueError(f"tensor name {name!r} is longer than {_MAX_TENSOR_NAME} bytes (llama.cpp's limit)")
    if isinstance(t, QuantizedTensor):
        data = t.data.detach().cpu().contiguous().numpy()
        if shape is not None:
            shape = tuple(int(d) for d in shape)
            n, k = t.shape
            if not 2 <= len(shape) <= 4 or shape[-1] != k or int(np.prod(shape[:-1])) != n:
                raise ValueError(f"tensor {name!r}: shape {shape} does not split the {t.qtype} tensor of shape "
                                 f"{tuple(t.shape)} into leading dimensions (2 to 4 dimensions, the last {k})")
            data = data.reshape(*shape[:-1], t.row_bytes)
        return name, data, t.spec.ggml_type
    if shape is not None:
        raise ValueError(f"tensor {name!r}: shapes are only given for QuantizedTensors (a torch tensor has its own)")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor {name!r}: expected QuantizedTensor or torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _TORCH_TO_GGML:
        raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in GGUF")
    if not 1 <= t.dim() <= 4:
        raise ValueError(f"tensor {name!r}: GGUF tensors have 1 to 4 dimensions, got shape {tuple(t.shape)}")
    c = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: write the raw bytes, typed BF16
        return name, c.view(torch.uint8).numpy().reshape(*c.shape[:-1], c.shape[-1] * 2), GGMLQuantizationType.BF16
    return name, c.numpy(), None


def write_gguf(path: "str | os.PathLike[str]", tensors: Mapping[str, "QuantizedTensor | torch.Tensor"],
               metadata: Mapping[str, Any] | None = None, architecture: str | None = None,
               shapes: "Mapping[str, Sequence[int]] | None" = None, split_max_tensors: int = 0) -> Path:
    """Write tensors (QuantizedTensors keep their exact bytes; plain tensors their dtype) and metadata.

    ``split_max_tensors`` > 0 splits the model as llama.cpp's gguf-split does, at most that many tensors per part:
    ``<stem>-00001-of-0000N.gguf`` ... beside ``path`` (the metadata in the first); the first part's path is
    returned, which GGUFFile and llama.cpp open as the whole model.

    ``shapes`` gives quantized tensors of more than two dimensions their torch-order shape: the rows of the
    (rows, K) QuantizedTensor split into leading dimensions, e.g. an expert stack's (experts, rows, K).

    ``metadata`` values are Python scalars, strings or flat lists (types inferred: int -> uint32/int32
    (64-bit when needed), float -> float32), or ``(value, gguf.GGUFValueType)`` to choose the type exactly.
    ``architecture`` is written as ``general.architecture``; None takes the metadata's
    ``general.architecture``, else "llama". Everything is checked before any file is created (ValueError
    or TypeError naming the key or tensor), and the file is written into a temporary directory beside it and
    moved into place, so a failure never leaves a partial file at ``path``.
    """
    path = Path(path)
    shapes = dict(shapes or {})
    unknown = [n for n in shapes if n not in tensors]
    if unknown:
        raise ValueError(f"shapes given for tensors that are not written: {', '.join(map(repr, unknown[:4]))}")
    prepared = [_prepare_tensor(name, t, shapes.get(name)) for name, t in tensors.items()]
    metadata = dict(metadata or {})
    for key in metadata:
        if not isinstance(key, str) or not key:
            raise TypeError(f"metadata keys must be non-empty strings, got {key!r}")
    md_arch = metadata.pop("general.architecture", None)
    if md_arch is not None:
        md_arch = _metadata_value("general.architecture", md_arch)[0]
        if not isinstance(md_arch, str):
            raise TypeError(f"metadata 'general.architecture' must be a string, got {md_arch!r}")
        if architecture is not None and architecture != md_arch:
            raise ValueError(f"metadata 'general.architecture' is {md_arch!r} but architecture={architecture!r}")
    architecture = architecture if architecture is not None else (md_arch if md_arch is not None else "llama")
    if not isinstance(architecture, str) or not architecture:
        raise ValueError(f"architecture must be a non-empty string, got {architecture!r}")
    _scalar("general.architecture", architecture, GGUFValueType.STRING)
    alignment = None
    if "general.alignment" in metadata:       # also changes where the tensor data goes: the writer must know
        alignment = _metadata_value("general.alignment", metadata.pop("general.alignment"))[0]
        if not _is_int(alignment) or alignment <= 0 or alignment & (alignment - 1) or alignment >= 2**32:
            raise ValueError(f"metadata 'general.alignment' must be a power of two below 2**32, got {alignment!r}")
    kv = [(k, *_metadata_value(k, v)) for k, v in metadata.items()]
    check_split_max_tensors(split_max_tensors)

    # gguf's writer writes into a temporary directory beside ``path``; the file (or the parts) move into place
    # only when complete, so a failure never leaves a partial file at ``path`` or beside it.
    tmpdir = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmpdir.mkdir()
    try:
        writer = GGUFWriter(tmpdir / path.name, architecture, split_max_tensors=split_max_tensors)
        try:
            if alignment is not None:
                writer.add_custom_alignment(alignment)
            for key, value, vtype, sub in kv:
                writer.add_key_value(key, value, vtype, sub_type=sub)
            for name, arr, raw_dtype in prepared:
                writer.add_tensor(name, arr, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        parts = sorted(tmpdir.iterdir())          # [path.name], or gguf-split's <stem>-0000i-of-0000N.gguf
        for part in parts:
            os.replace(part, path.with_name(part.name))
        return path.with_name(parts[0].name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
