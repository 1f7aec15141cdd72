"""OffloadedExperts: a mixture-of-experts layer whose stacked expert weights are GGUF-quantized.

transformers keeps the experts of a MoE block (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, gpt-oss, GLM-4.5,
...) as one module holding 3-D parameters, not nn.Linear modules: ``gate_up_proj`` (or ``up_proj`` where
there is no gate) of shape (E, out, in) and ``down_proj`` of shape (E, hidden, intermediate), transposed to
(E, in, out) in models whose class says ``is_transposed``. Such a module is called with the router's choice,
``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))``, and classes that follow that
contract carry transformers' ``use_experts_implementation`` flags (``has_gate``, ``has_bias``,
``is_transposed``, ...), which is what :func:`is_experts_module` recognizes.

Each projection's E expert matrices become one quantized weight of E * out rows: an OffloadedLinear
child named after the parameter it replaces (``gate_up_proj``, ``down_proj``), whose expert e is rows
e * out ... (e + 1) * out, a contiguous slice of the GGUF bytes (llama.cpp's ``ffn_*_exps`` tensors are laid
out the same way). Being OffloadedLinear modules, the two projections are placed by offload() like any
linear: resident, or streamed with their transformer block through the transfer engine.

The forward computes what transformers' expert implementations compute: for each expert that any token
chose, up (and gate) projection, the class's own gating (``_apply_gate``: SwiGLU for most, gpt-oss's clamped
variant, interleaved or concatenated gate/up rows) or activation, down projection, the optional
post-expert norm, then the routing weight; the contributions are summed per token in fp32. Up to
GROUPED_MAX_PAIRS_PER_EXPERT tokens per expert each projection is one grouped launch over all the (token,
expert) pairs, with the routing read on the device only (a resident layer traces whole under torch.compile
and CUDA graphs); beyond, and when gradients are needed, one device-to-host read of how many tokens each
expert got (as transformers' eager path does) and a qmatmul per chosen expert.
"""

from __future__ import annotations

import itertools
from typing import Mapping

import torch
from torch import nn

from ..formats import QuantizedTensor, get_spec, quantize
from ..formats.quantize import validate_weight
from .offloaded_linear import _FLOAT_DTYPES, OffloadedLinear, check_activations

#: Most (token, chosen expert) pairs per expert, on average, for which the layer runs each projection as one
#: grouped launch (qmatmul_experts, pairs sorted by expert on the device where experts repeat: the grouped
#: expert GEMV up to 4 pairs per expert, the grouped tensor-core GEMM above; no host read of the routing)
#: rather than grouping the tokens by expert on the host (one read of the counts, then a qmatmul per chosen
#: expert and projection, each picking its kernel by its tokens). 64 is where the dense crossover table
#: (kernels.configs.KERNEL_BY_M, measured on an H100) leaves the fused GEMM for dequantize + cuBLAS, whose
#: tensor-core rate is ~3x the fused kernel's: from there an expert's tokens are enough work to pay for its own
#: launches. Qwen3-30B-A3B (8 of 128 experts) is grouped up to 1024 tokens, Mixtral (2 of 8) up to 256. Not
#: measured for experts on a GPU yet (`bench experts` times both paths).
GROUPED_MAX_PAIRS_PER_EXPERT = 64

#: The flags transformers' ``use_experts_implementation`` sets on an experts module.
_EXPERT_FLAGS = ("has_gate", "has_bias", "is_transposed")


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module this package can quantize: it carries the
    ``use_experts_implementation`` flags, an int ``num_experts`` and 3-D float projection parameters."""
    if isinstance(module, OffloadedExperts) or not isinstance(module, nn.Module):
        return False
    if not all(isinstance(getattr(module, f, None), bool) for f in _EXPERT_FLAGS):
        return False
    if getattr(module, "has_post_expert_norm", False) and not isinstance(getattr(module, "post_expert_norm", None),
                                                                         nn.Module):
        return False
    e = getattr(module, "num_experts", None)
    if isinstance(e, bool) or not isinstance(e, int) or e < 1:
        return False
    for name in projection_names(module):
        w = module._parameters.get(name)
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[0] != e or not w.is_floating_point():
            return False
    return True


def projection_names(module: nn.Module) -> tuple[str, str]:
    """The names of an experts module's two projection parameters, in the order they are applied."""
    return ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")


def projection_shape(module: nn.Module, name: str) -> tuple[int, int, int]:
    """(experts, out_features, in_features) of projection ``name``: nn.Linear's order whatever the storage."""
    e, a, b = module._parameters[name].shape
    return (int(e), int(b), int(a)) if module.is_transposed else (int(e), int(a), int(b))


def expert_weight(module: nn.Module, name: str, expert: int) -> torch.Tensor:
    """Expert ``expert``'s (out_features, in_features) matrix of projection ``name`` (a view, detached)."""
    w = module._parameters[name].detach()[expert]
    return w.t() if module.is_transposed else w


def validate_experts(module: nn.Module, qtypes: Mapping[str, str]) -> None:
    """What quantizing ``module``'s projections to ``qtypes`` ({name: qtype}) would reject, raised first."""
    for name, qtype in qtypes.items():
        spec = get_spec(qtype)
        e = projection_shape(module, name)[0]
        for i in range(e):
            try:
                validate_weight(expert_weight(module, name, i), spec)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{name}, expert {i}: {exc}") from exc
        bias = module._parameters.get(f"{name}_bias") if module.has_bias else None
        if bias is not None and bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}_bias dtype must be fp16, bf16 or fp32, got {bias.dtype}")


def quantize_projection(module: nn.Module, name: str, qtype: str,
                        device: "torch.device | str | None" = None) -> QuantizedTensor:
    """Projection ``name`` as one QuantizedTensor of shape (E * out, in), quantized expert by expert (on
    ``device`` if given, else where the weight is), so at most one expert's float matrix is copied at a time."""
    spec = get_spec(qtype)
    e, out, k = projection_shape(module, name)
    parts = []
    for i in range(e):
        w = expert_weight(module, name, i)
        parts.append(quantize(w.to(device) if device is not None else w, spec).data)
    return QuantizedTensor(torch.cat(parts), spec, (e * out, k))


class OffloadedExperts(nn.Module):
    """A transformers experts module with its projections as GGUF-quantized OffloadedLinear children.

    Built by :meth:`from_experts` (offload() does it for every experts module of a model). Keeps the
    original's attributes (``num_experts``, ``act_fn``, the flags, gating constants such as gpt-oss's
    ``alpha``/``limit``) and children other than the projections (``post_expert_norm``), and calls its class's
    ``_apply_gate``.

    state_dict keys: ``<proj>.weight`` (uint8 GGUF bytes of all experts, (E * out, row_bytes)),
    ``<proj>.weight_format`` and, for classes with biases, ``<proj>.bias`` (E * out,). A float checkpoint
    of the original module (``gate_up_proj`` of shape (E, out, in) or its transposed form,
    ``gate_up_proj_bias`` of shape (E, out)) loads too: it is quantized to each projection's format.
    """

    #: The backend of the layer's matmuls (qmatmul's: "auto" is Triton on CUDA and torch elsewhere); tests
    #: set "triton" to run the kernels on CPU tensors under the Triton interpreter.
    kernel_backend = "auto"

    def __init__(self, original: nn.Module, projections: Mapping[str, OffloadedLinear]):
        super().__init__()
        if not is_experts_module(original):
            raise TypeError(f"{type(original).__name__} is not a transformers experts module (it needs the "
                            f"use_experts_implementation flags {', '.join(_EXPERT_FLAGS)}, num_experts and 3-D "
                            f"projection parameters)")
        names = projection_names(original)
        if set(projections) != set(names):
            raise ValueError(f"projections must be exactly {names}, got {tuple(projections)}")
        self.num_experts = original.num_experts
        self._expert_shapes: dict[str, tuple[int, int]] = {}
        for name in names:
            e, out, k = projection_shape(original, name)
            layer = projections[name]
            if not isinstance(layer, OffloadedLinear):
                raise TypeError(f"{name} must be an OffloadedLinear, got {type(layer).__name__}")
            if (layer.out_features, layer.in_features) != (e * out, k):
                raise ValueError(f"{name}: an OffloadedLinear of ({e * out}, {k}) is needed for {e} experts of "
                                 f"({out}, {k}), got ({layer.out_features}, {layer.in_features})")
            if (layer.bias is not None) != bool(original.has_bias):
                raise ValueError(f"{name}: the experts {'have' if original.has_bias else 'have no'} biases but "
                                 f"the OffloadedLinear {'has none' if layer.bias is None else 'has one'}")
            self._expert_shapes[name] = (out, k)
        # The original's plain attributes (flags, act_fn as a function, gating constants, config) and its
        # children other than the projections, so that its class's _apply_gate finds what it reads.
        for key, value in original.__dict__.items():
            if not key.startswith("_") and key != "training":
                self.__dict__.setdefault(key, value)
        self._is_expert_parallel = bool(getattr(original, "_is_expert_parallel", False))
        for key, child in original._modules.items():
            if key not in names:
                self.add_module(key, child)
        for key, p in original._parameters.items():
            if key not in names and key not in {f"{n}_bias" for n in names}:
                self.register_parameter(key, p)
        for key, b in original._buffers.items():
            self.register_buffer(key, b, persistent=key not in original._non_persistent_buffers_set)
        self._apply_gate_fn = type(original)._apply_gate if original.has_gate else None
        self._expert_cache = None              # an ExpertCache when the experts are copied on demand
        self._prefetch_next = None             # (next on-demand experts module, its router): speculative copies
        self._original_class = type(original).__name__
        self.hidden_size = projection_shape(original, names[0])[2]
        for name in names:
            self.add_module(name, projections[name])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_experts(cls, module: nn.Module, qtype: "str | Mapping[str, str]" = "q4_k",
                     device: "torch.device | str | None" = None) -> "OffloadedExperts":
        """Quantize ``module``'s projections (``qtype``: one format, or {projection name: format}, e.g.
        ``{"gate_up_proj": "q4_k", "down_proj": "q6_k"}`` as Q4_K_M files do) on ``device`` if given, else where
        the weights are. Everything is checked first (in_features a multiple of the block, finite weights)."""
        if not is_experts_module(module):
            raise TypeError(f"from_experts expects a transformers experts module (with the "
                            f"use_experts_implementation flags), got {type(module).__name__}")
        names = projection_names(module)
        if isinstance(qtype, Mapping):
            unknown = set(qtype) - set(names)
            missing = set(names) - set(qtype)
            if unknown or missing:
                raise ValueError(f"qtype mapping must name exactly {names}, got {tuple(qtype)}")
            qtypes = {n: get_spec(qtype[n]).name for n in names}
        else:
            qtypes = {n: get_spec(qtype).name for n in names}
        validate_experts(module, qtypes)
        projections = {}
        for name in names:
            qt = quantize_projection(module, name, qtypes[name], device)
            bias = module._parameters.get(f"{name}_bias") if module.has_bias else None
            if bias is not None:
                bias = bias.detach().reshape(-1).to(qt.device)
            projections[name] = OffloadedLinear.from_quantized(qt, bias)
        return cls(module, projections)

    # ------------------------------------------------------------------ properties
    @property
    def qtypes(self) -> dict[str, str]:
        return {name: self._modules[name].qtype for name in self._expert_shapes}

    def expert_weights(self, name: str, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert ``expert``'s dequantized (out_features, in_features) matrix of projection ``name``."""
        out, k = self._expert_shapes[name]
        qt = self._modules[name].quantized_weight()
        return QuantizedTensor(qt.data[expert * out:(expert + 1) * out], qt.spec, (out, k)).dequantize(dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        x, index, weights = self._check_inputs(hidden_states, top_k_index, top_k_weights)
        tokens, k = index.shape
        if 0 < tokens * k <= GROUPED_MAX_PAIRS_PER_EXPERT * self.num_experts and not self._needs_grad(x, weights):
            out = self._forward_grouped(x, index, weights)
        else:
            out = self._forward_by_expert(x, index, weights)
        return out.to(x.dtype).view(hidden_states.shape[:-1] + (out.shape[-1],))

    def _needs_grad(self, x: torch.Tensor, weights: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        biases = (self._modules[name].bias for name in self._expert_shapes)
        return x.requires_grad or weights.requires_grad or any(b is not None and b.requires_grad for b in biases)

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        return self._apply_gate_fn(self, h) if self._apply_gate_fn is not None else self.act_fn(h)

    def _forward_grouped(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Few tokens per expert: each projection is one grouped launch over every (token, chosen expert) pair
        (qmatmul_experts), with no host read of the routing outside eager-mode checks of the ids."""
        from ..kernels.qmatmul_experts import count_out_of_range, qmatmul_experts
        from ..kernels.runtime import capturing

        if self._expert_cache is not None:
            return self._forward_grouped_cached(x, index, weights)
        tokens, k = index.shape
        e_count = self.num_experts
        up_layer, down_layer = (self._modules[name] for name in self._expert_shapes)
        if not capturing(x.device) and not torch.compiler.is_compiling():
            self._check_id_counts(*count_out_of_range(index, e_count))
        if self._is_expert_parallel:            # other ranks' experts (ids >= num_experts) contribute nothing
            local = index < e_count
            index = torch.where(local, index, 0)
            weights = torch.where(local, weights, 0)
        up_bias = None if up_layer.bias is None else up_layer.bias.to(x.dtype)
        down_bias = None if down_layer.bias is None else down_layer.bias.to(x.dtype)
        up_qt, down_qt = up_layer._device_weight(x), down_layer._device_weight(x)
        try:
            h = qmatmul_experts(x, up_qt, index, e_count, up_bias, self.kernel_backend, check_ids=False)
            h = self._gate(h.view(tokens * k, -1)).view(tokens, k, -1)
            y = qmatmul_experts(h, down_qt, index, e_count, down_bias, self.kernel_backend, check_ids=False)
        finally:
            up_layer._release_device_weight()
            down_layer._release_device_weight()
        return self._combine(y, weights)

    def _forward_grouped_cached(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Experts on demand, few tokens per expert: the chosen experts are copied into the cache (one host read
        of the ids says which), then each projection is one grouped launch over the cache's slots (when they all
        fit in it; else expert by expert)."""
        from ..kernels.qmatmul_experts import qmatmul_expert_buffer

        cache = self._check_cache_device(x)
        tokens, k = index.shape
        e_count = self.num_experts
        guess = self._guess_next(x, k)
        ids = index.reshape(-1)
        ids = (ids if guess is None else torch.cat([ids, guess])).tolist()     # one host read for both
        ids, guessed = ids[:tokens * k], ids[tokens * k:]
        self._check_id_counts(sum(i < 0 for i in ids), sum(i >= e_count for i in ids))
        hit = sorted({i for i in ids if i < e_count})
        (up_out, k_up), (down_out, k_down) = self._expert_shapes.values()
        if not hit:                               # every choice is another rank's expert
            self._prefetch(guessed)
            return torch.zeros(tokens, down_out, dtype=torch.float32, device=x.device)
        if len(hit) > cache.num_slots:
            return self._forward_by_expert(x, index, weights, guessed)
        up_layer, down_layer = (self._modules[name] for name in self._expert_shapes)
        with cache.resident(self, hit) as (slot_of, up_bytes, down_bytes):
            # other ranks' experts read some cached expert's (finite) rows and get a zero weight
            slots = torch.tensor([slot_of.get(i, slot_of[hit[0]]) for i in ids], dtype=torch.int32,
                                 device=x.device).view(tokens, k)
            h = qmatmul_expert_buffer(x, up_bytes, up_layer.qtype, up_out, k_up, cache.slot_bytes,
                                      cache.num_slots, slots, self.kernel_backend)
            h = self._add_bias(h, up_layer, index, up_out)
            h = self._gate(h.view(tokens * k, -1)).view(tokens, k, -1)
            y = qmatmul_expert_buffer(h, down_bytes, down_layer.qtype, down_out, k_down, cache.slot_bytes,
                                      cache.num_slots, slots, self.kernel_backend)
        self._prefetch(guessed)
        y = self._add_bias(y, down_layer, index, down_out)
        if self._is_expert_parallel:
            weights = torch.where(index < e_count, weights, 0)
        return self._combine(y, weights)

    def _guess_next(self, x: torch.Tensor, k: int) -> "torch.Tensor | None":
        """With speculative prefetch: the experts the next on-demand layer's router picks for this layer's
        input (k per token, flat), or None."""
        link = self._prefetch_next
        if link is None or not self._expert_cache.prefetch:
            return None
        nxt, router = link
        w = router.weight.detach()
        logits = torch.nn.functional.linear(x.detach().to(device=w.device, dtype=w.dtype), w)
        return logits.topk(min(k, nxt.num_experts), dim=-1).indices.reshape(-1).to(x.device)

    def _prefetch(self, guessed: "list[int] | None") -> None:
        """Copy the guessed experts of the next layer (after this call's kernels were enqueued)."""
        if guessed:
            self._expert_cache.prefetch_experts(self._prefetch_next[0], sorted(set(guessed)))

    def _add_bias(self, y: torch.Tensor, layer: OffloadedLinear, index: torch.Tensor, rows: int) -> torch.Tensor:
        """y (tokens, k, rows) plus each pair's expert's bias (ids >= num_experts: any expert's; their weight is 0)."""
        if layer.bias is None:
            return y
        bias = layer.bias.to(y.dtype).view(self.num_experts, rows)
        return y + bias[index.clamp(max=self.num_experts - 1)]

    def _combine(self, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routing-weighted sum over each token's k experts, in fp32, after the optional post-expert norm."""
        tokens, k, out = y.shape
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y.view(tokens * k, out)).view(tokens, k, out)
        return (y.float() * weights.float()[..., None]).sum(1)

    def _check_id_counts(self, negative: int, over: int) -> None:
        if negative:
            raise ValueError(f"top_k_index holds {negative} negative expert ids")
        if over and not self._is_expert_parallel:
            raise ValueError(f"top_k_index holds {over} expert ids >= num_experts={self.num_experts}")

    def _check_cache_device(self, x: torch.Tensor):
        cache = self._expert_cache
        if x.device.type != cache.device.type:
            raise ValueError(f"hidden_states are on {x.device} but this layer's experts are cached on {cache.device}")
        return cache

    def _forward_by_expert(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                           guessed: "list[int] | None" = None) -> torch.Tensor:
        """Tokens grouped by expert: one sort, one read of the per-expert counts (the only sync), then one
        qmatmul per projection for each expert any token chose, reading each chosen expert once.
        ``guessed``: the next layer's guessed experts, when the caller read them already."""
        from ..kernels import qmatmul

        tokens, k = index.shape
        e_count = self.num_experts
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts_of = torch.bincount(flat.clamp(-1, e_count) + 1, minlength=e_count + 2)
        guess = self._guess_next(x, k) if (guessed is None and self._expert_cache is not None) else None
        bins = (counts_of if guess is None else torch.cat([counts_of, guess])).tolist()   # one host read
        if guess is not None:
            bins, guessed = bins[:e_count + 2], bins[e_count + 2:]
        self._check_id_counts(bins[0], bins[-1])
        counts = bins[1:-1]                      # expert-parallel sentinels (>= num_experts) sort last: skipped
        up_name, down_name = tuple(self._expert_shapes)
        up_layer, down_layer = self._modules[up_name], self._modules[down_name]
        up_out, down_out = self._expert_shapes[up_name][0], self._expert_shapes[down_name][0]
        up_bias = None if up_layer.bias is None else up_layer.bias.to(x.dtype)
        down_bias = None if down_layer.bias is None else down_layer.bias.to(x.dtype)
        hit = [e for e, c in enumerate(counts) if c]
        starts = [0, *itertools.accumulate(counts)]     # each expert's first row of ``order``
        cache = self._expert_cache
        if cache is not None:                    # on demand: the chosen experts, through the device cache
            weights_of = self._check_cache_device(x).experts(self, hit)
        else:
            # Both projections are acquired (and released) once per call whatever the routing: a streamed
            # block's layer uses per forward stay what the streamer learned.
            up_qt, down_qt = up_layer._device_weight(x), down_layer._device_weight(x)
            weights_of = ((e, _rows_of(up_qt, e, up_out), _rows_of(down_qt, e, down_out)) for e in hit)
        out = torch.zeros(tokens, down_out, dtype=torch.float32, device=x.device)
        flat_weights = weights.reshape(-1)
        # Autograd keeps the weight bytes for the backward pass, but a cache slot is reused by later experts:
        # keep private copies of the (quantized, small) bytes of each expert instead.
        keep = cache is not None and torch.is_grad_enabled() and x.requires_grad
        backend = self.kernel_backend
        try:
            for expert, up_w, down_w in weights_of:
                if keep:
                    up_w, down_w = _private_copy(up_w), _private_copy(down_w)
                rows = order[starts[expert]:starts[expert] + counts[expert]]
                token = rows // k
                h = qmatmul(x[token], up_w,
                            None if up_bias is None else up_bias[expert * up_out:(expert + 1) * up_out], backend)
                y = qmatmul(self._gate(h), down_w,
                            None if down_bias is None else down_bias[expert * down_out:(expert + 1) * down_out],
                            backend)
                if getattr(self, "has_post_expert_norm", False):
                    y = self.post_expert_norm(y)
                out.index_add_(0, token, y.float() * flat_weights[rows, None].float())
        finally:
            weights_of.close()
        if cache is None:
            up_layer._release_device_weight()
            down_layer._release_device_weight()
        else:
            self._prefetch(guessed)
        return out

    def _check_inputs(self, hidden_states, top_k_index, top_k_weights):
        check_activations(hidden_states, self.hidden_size, "hidden_states", f"the hidden size {self.hidden_size}")
        x = hidden_states.reshape(-1, self.hidden_size)
        for name, t in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 1 or t.shape[:-1] != hidden_states.shape[:-1]:
                raise ValueError(f"{name} must be (tokens, top_k) for hidden_states of shape "
                                 f"{tuple(hidden_states.shape)}, got shape {tuple(t.shape)}")
            if t.device != hidden_states.device:
                raise ValueError(f"{name} is on {t.device} but hidden_states is on {hidden_states.device}")
        if top_k_index.shape != top_k_weights.shape:
            raise ValueError(f"top_k_index {tuple(top_k_index.shape)} and top_k_weights "
                             f"{tuple(top_k_weights.shape)} must have the same shape")
        if top_k_index.dtype.is_floating_point or top_k_index.dtype in (torch.bool, torch.uint8) \
                or top_k_index.dtype.is_complex:
            raise TypeError(f"top_k_index must hold integer expert ids, got {top_k_index.dtype}")
        if not top_k_weights.is_floating_point():
            raise TypeError(f"top_k_weights must be a float tensor, got {top_k_weights.dtype}")
        k = top_k_index.shape[-1]
        return x, top_k_index.reshape(-1, k).long(), top_k_weights.reshape(-1, k)

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The original module's float parameters (3-D expert stacks, 2-D biases) become the children's
        # nn.Linear-shaped entries, which OffloadedLinear quantizes to its format when it loads them.
        for name, (out, k) in self._expert_shapes.items():
            w = state_dict.get(prefix + name)
            if isinstance(w, torch.Tensor):
                expected = (self.num_experts, k, out) if self.is_transposed else (self.num_experts, out, k)
                if tuple(w.shape) != expected:
                    error_msgs.append(f"{prefix + name}: expert weights of shape {tuple(w.shape)} do not match "
                                      f"{expected}")
                    del state_dict[prefix + name]
                    continue
                w = w.transpose(1, 2) if self.is_transposed else w
                state_dict[f"{prefix}{name}.weight"] = w.reshape(self.num_experts * out, k)
                del state_dict[prefix + name]
            b = state_dict.get(f"{prefix}{name}_bias")
            if isinstance(b, torch.Tensor) and self._modules[name].bias is not None:
                state_dict[f"{prefix}{name}.bias"] = b.reshape(-1)
                del state_dict[f"{prefix}{name}_bias"]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}=({self.num_experts} x {o}, {k}) {self._modules[n].qtype}"
                           for n, (o, k) in self._expert_shapes.items())
        return f"{self._original_class}: num_experts={self.num_experts}, {shapes}"


def _private_copy(qt: QuantizedTensor) -> QuantizedTensor:
    return QuantizedTensor._from_validated(qt.data.clone(), qt.spec, qt.shape)


def _rows_of(qt: QuantizedTensor, expert: int, rows: int) -> QuantizedTensor:
    """Expert ``expert``'s (rows, K) slice of a stacked projection: a view of its bytes."""
    return QuantizedTensor._from_validated(qt.data[expert * rows:(expert + 1) * rows], qt.spec,
                                           (rows, qt.shape[1]))


__all__ = ["OffloadedExperts", "expert_weight", "is_experts_module", "projection_names", "projection_shape",
           "quantize_projection", "validate_experts"]
