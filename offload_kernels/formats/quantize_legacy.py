"""q4_0 and q8_0 quantizers, byte-identical to ggml's ``quantize_row_q4_0_ref`` / ``quantize_row_q8_0_ref``."""

from __future__ import annotations

import torch

from .rounding import fp16_bytes, roundf


def quantize_q4_0_blocks(x: torch.Tensor) -> torch.Tensor:
    """(nb, 32) fp32 -> (nb, 18) uint8. d = (value of largest magnitude) / -8; q = min(15, trunc(x/d + 8.5))."""
    # The first element of largest magnitude wins ties, as in ggml's strict `amax < |v|` scan; a block of
    # zeros keeps the scan's initial +0.0 (not a -0.0 element), which makes d = -0.0.
    absx = torch.abs(x)
    idx = torch.argmax(absx, dim=1, keepdim=True)
    vmax = torch.gather(x, 1, idx).squeeze(1)
    vmax = torch.where(torch.gather(absx, 1, idx).squeeze(1) > 0, vmax, torch.zeros_like(vmax))
    d = vmax / -8.0
    inv_d = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    # ggml casts (x*id + 8.5f) to int8_t (truncation), then clamps to 15 as uint8.
    q = torch.trunc(x * inv_d[:, None] + 8.5).to(torch.int32).clamp_(max=15).to(torch.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return torch.cat([fp16_bytes(d), qs], dim=1)


def quantize_q8_0_blocks(x: torch.Tensor) -> torch.Tensor:
    """(nb, 32) fp32 -> (nb, 34) uint8. d = max|x| / 127; q = roundf(x / d) (x times the fp32 inverse of d)."""
    amax = torch.amax(torch.abs(x), dim=1)
    d = amax / 127.0
    inv_d = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = roundf(x * inv_d[:, None]).to(torch.int8).view(torch.uint8)
    return torch.cat([fp16_bytes(d), q], dim=1)
