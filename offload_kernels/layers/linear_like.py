"""The modules OffloadedLinear can replace, and their weights in nn.Linear's (out_features, in_features) order.

* nn.Linear and its subclasses;
* transformers' Conv1D (GPT-2, OpenAI GPT, ImageGPT, Decision Transformer, ...): y = x @ W + b with W stored
  (in_features, out_features), the transpose of nn.Linear's. It is recognized only once transformers is
  imported (a model that has one imported it), so this package never imports transformers itself.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _conv1d_type() -> "type | None":
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` computes x @ W.T + b from a 2-D float weight: nn.Linear or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        nx, nf = module.weight.shape
        return int(nx), int(nf)
    raise TypeError(f"expected an nn.Linear or a transformers Conv1D, got {type(module).__name__}")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The detached weight as (out_features, in_features): nn.Linear's own, Conv1D's transposed (a view)."""
    linear_features(module)       # raises for anything else
    w = module.weight.detach()
    return w if isinstance(module, nn.Linear) else w.t()


__all__ = ["is_conv1d", "is_linear_like", "linear_features", "linear_weight"]
