"""Placement planning and throughput prediction for offloaded models.

Given each linear layer's quantized size and the transformer block it belongs to, a GPU budget and the
number of staging slots, decide which layers stay resident and which stream through the transfer
engine; then predict tokens/s per batch size from measured link, HBM and matmul ceilings.

Time model for one forward of M tokens (a roofline per layer, copies overlapping compute):
    t_compute(M) = sum over layers of max(bytes read / HBM, 2 * M * params used per token / matmul FLOP/s)
    t_link       = streamed bytes / link bandwidth
    t(M)         = max(t_link, t_compute(M)) + non-linear work (ignored: norms, attention over short
                   contexts and embeddings are small next to the weights at these sizes)

A stack of E experts of which each token uses k (a MoE layer) streams all its bytes, but each token
multiplies by k/E of its weights, and M tokens read the expected share of experts that any of them chose,
1 - (1 - k/E)**M, from device memory (routing taken as uniform). Expert stacks copied on demand through an
expert cache (plan_with_expert_cache) add the chosen experts' bytes to t_link, times the share of them the
cache misses (Placement.expert_miss_fraction).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..formats import get_spec
from ..units import human_bytes, parse_bytes  # noqa: F401  (parse_bytes is re-exported)
from .bandwidth import Hardware


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer as the planner sees it."""

    name: str
    out_features: int
    in_features: int
    qtype: str | None              # None: kept unquantized (``unquantized_bytes_per_weight`` per weight)
    group: str                     # the block it streams with (e.g. "model.layers.3"); "" for none
    unquantized_bytes_per_weight: int = 2
    num_experts: int = 1           # a MoE projection: E experts stacked along out_features ...
    experts_per_token: int = 1     # ... of which each token uses k

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    @property
    def active_fraction(self) -> float:
        """The share of the weights one token multiplies by (k/E for experts, else 1)."""
        return min(1.0, self.experts_per_token / self.num_experts)

    def read_fraction(self, tokens: int) -> float:
        """The expected share of the weights ``tokens`` tokens read: the experts any of them chose."""
        return 1.0 - (1.0 - self.active_fraction) ** tokens

    @property
    def nbytes(self) -> int:
        if self.qtype is None:
            return self.params * self.unquantized_bytes_per_weight
        return self.out_features * get_spec(self.qtype).row_bytes(self.in_features)


@dataclass
class Placement:
    """Which layers are resident and which stream, and what that costs in device memory."""

    resident: list[str]
    streamed_groups: list[list[str]]            # streaming units, in model order
    group_bytes: list[int]                      # bytes of each streamed group
    fixed_bytes: int                            # non-linear parameters kept on the device
    num_slots: int
    slot_bytes: int
    linear_bytes: dict[str, int] = field(default_factory=dict)
    on_demand: list[str] = field(default_factory=list)   # expert stacks copied expert by expert when chosen
    expert_cache_slots: int = 0                          # ... into this many device slots
    expert_slot_bytes: int = 0                           # ... of this size (one expert's up and down rows)
    expert_count: int = 0                                # experts of all on-demand stacks

    @property
    def resident_bytes(self) -> int:
        return sum(self.linear_bytes[n] for n in self.resident)

    @property
    def streamed_bytes(self) -> int:
        """Bytes streamed whole every forward (on-demand experts, which depend on the routing, not counted)."""
        return sum(self.group_bytes)

    @property
    def on_demand_bytes(self) -> int:
        return sum(self.linear_bytes[n] for n in self.on_demand)

    @property
    def staging_bytes(self) -> int:
        return self.num_slots * self.slot_bytes if self.streamed_groups else 0

    @property
    def expert_cache_bytes(self) -> int:
        return self.expert_cache_slots * self.expert_slot_bytes

    @property
    def device_bytes(self) -> int:
        """Everything this plan puts on the device: fixed params, resident linears, staging slots, expert cache."""
        return self.fixed_bytes + self.resident_bytes + self.staging_bytes + self.expert_cache_bytes

    @property
    def resident_fraction(self) -> float:
        total = self.resident_bytes + self.streamed_bytes + self.on_demand_bytes
        return self.resident_bytes / total if total else 1.0

    def expert_miss_fraction(self, read_fraction: float) -> float:
        """The share of chosen experts the cache does not hold, when each forward chooses ``read_fraction`` of
        every layer's experts, uniformly and independently. The LRU cache holds the last ``slots`` experts
        used: the chosen experts of the last floor(slots / (read_fraction * experts)) whole forwards, so an
        expert misses if none of those chose it. (A forward that uses every expert cycles through more of
        them than the cache holds, and misses every time.)"""
        if not self.on_demand or self.expert_cache_slots >= self.expert_count or read_fraction <= 0:
            return 0.0
        forwards = math.floor(self.expert_cache_slots / (read_fraction * self.expert_count))
        return (1.0 - read_fraction) ** forwards


class BudgetError(ValueError):
    """The GPU budget cannot hold what the plan needs (fixed parameters plus staging slots)."""


def default_budget(device) -> int | None:
    """The budget used when none is given: on CUDA, the device's free memory less 10% and 1 GiB left for
    activations and the KV cache; on the CPU, no limit (everything resident). Free memory includes what
    torch's caching allocator holds but does not use (it is reused for our tensors), which the driver's
    mem_get_info counts as taken."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(0, int(free * 0.9) - (1 << 30))


def _groups_in_order(linears: Sequence[LinearSpec]) -> list[list[LinearSpec]]:
    groups: dict[str, list[LinearSpec]] = {}
    for i, lin in enumerate(linears):
        groups.setdefault(lin.group or f"\0{i}", []).append(lin)   # ungrouped layers stream alone
    return list(groups.values())


def _spread(count: int, total: int) -> list[int]:
    """``count`` indices out of ``total`` spread evenly, so streamed blocks interleave with resident ones
    and the link keeps copying while resident blocks compute."""
    if count <= 0:
        return []
    if count >= total:
        return list(range(total))
    return sorted({min(total - 1, int((i + 0.5) * total / count)) for i in range(count)})


def _units(linears: Sequence[LinearSpec], stream_whole_groups: bool) -> list[list[LinearSpec]]:
    """The streaming units: whole groups (transformer blocks), or single layers."""
    return _groups_in_order(linears) if stream_whole_groups else [[lin] for lin in linears]


def _unit_bytes(linears: Sequence[LinearSpec], stream_whole_groups: bool) -> list[int]:
    return [sum(lin.nbytes for lin in u) for u in _units(linears, stream_whole_groups)]


def budget_for_resident_fraction(linears: Sequence[LinearSpec], fixed_bytes: int, fraction: float,
                                 num_slots: int = 2, stream_whole_groups: bool = True) -> int:
    """The gpu_budget under which :func:`plan_placement` keeps about ``fraction`` of the linears' bytes
    resident: the fixed bytes, ``num_slots`` staging slots of the largest streaming unit, and ``fraction``
    of the linear bytes. ``fraction=1`` is the budget that holds everything (no slots needed).

    The plan keeps whole units and fills what is left with single layers, so it reaches ``fraction`` to
    within one unit; when the rest would fit in the slots anyway, this budget holds everything and the
    plan keeps it all resident. ``linears``/``fixed_bytes`` come from ``offload.select_linears(model, ...)``
    (its ``specs`` and ``fixed_bytes``) or a ``shapes.ModelInventory`` (``linears`` and ``fixed_bytes``).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be a number between 0 and 1, got {fraction!r}")
    if num_slots < 1:
        raise ValueError(f"num_slots must be at least 1, got {num_slots}")
    if isinstance(fixed_bytes, bool) or not isinstance(fixed_bytes, numbers.Integral) or fixed_bytes < 0:
        raise ValueError(f"fixed_bytes must be a non-negative integer, got {fixed_bytes!r}")
    if not linears:
        raise ValueError("no linear layers to place: there is no resident fraction to budget for")
    total = sum(lin.nbytes for lin in linears)
    if fraction >= 1:
        return fixed_bytes + total
    slots = num_slots * max(_unit_bytes(linears, stream_whole_groups))
    return fixed_bytes + slots + math.ceil(fraction * total)


def plan_placement(linears: Sequence[LinearSpec], budget: int | None, fixed_bytes: int = 0,
                   num_slots: int = 2, stream_whole_groups: bool = True, *,
                   slot_bytes: int | None = None) -> Placement:
    """Keep as many bytes resident as ``budget`` allows (after fixed params and staging slots); stream the rest.

    ``budget=None`` keeps everything resident. Streaming units are whole groups (transformer blocks) when
    ``stream_whole_groups``, otherwise single layers. Leftover budget keeps single layers of a streamed
    group resident, shrinking what that group streams. ``slot_bytes`` sizes the staging slots instead of the
    largest unit (plan_with_expert_cache: streamed blocks' experts do not go through the slots).
    """
    if num_slots < 1:
        raise ValueError(f"num_slots must be at least 1, got {num_slots}")
    if not linears:
        # Nothing to decide: an empty plan would hide a configuration that quantizes nothing, and the
        # staging-slot arithmetic below has no largest unit.
        raise ValueError("no linear layers to place: the plan needs at least one (quantized) linear")
    sizes = {lin.name: lin.nbytes for lin in linears}
    if len(sizes) != len(linears):
        raise ValueError("linear names must be unique")
    everything = fixed_bytes + sum(sizes.values())
    if budget is None or everything <= budget:
        return Placement([lin.name for lin in linears], [], [], fixed_bytes, num_slots, 0, sizes)

    units = _units(linears, stream_whole_groups)
    unit_bytes = [sum(lin.nbytes for lin in u) for u in units]
    slot_bytes = max(unit_bytes) if slot_bytes is None else slot_bytes
    staging = num_slots * slot_bytes
    if fixed_bytes + staging > budget:
        raise BudgetError(
            f"gpu_budget {human_bytes(budget)} is too small: non-linear parameters need {human_bytes(fixed_bytes)} "
            f"and {num_slots} staging slots of {human_bytes(slot_bytes)} need {human_bytes(staging)} "
            f"({human_bytes(fixed_bytes + staging)} in all)")
    free = budget - fixed_bytes - staging

    # Keep the smallest units that fit; equal-sized units (the usual transformer blocks) are spread
    # evenly among the streamed ones.
    by_size = sorted(range(len(units)), key=unit_bytes.__getitem__)
    n_resident_units = 0
    for i in by_size:
        if unit_bytes[i] > free:
            break
        free -= unit_bytes[i]
        n_resident_units += 1
    if n_resident_units == len(units):
        return Placement([lin.name for lin in linears], [], [], fixed_bytes, num_slots, 0, sizes)
    if len(set(unit_bytes)) == 1:
        resident_units = set(_spread(n_resident_units, len(units)))
    else:
        resident_units = set(by_size[:n_resident_units])

    resident: set[str] = set()
    for i in resident_units:
        resident.update(lin.name for lin in units[i])
    streamed_groups, group_bytes = [], []
    for i, unit in enumerate(units):
        if i in resident_units:
            continue
        for lin in unit:                      # leftover budget: single layers of this unit stay resident
            if lin.nbytes <= free and _keeps_one_streamed(unit, resident, lin):
                free -= lin.nbytes
                resident.add(lin.name)
        members = [lin.name for lin in unit if lin.name not in resident]
        streamed_groups.append(members)
        group_bytes.append(sum(sizes[n] for n in members))
    order = [lin.name for lin in linears if lin.name in resident]
    return Placement(order, streamed_groups, group_bytes, fixed_bytes, num_slots, slot_bytes, sizes)


EXPERT_SLOT_ALIGN = 256      # an expert cache slot, and the down rows in it, start at this alignment


def expert_slot_bytes_for(up_bytes: int, down_bytes: int) -> int:
    """An expert cache slot for an expert of ``up_bytes`` up (gate_up) rows and ``down_bytes`` down rows: the
    up rows, the down rows at the next 256-byte offset, the slot rounded to 256 bytes so that every slot, and
    both parts in it, start aligned (the kernels' word loads need 4-byte alignment)."""
    return _aligned(_aligned(up_bytes) + down_bytes)


def _aligned(n: int) -> int:
    return (n + EXPERT_SLOT_ALIGN - 1) // EXPERT_SLOT_ALIGN * EXPERT_SLOT_ALIGN


def plan_with_expert_cache(linears: Sequence[LinearSpec], experts: Sequence[str], budget: int | None,
                           fixed_bytes: int, num_slots: int, stream_whole_groups: bool,
                           cache_slots: int | None = None) -> Placement:
    """:func:`plan_placement`, but the expert stacks (``experts``: names of MoE projections, ``<module>.<proj>``)
    of streamed blocks are copied on demand through an expert cache instead of streamed whole.

    Resident blocks keep their experts resident: under routing that is uniform across experts a static
    resident share of them is hit at least as often as an LRU cache of the same size. The blocks that stream
    then stream only their other layers, in slots sized for those, and the cache gets ``cache_slots`` slots
    for the largest expert (expert_slot_bytes_for; None: what the budget leaves, at least the most experts one
    token uses, at most the on-demand experts). Both projections of an experts module go on demand if either streams. When the
    budget cannot hold slots for whole blocks, every expert stack goes on demand and the slots are sized for
    the rest. A budget that holds everything gives the plain plan: nothing streams, no cache."""
    names = set(experts)
    if not names or not names <= {lin.name for lin in linears}:
        raise ValueError("plan_with_expert_cache needs expert projection names that are among the linears")
    if cache_slots is not None and (isinstance(cache_slots, bool) or not isinstance(cache_slots, int)
                                    or cache_slots < 1):
        raise ValueError(f"expert_cache_slots must be a positive int or None, got {cache_slots!r}")
    specs = {lin.name: lin for lin in linears}
    least = max(specs[n].experts_per_token for n in names)
    expert_slot_bytes = _expert_slot_bytes(specs, names)
    reserve = (cache_slots or least) * expert_slot_bytes
    everything = fixed_bytes + sum(lin.nbytes for lin in linears)
    if budget is None or everything <= budget:
        return plan_placement(linears, budget, fixed_bytes, num_slots, stream_whole_groups)
    if fixed_bytes + reserve > budget:
        raise BudgetError(f"gpu_budget {human_bytes(budget)} is too small: non-linear parameters need "
                          f"{human_bytes(fixed_bytes)} and an expert cache of {cache_slots or least} experts "
                          f"{human_bytes(reserve)}")
    # Streamed blocks' slots hold only their layers other than experts: sized for those, the plan keeps as much
    # resident as the budget less the cache's minimum allows. If even those slots do not fit, every expert
    # stack goes on demand.
    units = _units(linears, stream_whole_groups)
    rest = max(sum(lin.nbytes for lin in u if lin.name not in names) for u in units)
    others = [lin for lin in linears if lin.name not in names]
    try:
        base = plan_placement(linears, budget - reserve, fixed_bytes, num_slots, stream_whole_groups,
                              slot_bytes=rest)
    except BudgetError:
        base = (plan_placement(others, budget - reserve, fixed_bytes, num_slots, stream_whole_groups) if others
                else Placement([], [], [], fixed_bytes, num_slots, 0, {}))
    return _expert_cache_plan(base, specs, names, budget, fixed_bytes, num_slots, expert_slot_bytes, cache_slots,
                              least)


def _expert_slot_bytes(specs: dict, names: set) -> int:
    """The cache slot for the largest expert among the stacks ``names`` (two projections per experts module,
    the up (gate_up) one first in model order)."""
    stacks: dict[str, list[LinearSpec]] = {}
    for lin in specs.values():
        if lin.name in names:
            stacks.setdefault(lin.name.rpartition(".")[0], []).append(lin)
    return max(expert_slot_bytes_for(up.nbytes // up.num_experts, down.nbytes // down.num_experts)
               for up, down in stacks.values())


def _expert_cache_plan(base: Placement, specs: dict, names: set, budget: int, fixed_bytes: int, num_slots: int,
                       expert_slot_bytes: int, cache_slots: "int | None", least: int) -> Placement:
    """``base`` with the experts modules that are not wholly resident moved out of the streamed groups and
    onto the expert cache, which gets ``cache_slots`` or what the budget leaves (at least ``least``)."""
    modules = {n.rpartition(".")[0] for n in names if n not in base.resident}
    on_demand = [n for n in specs if n in names and n.rpartition(".")[0] in modules]     # in model order
    if not on_demand:
        return base
    moved = set(on_demand)
    resident = [n for n in base.resident if n not in moved]
    groups, group_bytes = [], []
    for group in base.streamed_groups:
        members = [n for n in group if n not in moved]
        if members:
            groups.append(members)
            group_bytes.append(sum(specs[n].nbytes for n in members))
    slot_bytes = max(group_bytes, default=0)
    count = sum(specs[n].num_experts for n in on_demand) // 2          # two projections per experts module
    if cache_slots is None:
        left = budget - fixed_bytes - sum(specs[n].nbytes for n in resident) - (num_slots * slot_bytes if groups
                                                                                 else 0)
        cache_slots = min(count, max(least, left // expert_slot_bytes))
    return Placement(resident, groups, group_bytes, fixed_bytes, num_slots, slot_bytes,
                     {n: lin.nbytes for n, lin in specs.items()}, on_demand, int(cache_slots), expert_slot_bytes,
                     count)


def _keeps_one_streamed(unit: list[LinearSpec], resident: set[str], candidate: LinearSpec) -> bool:
    """A streamed unit must keep at least one streamed layer (else it would be resident)."""
    return sum(1 for lin in unit if lin.name not in resident and lin is not candidate) >= 1


@dataclass(frozen=True)
class Prediction:
    tokens: int                   # tokens per forward (batch x new tokens)
    seconds: float                # predicted time of one forward
    tokens_per_s: float
    bound: str                    # "link", "memory" or "compute": what sets the time


def predict_throughput(linears: Sequence[LinearSpec], placement: Placement, hw: Hardware,
                       token_counts: Iterable[int]) -> list[Prediction]:
    """Predicted forward time and tokens/s for each token count (see the module docstring's model)."""
    on_demand = [lin for lin in linears if lin.name in set(placement.on_demand)]
    out = []
    for m in token_counts:
        if m < 1:
            raise ValueError(f"token counts must be positive, got {m}")
        # on-demand experts: the chosen ones that miss the cache cross the link
        copied = sum(lin.nbytes * lin.read_fraction(m) * placement.expert_miss_fraction(lin.read_fraction(m))
                     for lin in on_demand)
        t_link = (placement.streamed_bytes + copied) / hw.link_bytes_per_s
        reads = [lin.nbytes * lin.read_fraction(m) / hw.hbm_bytes_per_s for lin in linears]
        flops = [2 * m * lin.params * lin.active_fraction / hw.matmul_flops for lin in linears]
        t_mem, t_flop = sum(reads), sum(flops)
        t_compute = sum(map(max, reads, flops))
        t = max(t_link, t_compute)
        bound = "link" if t_link >= t_compute else ("memory" if t_mem >= t_flop else "compute")
        out.append(Prediction(m, t, m / t, bound))
    return out
