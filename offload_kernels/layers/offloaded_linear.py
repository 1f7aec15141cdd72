"""OffloadedLinear: a drop-in nn.Linear whose weight is a GGUF-quantized tensor, resident or streamed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from gguf import GGMLQuantizationType
from torch import nn

from ..formats import QuantizedTensor, get_spec, quantize

if TYPE_CHECKING:  # pragma: no cover
    from ..model.streaming import WeightStreamer

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class OffloadedLinear(nn.Module):
    """y = x @ W.T + b with W held as GGUF blocks (q4_0, q8_0, q3_k, q4_k, q5_k, q6_k).

    The nn.Linear contract: ``in_features``, ``out_features``, optional ``bias``, any leading dims,
    fp16/bf16/fp32 input, output in the input's dtype.

    Placement:
      * ``"resident"``: the quantized bytes live on the module's device (a buffer like any other).
      * ``"streamed"``: the bytes live in the transfer engine's pinned host memory and are copied into a
        device slot for each forward (set up by :func:`offload_kernels.offload`); ``.to()``/``.cuda()``
        leave them on the host.

    state_dict keys: ``weight`` (uint8 GGUF bytes, shape (N, row_bytes)), ``weight_format`` (int64
    tensor [ggml_type, N, K]) and ``bias``: tensors only, so safetensors can store them. Loading a plain
    nn.Linear state dict (a float ``weight``) quantizes it to this module's qtype.
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
    def from_linear(cls, linear: nn.Linear, qtype: str = "q4_k",
                    device: "torch.device | str | None" = None) -> "OffloadedLinear":
        """Quantize an nn.Linear (on ``device`` if given, else where its weight is). The bias keeps its dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        spec = get_spec(qtype)
        if linear.in_features % spec.block_size:
            raise ValueError(f"in_features={linear.in_features} is not a multiple of the {spec.name} block "
                             f"size {spec.block_size}")
        w = linear.weight.detach()
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

        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension must be in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"input dtype must be fp16, bf16 or fp32, got {x.dtype}")
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        streamer = self._streamer
        if streamer is None:
            if self.weight.device != x.device:
                raise ValueError(f"input is on {x.device} but this layer's weight is on {self.weight.device}; "
                                 f"move one of them")
            return qmatmul(x, self.quantized_weight(), bias)
        data = streamer.weight_bytes(self, x.device)
        if torch.is_grad_enabled() and x.requires_grad:
            # Autograd keeps the weight bytes for the backward pass, but the slot is recycled after this
            # layer: keep a private copy of the (quantized, small) bytes instead.
            data = data.clone()
        qt = QuantizedTensor(data.view(self.weight.shape), self._spec, (self.out_features, self.in_features))
        y = qmatmul(x, qt, bias)
        streamer.after_use(self)           # the slot may be recycled once the kernels above are done
        return y

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
        key_w, key_f = prefix + "weight", prefix + "weight_format"
        if key_w in state_dict:
            incoming = state_dict[key_w]
            if incoming.is_floating_point():                 # a plain nn.Linear checkpoint: quantize it
                if tuple(incoming.shape) != (self.out_features, self.in_features):
                    error_msgs.append(f"{key_w}: float weight of shape {tuple(incoming.shape)} does not match "
                                      f"({self.out_features}, {self.in_features})")
                    return
                qt = quantize(incoming.to(self.weight.device), self._spec)
                state_dict = dict(state_dict)
                state_dict[key_w] = qt.data
                state_dict[key_f] = _format_tensor(self._spec, self.out_features, self.in_features)
            elif key_f in state_dict:
                problem = self._adopt_format(state_dict[key_f], incoming)
                if problem:
                    error_msgs.append(f"{prefix}: {problem}")
                    return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _adopt_format(self, fmt: torch.Tensor, data: torch.Tensor) -> Optional[str]:
        """Switch this module to the state dict's qtype if it differs (resident only). Returns a problem."""
        try:
            ggml_type, n, k = (int(v) for v in fmt.tolist())
            spec = get_spec(GGMLQuantizationType(ggml_type))
        except (ValueError, TypeError) as exc:
            return f"invalid weight_format {fmt.tolist()}: {exc}"
        if (n, k) != (self.out_features, self.in_features):
            return f"weight_format shape ({n}, {k}) does not match ({self.out_features}, {self.in_features})"
        if tuple(data.shape) != (n, spec.row_bytes(k)) or data.dtype != torch.uint8:
            return (f"weight bytes {tuple(data.shape)} {data.dtype} do not match {spec.name} ({n}, {k}), "
                    f"which needs uint8 ({n}, {spec.row_bytes(k)})")
        if spec is not self._spec:
            if self._streamer is not None:
                return f"cannot change a streamed layer's qtype from {self.qtype} to {spec.name} by loading"
            self._spec = spec
            self._buffers["weight"] = torch.empty(n, spec.row_bytes(k), dtype=torch.uint8, device=self.weight.device)
            self._buffers["weight_format"] = _format_tensor(spec, n, k).to(self.weight_format.device)
        return None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"qtype={self.qtype}, bits_per_weight={self.bits_per_weight:g}, placement={self.placement}")


def _format_tensor(spec, n: int, k: int) -> torch.Tensor:
    return torch.tensor([int(spec.ggml_type), n, k], dtype=torch.int64)
