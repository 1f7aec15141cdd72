"""offload(model, ...): replace a model's nn.Linear layers with quantized, resident or streamed ones."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats import get_spec, quantize
from ..layers import OffloadedLinear
from .bandwidth import Hardware, measure_hardware
from .planner import (LinearSpec, Placement, Prediction, default_budget, parse_bytes, plan_placement,
                      predict_throughput)
from .streaming import WeightStreamer

log = logging.getLogger("offload_kernels")

DEFAULT_TOKEN_COUNTS = (1, 8, 64, 512, 2048)


@dataclass
class OffloadReport:
    """What offload() did and what it predicts."""

    device: str
    qtype: str
    num_slots: int
    placement: Placement
    quantized: dict[str, str] = field(default_factory=dict)      # layer -> qtype
    skipped: dict[str, str] = field(default_factory=dict)        # layer -> reason
    hardware: Optional[Hardware] = None
    predictions: list[Prediction] = field(default_factory=list)

    @property
    def bytes_resident(self) -> int:
        """Device bytes for weights: non-linear parameters, kept linears and resident quantized linears."""
        return self.placement.fixed_bytes + self.placement.resident_bytes

    @property
    def bytes_streamed_per_forward(self) -> int:
        return self.placement.streamed_bytes

    @property
    def staging_bytes(self) -> int:
        return self.placement.staging_bytes

    def __str__(self) -> str:
        from ..cli.table import format_table, human_bytes

        p = self.placement
        n_streamed = sum(len(g) for g in p.streamed_groups)
        counts: dict[str, int] = {}
        for q in self.quantized.values():
            counts[q] = counts.get(q, 0) + 1
        mix = ", ".join(f"{q}: {n}" for q, n in sorted(counts.items()))
        lines = [
            f"offloaded to {self.device}: {len(self.quantized)} quantized linears ({mix}), "
            f"{len(self.skipped)} kept as they were",
            f"  resident: {human_bytes(self.bytes_resident)} ({len(p.resident)} quantized linears + "
            f"{human_bytes(p.fixed_bytes)} other parameters)",
            f"  streamed: {human_bytes(self.bytes_streamed_per_forward)} per forward ({n_streamed} linears in "
            f"{len(p.streamed_groups)} groups) through {self.num_slots} slots of {human_bytes(p.slot_bytes)}",
            f"  device total: {human_bytes(p.device_bytes)}; resident fraction of quantized weights "
            f"{p.resident_fraction:.0%}",
        ]
        if self.hardware is not None and self.predictions:
            hw = self.hardware
            lines.append(f"  measured: link {hw.link_bytes_per_s / 1e9:.1f} GB/s, memory {hw.hbm_bytes_per_s / 1e9:.1f} "
                         f"GB/s, matmul {hw.matmul_flops / 1e12:.1f} TFLOP/s")
            rows = [[pr.tokens, pr.seconds * 1e3, pr.tokens_per_s, pr.bound] for pr in self.predictions]
            lines.append(format_table(["tokens/forward", "predicted ms", "tokens/s", "bound by"], rows))
        return "\n".join(lines)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name.split(".")[-1] == p for p in patterns)


def _group_of(model: nn.Module, name: str) -> str:
    """The path of the nearest ancestor that is an item of an nn.ModuleList (a transformer block)."""
    parts = name.split(".")
    group = ""
    module = model
    for i, part in enumerate(parts[:-1]):
        parent = module
        module = getattr(module, part)
        if isinstance(parent, nn.ModuleList):
            group = ".".join(parts[:i + 1])
    return group


def _resolve_qtype(name: str, default: str, overrides: Mapping[str, Optional[str]]) -> Optional[str]:
    for pattern, qtype in overrides.items():
        if _matches(name, [pattern]):
            return qtype
    return default


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class LinearSelection:
    """Which linears offload() quantizes (and to what), which it keeps, and the planner's view of them."""

    chosen: dict[str, str]               # layer -> qtype
    skipped: dict[str, str]              # layer -> reason
    specs: list[LinearSpec]
    fixed_bytes: int                     # everything else the device holds: other params, buffers, biases


def select_linears(model: nn.Module, qtype: str = "q4_k", skip: Sequence[str] = ("lm_head",),
                   qtype_overrides: Optional[Mapping[str, Optional[str]]] = None,
                   stream_whole_blocks: bool = True) -> LinearSelection:
    """Decide, without changing ``model``, what offload() would quantize and what the device must hold."""
    overrides = dict(qtype_overrides or {})
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError("model has no nn.Linear layers to offload")
    chosen: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, lin in linears.items():
        q = None if _matches(name, skip) else _resolve_qtype(name, qtype, overrides)
        if q is None:
            skipped[name] = "skipped by configuration"
        elif lin.in_features % get_spec(q).block_size:
            skipped[name] = (f"in_features={lin.in_features} is not a multiple of the {q} block size "
                             f"{get_spec(q).block_size}")
        elif lin.weight.device.type == "meta":
            raise ValueError(f"{name} has no weights (meta device); load the model's weights first")
        else:
            chosen[name] = q
    # Everything but the quantized weights stays on the device at its own dtype (biases included).
    quantized_weights = {id(linears[n].weight) for n in chosen}
    fixed = _tensor_bytes(p for p in model.parameters() if id(p) not in quantized_weights)
    fixed += _tensor_bytes(model.buffers())
    specs = [LinearSpec(n, linears[n].out_features, linears[n].in_features, q,
                        _group_of(model, n) if stream_whole_blocks else "") for n, q in chosen.items()]
    return LinearSelection(chosen, skipped, specs, fixed)


def offload(model: nn.Module, qtype: str = "q4_k", gpu_budget: "int | str | None" = None,
            device: "torch.device | str | None" = None, *, skip: Sequence[str] = ("lm_head",),
            qtype_overrides: Optional[Mapping[str, Optional[str]]] = None, num_slots: int = 2,
            stream_whole_blocks: bool = True, progress: bool = True, measure: bool = True,
            token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS) -> OffloadReport:
    """Quantize ``model``'s nn.Linear layers in place and place them within ``gpu_budget``.

    Args:
        model: any nn.Module (Hugging Face transformers first); its linears are replaced in place and the
            rest of its parameters are moved to ``device``.
        qtype: the default GGUF format for linears.
        gpu_budget: device bytes for weights and staging slots (int, or a string like "24GiB"). None: on
            CUDA the free device memory less 10% and 1 GiB (room for activations and the KV cache, which
            the budget does not count); on the CPU no limit.
        device: where the model runs (default: cuda if available, else cpu — the CPU path uses the torch
            kernels and the engine's host backend).
        skip: linears left untouched (names or glob patterns; a bare name matches the last component).
        qtype_overrides: {pattern: qtype or None} per-layer formats, e.g. {"*.down_proj": "q6_k"};
            None keeps a layer unquantized.
        num_slots: staging slots of the transfer engine (2 = double buffering).
        stream_whole_blocks: stream a whole transformer block per copy (else one layer per copy).
        measure: measure link/memory/matmul ceilings for the report's predictions.

    Raises ValueError/TypeError for bad arguments — before the model is touched.
    """
    # ---------------------------------------------------------------- validate everything first
    if not isinstance(model, nn.Module):
        raise TypeError(f"offload expects an nn.Module, got {type(model).__name__}")
    get_spec(qtype)
    overrides = dict(qtype_overrides or {})
    for pattern, q in overrides.items():
        if q is not None:
            get_spec(q)
    budget = parse_bytes(gpu_budget)
    if not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but torch sees no CUDA device")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device}")
    if any(isinstance(m, OffloadedLinear) for m in model.modules()):
        raise ValueError("model already contains OffloadedLinear layers; offload() a fresh model")
    if budget is None:
        budget = default_budget(device)

    # ---------------------------------------------------------------- decide per linear, plan
    selection = select_linears(model, qtype, skip, overrides, stream_whole_blocks)
    for name, reason in selection.skipped.items():
        log.info("offload: keeping %s as nn.Linear: %s", name, reason)
    chosen, skipped, specs, fixed = selection.chosen, selection.skipped, selection.specs, selection.fixed_bytes
    linears = {name: m for name, m in model.named_modules() if name in chosen}
    placement = plan_placement(specs, budget, fixed, num_slots, stream_whole_groups=stream_whole_blocks)

    # ---------------------------------------------------------------- quantize and replace
    resident = set(placement.resident)
    replaced: dict[str, OffloadedLinear] = {}
    work_device = device if device.type == "cuda" else torch.device("cpu")
    for name in tqdm(list(chosen), desc=f"quantizing to {qtype}", disable=not progress, unit="layer"):
        lin = linears.pop(name)              # drop our reference so the float weight can be freed
        qt = quantize(lin.weight.detach().to(work_device), chosen[name])
        qt = qt.to(device) if name in resident else qt.to("cpu")
        bias = None if lin.bias is None else lin.bias.detach()
        new = OffloadedLinear.from_quantized(qt, bias)
        new._forward_hooks.update(lin._forward_hooks)
        new._forward_pre_hooks.update(lin._forward_pre_hooks)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        replaced[name] = new
    apply_placement(model, replaced, placement, device)
    return _report(device, qtype, placement, chosen, skipped, specs, measure, token_counts)


def apply_placement(model: nn.Module, layers: Mapping[str, OffloadedLinear], placement: Placement,
                    device: torch.device) -> Optional[WeightStreamer]:
    """Move resident layers and all other parameters to ``device``; stream the placement's groups."""
    for name in placement.resident:
        layer = layers[name]
        layer._buffers["weight"] = layer.weight.to(device)
    model.to(device)            # streamed layers keep their bytes on the host (OffloadedLinear._apply)
    if not placement.streamed_groups:
        return None
    groups = [[layers[n] for n in g] for g in placement.streamed_groups]
    streamer = WeightStreamer(groups, device, placement.num_slots)
    streamer.attach(model)
    model._offload_streamer = streamer   # keeps the engine alive with the model
    return streamer


def _report(device, qtype, placement, chosen, skipped, specs, measure, token_counts) -> OffloadReport:
    hw = measure_hardware(device) if measure else None
    predictions = predict_throughput(specs, placement, hw, token_counts) if hw else []
    return OffloadReport(str(device), qtype, placement.num_slots, placement, dict(chosen), dict(skipped), hw,
                         predictions)


def streamer_of(model: nn.Module) -> Optional[WeightStreamer]:
    """The WeightStreamer offload() attached to ``model``, if any layer streams."""
    return getattr(model, "_offload_streamer", None)
