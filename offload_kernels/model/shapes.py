"""Layer inventories of models for planning: from presets, a transformers config, or a GGUF file."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from ..formats import LLAMA_QUANTIZE_FALLBACKS, QTYPES, get_spec
from ..formats.gguf_io import GGUFError, GGUFFile
from .gguf_names import EMBEDDING, Target, gguf_targets
from .planner import LinearSpec


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that determine a llama-family decoder's linear layers (and, for a mixture-of-experts model
    such as Mixtral or Qwen3-MoE, its experts: every block's feed-forward is ``experts`` experts of width
    ``expert_intermediate``, ``experts_per_token`` of them used per token, instead of a dense MLP; for a
    latent-attention model such as DeepSeek-V3, ``kv_lora_rank`` > 0 and the attention's latent sizes)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    arch: str = "llama"           # the transformers model_type the benchmark builds for this shape
    shared_intermediate: int = 0  # MoE: the width of a shared expert beside the routed ones (0: none)
    dense_layers: int = 0         # MoE: the first blocks keep a dense MLP of width ``intermediate``
    expert_qtype: str | None = None   # MoE: the format the published files keep the routed experts in, if fixed
    # multi-head latent attention (DeepSeek-V2/V3, Kimi K2): q (through a q_lora_rank latent unless 0) and k/v
    # through a kv_lora_rank latent; heads of qk_nope_dim + qk_rope_dim key and v_head_dim value dimensions
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0

    @property
    def kv_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.kv_heads

    @property
    def q_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.heads


#: The format of a preset's or config's linears unless one is asked for (the common Q4_K_M files' main one).
DEFAULT_QTYPE = "q4_k"

PRESETS: dict[str, LlamaShape] = {
    "llama-3-8b": LlamaShape(4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": LlamaShape(8192, 28672, 80, 64, 8, 128256),
    "llama-2-13b": LlamaShape(5120, 13824, 40, 40, 40, 32000),
    "mistral-7b": LlamaShape(4096, 14336, 32, 32, 8, 32768),
    "qwen2-7b": LlamaShape(3584, 18944, 28, 28, 4, 152064),
    "qwen2-72b": LlamaShape(8192, 29568, 80, 64, 8, 152064),
    "qwen3-8b": LlamaShape(4096, 12288, 36, 32, 8, 151936, head_dim=128),
    "qwen3-32b": LlamaShape(5120, 25600, 64, 64, 8, 151936, head_dim=128),   # q is 64 x 128 = 8192 wide
    # Gemma: lm_head is the tied embedding (in GGUF one quantized token_embd serves both)
    "gemma-2-27b": LlamaShape(4608, 36864, 46, 32, 16, 256000, head_dim=128),
    "gemma-3-12b": LlamaShape(3840, 15360, 48, 16, 8, 262208, head_dim=256),
    "gemma-3-27b": LlamaShape(5376, 21504, 62, 32, 16, 262208, head_dim=128),
    # Mixture of experts: all experts' bytes are stored (and streamed), k/E of them used per token
    "mixtral-8x7b": LlamaShape(4096, 14336, 32, 32, 8, 32000, experts=8, experts_per_token=2,
                               expert_intermediate=14336, arch="mixtral"),
    "qwen3-30b-a3b": LlamaShape(2048, 6144, 48, 32, 4, 151936, head_dim=128, experts=128, experts_per_token=8,
                                expert_intermediate=768, arch="qwen3_moe"),
    "qwen3-235b-a22b": LlamaShape(4096, 12288, 94, 64, 4, 151936, head_dim=128, experts=128, experts_per_token=8,
                                  expert_intermediate=1536, arch="qwen3_moe"),
    # GLM-4.5: dense first block(s), a shared expert beside the routed ones in the others
    "glm-4.5-air": LlamaShape(4096, 10944, 46, 96, 8, 151552, head_dim=128, experts=128, experts_per_token=8,
                              expert_intermediate=1408, arch="glm4_moe", shared_intermediate=1408, dense_layers=1),
    "glm-4.5": LlamaShape(5120, 12288, 92, 96, 8, 151552, head_dim=128, experts=160, experts_per_token=8,
                          expert_intermediate=1536, arch="glm4_moe", shared_intermediate=1536, dense_layers=3),
    # latent attention (q and kv through latents) and DeepSeek's routed + shared experts after dense first blocks
    "deepseek-v3": LlamaShape(7168, 18432, 61, 128, 128, 129280, experts=256, experts_per_token=8,
                              expert_intermediate=2048, arch="deepseek_v3", shared_intermediate=2048, dense_layers=3,
                              q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128),
    "kimi-k2": LlamaShape(7168, 18432, 61, 64, 64, 163840, experts=384, experts_per_token=8, expert_intermediate=2048,
                          arch="deepseek_v3", shared_intermediate=2048, dense_layers=1, q_lora_rank=1536,
                          kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128),
    "deepseek-v2-lite": LlamaShape(2048, 10944, 27, 16, 16, 102400, experts=64, experts_per_token=6,
                                   expert_intermediate=1408, arch="deepseek_v2", shared_intermediate=2816,
                                   dense_layers=1, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128),
    # gpt-oss: every block MoE, 4 experts of 2880 x 2880 per token; 2880 is no multiple of 256, so k-quant
    # formats fall back as llama-quantize's do (q4_k -> q5_0, ...; the published files keep the experts in MXFP4)
    "gpt-oss-20b": LlamaShape(2880, 2880, 24, 64, 8, 201088, head_dim=64, experts=32, experts_per_token=4,
                              expert_intermediate=2880, arch="gpt_oss", expert_qtype="mxfp4"),
    "gpt-oss-120b": LlamaShape(2880, 2880, 36, 64, 8, 201088, head_dim=64, experts=128, experts_per_token=4,
                               expert_intermediate=2880, arch="gpt_oss", expert_qtype="mxfp4"),
}


def transformers_config(shape: LlamaShape, layers: "int | None" = None, vocab: "int | None" = None,
                        max_positions: int = 8192):
    """The transformers config of a model of ``shape`` (its ``arch``: llama, mixtral, qwen3_moe, glm4_moe, gpt_oss,
    deepseek_v3 or deepseek_v2), untied embeddings, optionally fewer ``layers`` or another ``vocab``."""
    from transformers import AutoConfig

    extra = {"head_dim": shape.head_dim} if shape.head_dim else {}
    if shape.arch == "mixtral":
        extra.update(num_local_experts=shape.experts, num_experts_per_tok=shape.experts_per_token)
    elif shape.arch == "qwen3_moe":
        extra.update(num_experts=shape.experts, num_experts_per_tok=shape.experts_per_token,
                     moe_intermediate_size=shape.expert_intermediate, norm_topk_prob=True)
    elif shape.arch == "glm4_moe":
        extra.update(n_routed_experts=shape.experts, num_experts_per_tok=shape.experts_per_token,
                     moe_intermediate_size=shape.expert_intermediate, norm_topk_prob=True,
                     n_shared_experts=max(1, shape.shared_intermediate // shape.expert_intermediate),
                     first_k_dense_replace=shape.dense_layers)
    elif shape.arch == "gpt_oss":          # its experts' width is intermediate_size
        extra.update(num_local_experts=shape.experts, num_experts_per_tok=shape.experts_per_token)
    elif shape.arch in ("deepseek_v3", "deepseek_v2"):
        extra = dict(n_routed_experts=shape.experts, num_experts_per_tok=shape.experts_per_token,
                     moe_intermediate_size=shape.expert_intermediate, first_k_dense_replace=shape.dense_layers,
                     n_shared_experts=max(1, shape.shared_intermediate // shape.expert_intermediate),
                     q_lora_rank=shape.q_lora_rank or None, kv_lora_rank=shape.kv_lora_rank,
                     qk_nope_head_dim=shape.qk_nope_dim, qk_rope_head_dim=shape.qk_rope_dim,
                     v_head_dim=shape.v_head_dim, n_group=1, topk_group=1)
    return AutoConfig.for_model(
        shape.arch, vocab_size=vocab or shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=layers or shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=max_positions, tie_word_embeddings=False,
        **extra)


@dataclass(frozen=True)
class ModelInventory:
    name: str
    linears: list[LinearSpec]
    fixed_bytes: int              # embeddings and norms at fp16 (always resident)


def llama_inventory(shape: LlamaShape, qtype: str = DEFAULT_QTYPE, lm_head_qtype: str | None = "q6_k",
                    name: str = "model", expert_qtype: str | None = None) -> ModelInventory:
    """Linears of a llama-family model quantized to ``qtype`` (lm_head to ``lm_head_qtype``, None = fp16; a MoE
    model's routed experts to ``expert_qtype`` if given); a linear whose rows that format's blocks cannot tile
    takes llama-quantize's fallback (LLAMA_QUANTIZE_FALLBACKS, as save_gguf does), else stays fp16."""
    get_spec(qtype)
    expert_qtype = get_spec(expert_qtype).name if expert_qtype is not None else qtype
    h, q, kv, f = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    e, k_used, w = shape.experts, shape.experts_per_token, shape.expert_intermediate
    if e and not (1 <= k_used <= e and w > 0):
        raise ValueError(f"a MoE shape needs 1 <= experts_per_token <= experts and an expert width, got {shape}")
    linears = []
    attention = _mla_linears(shape) if shape.kv_lora_rank else (
        ("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
        ("self_attn.o_proj", h, q))
    for i in range(shape.layers):
        g = f"model.layers.{i}"
        for short, n, k in attention:
            linears.append(LinearSpec(f"{g}.{short}", n, k, qtype, g))
        if e and i >= shape.dense_layers:
            moe = dict(num_experts=e, experts_per_token=k_used)
            linears.append(LinearSpec(f"{g}.mlp.experts.gate_up_proj", e * 2 * w, h, expert_qtype, g, **moe))
            linears.append(LinearSpec(f"{g}.mlp.experts.down_proj", e * h, w, expert_qtype, g, **moe))
            sw = shape.shared_intermediate
            shared = ("shared_experts" if shape.arch in ("glm4_moe", "deepseek_v3", "deepseek_v2")   # transformers'
                      else "shared_expert")                                                      # names
            if sw:
                for short, n, k in (("gate_proj", sw, h), ("up_proj", sw, h), ("down_proj", h, sw)):
                    linears.append(LinearSpec(f"{g}.mlp.{shared}.{short}", n, k, qtype, g))
            continue
        for short, n, k in (("mlp.gate_proj", f, h), ("mlp.up_proj", f, h), ("mlp.down_proj", h, f)):
            linears.append(LinearSpec(f"{g}.{short}", n, k, qtype, g))
    linears.append(LinearSpec("lm_head", shape.vocab, h, lm_head_qtype, ""))
    linears = [replace(lin, qtype=_tiling_format(lin.qtype, lin.in_features)) for lin in linears]
    moe_layers = shape.layers - shape.dense_layers if e else 0
    latent_norms = shape.layers * (shape.q_lora_rank + shape.kv_lora_rank)
    fixed = 2 * (shape.vocab * h + (2 * shape.layers + 1) * h + moe_layers * e * h     # routers: E x H each
                 + latent_norms)
    return ModelInventory(name, linears, fixed)


def _mla_linears(shape: LlamaShape) -> tuple[tuple[str, int, int], ...]:
    """A latent-attention block's linears (transformers' deepseek_v3 names), kv_b_proj whole, as offload() of the
    transformers model quantizes it (an MLA GGUF file's k half is held dequantized instead: gguf_inventory)."""
    h, heads, qk = shape.hidden, shape.heads, shape.qk_nope_dim + shape.qk_rope_dim
    if not (shape.qk_nope_dim > 0 and shape.qk_rope_dim > 0 and shape.v_head_dim > 0):
        raise ValueError(f"a latent-attention shape needs positive qk_nope_dim, qk_rope_dim and v_head_dim, "
                         f"got {shape}")
    q = ((("self_attn.q_a_proj", shape.q_lora_rank, h), ("self_attn.q_b_proj", heads * qk, shape.q_lora_rank))
         if shape.q_lora_rank else (("self_attn.q_proj", heads * qk, h),))
    return (*q, ("self_attn.kv_a_proj_with_mqa", shape.kv_lora_rank + shape.qk_rope_dim, h),
            ("self_attn.kv_b_proj", heads * (shape.qk_nope_dim + shape.v_head_dim), shape.kv_lora_rank),
            ("self_attn.o_proj", h, heads * shape.v_head_dim))


def _tiling_format(qtype: str | None, in_features: int) -> str | None:
    """``qtype`` if its blocks tile rows of ``in_features`` weights, else llama-quantize's fallback if that does,
    else None (kept fp16)."""
    for q in (qtype, LLAMA_QUANTIZE_FALLBACKS.get(qtype or "")):
        if q is not None and in_features % get_spec(q).block_size == 0:
            return q
    return None


@dataclass(frozen=True)
class GGUFLinearPlan:
    """What loading a GGUF file puts where; :func:`load_gguf_model` and :func:`gguf_inventory` both use it."""

    sources: dict[str, str]       # transformers linear -> the GGUF tensor holding its weight
    specs: list[LinearSpec]       # the quantized linears: OffloadedLinears over the file bytes (placeable)
    fixed_bytes: int              # always on the device: embeddings, norms, biases, float linears
    tied: bool                    # no output.weight: lm_head is a linear over token_embd.weight
    experts: dict[str, dict[str, str]] = field(default_factory=dict)  # experts module -> {part: GGUF tensor}
    #                                     (parts "gate", "up", "down", and "gate_bias", ... where the file has them)


_FLOAT_LINEAR_TYPES = ("F32", "F16", "BF16")


def gguf_linear_plan(f: GGUFFile, targets: "Mapping[str, Target]", elem_bytes: int = 2) -> GGUFLinearPlan:
    """The linears of a GGUF file as the loader builds them, and the bytes that stay on the device.

    Quantized linears (lm_head over a quantized token_embd when tied, too) become LinearSpecs with the
    file's own types; float linears are kept as nn.Linear in the model dtype, so like embeddings, norms
    and biases they count toward ``fixed_bytes`` at ``elem_bytes`` per element, as does an MLA file's attn_k_b
    (dequantized: deepseek2.LatentKVProjection).
    """
    sources = {t.hf_name: name for name, t in targets.items() if t.kind == "linear"}
    # an MLA file's attn_v_b (heads x v_head x latent): the rows of its LatentKVProjection's v_proj
    sources.update({f"{t.hf_name}.v_proj": name for name, t in targets.items() if t.kind == "latent_v"})
    tied = "lm_head" not in sources and EMBEDDING in targets
    if tied:                       # llama.cpp then computes the logits with the embedding matrix
        sources["lm_head"] = EMBEDDING
    specs, fixed = [], 0
    for hf, src in sources.items():
        info = f.info(src)
        shape = info.shape
        if targets.get(src) is not None and targets[src].kind == "latent_v" and len(shape) == 3:
            shape = (shape[0] * shape[1], shape[2])
        if len(shape) != 2:
            raise GGUFError(f"{f.path}: tensor {src!r} has shape {info.shape}, a linear weight must be 2-D")
        if info.is_quantized:
            if not info.is_supported:
                raise GGUFError(unsupported_type_message(f, info))
            specs.append(LinearSpec(hf, *shape, get_spec(info.ggml_type).name, block_of(hf)))
        elif info.ggml_type.name in _FLOAT_LINEAR_TYPES:
            fixed += _numel(info.shape) * elem_bytes
        else:
            raise GGUFError(unsupported_type_message(f, info))
    fixed += sum(_numel(f.info(name).shape) * elem_bytes for name, t in targets.items()
                 if t.kind in ("embedding", "norm", "linear_bias", "router", "gate_vector", "router_bias", "sinks",
                               "experts_bias", "latent_k"))
    experts: dict[str, dict[str, str]] = {}     # per experts module: "gate"/"up"/"down" and (gpt-oss) "<part>_bias"
    for name, t in targets.items():
        if t.kind in ("experts", "experts_bias"):
            experts.setdefault(t.hf_name, {})[t.part if t.kind == "experts" else f"{t.part}_bias"] = name
    for hf, parts in experts.items():
        specs.extend(_expert_specs(f, hf, parts))
    return GGUFLinearPlan(sources, specs, fixed, tied, experts)


def expert_stack_parts(f: GGUFFile, hf: str, parts: Mapping[str, str]) -> tuple[str, ...]:
    """The stacks an experts module's file tensors come in: ("gate", "up", "down"), or ("gate_up", "down") where
    llama.cpp's converter fused gate and up (``--fuse-gate-up-exps``); GGUFError for a missing or doubled one."""
    wanted = ("gate_up", "down") if "gate_up" in parts else ("gate", "up", "down")
    missing = [p for p in wanted if p not in parts]
    if missing:
        raise GGUFError(f"{f.path}: {hf} has no ffn_{missing[0]}_exps tensor (an experts module needs gate, up "
                        f"and down, or gate_up and down)")
    doubled = [p for p in ("gate", "up") if p in parts and "gate_up" in parts]
    if doubled:
        raise GGUFError(f"{f.path}: {hf} has both ffn_gate_up_exps and ffn_{doubled[0]}_exps")
    return wanted


def _expert_specs(f: GGUFFile, hf: str, parts: Mapping[str, str]) -> list[LinearSpec]:
    """The two stacked projections an experts module's GGUF tensors become: gate_up_proj (each expert's gate
    and up rows, so gate and up must share a format) and down_proj."""
    infos = {p: f.info(parts[p]) for p in expert_stack_parts(f, hf, parts)}
    for p, info in infos.items():
        if len(info.shape) != 3:
            raise GGUFError(f"{f.path}: tensor {info.name!r} has shape {info.shape}, expert weights must be 3-D "
                            f"(experts, rows, columns)")
        if not info.is_quantized or not info.is_supported:
            raise GGUFError(unsupported_type_message(f, info) + "; expert stacks must be quantized")
    down = infos["down"]
    if "gate_up" in infos:
        gate = infos["gate_up"]
        e, two_i, h = gate.shape
        if two_i % 2:
            raise GGUFError(f"{f.path}: tensor {gate.name!r} has shape {gate.shape}: an odd number of rows cannot be "
                            f"gate rows then as many up rows")
        i = two_i // 2
    else:
        gate, up = infos["gate"], infos["up"]
        if gate.shape != up.shape or gate.ggml_type != up.ggml_type:
            raise GGUFError(f"{f.path}: {gate.name!r} ({gate.ggml_type.name} {gate.shape}) and {up.name!r} "
                            f"({up.ggml_type.name} {up.shape}) must have one type and shape: they become one "
                            f"gate_up_proj")
        e, i, h = gate.shape
    if down.shape != (e, h, i):
        raise GGUFError(f"{f.path}: tensor {down.name!r} has shape {down.shape}, expected {(e, h, i)} for {hf}")
    k = expert_used_count(f, e)
    return [LinearSpec(f"{hf}.gate_up_proj", e * 2 * i, h, get_spec(gate.ggml_type).name, block_of(hf),
                       num_experts=e, experts_per_token=k),
            LinearSpec(f"{hf}.down_proj", e * h, i, get_spec(down.ggml_type).name, block_of(hf),
                       num_experts=e, experts_per_token=k)]


def expert_used_count(f: GGUFFile, experts: int) -> int:
    """The file's experts per token (``<arch>.expert_used_count``); GGUFError when absent or out of range."""
    key = f"{f.architecture}.expert_used_count"
    k = f.metadata.get(key)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
        raise GGUFError(f"{f.path}: metadata {key} must be an integer from 1 to the {experts} experts, got {k!r}")
    return k


def unsupported_type_message(f: GGUFFile, info) -> str:
    return (f"{f.path}: tensor {info.name!r} has type {info.ggml_type.name}, which is not supported "
            f"(supported: {', '.join(QTYPES)}, {', '.join(t.lower() for t in _FLOAT_LINEAR_TYPES)})")


def block_of(hf_name: str) -> str:
    """The streaming group of a linear: its transformer block ("model.layers.3"), "" outside the blocks."""
    m = re.match(r"^(model\.layers\.\d+)\.", hf_name)
    return m.group(1) if m else ""


def _numel(shape: "tuple[int, ...]") -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def gguf_inventory(path: "str | os.PathLike[str]") -> ModelInventory:
    """Linears of a GGUF file with the file's own types, as :func:`load_gguf_model` would place them."""
    with GGUFFile(path) as f:
        plan = gguf_linear_plan(f, gguf_targets(f))
    return ModelInventory(Path(path).name, plan.specs, plan.fixed_bytes)


#: config.json keys that give a MoE model's expert count, in the spellings transformers' configs use.
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def config_inventory(path: "str | os.PathLike[str]", qtype: str = DEFAULT_QTYPE) -> ModelInventory:
    """From a transformers config.json of a llama-family model, or of a MoE model (Mixtral, Qwen2/3-MoE,
    GLM-4.5, DeepSeek-V2/V3, Kimi K2: routed experts, a shared expert, dense first blocks, latent attention); what
    the shape cannot describe (dense blocks between MoE ones) is refused by name."""
    cfg = json.loads(Path(path).read_text())
    experts = next((cfg[k] for k in _EXPERT_COUNT_KEYS if cfg.get(k)), 0)
    moe = {}
    mla = {}
    if cfg.get("kv_lora_rank"):
        missing = [k for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim") if not cfg.get(k)]
        if missing:
            raise ValueError(f"{path}: a latent-attention config (kv_lora_rank) needs {', '.join(missing)}")
        mla = dict(q_lora_rank=cfg.get("q_lora_rank") or 0, kv_lora_rank=cfg["kv_lora_rank"],
                   qk_nope_dim=cfg["qk_nope_head_dim"], qk_rope_dim=cfg["qk_rope_head_dim"],
                   v_head_dim=cfg["v_head_dim"])
    if experts:
        unsupported = ["mlp_only_layers"] if cfg.get("mlp_only_layers") else []
        unsupported += ["decoder_sparse_step"] if cfg.get("decoder_sparse_step", 1) != 1 else []
        if unsupported:
            raise ValueError(f"{path}: a MoE config with {', '.join(unsupported)} (dense layers between MoE ones) is "
                             f"not one plan can describe; plan the model's GGUF file instead")
        width = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        # a shared expert: Qwen2-MoE gives its width, DeepSeek/GLM a count of expert-wide ones
        shared = cfg.get("shared_expert_intermediate_size") or (cfg.get("n_shared_experts") or 0) * width
        moe = dict(experts=experts, experts_per_token=cfg.get("num_experts_per_tok", experts),
                   expert_intermediate=width, shared_intermediate=shared,
                   dense_layers=cfg.get("first_k_dense_replace") or 0)
    shape = LlamaShape(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                       cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                       cfg["vocab_size"], None if mla else cfg.get("head_dim"), **moe, **mla,
                       arch=cfg.get("model_type") or "llama")          # transformers' module names follow it
    return llama_inventory(shape, qtype, name=Path(path).parent.name or "config")


def expert_format(shape: LlamaShape, qtype: str | None = None) -> str:
    """The format a preset's routed experts are taken in: ``qtype`` if given, else the one its published files
    keep them in (``expert_qtype``: gpt-oss's mxfp4), else DEFAULT_QTYPE."""
    return qtype or shape.expert_qtype or DEFAULT_QTYPE


def resolve_inventory(model: str, qtype: str | None = None) -> ModelInventory:
    """A preset name, a .gguf file or a config.json -> inventory: linears in ``qtype`` (default DEFAULT_QTYPE), a
    preset's routed experts by default in the format its published files keep them in (expert_format)."""
    if model in PRESETS:
        shape = PRESETS[model]
        return llama_inventory(shape, qtype or DEFAULT_QTYPE, name=model, expert_qtype=expert_format(shape, qtype))
    p = Path(model)
    if p.suffix == ".gguf":
        return gguf_inventory(p)
    if p.is_dir() and (p / "config.json").exists():
        p = p / "config.json"
    if p.suffix == ".json":
        return config_inventory(p, qtype or DEFAULT_QTYPE)
    raise ValueError(f"unknown model {model!r}: give a preset ({', '.join(PRESETS)}), a .gguf file or a config.json")
