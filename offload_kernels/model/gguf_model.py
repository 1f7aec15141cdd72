"""load_gguf_model: a llama.cpp GGUF file -> a Hugging Face transformers model with offloaded linears.

Every linear is an OffloadedLinear over the file's own quantized bytes (no requantization, no float
copy); embeddings and norms are dequantized to ``dtype``. Everything is checked before anything is
allocated on the GPU: architecture, tensor names, types and shapes, and the file's length.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..formats import QuantizedTensor, dequantize
from ..formats.gguf_io import GGUFError, GGUFFile, GGUFTensorInfo
from ..layers import OffloadedExperts, OffloadedLinear
from ..layers.offloaded_experts import is_experts_module, projection_shape
from .deepseek2 import LatentKVProjection, deepseek2_config, k_b_to_rows
from .gemma import configure_gemma
from .glm4moe import glm4moe_config
from .gpt_oss import gpt_oss_config
from .gguf_rope import read_rope_scaling, require_rope_parameters
from .gguf_vocab import PRE_TOKENIZER_SPLITS, set_pre_tokenizer
from .gguf_names import (DEEPSEEK2_ARCHITECTURES, GEMMA_ARCHITECTURES, GLM4MOE_ARCHITECTURES, GPT_OSS_ARCHITECTURES,
                         SLIDING_WINDOW_ARCHITECTURES, SUPPORTED_ARCHITECTURES, Target, gguf_targets)
from .offload import _on_demand_modules, _report, apply_placement, check_device, check_experts, check_num_slots
from .planner import (BudgetError, LinearSpec, Placement, default_budget, parse_bytes, plan_placement,
                      plan_with_expert_cache)
from .shapes import expert_stack_parts, expert_used_count, gguf_linear_plan, unsupported_type_message

log = logging.getLogger("offload_kernels")

__all__ = ["SUPPORTED_ARCHITECTURES", "load_gguf_model", "load_gguf_tokenizer", "permute_rows", "unpermute_rows"]


def unpermute_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """Gather index undoing llama.cpp's rope permutation of q/k rows: hf_weight = gguf_weight[index].

    Within each head the converter moves row (pair j, i) of the (2, half) layout to (i, pair j) of the
    (half, 2) layout; this index moves it back. Whole rows move, so it is free on quantized data. A q/k
    bias is permuted the same way along its length (entry r belongs to output row r).
    """
    if n_heads <= 0 or n_rows % (2 * n_heads):
        raise GGUFError(f"cannot undo the q/k permutation: {n_rows} rows do not split into {n_heads} heads x 2")
    half = n_rows // n_heads // 2
    return torch.arange(n_rows).view(n_heads, half, 2).transpose(1, 2).reshape(n_rows)


def permute_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`unpermute_rows`: gguf_weight = hf_weight[index] (what llama.cpp's converter does)."""
    return torch.argsort(unpermute_rows(n_rows, n_heads))


def _hf_config(f: GGUFFile):
    """transformers' reading of the metadata, completed where llama.cpp reads more of it.

    Any failure to build the config is a GGUFError naming the file: the metadata is what is wrong.
    """
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if f.architecture in GLM4MOE_ARCHITECTURES:         # transformers' GGUF reader has no glm4moe entry
        config = glm4moe_config(f)
        _set_head_dim(f, config)
        _set_pad_token(f, config)
        _set_rope_scaling(f, config)
        return config
    if f.architecture in DEEPSEEK2_ARCHITECTURES:       # no transformers reader either; its YaRN is its own
        config = deepseek2_config(f)
        _set_pad_token(f, config)
        return config
    if f.architecture in GPT_OSS_ARCHITECTURES:         # its rope and layer pattern are read by gpt_oss_config
        config = gpt_oss_config(f)
        _set_head_dim(f, config)
        _set_pad_token(f, config)
        return config
    try:
        parsed = load_gguf_checkpoint(str(f.path), return_tensors=False)
        cfg = dict(parsed["config"])
        model_type = cfg.pop("model_type")
        cfg.pop("_model_name_or_path", None)
        if model_type == "llama" and _metadata_int(f, "llama.expert_count"):
            model_type = "mixtral"              # llama.cpp's Mixtral files are llamas with experts
        config = AutoConfig.for_model(model_type, **cfg)
    except Exception as exc:  # transformers raises KeyError/ValueError/TypeError... on odd metadata
        raise GGUFError(f"{f.path}: cannot build a transformers config from the file's metadata "
                        f"({type(exc).__name__}: {exc})") from exc
    _set_head_dim(f, config)
    _set_bias_flags(f, config)
    if f.architecture in ("qwen2moe", "qwen3moe") or config.model_type == "mixtral":
        _set_experts(f, config)
    _set_pad_token(f, config)
    _set_sliding_window(f, config)
    if f.architecture in GEMMA_ARCHITECTURES:
        configure_gemma(f, config)
    else:
        _set_rope_scaling(f, config)
    return config


def _set_experts(f: GGUFFile, config) -> None:
    """The experts' count, use per token and width, which transformers' GGUF reader leaves at the config
    class's defaults (all of them for a llama file with experts, the width for qwen3moe), and every block a MoE
    block as llama.cpp builds them."""
    arch = f.architecture
    count = _metadata_int(f, f"{arch}.expert_count")
    if count is None:
        raise GGUFError(f"{f.path}: metadata {arch}.expert_count is missing (the number of experts)")
    used = expert_used_count(f, count)
    width = _metadata_int(f, f"{arch}.expert_feed_forward_length")
    if arch == "llama":       # Mixtral: older files give the experts' width as feed_forward_length only
        width = width or _metadata_int(f, "llama.feed_forward_length")
    if width is None:
        raise GGUFError(f"{f.path}: metadata {arch}.expert_feed_forward_length is missing (the experts' width)")
    if config.model_type == "mixtral":
        config.num_local_experts, config.num_experts_per_tok, config.intermediate_size = count, used, width
        config.sliding_window = None            # llama.cpp's llama graph attends to the whole context
    else:
        config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size = count, used, width
        config.decoder_sparse_step = 1
        config.mlp_only_layers = []
    if arch == "qwen2moe":
        shared = _metadata_int(f, "qwen2moe.expert_shared_feed_forward_length")
        if shared is None:
            raise GGUFError(f"{f.path}: metadata qwen2moe.expert_shared_feed_forward_length is missing (the shared "
                            f"expert's width)")
        config.shared_expert_intermediate_size = shared
        config.norm_topk_prob = False           # llama.cpp's qwen2moe weights the chosen experts unrenormalized


def _set_rope_scaling(f: GGUFFile, config) -> None:
    """Linear or YaRN rope scaling as llama.cpp applies it (gguf_rope), which transformers' GGUF reader drops;
    other scalings are refused by name."""
    scaling = read_rope_scaling(f)
    if scaling is not None:
        require_rope_parameters(f, config, f"{scaling['rope_type']} rope scaling")
        config.rope_parameters = {**(getattr(config, "rope_parameters", None) or {}), **scaling}


def _set_sliding_window(f: GGUFFile, config) -> None:
    """Full-context attention, as llama.cpp computes phi3 files: it reads attention.sliding_window but does
    not apply it (its converters have written unreliable windows for Phi models). transformers' Phi-3 would
    apply the window it finds in the config, so that is cleared, and a declared window only logged."""
    if f.architecture not in SLIDING_WINDOW_ARCHITECTURES:
        return
    window = _metadata_int(f, f"{f.architecture}.attention.sliding_window")
    if window:
        log.info("%s: attention.sliding_window=%d is not applied (llama.cpp does not apply it to %s either); "
                 "beyond %d tokens the logits differ from a sliding-window transformers model", f.path, window,
                 f.architecture, window)
    config.sliding_window = None


def _set_pad_token(f: GGUFFile, config) -> None:
    """The file's padding token, else none: a config class's default (phi3's 32000) may lie outside a smaller
    vocabulary, where the embedding would refuse it as its padding index."""
    pad = f.metadata.get("tokenizer.ggml.padding_token_id")
    vocab = config.vocab_size
    if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < vocab:
        config.pad_token_id = pad
    elif getattr(config, "pad_token_id", None) is not None and not 0 <= config.pad_token_id < vocab:
        config.pad_token_id = None


def _metadata_int(f: GGUFFile, key: str) -> Optional[int]:
    value = f.metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GGUFError(f"{f.path}: metadata {key} must be a positive integer, got {value!r}")
    return value


def _set_head_dim(f: GGUFFile, config) -> None:
    """The head size as llama.cpp reads it: attention.key_length/value_length, else hidden / heads.

    transformers takes llama's head_dim from rope.dimension_count and ignores key_length; the two agree
    only when the whole head is rotated, which is all transformers' llama/mistral/qwen2/qwen3 implement
    (a partially rotated head, as in Phi-4-mini, is refused). GLM-4.5 rotates part of each head: its
    partial_rotary_factor is set from rope.dimension_count.
    """
    arch = f.architecture
    heads, hidden = config.num_attention_heads, config.hidden_size
    if not heads or heads <= 0:
        raise GGUFError(f"{f.path}: metadata {arch}.attention.head_count must be a positive integer")
    default = hidden // heads
    key = _metadata_int(f, f"{arch}.attention.key_length") or default
    value = _metadata_int(f, f"{arch}.attention.value_length") or default
    rope = _metadata_int(f, f"{arch}.rope.dimension_count") or key
    if key != value:
        raise GGUFError(f"{f.path}: attention.key_length {key} != attention.value_length {value}; transformers' "
                        f"{config.model_type} attention needs one head size")
    if rope != key and arch not in GLM4MOE_ARCHITECTURES:
        raise GGUFError(f"{f.path}: rope.dimension_count {rope} != head size {key}: partial rotary embeddings "
                        f"are not supported for {arch}")
    if arch in GLM4MOE_ARCHITECTURES:
        factor = rope / key
        if rope > key or rope % 2 or int(key * factor) != rope:
            raise GGUFError(f"{f.path}: rope.dimension_count {rope} is not an even number of dimensions of the "
                            f"{key}-wide heads")
        config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": factor}
    config.head_dim = key


def _set_bias_flags(f: GGUFFile, config) -> None:
    """llama with biases in every layer: say so in the config (transformers' GGUF reader does not)."""
    if config.model_type != "llama":
        return
    n = config.num_hidden_layers

    def everywhere(shorts):
        return n > 0 and all(f"blk.{i}.{s}.bias" in f for i in range(n) for s in shorts)

    if everywhere(("attn_q", "attn_k", "attn_v", "attn_output")):
        config.attention_bias = True
    if everywhere(("ffn_gate", "ffn_up", "ffn_down")):
        config.mlp_bias = True


def _check_tensor(f: GGUFFile, info: GGUFTensorInfo, target: Target, expected: tuple[int, ...]) -> None:
    if info.shape != expected:
        raise GGUFError(f"{f.path}: tensor {info.name!r} has shape {info.shape}, expected {expected} "
                        f"for {target.hf_name}")
    if info.is_quantized and not info.is_supported:
        raise GGUFError(unsupported_type_message(f, info))


def _validate(f: GGUFFile, targets: dict[str, Target], model: nn.Module, config) -> None:
    """Every file tensor against the module it is meant for: present, shaped and typed as it needs."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for name, target in targets.items():
        info = f.info(name)
        if target.kind in ("linear", "linear_bias"):
            lin = modules.get(target.hf_name)
            if not isinstance(lin, nn.Linear):
                raise GGUFError(_no_such_module(f, name, target, config))
            expected = (lin.out_features, lin.in_features) if target.kind == "linear" else (lin.out_features,)
        elif target.kind in ("embedding", "norm", "router", "sinks"):
            if target.hf_name not in params:
                raise GGUFError(_no_such_module(f, name, target, config))
            expected = tuple(params[target.hf_name].shape)
        elif target.kind == "router_bias":     # a buffer (GLM-4.5's expert selection bias)
            buf = dict(model.named_buffers()).get(target.hf_name)
            if buf is None:
                raise GGUFError(_no_such_module(f, name, target, config))
            expected = tuple(buf.shape)
        elif target.kind == "gate_vector":     # a one-row nn.Linear stored as a vector
            lin = modules.get(target.hf_name)
            if not isinstance(lin, nn.Linear) or lin.out_features != 1:
                raise GGUFError(_no_such_module(f, name, target, config))
            expected = (lin.in_features,)
        elif target.kind in ("latent_k", "latent_v"):
            kv = modules.get(target.hf_name)
            if not isinstance(kv, LatentKVProjection):
                raise GGUFError(_no_such_module(f, name, target, config))
            expected = ((kv.heads, kv.in_features, kv.qk_nope) if target.kind == "latent_k"
                        else (kv.heads, kv.v_head, kv.in_features))
        elif target.kind == "experts":
            experts = modules.get(target.hf_name)
            if experts is None:
                raise GGUFError(_no_such_module(f, name, target, config))
            if not is_experts_module(experts) or not experts.has_gate:
                raise GGUFError(f"{f.path}: tensor {name!r} is an expert stack, but {target.hf_name} is a "
                                f"{type(experts).__name__}, not an experts module holding 3-D stacks with "
                                f"transformers' use_experts_implementation flags (transformers 5 has them)")
            e, rows, cols = projection_shape(experts, "gate_up_proj" if target.part != "down" else "down_proj")
            expected = (e, rows // 2, cols) if target.part in ("gate", "up") else (e, rows, cols)
        elif target.kind == "experts_bias":    # gpt-oss: (experts, rows) biases of one stack
            experts = modules.get(target.hf_name)
            if experts is None or not is_experts_module(experts) or not experts.has_bias:
                raise GGUFError(f"{f.path}: tensor {name!r} is an expert stack's bias, but {target.hf_name} is not "
                                f"an experts module with biases")
            e, rows, _ = projection_shape(experts, "gate_up_proj" if target.part != "down" else "down_proj")
            expected = (e, rows // 2) if target.part in ("gate", "up") else (e, rows)
        else:                                   # rope_freqs: one factor per rotary frequency
            inv = getattr(modules.get(target.hf_name), "inv_freq", None)
            if inv is None:
                raise GGUFError(_no_such_module(f, name, target, config))
            expected = (inv.numel(),)
        _check_tensor(f, info, target, expected)
        if target.kind == "rope_freqs":
            if info.type_name not in ("f32", "f16", "bf16"):
                raise GGUFError(f"{f.path}: tensor {name!r} has type {info.ggml_type.name}; rope frequency "
                                f"factors must be f32, f16 or bf16")
            factors = f.tensor(name).float()
            if not bool(torch.isfinite(factors).all()) or bool((factors <= 0).any()):
                raise GGUFError(f"{f.path}: tensor {name!r} holds non-positive or non-finite rope frequency "
                                f"factors")


def _no_such_module(f: GGUFFile, name: str, target: Target, config) -> str:
    return (f"{f.path}: tensor {name!r} is for {target.hf_name}, which the model described by the file's "
            f"metadata ({config.num_hidden_layers} layers) does not have")


def _place(specs: list[LinearSpec], budget: Optional[int], fixed: int, num_slots: int) -> Placement:
    if specs:
        return plan_placement(specs, budget, fixed, num_slots)
    # No quantized linear (an f32/f16 file): nothing to stream, everything stays on the device.
    if budget is not None and fixed > budget:
        raise BudgetError(f"gpu_budget {budget} bytes is too small: the model's unquantized parameters need "
                          f"{fixed} bytes")
    return Placement([], [], [], fixed, num_slots, 0, {})


def _dense(f: GGUFFile, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A float copy of a non-linear tensor (embeddings, norms, biases may be stored quantized)."""
    t = f.tensor(name)
    if isinstance(t, QuantizedTensor):
        return dequantize(t, dtype).reshape(f.info(name).shape)
    return t.to(dtype, copy=True)


def load_gguf_model(path: "str | os.PathLike[str]", gpu_budget: "int | str | None" = None,
                    dtype: torch.dtype = torch.float16, device: "torch.device | str | None" = None, *,
                    num_slots: int = 2, measure: bool = False, return_report: bool = False,
                    experts: str = "with_block", expert_cache_slots: Optional[int] = None,
                    expert_prefetch: bool = False):
    """Build a transformers causal LM from a llama.cpp GGUF file, linears over the file's quantized bytes.

    Architectures: llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3 (text), and the mixture-of-experts
    qwen2moe, qwen3moe, glm4moe (GLM-4.5, GLM-4.5-Air: model/glm4moe.py), gpt-oss (gpt-oss-20b, gpt-oss-120b:
    model/gpt_oss.py), deepseek2 (DeepSeek-V3, R1, Kimi K2, DeepSeek-V2-Lite: model/deepseek2.py; latent attention)
    and Mixtral (a llama file with ``llama.expert_count``), whose experts become
    :class:`~offload_kernels.OffloadedExperts` over the file's expert stacks. Layers within ``gpu_budget``
    (bytes or "20GiB"; None: as for :func:`offload`, the free device memory less a margin) stay resident on
    the device, the rest stream through the transfer engine; ``experts="on_demand"`` copies a MoE file's
    experts only when chosen, through a device cache (as :func:`offload` does; ``expert_prefetch`` as there).
    Returns the model (and the
    OffloadReport when ``return_report``). Raises GGUFError for unsupported or malformed files before
    anything is allocated on the device.
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype must be fp16, bf16 or fp32, got {dtype}")
    budget = parse_bytes(gpu_budget)
    device = check_device(device)
    check_num_slots(num_slots)
    check_experts(experts, expert_cache_slots, expert_prefetch)
    if budget is None:
        budget = default_budget(device)
    with GGUFFile(path) as f:     # closing drops only our reference: the layers' views keep the mapping
        return _load(f, budget, dtype, device, num_slots, measure, return_report, experts, expert_cache_slots,
                     expert_prefetch)


def _load(f: GGUFFile, budget, dtype, device, num_slots, measure, return_report, experts="with_block",
          expert_cache_slots=None, expert_prefetch=False):
    arch = f.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{f.path}: architecture {arch!r} is not supported (supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    config = _hf_config(f)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    targets = gguf_targets(f)
    blocks = {t.hf_name.split(".")[2] for t in targets.values() if t.hf_name.startswith("model.layers.")}
    if config.num_hidden_layers > len(blocks):      # also keeps an absurd block_count from building for ages
        raise GGUFError(f"{f.path}: block_count is {config.num_hidden_layers} but the file has tensors for "
                        f"{len(blocks)} blocks")

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # e.g. a rope base of the wrong type only fails when the rotary table is built
        raise GGUFError(f"{f.path}: cannot build the transformers model the metadata describes "
                        f"({type(exc).__name__}: {exc})") from exc

    _use_latent_kv(model, targets, config)

    # ---------------------------------------------------------------- validate every tensor first
    _validate(f, targets, model, config)
    elem = torch.tensor([], dtype=dtype).element_size()
    plan = gguf_linear_plan(f, targets, elem)      # the same function gives the planner's inventory
    params = dict(model.named_parameters())
    gate_vectors = {t.hf_name: n for n, t in targets.items() if t.kind == "gate_vector"}
    latent_k = {f"{t.hf_name}.k_proj": n for n, t in targets.items() if t.kind == "latent_k"}
    expected_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = expected_linears - set(plan.sources) - set(gate_vectors) - set(latent_k)
    if missing:
        raise GGUFError(f"{f.path}: missing weights for {', '.join(sorted(missing)[:8])}")
    bias_sources = {t.hf_name: n for n, t in targets.items() if t.kind == "linear_bias"}
    covered = {t.hf_name for t in targets.values()}
    missing_experts = [n for n, m in model.named_modules() if is_experts_module(m) and n not in plan.experts]
    if missing_experts:
        raise GGUFError(f"{f.path}: missing expert weights (ffn_*_exps) for {', '.join(missing_experts[:8])}")
    _check_expert_biases(f, model, plan.experts)
    missing_params = [n for n in params if n not in covered and n.rpartition(".")[0] not in expected_linears
                      and n.rpartition(".")[0] not in plan.experts]
    missing_bias = [n for n in params if n.endswith(".bias") and n.rpartition(".")[0] in expected_linears
                    and n.rpartition(".")[0] not in bias_sources]
    if arch not in DEEPSEEK2_ARCHITECTURES:     # llama.cpp's deepseek2 routes without exp_probs_b when a file has none
        missing_params += [n for n, _ in model.named_buffers()      # GLM-4.5's expert selection biases
                           if n.endswith(".e_score_correction_bias") and n not in covered]
    if missing_params or missing_bias:
        raise GGUFError(f"{f.path}: missing tensors for {', '.join(sorted(missing_params + missing_bias)[:8])}")

    # ---------------------------------------------------------------- plan before touching the device
    quantized = {s.name for s in plan.specs}
    on_demand = experts == "on_demand" and bool(plan.experts)
    if on_demand:
        placement = plan_with_expert_cache(
            plan.specs, [f"{hf}.{p}" for hf in plan.experts for p in ("gate_up_proj", "down_proj")], budget,
            plan.fixed_bytes, num_slots, True, expert_cache_slots)
    else:
        placement = _place(plan.specs, budget, plan.fixed_bytes, num_slots)

    # ---------------------------------------------------------------- build
    layers: dict[str, OffloadedLinear] = {}
    unpermute: dict[str, torch.Tensor] = {}     # layer -> row gather, applied once the bytes are placed
    for hf, src in plan.sources.items():
        qk = targets[src].qk
        heads = n_heads if qk == "q" else n_kv if qk == "k" else 0
        bias = _dense(f, bias_sources[hf], dtype) if hf in bias_sources else None
        if bias is not None and heads:         # the converter permuted the bias like the weight rows
            bias = bias[unpermute_rows(bias.shape[0], heads)]
        if hf in quantized:
            new = OffloadedLinear.from_quantized(f.tensor(src), bias)     # over the mapped file bytes
            if heads:
                unpermute[hf] = unpermute_rows(new.out_features, heads)
        else:                                   # float linear in the file: kept as nn.Linear in dtype
            w = f.tensor(src)
            w = w.reshape(-1, w.shape[-1])      # (an MLA file's attn_v_b is heads x rows x columns)
            w = w[unpermute_rows(w.shape[0], heads)].to(dtype) if heads else w.to(dtype, copy=True)
            new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=dtype)
            new.weight = nn.Parameter(w, requires_grad=False)
            if bias is not None:
                new.bias = nn.Parameter(bias, requires_grad=False)
        parent, _, attr = hf.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        if isinstance(new, OffloadedLinear):
            layers[hf] = new
    for hf, parts in plan.experts.items():
        original = model.get_submodule(hf)
        projections = _expert_projections(f, parts, original)
        parent, _, attr = hf.rpartition(".")
        setattr(model.get_submodule(parent), attr, OffloadedExperts(original, projections))
        for proj, layer in projections.items():
            layers[f"{hf}.{proj}"] = layer
    for name, target in targets.items():
        if target.kind == "norm" and arch in GEMMA_ARCHITECTURES:
            # the file holds 1 + w (gguf_names.GEMMA_ARCHITECTURES); exact when the gain lies in [0.5, 2]
            _set_parameter(model, target.hf_name, (_dense(f, name, torch.float32) - 1.0).to(dtype))
        elif target.kind in ("embedding", "norm", "router", "sinks"):
            _set_parameter(model, target.hf_name, _dense(f, name, dtype))
        elif target.kind == "gate_vector":
            _set_parameter(model, target.hf_name + ".weight", _dense(f, name, dtype).reshape(1, -1))
        elif target.kind == "latent_k":         # dequantized once: its quantized rows run along the wrong axis
            _set_parameter(model, target.hf_name + ".k_proj.weight", k_b_to_rows(_dense(f, name, torch.float32))
                           .to(dtype))
        elif target.kind == "router_bias":     # kept in float32, as transformers keeps it
            parent, _, attr = target.hf_name.rpartition(".")
            setattr(model.get_submodule(parent), attr, _dense(f, name, torch.float32))
        elif target.kind == "rope_freqs":
            _apply_rope_freqs(model, f.tensor(name).float())
    if plan.tied:
        model.config.tie_word_embeddings = False   # lm_head has its own copy or the embedding's quantized bytes

    apply_placement(model, layers, placement, device, _on_demand_modules(model, placement), expert_prefetch)
    # Undo llama.cpp's q/k row order where the bytes now live (device memory, the engine's pinned storage,
    # or copy-on-write pages of the mapping): one tensor-sized temporary at a time, never a host copy of
    # the model. Views of the mapping keep it alive only as long as a layer still reads from it.
    for hf, rows in unpermute.items():
        w = layers[hf].weight
        w.copy_(w.index_select(0, rows.to(w.device)))
    model.eval()
    report = _report(device, "gguf", placement, {n: layers[n].qtype for n in layers}, {}, plan.specs, measure,
                     (1, 8, 64, 512))
    report.experts = list(plan.experts)
    return (model, report) if return_report else model


def _use_latent_kv(model: nn.Module, targets: dict[str, Target], config) -> None:
    """An MLA file's split attn_k_b/attn_v_b: the blocks' kv_b_proj become LatentKVProjection modules (on the meta
    device, like the rest of the model until its tensors are set)."""
    for hf in {t.hf_name for t in targets.values() if t.kind in ("latent_k", "latent_v")}:
        parent, _, attr = hf.rpartition(".")
        setattr(model.get_submodule(parent), attr, LatentKVProjection(
            config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank,
            dtype=model.dtype, device="meta"))


def _check_expert_biases(f: GGUFFile, model: nn.Module, experts: dict[str, dict[str, str]]) -> None:
    """Every stack's bias for experts modules that have biases (gpt-oss): without them the layer would be built
    wrong, not fail."""
    for hf, parts in experts.items():
        if not getattr(model.get_submodule(hf), "has_bias", False):
            continue
        missing = [parts[p].replace(".weight", ".bias") for p in expert_stack_parts(f, hf, parts)
                   if f"{p}_bias" not in parts]
        if missing:
            raise GGUFError(f"{f.path}: missing tensors for {hf}'s biases: {', '.join(missing)}")


def _expert_projections(f: GGUFFile, parts: dict[str, str], original: nn.Module) -> dict[str, OffloadedLinear]:
    """An experts module's gate_up_proj and down_proj over the file's stacks (and their biases, if it has them).

    gate_up_proj joins each expert's gate and up rows as the module's class keeps them: concatenated (gate rows,
    then up rows) or, where ``is_concatenated`` is False (gpt-oss), interleaved (gate row i, then up row i).
    Whole rows move, so this is one host copy of the two stacks whatever their block format; a fused
    ffn_gate_up_exps (gate rows then up rows) is already the concatenated layout, a view of the file's bytes as
    down_proj is.
    """
    down = f.tensor(parts["down"])
    e = f.info(parts["down"]).shape[0]
    interleaved = not getattr(original, "is_concatenated", True)
    if "gate_up" in parts:
        first = f.tensor(parts["gate_up"])
        gate_rows, up_rows = first.data.view(e, 2, -1, first.row_bytes).unbind(1)
    else:
        first, up = f.tensor(parts["gate"]), f.tensor(parts["up"])
        gate_rows, up_rows = first.data.view(e, -1, first.row_bytes), up.data.view(e, -1, up.row_bytes)
    if "gate_up" in parts and not interleaved:
        gate_up = first                                             # the file's bytes as they are
    else:
        joined = _join_gate_up(gate_rows, up_rows, interleaved).reshape(-1, first.row_bytes)
        gate_up = QuantizedTensor(joined, first.spec, (joined.shape[0], first.shape[1]))
    biases = {"gate_up_proj": None, "down_proj": None}
    if original.has_bias:
        dtype = original.gate_up_proj_bias.dtype
        if "gate_up" in parts:
            gate_b, up_b = _dense(f, parts["gate_up_bias"], dtype).view(e, 2, -1, 1).unbind(1)
        else:
            gate_b, up_b = (_dense(f, parts[f"{p}_bias"], dtype).unsqueeze(-1) for p in ("gate", "up"))
        biases = {"gate_up_proj": _join_gate_up(gate_b, up_b, interleaved).reshape(-1),
                  "down_proj": _dense(f, parts["down_bias"], dtype).reshape(-1)}
    return {"gate_up_proj": OffloadedLinear.from_quantized(gate_up, biases["gate_up_proj"]),
            "down_proj": OffloadedLinear.from_quantized(down, biases["down_proj"])}


def _join_gate_up(gate: torch.Tensor, up: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """(experts, 2 * rows, ...) from two (experts, rows, ...) stacks: per expert all gate rows then all up rows,
    or, ``interleaved``, gate row i then up row i."""
    joined = torch.stack([gate, up], dim=2 if interleaved else 1)
    return joined.reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:])


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, nn.Parameter(value, requires_grad=False))


def _apply_rope_freqs(model: nn.Module, freqs: torch.Tensor) -> None:
    """llama.cpp's rope frequency factors divide each rotary frequency (Llama 3.1-style scaling)."""
    rotary = model.get_submodule("model.rotary_emb")
    inv = rotary.inv_freq
    if inv.shape != freqs.shape:
        raise GGUFError(f"rope_freqs has {freqs.numel()} factors, the model has {inv.numel()} rotary frequencies")
    rotary.inv_freq = (inv.float() / freqs.to(inv.device)).to(inv.dtype)
    if hasattr(rotary, "original_inv_freq"):
        rotary.original_inv_freq = rotary.inv_freq


def load_gguf_tokenizer(path: "str | os.PathLike[str]"):
    """A transformers tokenizer built from the GGUF file's tokenizer metadata, tokenizing as llama.cpp does (but
    for gpt-4o's pre-tokenizer: the model's own regex, which llama.cpp approximates with ASCII case classes).

    transformers' AutoTokenizer reads the model's config from the file first, which it cannot for some
    architectures (glm4moe, gpt-oss); their tokenizer is built from the tokenizer metadata alone (a
    ``PreTrainedTokenizerFast``). A byte-level vocabulary whose pre-tokenizer is one of
    ``gguf_vocab.PRE_TOKENIZER_SPLITS`` gets that split (transformers has no "glm4" split and would fall back to
    GPT-2's)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    with GGUFFile(path) as f:                 # a missing or unreadable file fails here, naming itself
        kind = f.metadata.get("tokenizer.ggml.model")
        pre = f.metadata.get("tokenizer.ggml.pre")
    if kind is None:
        raise GGUFError(f"{path}: no tokenizer metadata (tokenizer.ggml.model)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception:        # its config step, for architectures transformers does not read (a failure here chains it)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    if kind == "gpt2" and pre is not None and not set_pre_tokenizer(tokenizer, str(pre)) and pre != "gpt-2":
        # transformers then splits as GPT-2 does, llama.cpp by the regexes it keeps for that name
        log.warning("%s: pre-tokenizer %r is not one whose split this package knows (%s); text is split as GPT-2 "
                    "splits it, and token ids may differ from llama.cpp's", path, pre, ", ".join(PRE_TOKENIZER_SPLITS))
    return tokenizer
