"""nn.Module layers over quantized weights."""

from .offloaded_linear import OffloadedLinear

__all__ = ["OffloadedLinear"]
