"""Turns what ``TransferEngine.register`` accepts into raw ``(address, nbytes)`` parts for the native core."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

_ACCEPTED = ("a CPU torch.Tensor, a numpy array, bytes, bytearray or memoryview (or a list/tuple of those "
             "for a multi-part item)")


class HostPart(NamedTuple):
    address: int
    nbytes: int
    keepalive: Any  # the object owning the bytes; must outlive the native copy


def host_part(obj: Any, what: str) -> HostPart:
    """The bytes of one part, validated: host memory, contiguous, at least one byte."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise ValueError(f"{what} is a tensor on {obj.device}; register takes host data (call .cpu() first)")
        if obj.layout != torch.strided:
            raise TypeError(f"{what} is a {obj.layout} tensor; only dense (strided) tensors can be registered")
        if not obj.is_contiguous():
            raise ValueError(f"{what} is not contiguous (shape {tuple(obj.shape)}, stride {obj.stride()}); "
                             "call .contiguous() first")
        part = HostPart(obj.data_ptr(), obj.numel() * obj.element_size(), obj)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"{what} is a numpy array of Python objects; its bytes are pointers, not data")
        if not obj.flags.c_contiguous:
            raise ValueError(f"{what} is a non-contiguous numpy array; use np.ascontiguousarray first")
        part = HostPart(int(obj.__array_interface__["data"][0]), int(obj.nbytes), obj)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        view = memoryview(obj)
        if not view.c_contiguous:
            raise ValueError(f"{what} is a non-contiguous memoryview")
        if view.nbytes == 0:
            raise ValueError(f"{what} is empty (0 bytes): nothing to transfer")
        array = np.frombuffer(view.cast("B") if view.ndim != 1 or view.format != "B" else view, dtype=np.uint8)
        part = HostPart(int(array.__array_interface__["data"][0]), int(array.nbytes), (array, view))
    else:
        raise TypeError(f"cannot register {what} of type {type(obj).__name__}: expected {_ACCEPTED}")
    if part.nbytes == 0:
        raise ValueError(f"{what} is empty (0 bytes): nothing to transfer")
    return part


def item_parts(item: Any, what: str) -> list[HostPart]:
    """One item: a single buffer, or a list/tuple of buffers laid out as consecutive parts."""
    if isinstance(item, (list, tuple)):
        if not item:
            raise ValueError(f"{what} is an empty list: a multi-part item needs at least one part")
        parts = []
        for i, p in enumerate(item):
            if isinstance(p, (list, tuple)):
                raise TypeError(f"part {i} of {what} is a {type(p).__name__}: parts cannot be nested")
            parts.append(host_part(p, f"part {i} of {what}"))
        return parts
    return [host_part(item, what)]
