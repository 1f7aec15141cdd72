"""Small models offloaded on the CPU path (torch kernels + the engine's host backend) with every block
streamed, for the streamed-layer and WeightStreamer tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

from offload_kernels import offload
from offload_kernels.model import streamer_of

D = 64            # width of Net (q8_0 blocks are 32 wide); single-layer tests use k-quants at 256


class Block(nn.Module):
    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    """``blocks`` run in order; ``schedule`` (block indices) overrides that order for models that visit a
    block more than once per pass."""

    def __init__(self, n: int = 4, seed: int = 0, schedule: list[int] | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.schedule = list(range(n)) if schedule is None else schedule

    def forward(self, x):
        for i in self.schedule:
            x = self.blocks[i](x)
        return x


def offloaded(model: nn.Module, qtype: str = "q8_0", num_slots: int = 2, stream: bool = True) -> nn.Module:
    """``model`` offloaded in place: every block streamed through ``num_slots`` slots, or all resident."""
    budget = None
    if stream:
        probe = offload(copy.deepcopy(model), qtype, device="cpu", progress=False, measure=False)
        per_block = probe.placement.resident_bytes // len(model.blocks)
        budget = probe.placement.fixed_bytes + num_slots * per_block + 1
    offload(model, qtype, gpu_budget=budget, device="cpu", num_slots=num_slots, progress=False, measure=False)
    if stream:
        s = streamer_of(model)
        assert s is not None and len(s.groups) == len(model.blocks), "every block must stream"
    return model


def group_of(model: nn.Module, block: int) -> int:
    """The streamer's group index of ``model.blocks[block]``."""
    return streamer_of(model)._where[id(model.blocks[block].up)][0]


def acquired(model: nn.Module) -> list[int]:
    s = streamer_of(model)
    return [h for h in s.handles if s.engine.state(h) == "acquired"]
