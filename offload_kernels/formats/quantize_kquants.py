"""Placeholder: k-quant quantizers are being written (q3_k, q4_k, q5_k, q6_k)."""
import torch


def _missing(x: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("k-quant quantizers not written yet")


quantize_q3_k_blocks = quantize_q4_k_blocks = quantize_q5_k_blocks = quantize_q6_k_blocks = _missing
