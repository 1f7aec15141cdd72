"""GGUF <-> transformers names for the llama-family architectures (llama, mistral, qwen2, qwen3, phi3), Gemma 2
and 3 (gemma2, gemma3) and the mixture-of-experts Qwen2-MoE (qwen2moe), Qwen3-MoE (qwen3moe), Mixtral (llama
with experts), GLM-4.5 (glm4moe), OpenAI gpt-oss (gpt-oss) and DeepSeek-V3 (deepseek2): one table for loading and
saving.

llama.cpp names tensors ``blk.N.attn_q.weight``; transformers names the same weight
``model.layers.N.self_attn.q_proj.weight``. Both directions come from the tables below so the loader
(:mod:`.gguf_model`), the exporter (:mod:`.gguf_export`) and the planner inventory (:mod:`.shapes`)
cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ..formats.gguf_io import GGUFError, GGUFFile

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "qwen2moe", "qwen3moe",
                           "glm4moe", "gpt-oss", "deepseek2")
# Mixture-of-experts architectures: every block's feed-forward is a router (ffn_gate_inp) and three 3-D expert
# stacks (ffn_gate_exps, ffn_up_exps, ffn_down_exps: experts x rows x columns), which become one transformers
# experts module (gate and up rows concatenated per expert, as its gate_up_proj holds them). A llama file with
# llama.expert_count > 0 is a Mixtral (transformers' mixtral).
MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe", "llama", "glm4moe", "gpt-oss", "deepseek2")
# glm4moe (GLM-4.5, GLM-4.5-Air): the first leading_dense_block_count blocks keep a dense MLP; the others route
# with a sigmoid score plus a per-expert selection bias (exp_probs_b, transformers' e_score_correction_bias) and
# add a shared expert (ffn_*_shexp, transformers' shared_experts, no gate). The last nextn_predict_layers blocks
# of the file are multi-token-prediction layers, which llama.cpp loads and never runs, and transformers' model has
# no module for: they are skipped. q and k are rotated on their first rope.dimension_count dimensions only
# (partial_rotary_factor), in the neox layout: no permutation.
GLM4MOE_ARCHITECTURES = ("glm4moe",)
# deepseek2 (DeepSeek-V3, R1, Kimi K2: model/deepseek2.py): multi-head latent attention (q and kv compressed to
# latents, each RMS-normalized, then expanded per head), then a dense MLP in the first leading_dense_block_count
# blocks and GLM-4.5's routed experts (selection bias, shared experts) in the others; multi-token-prediction blocks
# at the end are skipped as for glm4moe. MLA files store kv_b_proj split per head (attn_k_b transposed, attn_v_b):
# both go to one module, gguf_model's LatentKVProjection, as "latent_k"/"latent_v" targets.
DEEPSEEK2_ARCHITECTURES = ("deepseek2",)
# Architectures routing as GLM-4.5 does: sigmoid scores, a selection bias (exp_probs_b) and shared experts.
SELECTION_BIAS_ARCHITECTURES = GLM4MOE_ARCHITECTURES + DEEPSEEK2_ARCHITECTURES
# gpt-oss (gpt-oss-20b, gpt-oss-120b; llama.cpp's LLM_ARCH_OPENAI_MOE): every block is attention with biases and a
# learned sink logit per head (attn_sinks, transformers' self_attn.sinks), then a MoE block whose router
# (ffn_gate_inp) and three expert stacks all have biases (.bias tensors: (experts,), (experts, rows)). transformers
# keeps gate and up rows interleaved in gate_up_proj (row 2i gate i, row 2i + 1 up i), llama.cpp separate stacks:
# the loader interleaves rows of the file's bytes, the exporter splits them. The pre-FFN norm is llama.cpp's
# post_attention_norm. The semantics both projects must share are in model/gpt_oss.py.
GPT_OSS_ARCHITECTURES = ("gpt-oss",)
# qwen2moe (Qwen1.5-MoE, Qwen2-57B-A14B) adds a shared expert to every MoE block: an MLP (ffn_*_shexp) whose
# output a sigmoid gate (ffn_gate_inp_shexp, one row, stored 1-D) scales.
# llama.cpp's converter permutes attn_q/attn_k rows (and the matching bias entries) for its rope layout
# on these architectures; qwen2, qwen3 and phi3 use the neox rope layout, which needs no permutation.
PERMUTED_QK_ARCHITECTURES = ("llama", "mistral")
# Architectures whose files declare a sliding window (attention.sliding_window, written by llama.cpp's
# converter from the config), which llama.cpp nevertheless does not apply: see gguf_model._set_sliding_window.
SLIDING_WINDOW_ARCHITECTURES = ("phi3",)
# Gemma: llama.cpp's converter stores every RMSNorm gain as 1 + w (Gemma's norm multiplies by 1 + w, llama.cpp's
# by the stored gain); the loader subtracts the 1 again, the exporter adds it.
GEMMA_ARCHITECTURES = ("gemma2", "gemma3")
# transformers model_type -> the GGUF architecture llama.cpp writes for it (Mistral 7B is a llama in GGUF; a
# text-only Gemma 3 is transformers' gemma3_text).
HF_TO_GGUF_ARCHITECTURE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                           "gemma2": "gemma2", "gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
                           "mixtral": "llama", "glm4_moe": "glm4moe", "gpt_oss": "gpt-oss",
                           "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2"}

BLOCK_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# phi3 (Phi-3, Phi-3.5, Phi-4) fuses q, k, v into one matrix (rows q, then k, then v) and gate and up into
# ffn_up (rows gate, then up), in the same row order in both projects.
PHI3_BLOCK_LINEARS = {
    "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
# attn_q_norm/attn_k_norm: qwen3's per-head RMSNorms of q and k (before rope); other architectures have none,
# and a file that has them anyway fails the loader's check that every tensor has a module to go to.
BLOCK_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3 normalize both sublayers' inputs and outputs. transformers' post_attention_layernorm is the norm of
# the attention output here (llama.cpp's post_attention_norm), not the pre-FFN norm it is in llama.
GEMMA_BLOCK_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                     "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                     "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# GLM-4.5: the pre-FFN norm is llama.cpp's post_attention_norm (the norm after the attention's residual add).
GLM4MOE_BLOCK_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                       "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# GGUF expert tensor -> (transformers path relative to the block, kind, part of the experts module)
MOE_BLOCK_TENSORS = {
    "ffn_gate_inp": ("mlp.gate.weight", "router", ""),
    "ffn_gate_exps": ("mlp.experts", "experts", "gate"),
    "ffn_up_exps": ("mlp.experts", "experts", "up"),
    # llama.cpp's converter with --fuse-gate-up-exps: one stack, each expert's gate rows then its up rows
    "ffn_gate_up_exps": ("mlp.experts", "experts", "gate_up"),
    "ffn_down_exps": ("mlp.experts", "experts", "down"),
    "ffn_gate_shexp": ("mlp.shared_expert.gate_proj", "linear", ""),
    "ffn_up_shexp": ("mlp.shared_expert.up_proj", "linear", ""),
    "ffn_down_shexp": ("mlp.shared_expert.down_proj", "linear", ""),
    "ffn_gate_inp_shexp": ("mlp.shared_expert_gate", "gate_vector", ""),
}
# GLM-4.5's shared experts (one MLP, plural name, no gate) and its router's selection bias (a float32 buffer)
GLM4MOE_BLOCK_TENSORS = {
    "ffn_gate_shexp": ("mlp.shared_experts.gate_proj", "linear", ""),
    "ffn_up_shexp": ("mlp.shared_experts.up_proj", "linear", ""),
    "ffn_down_shexp": ("mlp.shared_experts.down_proj", "linear", ""),
}
GLM4MOE_SELECTION_BIAS = ("exp_probs_b", "mlp.gate.e_score_correction_bias")
GPT_OSS_BLOCK_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"}
DEEPSEEK2_BLOCK_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                         "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_kv_a_norm": "self_attn.kv_a_layernorm"}
DEEPSEEK2_BLOCK_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_b": "self_attn.kv_b_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# An MLA file's split kv_b_proj: GGUF name -> target kind (both target the self_attn.kv_b_proj module)
DEEPSEEK2_LATENT_KV = {"attn_k_b": "latent_k", "attn_v_b": "latent_v"}
LATENT_KV_MODULE = "self_attn.kv_b_proj"
# gpt-oss block tensors beyond the attention linears: GGUF (name, weight|bias) -> (path, kind, part)
GPT_OSS_BLOCK_TENSORS = {
    ("attn_sinks", "weight"): ("self_attn.sinks", "sinks", ""),
    ("ffn_gate_inp", "weight"): ("mlp.router.weight", "router", ""),
    ("ffn_gate_inp", "bias"): ("mlp.router.bias", "router", ""),
    **{(f"ffn_{part}_exps", what): ("mlp.experts", "experts" if what == "weight" else "experts_bias", part)
       for part in ("gate", "up", "gate_up", "down") for what in ("weight", "bias")},
}
_GPT_OSS_ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_output")
_HF_GPT_OSS_TENSORS = {path: f"{short}.{what}" for (short, what), (path, kind, _) in GPT_OSS_BLOCK_TENSORS.items()
                       if kind not in ("experts", "experts_bias")}
_HF_GPT_OSS_BLOCK_NORMS = {hf: g for g, hf in GPT_OSS_BLOCK_NORMS.items()}
_HF_SHARED_EXPERT = {"mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
                     "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
_HF_GLM4MOE_SHARED = {path: g for g, (path, _, _) in GLM4MOE_BLOCK_TENSORS.items()}
_HF_GLM4MOE_BLOCK_NORMS = {hf: g for g, hf in GLM4MOE_BLOCK_NORMS.items()}
_HF_DEEPSEEK2_BLOCK_NORMS = {hf: g for g, hf in DEEPSEEK2_BLOCK_NORMS.items()}
_HF_DEEPSEEK2_BLOCK_LINEARS = {hf: g for g, hf in DEEPSEEK2_BLOCK_LINEARS.items()}
_HF_BLOCK_LINEARS = {hf: g for table in (BLOCK_LINEARS, PHI3_BLOCK_LINEARS) for g, hf in table.items()}
_HF_BLOCK_NORMS = {hf: g for g, hf in BLOCK_NORMS.items()}
_HF_GEMMA_BLOCK_NORMS = {hf: g for g, hf in GEMMA_BLOCK_NORMS.items()}
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_BLOCK_TENSOR_ANY = re.compile(r"^blk\.(\d+)\.")           # any block tensor, nextn.* included
_HF_BLOCK_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_SELECTION_BIAS = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias$")
_HF_GPT_OSS_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.sinks|mlp\.router\.(?:weight|bias))$")

EMBEDDING = "token_embd.weight"
OUTPUT = "output.weight"                 # absent when lm_head is tied to the embedding
OUTPUT_NORM = "output_norm.weight"
ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class Target:
    """Where one file tensor goes in the transformers model."""

    hf_name: str      # a module ("model.layers.3.self_attn.q_proj") for linears, their biases and expert
                      # stacks, else a parameter path
    kind: str         # "linear", "linear_bias", "embedding", "norm", "rope_freqs", "router", "experts",
                      # "gate_vector" (a one-row linear stored 1-D), "router_bias" (a float32 buffer),
                      # "sinks" (gpt-oss's attention sink logits), "experts_bias" (an expert stack's biases),
                      # "latent_k"/"latent_v" (an MLA file's split kv_b_proj: deepseek2.LatentKVProjection)
    qk: str = ""      # "q"/"k": rows (weight) or entries (bias) permuted by llama.cpp's converter for rope
    part: str = ""    # experts, experts_bias: which stack ("gate", "up", "gate_up": both fused, "down")


def block_norms(arch: str) -> dict[str, str]:
    """GGUF block norm name -> transformers module path (relative to the block) for ``arch``."""
    if arch in GLM4MOE_ARCHITECTURES:
        return GLM4MOE_BLOCK_NORMS
    if arch in DEEPSEEK2_ARCHITECTURES:
        return DEEPSEEK2_BLOCK_NORMS
    if arch in GPT_OSS_ARCHITECTURES:
        return GPT_OSS_BLOCK_NORMS
    return GEMMA_BLOCK_NORMS if arch in GEMMA_ARCHITECTURES else BLOCK_NORMS


def gguf_target(name: str, arch: str) -> Optional[Target]:
    """The transformers destination of GGUF tensor ``name`` (None when the name is not one we map)."""
    if name == EMBEDDING:
        return Target("model.embed_tokens.weight", "embedding")
    if name == OUTPUT_NORM:
        return Target("model.norm.weight", "norm")
    if name == OUTPUT:
        return Target("lm_head", "linear")
    if name == ROPE_FREQS:
        return Target("model.rotary_emb", "rope_freqs")
    m = _BLOCK_TENSOR.match(name)
    if not m:
        return None
    i, short, what = m.groups()
    prefix = f"model.layers.{i}."
    norms = block_norms(arch)
    if short in norms and what == "weight":
        return Target(prefix + norms[short] + ".weight", "norm")
    if arch in GPT_OSS_ARCHITECTURES:
        return _gpt_oss_target(prefix, short, what)
    if arch in DEEPSEEK2_ARCHITECTURES and what == "weight":
        if short in DEEPSEEK2_BLOCK_LINEARS:
            return Target(prefix + DEEPSEEK2_BLOCK_LINEARS[short], "linear")
        if short in DEEPSEEK2_LATENT_KV:
            return Target(prefix + LATENT_KV_MODULE, DEEPSEEK2_LATENT_KV[short])
    if arch in SELECTION_BIAS_ARCHITECTURES:
        if short in GLM4MOE_BLOCK_TENSORS and what == "weight":
            path, kind, part = GLM4MOE_BLOCK_TENSORS[short]
            return Target(prefix + path, kind, part=part)
        if short == GLM4MOE_SELECTION_BIAS[0] and what == "bias":
            return Target(prefix + GLM4MOE_SELECTION_BIAS[1], "router_bias")
    if arch in MOE_ARCHITECTURES and short in MOE_BLOCK_TENSORS and what == "weight":
        path, kind, part = MOE_BLOCK_TENSORS[short]
        return Target(prefix + path, kind, part=part)
    if arch in DEEPSEEK2_ARCHITECTURES:
        return None
    linears = PHI3_BLOCK_LINEARS if arch == "phi3" else BLOCK_LINEARS
    if short in linears:
        qk = short[-1] if arch in PERMUTED_QK_ARCHITECTURES and short in ("attn_q", "attn_k") else ""
        return Target(prefix + linears[short], "linear" if what == "weight" else "linear_bias", qk)
    return None


def _gpt_oss_target(prefix: str, short: str, what: str) -> Optional[Target]:
    """A gpt-oss block tensor's destination: the attention linears (no rope permutation: llama.cpp computes
    gpt-oss in the neox layout) and GPT_OSS_BLOCK_TENSORS; anything else is not one of its tensors."""
    if short in _GPT_OSS_ATTENTION:
        return Target(prefix + BLOCK_LINEARS[short], "linear" if what == "weight" else "linear_bias")
    if (short, what) in GPT_OSS_BLOCK_TENSORS:
        path, kind, part = GPT_OSS_BLOCK_TENSORS[short, what]
        return Target(prefix + path, kind, part=part)
    return None


def gguf_targets(f: GGUFFile) -> dict[str, Target]:
    """Every tensor of ``f`` mapped to its transformers destination; GGUFError for anything unknown."""
    arch = f.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{f.path}: architecture {arch!r} is not supported (supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    out: dict[str, Target] = {}
    unknown = []
    skipped = prediction_layers(f)
    for name in f:
        m = _BLOCK_TENSOR_ANY.match(name)
        if m and int(m.group(1)) in skipped:
            continue
        target = gguf_target(name, arch)
        if target is None:
            unknown.append(name)
        else:
            out[name] = target
    longrope = [n for n in unknown if n.startswith("rope_factors_")]
    if longrope:
        raise GGUFError(f"{f.path}: long-context rope scaling ({', '.join(longrope)}: LongRoPE, as in Phi-3-128k "
                        f"and Phi-3.5) is not supported")
    if unknown:
        raise GGUFError(f"{f.path}: tensors not understood for architecture {arch!r}: {', '.join(unknown[:8])}"
                        + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
    return out


def prediction_layers(f: GGUFFile) -> range:
    """The blocks of ``f`` that are multi-token-prediction layers (glm4moe's and deepseek2's last
    nextn_predict_layers blocks), which llama.cpp loads but never runs: their tensors are not loaded."""
    arch = f.architecture
    if arch not in SELECTION_BIAS_ARCHITECTURES:
        return range(0)
    blocks, nextn = f.metadata.get(f"{arch}.block_count"), f.metadata.get(f"{arch}.nextn_predict_layers", 0)
    for key, value in (("block_count", blocks), ("nextn_predict_layers", nextn)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise GGUFError(f"{f.path}: metadata {arch}.{key} must be a non-negative integer, got {value!r}")
    if nextn >= blocks:
        raise GGUFError(f"{f.path}: {arch}.nextn_predict_layers {nextn} leaves none of the {blocks} blocks to run")
    return range(blocks - nextn, blocks)


def hf_to_gguf_name(hf_name: str, arch: str = "llama") -> Optional[str]:
    """The GGUF name of a transformers state_dict entry of a model saved as GGUF architecture ``arch`` (None for
    entries GGUF does not store)."""
    if hf_name == "model.embed_tokens.weight":
        return EMBEDDING
    if hf_name == "model.norm.weight":
        return OUTPUT_NORM
    if hf_name == "lm_head.weight":
        return OUTPUT
    m = _HF_SELECTION_BIAS.match(hf_name)
    if m and arch in SELECTION_BIAS_ARCHITECTURES:
        return f"blk.{m.group(1)}.{GLM4MOE_SELECTION_BIAS[0]}.bias"
    m = _HF_GPT_OSS_TENSOR.match(hf_name)
    if m and arch in GPT_OSS_ARCHITECTURES:
        return f"blk.{m.group(1)}.{_HF_GPT_OSS_TENSORS[m.group(2)]}"
    m = _HF_BLOCK_TENSOR.match(hf_name)
    if not m:
        return None
    i, rest, what = m.groups()
    if arch in DEEPSEEK2_ARCHITECTURES and rest in _HF_DEEPSEEK2_BLOCK_LINEARS and what == "weight":
        return f"blk.{i}.{_HF_DEEPSEEK2_BLOCK_LINEARS[rest]}.weight"
    if rest in _HF_BLOCK_LINEARS:
        return f"blk.{i}.{_HF_BLOCK_LINEARS[rest]}.{what}"
    if rest == "mlp.gate" and what == "weight" and arch in MOE_ARCHITECTURES:
        return f"blk.{i}.ffn_gate_inp.weight"
    if rest in _HF_SHARED_EXPERT and what == "weight" and arch == "qwen2moe":
        return f"blk.{i}.{_HF_SHARED_EXPERT[rest]}.weight"
    if arch in SELECTION_BIAS_ARCHITECTURES and rest in _HF_GLM4MOE_SHARED and what == "weight":
        return f"blk.{i}.{_HF_GLM4MOE_SHARED[rest]}.weight"
    hf_norms = (_HF_GLM4MOE_BLOCK_NORMS if arch in GLM4MOE_ARCHITECTURES
                else _HF_DEEPSEEK2_BLOCK_NORMS if arch in DEEPSEEK2_ARCHITECTURES
                else _HF_GPT_OSS_BLOCK_NORMS if arch in GPT_OSS_ARCHITECTURES
                else _HF_GEMMA_BLOCK_NORMS if arch in GEMMA_ARCHITECTURES else _HF_BLOCK_NORMS)
    if rest in hf_norms and what == "weight":
        return f"blk.{i}.{hf_norms[rest]}.weight"
    return None


def qk_side(gguf_name: str) -> str:
    """"q" or "k" for attn_q/attn_k weights and biases (the tensors llama.cpp permutes), else ""."""
    m = _BLOCK_TENSOR.match(gguf_name)
    if m and m.group(2) in ("attn_q", "attn_k"):
        return m.group(2)[-1]
    return ""
