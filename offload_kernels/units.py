"""Small shared helpers: parsing "24GiB"-style budgets, printing sizes, the default device."""

from __future__ import annotations

import math


def parse_bytes(value: "int | float | str | None") -> int | None:
    """``24GiB``, ``"1.5 GB"``, ``512MiB``, ``2**30`` -> bytes; None stays None. Rejects negatives."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("gpu_budget must be a byte count or a string like '24GiB', not a bool")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"gpu_budget must be a non-negative byte count, got {value}")
        return int(value)
    if not isinstance(value, str):
        raise TypeError(f"gpu_budget must be bytes (int) or a string like '24GiB', got {type(value).__name__}")
    units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    text = value.strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):]
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"cannot parse gpu_budget {value!r}; use e.g. '24GiB', '16GB' or a byte count") from None
    if unit not in units:
        raise ValueError(f"unknown unit {unit!r} in gpu_budget {value!r}; use B, KB, MB, GB, KiB, MiB, GiB, TiB")
    if amount < 0 or not math.isfinite(amount):
        raise ValueError(f"gpu_budget must be non-negative, got {value!r}")
    return int(amount * units[unit])


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def default_device(device: "object | None" = None):
    """``device`` as a torch.device; None: cuda when torch sees a CUDA device, else cpu.

    The one place that picks the default device, so offload(), the CLI and the measurements agree.
    """
    import torch        # lazily: parse_bytes/human_bytes are used where importing torch is not wanted

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
