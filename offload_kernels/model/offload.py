"""offload(model, ...): replace a model's linear layers with quantized, resident or streamed ones."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats import LLAMA_QUANTIZE_FALLBACKS, get_spec, quantize
from ..formats.quantize import validate_weight
from ..layers import OffloadedExperts, OffloadedLinear
from ..layers.offloaded_experts import is_experts_module, projection_names, projection_shape, validate_experts
from ..layers.linear_like import is_linear_like, linear_features, linear_weight
from ..layers.offloaded_linear import _FLOAT_DTYPES as _LAYER_DTYPES
from ..units import default_device
from .bandwidth import Hardware, measure_hardware
from .expert_cache import ExpertCache
from .planner import (LinearSpec, Placement, Prediction, default_budget, parse_bytes, plan_placement,
                      plan_with_expert_cache, predict_throughput)
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
    experts: list[str] = field(default_factory=list)             # MoE experts modules quantized

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
        moe = (f" (the expert stacks of {len(self.experts)} MoE layers among them)" if self.experts else "")
        lines = [
            f"offloaded to {self.device}: {len(self.quantized)} quantized linears ({mix}){moe}, "
            f"{len(self.skipped)} kept as they were",
            f"  resident: {human_bytes(self.bytes_resident)} ({len(p.resident)} quantized linears + "
            f"{human_bytes(p.fixed_bytes)} other parameters)",
            f"  streamed: {human_bytes(self.bytes_streamed_per_forward)} per forward ({n_streamed} linears in "
            f"{len(p.streamed_groups)} groups) through {self.num_slots} slots of {human_bytes(p.slot_bytes)}",
            f"  device total: {human_bytes(p.device_bytes)}; resident fraction of quantized weights "
            f"{p.resident_fraction:.0%}",
        ]
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.skipped.items():
            by_reason.setdefault(reason, []).append(name)
        # why each kept layer was kept, one line per reason, under the first line
        lines[1:1] = [f"  kept {names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''}: {reason}"
                      for reason, names in by_reason.items()]
        if p.on_demand:
            lines.append(f"  experts on demand: {human_bytes(p.on_demand_bytes)} in host memory ({len(p.on_demand)} "
                         f"expert stacks), copied when chosen into a cache of {p.expert_cache_slots} of their "
                         f"{p.expert_count} experts ({human_bytes(p.expert_cache_bytes)})")
        if self.hardware is not None and self.predictions:
            hw = self.hardware
            lines.append(f"  measured: link {hw.link_bytes_per_s / 1e9:.1f} GB/s, memory {hw.hbm_bytes_per_s / 1e9:.1f} "
                         f"GB/s, matmul {hw.matmul_flops / 1e12:.1f} TFLOP/s")
            rows = [[pr.tokens, pr.seconds * 1e3, pr.tokens_per_s, pr.bound] for pr in self.predictions]
            lines.append(format_table(["tokens/forward", "predicted ms", "tokens/s", "bound by"], rows))
        return "\n".join(lines)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name.split(".")[-1] == p for p in patterns)


def _patterns(value: "str | Iterable[str] | None", what: str) -> tuple[str, ...]:
    """A pattern or an iterable of patterns as a tuple; a bare string is one pattern, not its characters."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise TypeError(f"{what} must be a name/glob pattern or an iterable of them, "
                        f"got {type(value).__name__}") from None
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what} patterns must be strings, got {bad[0]!r}")
    return patterns


def _overrides(value: "Mapping[str, Optional[str]] | None") -> dict[str, Optional[str]]:
    """qtype_overrides checked: a mapping of pattern -> known qtype name or None."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"qtype_overrides must be a mapping {{pattern: qtype or None}}, got {type(value).__name__}")
    for pattern, q in value.items():
        if not isinstance(pattern, str):
            raise TypeError(f"qtype_overrides keys must be name/glob patterns (str), got {pattern!r}")
        if q is not None:
            get_spec(q)
    return dict(value)


def check_device(device: "torch.device | str | None") -> torch.device:
    """``device`` (None: cuda when torch sees one, else cpu) as a torch.device models can be offloaded to or
    loaded on: cpu, or cuda when torch sees a CUDA device. ValueError otherwise."""
    try:
        resolved = default_device(device)
    except (RuntimeError, TypeError) as exc:          # torch.device("tpu"), torch.device(1.5), ...
        raise ValueError(f"device must be cuda or cpu, got {device!r} ({exc})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but torch sees no CUDA device")
    if resolved.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {resolved}")
    return resolved


def check_experts(experts: str, expert_cache_slots: Optional[int], expert_prefetch: bool = False) -> None:
    """offload()/load_gguf_model()'s ``experts``, ``expert_cache_slots`` and ``expert_prefetch`` arguments."""
    if experts not in ("with_block", "on_demand"):
        raise ValueError(f"experts must be 'with_block' or 'on_demand', got {experts!r}")
    if not isinstance(expert_prefetch, bool):
        raise TypeError(f"expert_prefetch must be a bool, got {type(expert_prefetch).__name__}")
    if expert_prefetch and experts != "on_demand":
        raise ValueError("expert_prefetch=True guesses which experts to copy on demand: it needs "
                         f"experts='on_demand', got experts={experts!r}")
    if expert_cache_slots is not None and (experts != "on_demand" or isinstance(expert_cache_slots, bool)
                                           or not isinstance(expert_cache_slots, int) or expert_cache_slots < 1):
        raise ValueError(f"expert_cache_slots must be a positive int, with experts='on_demand'; got "
                         f"{expert_cache_slots!r} with experts={experts!r}")


def check_num_slots(num_slots: int) -> None:
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")


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


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _names_module(name: str, pattern: str) -> bool:
    """Whether ``pattern`` (dotted module names, a trailing ".weight" ignored) names module ``name`` or one
    of its ancestors: its components appear as a run of the name's ("wo" matches "block.0.DenseReluDense.wo",
    "mlp.gate" matches "layers.3.mlp.gate" but not "layers.3.mlp.gate_proj", "qformer" everything under it)."""
    wanted = pattern.removesuffix(".weight").split(".")
    parts = name.split(".")
    return any(parts[i:i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1))


def _model_fp32_patterns(model: nn.Module) -> dict[str, str]:
    """The module patterns a Hugging Face model (or any of its sub-models) keeps in fp32, by pattern -> the
    attribute that lists it (``_keep_in_fp32_modules``, ``_keep_in_fp32_modules_strict``). Hugging Face's own
    quantizers leave those modules unquantized, and some models' code relies on it: T5 casts its feed-forward
    input to ``wo.weight.dtype``, which for a quantized layer is the uint8 of its bytes."""
    found: dict[str, str] = {}
    for module in model.modules():
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            value = getattr(module, attr, None)
            if isinstance(value, str):
                value = (value,)
            for pattern in value or ():
                if isinstance(pattern, str) and pattern:
                    found.setdefault(pattern, attr)
    return found


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


#: torch modules whose fast path hands their children's weights to fused kernels itself (instead of calling
#: the children), and the attribute that turns that path off, with the value that does: see _fast_path_guards.
_ENCODER_LAYER_FAST_PATH = ("activation_relu_or_gelu", 0)   # TransformerEncoderLayer: the path needs relu/gelu
_ENCODER_NESTED_FAST_PATH = ("use_nested_tensor", False)    # TransformerEncoder: its nested-tensor path


#: nn.Linear subclasses whose own forward computes exactly nn.Linear's x @ W.T + b (so OffloadedLinear may
#: replace them), by qualified class name.
_PLAIN_LINEAR_SUBCLASSES = frozenset({
    "transformers.models.falcon.modeling_falcon.FalconLinear",      # input @ weight.T (+ bias): every Falcon linear
})


def _changes_linear_forward(module: nn.Module) -> bool:
    """Whether ``module`` is an nn.Linear subclass whose forward does something else than x @ W.T + b (a
    router returning top-k choices, a grouped or decoupled linear): replacing it would drop that."""
    cls = type(module)
    if not isinstance(module, nn.Linear) or cls.forward is nn.Linear.forward:
        return False
    return f"{cls.__module__}.{cls.__qualname__}" not in _PLAIN_LINEAR_SUBCLASSES


def _unreplaceable(model: nn.Module) -> dict[str, str]:
    """Linears that must stay as they are, by name -> reason: their parent reads the weight itself (replacing
    them would hand a fused kernel the quantized bytes), or their class's forward is not nn.Linear's."""
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if _changes_linear_forward(module):
            out[name] = (f"its class {type(module).__name__} overrides nn.Linear.forward (an OffloadedLinear "
                         f"would compute only x @ W.T + b, not what that forward does)")
        if isinstance(module, nn.MultiheadAttention) and isinstance(getattr(module, "out_proj", None), nn.Linear):
            out[_join(name, "out_proj")] = ("nn.MultiheadAttention passes out_proj's weight to its attention kernel "
                                            "itself (it never calls the module)")
        elif isinstance(module, nn.TransformerEncoderLayer) and not hasattr(module, _ENCODER_LAYER_FAST_PATH[0]):
            for child in ("linear1", "linear2"):
                out[_join(name, child)] = ("nn.TransformerEncoderLayer's fast path reads its weight itself, and "
                                           "this torch version has no known switch to turn that path off")
    return out


def _fast_path_guards(model: nn.Module, replaced: Iterable[str]) -> list[tuple[nn.Module, str, object]]:
    """(module, attribute, value) settings that keep torch's transformer fast paths from reading the weights
    of replaced linears: a TransformerEncoderLayer whose linear1/linear2 is replaced takes its module-by-
    module path (which calls them), and a TransformerEncoder holding one skips its nested-tensor path."""
    replaced = set(replaced)
    guards = []
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            if replaced & {_join(name, "linear1"), _join(name, "linear2")}:
                guards.append((module, *_ENCODER_LAYER_FAST_PATH))
        elif isinstance(module, nn.TransformerEncoder) and hasattr(module, _ENCODER_NESTED_FAST_PATH[0]):
            prefix = _join(name, "layers.")
            if any(r.startswith(prefix) for r in replaced):
                guards.append((module, *_ENCODER_NESTED_FAST_PATH))
    return guards


@dataclass
class LinearSelection:
    """Which linears offload() quantizes (and to what), which it keeps, and the planner's view of them."""

    chosen: dict[str, str]               # layer -> qtype
    skipped: dict[str, str]              # layer -> reason
    specs: list[LinearSpec]
    fixed_bytes: int                     # everything else the device holds: other params, buffers, biases
    experts: dict[str, dict[str, str]] = field(default_factory=dict)   # MoE experts module -> {projection: qtype}


def _fallback_of(qtype: str, fallback_qtype: "str | Mapping[str, str] | None") -> Optional[str]:
    """The fallback format of a layer meant to be ``qtype`` (a mapping is keyed by the intended format)."""
    if isinstance(fallback_qtype, Mapping):
        return fallback_qtype.get(qtype)
    return fallback_qtype


def _check_fallback(fallback_qtype: "str | Mapping[str, str] | None") -> None:
    if fallback_qtype is None:
        return
    if isinstance(fallback_qtype, Mapping):
        for key, value in fallback_qtype.items():
            get_spec(key)
            get_spec(value)
    elif isinstance(fallback_qtype, str):
        get_spec(fallback_qtype)
    else:
        raise TypeError(f"fallback_qtype must be a qtype string, a mapping {{qtype: fallback qtype}} (e.g. "
                        f"LLAMA_QUANTIZE_FALLBACKS) or None, got {type(fallback_qtype).__name__}")


def _format_for(in_features: int, qtype: str,
                fallback_qtype: "str | Mapping[str, str] | None") -> tuple[Optional[str], str]:
    """(the format a layer gets, "") when ``qtype``'s block, else its fallback's (see _fallback_of), divides
    in_features; (None, why not) when neither does."""
    block = get_spec(qtype).block_size
    if in_features % block == 0:
        return qtype, ""
    fallback = _fallback_of(qtype, fallback_qtype)
    if fallback is not None and in_features % get_spec(fallback).block_size == 0:
        return fallback, ""
    why = f"in_features={in_features} is not a multiple of the {qtype} block size {block}"
    if fallback is not None:
        why += f" nor of the fallback {fallback}'s {get_spec(fallback).block_size}"
    elif in_features % 32 == 0:
        hint = LLAMA_QUANTIZE_FALLBACKS.get(qtype, "q8_0")
        why += f" (fallback_qtype='{hint}' or LLAMA_QUANTIZE_FALLBACKS would quantize it)"
    return None, why


_ABSENT = object()


def select_linears(model: nn.Module, qtype: str = "q4_k", skip: "str | Sequence[str] | None" = ("lm_head",),
                   qtype_overrides: Optional[Mapping[str, Optional[str]]] = None,
                   stream_whole_blocks: bool = True,
                   fallback_qtype: "str | Mapping[str, str] | None" = None,
                   keep_model_fp32_modules: bool = True) -> LinearSelection:
    """Decide, without changing ``model``, what offload() would quantize and what the device must hold.

    Linears are nn.Linear modules and transformers' Conv1D (see layers.linear_like), and the two projections
    of every transformers MoE experts module (see layers.offloaded_experts), named after their parameters
    (``model.layers.3.mlp.experts.gate_up_proj``, ``...experts.down_proj``). For each, in order: a linear
    whose parent reads its weight itself (nn.MultiheadAttention's out_proj) is kept; then ``skip``; then the
    first matching ``qtype_overrides`` pattern; then, with ``keep_model_fp32_modules``, the modules a Hugging
    Face model lists in ``_keep_in_fp32_modules(_strict)`` are kept; then ``qtype``. A layer whose
    in_features is not a multiple of its format's block takes its fallback (``fallback_qtype``, or
    ``fallback_qtype[format]`` for a mapping such as LLAMA_QUANTIZE_FALLBACKS) if that one's block divides
    it, else it is kept. An experts module is quantized whole or kept whole: if either projection is kept,
    so is the other.

    Raises TypeError/ValueError for bad patterns, unknown qtypes, an override that names no linear of the
    model, or weights on the meta device.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"select_linears expects an nn.Module, got {type(model).__name__}")
    get_spec(qtype)
    _check_fallback(fallback_qtype)
    if not isinstance(keep_model_fp32_modules, bool):
        raise TypeError(f"keep_model_fp32_modules must be True or False, got {keep_model_fp32_modules!r}")
    skip = _patterns(skip, "skip")
    overrides = _overrides(qtype_overrides)
    linears: dict[str, nn.Module] = {}
    experts: dict[str, nn.Module] = {}
    candidates: dict[str, tuple[int, torch.Tensor]] = {}      # name -> (in_features, weight), in model order
    for name, m in model.named_modules():
        if is_linear_like(m):
            linears[name] = m
            candidates[name] = (linear_features(m)[0], m.weight)
        elif is_experts_module(m):
            experts[name] = m
            for proj in projection_names(m):
                candidates[_join(name, proj)] = (projection_shape(m, proj)[2], m._parameters[proj])
    if not candidates:
        raise ValueError("model has no nn.Linear (or transformers Conv1D) layers or MoE experts to offload")
    unmatched = [p for p in overrides if not any(_matches(name, [p]) for name in candidates)]
    if unmatched:       # most likely a typo: silently ignoring it would quantize what the user meant to keep
        raise ValueError(f"qtype_overrides pattern(s) {', '.join(map(repr, unmatched))} match no nn.Linear or "
                         f"expert projection of the model (e.g. {next(iter(candidates))!r})")
    unreplaceable = _unreplaceable(model)
    model_fp32 = _model_fp32_patterns(model) if keep_model_fp32_modules else {}
    chosen: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, (in_features, weight) in candidates.items():
        if name in unreplaceable:
            skipped[name] = unreplaceable[name]
            continue
        if _matches(name, skip):
            skipped[name] = "skipped by configuration"
            continue
        override = next((q for p, q in overrides.items() if _matches(name, [p])), _ABSENT)
        if override is _ABSENT:
            kept_by = next((f"{attr} lists {p!r}" for p, attr in model_fp32.items() if _names_module(name, p)), None)
            if kept_by is not None:
                skipped[name] = (f"the model keeps it in fp32 ({kept_by}; keep_model_fp32_modules=False or a "
                                 f"qtype_overrides entry quantizes it anyway)")
                continue
            q = qtype
        elif override is None:
            skipped[name] = "skipped by configuration"
            continue
        else:
            q = override
        q, reason = _format_for(in_features, q, fallback_qtype)
        if q is None:
            skipped[name] = reason
            continue
        if weight.device.type == "meta":
            raise ValueError(f"{name} has no weights (meta device); load the model's weights first")
        chosen[name] = q
    chosen_experts: dict[str, dict[str, str]] = {}
    for name, m in experts.items():
        projs = {proj: _join(name, proj) for proj in projection_names(m)}
        kept = [full for full in projs.values() if full not in chosen]
        if not kept:
            chosen_experts[name] = {proj: chosen[full] for proj, full in projs.items()}
            continue
        for full in projs.values():
            if full not in kept:
                del chosen[full]
                skipped[full] = (f"an experts module is quantized whole, and {kept[0].rpartition('.')[2]} is "
                                 f"kept ({skipped[kept[0]]})")
    # Everything but the quantized weights stays on the device at its own dtype (biases included). Count by
    # reference, not by tensor: a weight tied to another module (lm_head.weight is embed_tokens.weight)
    # leaves the device only if every name it has is a quantized linear's weight.
    consumed = {f"{n}.weight" for n in chosen if n in linears} | {n for n in chosen if n not in linears}
    kept = {id(t): t for name, t in model.named_parameters(remove_duplicate=False) if name not in consumed}
    kept.update((id(t), t) for t in model.buffers())
    fixed = _tensor_bytes(kept.values())
    specs = []
    for n, q in chosen.items():
        group = _group_of(model, n) if stream_whole_blocks else ""
        if n in linears:
            specs.append(LinearSpec(n, *reversed(linear_features(linears[n])), q, group))
            continue
        parent, _, proj = n.rpartition(".")
        e, out, k = projection_shape(experts[parent], proj)
        specs.append(LinearSpec(n, e * out, k, q, group, num_experts=e,
                                experts_per_token=_experts_per_token(model, parent, experts[parent])))
    return LinearSelection(chosen, skipped, specs, fixed, chosen_experts)


def _experts_per_token(model: nn.Module, name: str, experts: nn.Module) -> int:
    """How many experts each token uses (top-k) in the MoE block holding ``experts``: the router's ``top_k``,
    else the config's ``num_experts_per_tok``; all of them if neither says (a conservative prediction)."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    for owner in (parent, *parent.children(), getattr(experts, "config", None)):
        for attr in ("top_k", "num_experts_per_tok"):
            k = getattr(owner, attr, None)
            if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= experts.num_experts:
                return k
    return experts.num_experts


_BIAS_DTYPES = _LAYER_DTYPES     # what OffloadedLinear accepts for its bias


def _validate_weights(linears: Mapping[str, nn.Module], chosen: Mapping[str, str],
                      experts: Mapping[str, tuple[nn.Module, Mapping[str, str]]] = {}) -> None:
    """Everything quantize() and OffloadedLinear would reject, checked for every chosen layer (and experts
    module: ``experts`` maps its name to (module, {projection: qtype})) first, so a bad layer late in the
    model fails the call before the model is changed."""
    for name, q in chosen.items():
        if name not in linears:
            continue
        lin = linears[name]
        try:
            validate_weight(linear_weight(lin), get_spec(q))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from exc
        if lin.bias is not None and lin.bias.dtype not in _BIAS_DTYPES:
            raise TypeError(f"{name}: bias dtype must be fp16, bf16 or fp32, got {lin.bias.dtype}")
    for name, (module, qtypes) in experts.items():
        try:
            validate_experts(module, qtypes)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}.{exc}") from exc


# The hook registries of an nn.Module. A replacement module takes the original's dict objects, so hooks
# registered before offload() still fire and their handles (which hold these dicts) still remove them.
_HOOK_ATTRS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
               "_is_full_backward_hook", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _share_hooks(original: nn.Module, new: nn.Module) -> None:
    for attr in _HOOK_ATTRS:
        if attr in original.__dict__:
            new.__dict__[attr] = original.__dict__[attr]


def _tensor_devices(model: nn.Module) -> list[tuple[nn.Module, str, str, torch.device]]:
    """Where every parameter and buffer of ``model`` lives, to undo a partial model.to() on failure."""
    out = []
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(module, kind).items():
                if t is not None:
                    out.append((module, kind, key, t.device))
    return out


def _roll_back(model: nn.Module, originals: list[tuple[nn.Module, str, nn.Module]],
               devices: list[tuple[nn.Module, str, str, torch.device]], had_streamer: bool,
               settings: Sequence[tuple[nn.Module, str, object]] = ()) -> None:
    """Put back every replaced linear, every changed attribute (``settings``: module, name, old value) and
    every moved tensor; drop a streamer this call attached."""
    for parent, attr, original in reversed(originals):
        setattr(parent, attr, original)
    for module, attr, value in reversed(settings):
        setattr(module, attr, value)
    cache = expert_cache_of(model)
    if cache is not None:
        del model._offload_expert_cache
        cache.close()
    streamer = streamer_of(model)
    if streamer is not None and not had_streamer:
        del model._offload_streamer
        try:
            streamer.close()                     # removes its hooks on the model, frees the engine
        except Exception:  # noqa: BLE001 - the original error is the one to report
            log.warning("offload: could not close the streamer while rolling back", exc_info=True)
    with torch.no_grad():
        for module, kind, key, device in devices:
            t = getattr(module, kind).get(key)
            if t is None or t.device == device:
                continue
            if kind == "_parameters":
                t.data = t.data.to(device)       # the same Parameter object: tied references stay tied
            else:
                module._buffers[key] = t.to(device)


def offload(model: nn.Module, qtype: str = "q4_k", gpu_budget: "int | str | None" = None,
            device: "torch.device | str | None" = None, *, skip: "str | Sequence[str] | None" = ("lm_head",),
            qtype_overrides: Optional[Mapping[str, Optional[str]]] = None, num_slots: int = 2,
            stream_whole_blocks: bool = True, progress: bool = True, measure: bool = True,
            token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
            fallback_qtype: "str | Mapping[str, str] | None" = None,
            keep_model_fp32_modules: bool = True, experts: str = "with_block",
            expert_cache_slots: Optional[int] = None, expert_prefetch: bool = False) -> OffloadReport:
    """Quantize ``model``'s linear layers (nn.Linear, and transformers' Conv1D) and MoE expert stacks in
    place and place them within ``gpu_budget``.

    Args:
        model: any nn.Module (Hugging Face transformers first); its linears are replaced in place and the
            rest of its parameters are moved to ``device``.
        qtype: the default GGUF format for linears.
        gpu_budget: device bytes for weights and staging slots (int, or a string like "24GiB"). None: on
            CUDA the free device memory less 10% and 1 GiB (room for activations and the KV cache, which
            the budget does not count); on the CPU no limit.
        device: where the model runs (default: cuda if available, else cpu — the CPU path uses the torch
            kernels and the engine's host backend).
        skip: linears left untouched: a name or glob pattern, or several (a bare name matches the last
            component).
        qtype_overrides: {pattern: qtype or None} per-layer formats, e.g. {"*.down_proj": "q6_k"};
            None keeps a layer unquantized. A pattern that matches no nn.Linear is an error.
        fallback_qtype: the format for layers whose in_features is not a multiple of their format's block
            (the k-quants need 256, the other formats 32), e.g. "q8_0", or a mapping from the intended format
            to its fallback: LLAMA_QUANTIZE_FALLBACKS is llama-quantize's (q3_k -> iq4_nl, q4_k -> q5_0,
            q5_k -> q5_1, q6_k -> q8_0). None: such layers stay as they are, with the reason logged.
        keep_model_fp32_modules: leave unquantized the modules a Hugging Face model lists in
            ``_keep_in_fp32_modules`` / ``_keep_in_fp32_modules_strict`` (as its own quantizers do; T5's
            ``wo`` needs it). An explicit qtype_overrides entry wins.
        num_slots: staging slots of the transfer engine (2 = double buffering).
        stream_whole_blocks: stream a whole transformer block per copy (else one layer per copy).
        measure: measure link/memory/matmul ceilings for the report's predictions.
        experts: for MoE models, where the expert stacks of blocks that stream go. "with_block": streamed
            whole with their block, like the other linears. "on_demand": kept in pinned host memory; each MoE
            layer copies only the experts its tokens chose into an LRU cache of expert slots on the device
            (see model.expert_cache), which gets the budget the rest leaves. Either way resident blocks keep
            their experts resident, and a budget that holds everything streams nothing.
        expert_cache_slots: with experts="on_demand", the cache's size in experts (None: as many as the
            budget holds, at least the experts one token uses).
        expert_prefetch: with experts="on_demand", each MoE layer also applies the next on-demand layer's
            router to its own input and copies the experts it picks ahead of that layer's call (see
            model.expert_cache: a guess costs link bytes when wrong, never results). Not measured on a GPU
            yet, hence off by default.

    Raises ValueError/TypeError for bad arguments or weights (NaN/Inf, non-float, ...) before the model is
    touched; if quantizing or placing still fails, the model is restored as it was before re-raising.
    """
    # ---------------------------------------------------------------- validate everything first
    if not isinstance(model, nn.Module):
        raise TypeError(f"offload expects an nn.Module, got {type(model).__name__}")
    get_spec(qtype)
    skip = _patterns(skip, "skip")
    overrides = _overrides(qtype_overrides)
    budget = parse_bytes(gpu_budget)
    check_num_slots(num_slots)
    device = check_device(device)
    check_experts(experts, expert_cache_slots, expert_prefetch)
    if any(isinstance(m, OffloadedLinear) for m in model.modules()):
        raise ValueError("model already contains OffloadedLinear layers; offload() a fresh model")
    if budget is None:
        budget = default_budget(device)

    # ---------------------------------------------------------------- decide per linear, check weights, plan
    selection = select_linears(model, qtype, skip, overrides, stream_whole_blocks, fallback_qtype,
                               keep_model_fp32_modules)
    for name, reason in selection.skipped.items():
        log.info("offload: keeping %s as it is: %s", name, reason)
    chosen, skipped, specs, fixed = selection.chosen, selection.skipped, selection.specs, selection.fixed_bytes
    if not chosen:
        reasons = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:4])
        raise ValueError(f"no linear layer to quantize: all {len(skipped)} were kept ({reasons}"
                         f"{'; ...' if len(skipped) > 4 else ''})")
    linears = {name: m for name, m in model.named_modules() if name in chosen}
    experts_to_do = {name: (model.get_submodule(name), qtypes) for name, qtypes in selection.experts.items()}
    _validate_weights(linears, chosen, experts_to_do)
    if experts == "on_demand" and experts_to_do:
        placement = plan_with_expert_cache(
            specs, [_join(e, p) for e, (_, qtypes) in experts_to_do.items() for p in qtypes], budget, fixed,
            num_slots, stream_whole_blocks, expert_cache_slots)
    else:
        placement = plan_placement(specs, budget, fixed, num_slots, stream_whole_groups=stream_whole_blocks)

    # ---------------------------------------------------------------- quantize and replace
    # Should anything still fail (quantize() checks the fp16 block scales only on its result; device memory
    # may run out), every replaced module and moved tensor is put back: the model is exactly as before.
    # That keeps each replaced layer's float weight alive until the end (host memory, where models that
    # need offloading usually are, rather than freeing it layer by layer).
    resident = set(placement.resident)
    replaced: dict[str, OffloadedLinear] = {}
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    settings: list[tuple[nn.Module, str, object]] = []
    devices = _tensor_devices(model)
    had_streamer = streamer_of(model) is not None
    work_device = device if device.type == "cuda" else torch.device("cpu")
    # One unit of work per linear, and one per experts module (both its projections).
    expert_projections = {_join(e, p): e for e, (_, qtypes) in experts_to_do.items() for p in qtypes}
    units = [n for n in chosen if n not in expert_projections] + list(experts_to_do)
    units.sort(key=_model_order(model))
    try:
        for name in tqdm(units, desc=f"quantizing to {qtype}", disable=not progress, unit="layer"):
            if name in experts_to_do:
                original, qtypes = experts_to_do.pop(name)
                new = OffloadedExperts.from_experts(original, qtypes, device=work_device)
                for proj in qtypes:
                    child, full = new._modules[proj], _join(name, proj)
                    child._buffers["weight"] = child.weight.to(device if full in resident else "cpu")
                    replaced[full] = child
            else:
                original = linears.pop(name)
                qt = quantize(linear_weight(original).to(work_device), chosen[name])
                qt = qt.to(device) if name in resident else qt.to("cpu")
                bias = None if original.bias is None else original.bias.detach()
                new = OffloadedLinear.from_quantized(qt, bias)
                replaced[name] = new
            _share_hooks(original, new)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            originals.append((parent, attr, original))
        for module, attr, value in _fast_path_guards(model, replaced):
            settings.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)
        apply_placement(model, replaced, placement, device, _on_demand_modules(model, placement), expert_prefetch)
        report = _report(device, qtype, placement, chosen, skipped, specs, measure, token_counts)
        report.experts = list(selection.experts)
        return report
    except BaseException:
        _roll_back(model, originals, devices, had_streamer, settings)
        raise


def apply_placement(model: nn.Module, layers: Mapping[str, OffloadedLinear], placement: Placement,
                    device: torch.device, on_demand_experts: Sequence[OffloadedExperts] = (),
                    expert_prefetch: bool = False) -> Optional[WeightStreamer]:
    """Move resident layers and all other parameters to ``device``; stream the placement's groups; copy the
    experts of ``on_demand_experts`` (the placement's on-demand stacks) through an expert cache (guessing
    each next layer's experts with ``expert_prefetch``)."""
    for name in placement.resident:
        layer = layers[name]
        layer._buffers["weight"] = layer.weight.to(device)
    if placement.on_demand:
        # Before model.to(): the cache marks the experts' bytes as host-held, so they stay where they are.
        cache = ExpertCache(on_demand_experts, device, placement.expert_cache_slots, prefetch=expert_prefetch)
        model._offload_expert_cache = cache
        if expert_prefetch:
            cache.link_next_layers(model)
    if not placement.streamed_groups:
        model.to(device)
        return None
    # The streamer takes the streamed bytes into pinned host memory and marks their layers as streamed
    # first: only then does model.to() leave them on the host (OffloadedLinear._apply) instead of copying
    # every streamed weight to the device, which is what the budget said would not fit.
    groups = [[layers[n] for n in g] for g in placement.streamed_groups]
    streamer = WeightStreamer(groups, device, placement.num_slots)
    try:
        model.to(device)
        streamer.attach(model)
    except BaseException:
        streamer.close()                 # removes whatever hooks it did register, frees the engine
        raise
    model._offload_streamer = streamer   # keeps the engine alive with the model
    return streamer


def _report(device, qtype, placement, chosen, skipped, specs, measure, token_counts) -> OffloadReport:
    hw = None
    if measure:
        # The model is already placed: a measurement that fails (e.g. no memory left for its buffers once
        # the budget is filled) costs the predictions, not the offload.
        try:
            hw = measure_hardware(device)
        except (torch.OutOfMemoryError, MemoryError) as e:
            log.warning("could not measure %s for the throughput predictions (%s); report without them",
                        device, e)
    predictions = predict_throughput(specs, placement, hw, token_counts) if hw else []
    return OffloadReport(str(device), qtype, placement.num_slots, placement, dict(chosen), dict(skipped), hw,
                         predictions)


def _model_order(model: nn.Module):
    """A sort key putting module names in the model's module order."""
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return lambda name: position[name]


def streamer_of(model: nn.Module) -> Optional[WeightStreamer]:
    """The WeightStreamer offload() attached to ``model``, if any layer streams."""
    return getattr(model, "_offload_streamer", None)


def _on_demand_modules(model: nn.Module, placement: Placement) -> list[OffloadedExperts]:
    """The OffloadedExperts whose projections the placement copies on demand, in model order."""
    names = dict.fromkeys(n.rpartition(".")[0] for n in placement.on_demand)
    return [model.get_submodule(n) for n in names]


def expert_cache_of(model: nn.Module) -> Optional[ExpertCache]:
    """The ExpertCache offload(experts="on_demand") attached to ``model``, if any experts are copied on demand."""
    return getattr(model, "_offload_expert_cache", None)

