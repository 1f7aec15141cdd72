"""nn.Module layers over quantized weights."""

from .offloaded_experts import OffloadedExperts
from .offloaded_linear import OffloadedLinear

__all__ = ["OffloadedExperts", "OffloadedLinear"]
