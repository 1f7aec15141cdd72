"""OffloadedLinear: a drop-in nn.Linear whose weight is a GGUF-quantized tensor, resident or streamed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from gguf import GGMLQuantizationType
from torch import nn

from ..formats import QuantizedTensor, get_spec, quantize
from .linear_like import is_linear_like, linear_features, linear_weight

if TYPE_CHECKING:  # pragma: no cover
    from ..model.streaming import WeightStreamer

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class OffloadedLinear(nn.Module):
    """y = x @ W.T + b with W held as GGUF blocks (any of formats.QTYPES: the k-quants, q4_0 ... q8_0, iq4_nl).

    The nn.Linear contract: ``in_features``, ``out_features``, optional ``bias``, any leading dims,
    fp16/bf16/fp32 input, output in the input's dtype.

    Placement:
      * ``"resident"``: the quantized bytes live on the module's device (a buffer like any other).
      * ``"streamed"``: the bytes live in the transfer engine's pinned host memory and are copied into a
        device slot for each forward (set up by :func:`offload_kernels.offload`); ``.to()``/``.cuda()``
        leave them on the host.

    state_dict keys: ``weight`` (uint8 GGUF bytes, shape (N, row_bytes)), ``weight_format`` (int64
    tensor [ggml_type, N, K]) and ``bias``: tensors only, so safetensors can store them. Loading a plain
    nn.Linear state dict (a float ``weight``) quantizes it to this module's qtype, or to the qtype a
    ``weight_format`` beside it names (whose shape must be this layer's). Quantized ``weight`` bytes and
    ``weight_format`` must agree (a ``weight_format`` naming another qtype needs that qtype's ``weight``);
    a streamed layer's new bytes are written into the engine's pinned storage in place, also with
    ``assign=True``, and it keeps its byte count (another qtype only if its bytes are the same size).
    A load refused with an error (weight, format or bias of the wrong shape or dtype, a failed copy)
    leaves the layer as it was.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, qtype: str = "q4_k",
                 device: "torch.device | str | None" = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        spec = get_spec(qtype)
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        if in_features % spec.block_size:
            raise ValueError(f"in_features={in_features} is not a multiple of the {spec.name} block size "
                             f"{spec.block_size}")
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bias dtype must be one of fp16/bf16/fp32, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self._spec = spec
        self.register_buffer("weight", torch.zeros(out_features, spec.row_bytes(in_features), dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("weight_format", _format_tensor(spec, out_features, in_features).to(device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._streamer: Optional["WeightStreamer"] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None) -> "OffloadedLinear":
        """Wrap an existing QuantizedTensor (its bytes are used, not copied)."""
        if not isinstance(qt, QuantizedTensor):
            raise TypeError(f"expected a QuantizedTensor, got {type(qt).__name__}")
        n, k = qt.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (n,):
                raise ValueError(f"bias must be a tensor of shape ({n},), got "
                                 f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
            if bias.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"bias dtype must be one of fp16/bf16/fp32, got {bias.dtype}")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_features, mod.out_features, mod._spec = k, n, qt.spec
        mod.register_buffer("weight", qt.data)
        mod.register_buffer("weight_format", _format_tensor(qt.spec, n, k).to(qt.device))
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().to(qt.device), requires_grad=False)
        else:
            mod.register_parameter("bias", None)
        mod._streamer = None
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Module, qtype: str = "q4_k",
                    device: "torch.device | str | None" = None) -> "OffloadedLinear":
        """Quantize an nn.Linear, or a transformers Conv1D (GPT-2's transposed linear), on ``device`` if given,
        else where its weight is. The bias keeps its dtype."""
        if not is_linear_like(linear):
            raise TypeError(f"from_linear expects an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        spec = get_spec(qtype)
        in_features, _ = linear_features(linear)
        if in_features % spec.block_size:
            raise ValueError(f"in_features={in_features} is not a multiple of the {spec.name} block "
                             f"size {spec.block_size}")
        w = linear_weight(linear)
        if device is not None:
            w = w.to(device)
        qt = quantize(w, spec)
        bias = None if linear.bias is None else linear.bias.detach().to(qt.device)
        return cls.from_quantized(qt, bias)

    # ------------------------------------------------------------------ properties
    @property
    def qtype(self) -> str:
        return self._spec.name

    @property
    def bits_per_weight(self) -> float:
        return self._spec.bits_per_weight

    @property
    def placement(self) -> str:
        return "streamed" if self._streamer is not None else "resident"

    @property
    def weight_nbytes(self) -> int:
        return self.weight.numel()

    def quantized_weight(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor over this module's bytes (host bytes when streamed)."""
        return QuantizedTensor(self.weight, self._spec, (self.out_features, self.in_features))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import qmatmul

        check_activations(x, self.in_features, "input", f"in_features={self.in_features}")
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        y = qmatmul(x, self._device_weight(x), bias)
        self._release_device_weight()
        return y

    def _device_weight(self, x: torch.Tensor) -> QuantizedTensor:
        """The weight on ``x``'s device for one use: the resident bytes, or the streamed group's slot bytes,
        valid until :meth:`_release_device_weight` (call it once the kernels reading them are enqueued)."""
        streamer = self._streamer
        if streamer is None:
            if self.weight.device != x.device:
                raise ValueError(f"input is on {x.device} but this layer's weight is on {self.weight.device}; "
                                 f"move one of them")
            return self.quantized_weight()
        data = streamer.weight_bytes(self, x.device)
        if torch.is_grad_enabled() and x.requires_grad:
            # Autograd keeps the weight bytes for the backward pass, but the slot is recycled after this
            # layer: keep a private copy of the (quantized, small) bytes instead.
            data = data.clone()
        # The slot holds exactly the bytes registered (checked when registered): no per-call validation.
        return QuantizedTensor._from_validated(data.view(self.weight.shape), self._spec,
                                               (self.out_features, self.in_features))

    def _release_device_weight(self) -> None:
        if self._streamer is not None:
            self._streamer.after_use(self)    # the slot may be recycled once the kernels enqueued are done

    # ------------------------------------------------------------------ nn.Module plumbing
    def _apply(self, fn, recurse=True):
        if self._streamer is None:
            return super()._apply(fn, recurse)
        # Streamed bytes stay in pinned host memory: only the bias (and format tag) follow .to()/.cuda().
        weight = self._buffers.pop("weight")
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers["weight"] = weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key_w, key_f, key_b = prefix + "weight", prefix + "weight_format", prefix + "bias"
        load = super()._load_from_state_dict
        assign = local_metadata.get("assign_to_params_buffers", False)
        # Everything is checked, and a new qtype's bytes copied to the device, before anything changes: a load
        # rejected with an error leaves this layer as it was. (Missing and unexpected keys are only reported,
        # as torch does for every module: load_state_dict raises for them after loading, unless a post-hook
        # waives them.)
        errors = []
        spec, data = self._spec, None
        if key_w in state_dict or key_f in state_dict:
            try:
                spec, data = self._incoming_weight(state_dict.get(key_w), state_dict.get(key_f))
            except _LoadError as exc:
                errors.append(f"{key_w}: {exc}")
        try:
            self._check_incoming_bias(state_dict.get(key_b, _ABSENT), assign)
        except _LoadError as exc:
            errors.append(f"{key_b}: {exc}")
        if errors:
            error_msgs.extend(errors)
            return
        if key_w not in state_dict and key_f not in state_dict:
            return load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        state_dict = dict(state_dict)
        if key_f in state_dict or data is not None:   # the tag always describes the bytes loaded
            state_dict[key_f] = _format_tensor(spec, self.out_features, self.in_features).to(
                self.weight_format.device)
        if data is None:                    # weight_format alone, naming the format the layer holds
            return load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

        if self._streamer is not None:
            # The bytes live in the engine's pinned storage, which the buffer aliases: write them there in
            # place (with assign=True too, which would otherwise swap in a tensor the engine never reads),
            # once the engine has dropped its device copies and finished the copies in flight.
            try:
                self._streamer.invalidate(self)
            except RuntimeError as exc:
                error_msgs.append(f"{key_w}: {exc}")
                return
            with torch.no_grad():
                self.weight.copy_(data)
            self._spec = spec               # _incoming_weight checked the byte count is unchanged
        elif assign or data.shape != self.weight.shape:
            if not assign:                  # another size: copy to the device first; the swap can't fail
                try:                        # (bytes quantized here are a new tensor already: no second copy)
                    data = data.to(self.weight.device, copy=data is state_dict.get(key_w))
                except Exception as exc:  # noqa: BLE001 - reported like torch's own copy failures
                    error_msgs.append(f"{key_w}: could not copy the {spec.name} bytes to {self.weight.device}: "
                                      f"{exc}")
                    return
            self._buffers["weight"] = data  # with assign: the state dict's tensor itself, as torch does
            self._spec = spec
        else:
            with torch.no_grad():
                self.weight.copy_(data)
            self._spec = spec
        # The weight is loaded: torch loads the rest (bias, format tag) with `weight` neither missing nor
        # loaded again.
        del state_dict[key_w]
        self._non_persistent_buffers_set.add("weight")
        try:
            return load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        finally:
            self._non_persistent_buffers_set.discard("weight")

    def _check_incoming_bias(self, b, assign: bool) -> None:
        """Raises _LoadError where torch would fail to load ``b`` only after this layer's weight changed (or
        where assign=True would install a bias this layer cannot use)."""
        if b is _ABSENT or self.bias is None:   # nothing to load (a bias of a bias-free layer is unexpected)
            return
        if not isinstance(b, torch.Tensor):
            raise _LoadError(f"bias must be a tensor, got {type(b).__name__}")
        if tuple(b.shape) != (self.out_features,):
            raise _LoadError(f"bias of shape {tuple(b.shape)} does not match ({self.out_features},)")
        if not b.is_floating_point() or (assign and b.dtype not in _FLOAT_DTYPES):
            raise _LoadError(f"bias dtype {b.dtype} is not {'fp16/bf16/fp32' if assign else 'a float dtype'}")
        if b.is_meta and not self.bias.is_meta:
            raise _LoadError("bias is a meta tensor, which has no data to load")

    def _incoming_weight(self, w, fmt):
        """The qtype and uint8 bytes (None if the state dict has no weight) a state dict's ``weight`` and
        ``weight_format`` describe, checked against this layer; a float ``weight`` is quantized to the qtype
        ``weight_format`` names, else to the layer's. Raises _LoadError."""
        n, k = self.out_features, self.in_features
        for name, t in (("weight", w), ("weight_format", fmt)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise _LoadError(f"{name} must be a tensor, got {type(t).__name__}")
            if t is not None and t.is_meta and not self.weight.is_meta:
                raise _LoadError(f"{name} is a meta tensor, which has no data to load")
        spec = self._spec
        if fmt is not None:
            try:
                ggml_type, fn, fk = (int(v) for v in fmt.reshape(-1).tolist())
                spec = get_spec(GGMLQuantizationType(ggml_type))
            except (ValueError, TypeError) as exc:
                raise _LoadError(f"invalid weight_format {fmt.tolist()}: {exc}") from None
            if (fn, fk) != (n, k):
                raise _LoadError(f"weight_format shape ({fn}, {fk}) does not match ({n}, {k})")
            if k % spec.block_size:
                raise _LoadError(f"weight_format says {spec.name}, whose block size {spec.block_size} does not "
                                 f"divide in_features={k}")
        if w is None:
            if spec.name != self.qtype:
                raise _LoadError(f"weight_format says {spec.name} but the layer holds {self.qtype} bytes and the "
                                 "state dict has no weight to replace them: load weight and weight_format together")
            return spec, None
        need = (n, spec.row_bytes(k))
        if self._streamer is not None and need != tuple(self.weight.shape):
            raise _LoadError(f"cannot change a streamed layer's qtype from {self.qtype} to {spec.name}: its pinned "
                             f"storage holds {self.weight.numel()} bytes, {spec.name} needs {need[0] * need[1]}")
        if w.is_floating_point():           # a plain nn.Linear checkpoint: quantize it
            if tuple(w.shape) != (n, k):
                raise _LoadError(f"float weight of shape {tuple(w.shape)} does not match ({n}, {k})")
            try:
                # A streamed layer's bytes live on the host, but its streamer's device (a GPU) quantizes
                # far faster than the CPU; the bytes come back to the host view afterwards.
                where = self._streamer.device if self._streamer is not None else self.weight.device
                try:
                    return spec, quantize(w.detach().to(where), spec).data
                except torch.OutOfMemoryError:
                    if self._streamer is None or torch.device(where).type == "cpu":
                        raise
                    # That GPU is filled to the budget by design; the CPU gives the same bytes.
                    return spec, quantize(w.detach().cpu(), spec).data
            except (TypeError, ValueError) as exc:
                raise _LoadError(f"cannot quantize the float weight to {spec.name}: {exc}") from None
        if tuple(w.shape) != need or w.dtype != torch.uint8:
            raise _LoadError(f"weight bytes {tuple(w.shape)} {w.dtype} do not match {spec.name} ({n}, {k}), "
                             f"which needs uint8 {need}")
        return spec, w

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"qtype={self.qtype}, bits_per_weight={self.bits_per_weight:g}, placement={self.placement}")


class _LoadError(ValueError):
    """A state dict this layer cannot load; reported through load_state_dict's error list."""


_ABSENT = object()   # a state dict without the key (None could be a value)


def check_activations(x, features: int, name: str, what: str) -> None:
    """Raise TypeError/ValueError naming what is wrong with activations ``x`` that must be a float tensor
    whose last dimension is ``features`` (``what`` says which size that is)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != features:
        raise ValueError(f"{name}'s last dimension must be {what}, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} dtype must be fp16, bf16 or fp32, got {x.dtype}")


def _format_tensor(spec, n: int, k: int) -> torch.Tensor:
    return torch.tensor([int(spec.ggml_type), n, k], dtype=torch.int64)
