"""DeepSeek-V3/R1, Kimi K2, DeepSeek-V2-Lite and other multi-head latent attention (MLA) models (llama.cpp's deepseek2,
transformers' deepseek_v3 and deepseek_v2): the config from a GGUF file's metadata, the metadata from a config, and
the split key/value up-projection MLA files store.

transformers' GGUF reader has no deepseek2 entry, so :func:`deepseek2_config` reads the keys llama.cpp's loader reads
(llama_model_deepseek2::load_arch_hparams) into a ``DeepseekV3Config`` (or ``DeepseekV2Config``) and
:func:`deepseek2_metadata` writes them back for save_gguf. What llama.cpp computes and transformers' classes must
agree on:

* attention compresses the hidden state to a ``kv_lora_rank`` latent (plus one shared ``qk_rope_head_dim`` key part)
  and, with ``q_lora_rank``, q to a ``q_lora_rank`` latent, each RMS-normalized, then expands them per head; heads
  have ``qk_nope_head_dim`` unrotated and ``qk_rope_head_dim`` rotated key dimensions and ``v_head_dim`` value ones;
* the rotation pairs adjacent dimensions (llama.cpp's LLAMA_ROPE_TYPE_NORM), which is transformers'
  ``rope_interleave=True``; the converter does not permute rows;
* MLA files (``attention.key_length_mla`` present) store the expansion split per head: ``attn_k_b`` transposed
  (heads x kv_lora_rank x qk_nope) and ``attn_v_b`` (heads x v_head x kv_lora_rank); older files store the one
  ``attn_kv_b`` matrix transformers' ``kv_b_proj`` is. In MLA files ``attention.key_length``/``value_length`` are
  the latent widths llama.cpp attends over, the per-head sizes are the ``_mla`` keys, and ``head_count_kv`` is 1;
* routing (``expert_gating_func`` 2) as in GLM-4.5 (sigmoid scores, the top k of score + ``exp_probs_b`` chosen,
  weighted by their scores, renormalized when ``expert_weights_norm``, scaled by ``expert_weights_scale``), limited
  to the experts of the ``expert_group_used_count`` best of ``expert_group_count`` groups (a group scored by its two
  best experts), as DeepSeek-V3's router does: transformers' deepseek_v3. DeepSeek-V2's (1, or unset): the top k
  softmax probabilities, not renormalized, scaled: transformers' deepseek_v2 with ``topk_method="greedy"``; its
  group-limited variant (V2, V2.5) scores a group by its best expert where llama.cpp takes the two best: refused;
* YaRN: llama.cpp leaves cos/sin unscaled and multiplies the attention scale by mscale^2, mscale =
  1 + 0.1 ``mscale_all_dim`` ln(factor), with ``rope.scaling.yarn_log_multiplier`` = 0.1 ``mscale_all_dim`` (its loader
  divides the 0.1 back out); transformers computes the same with ``mscale`` = ``mscale_all_dim``;
* ``nextn_predict_layers`` multi-token-prediction blocks at the end of the file are not part of the model.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats.gguf_io import GGUFError, GGUFFile
from .gguf_names import EMBEDDING, prediction_layers
from .gguf_rope import config_rope_metadata, metadata_number, metadata_positive_int, read_rope_scaling
from .shapes import expert_used_count

ARCH = "deepseek2"
#: llama.cpp's expert_gating_func values: softmax (DeepSeek-V2) and sigmoid (V3); 0, unset, means softmax for
#: deepseek2 files.
SOFTMAX_GATING, SIGMOID_GATING = 1, 2
#: The one model family whose deepseek2 files leave expert_gating_func unset yet route by sigmoid (llama.cpp's
#: loader recognises GLM-4.7-Flash by its block count and vocabulary).
_SIGMOID_WITHOUT_KEY = ({47, 48}, 154880)


class LatentKVProjection(nn.Module):
    """transformers' ``kv_b_proj`` (latent -> per head [k_nope | v]) over an MLA file's split tensors.

    ``k_proj`` holds ``attn_k_b`` dequantized and transposed back (the file stores each head's matrix transposed,
    so its quantized rows are not the rows a matmul over the latent needs); ``v_proj``'s rows are ``attn_v_b``'s own,
    an OffloadedLinear over the file's bytes once loaded. The output interleaves them per head as ``kv_b_proj`` does.
    """

    def __init__(self, heads: int, qk_nope: int, v_head: int, kv_lora_rank: int, dtype=None, device=None):
        super().__init__()
        self.heads, self.qk_nope, self.v_head = heads, qk_nope, v_head
        self.in_features, self.out_features = kv_lora_rank, heads * (qk_nope + v_head)
        self.k_proj = nn.Linear(kv_lora_rank, heads * qk_nope, bias=False, dtype=dtype, device=device)
        self.v_proj = nn.Linear(kv_lora_rank, heads * v_head, bias=False, dtype=dtype, device=device)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        k = self.k_proj(latent).unflatten(-1, (self.heads, self.qk_nope))
        v = self.v_proj(latent).unflatten(-1, (self.heads, self.v_head))
        return torch.cat([k, v], dim=-1).flatten(-2)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, qk_nope={self.qk_nope}, v_head={self.v_head}, kv_lora_rank={self.in_features}"


def k_b_to_rows(k_b: torch.Tensor) -> torch.Tensor:
    """(heads, kv_lora_rank, qk_nope) as the file stores it -> (heads * qk_nope, kv_lora_rank) ``k_proj`` rows."""
    return k_b.transpose(1, 2).reshape(-1, k_b.shape[1])


def split_kv_b(weight: torch.Tensor, heads: int, qk_nope: int, v_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' kv_b_proj weight -> (attn_k_b (heads, kv_lora_rank, qk_nope), attn_v_b (heads, v_head,
    kv_lora_rank)), as llama.cpp's converter splits it."""
    per_head = weight.reshape(heads, qk_nope + v_head, weight.shape[-1])
    return per_head[:, :qk_nope].transpose(1, 2).contiguous(), per_head[:, qk_nope:].contiguous()


def is_mla_file(f: GGUFFile) -> bool:
    """Whether ``f`` stores the split attn_k_b/attn_v_b (llama.cpp: both ``_mla`` head sizes given)."""
    md = f.metadata
    return bool(md.get(f"{ARCH}.attention.key_length_mla")) and bool(md.get(f"{ARCH}.attention.value_length_mla"))


def _gating(f: GGUFFile, layers: int, vocab: int) -> int:
    """The routing llama.cpp applies to ``f``: SOFTMAX_GATING or SIGMOID_GATING (GGUFError for another value)."""
    gating = f.metadata.get(f"{ARCH}.expert_gating_func", 0)
    if gating == 0:
        sigmoid = layers in _SIGMOID_WITHOUT_KEY[0] and vocab == _SIGMOID_WITHOUT_KEY[1]
        return SIGMOID_GATING if sigmoid else SOFTMAX_GATING
    if gating not in (SOFTMAX_GATING, SIGMOID_GATING):
        raise GGUFError(f"{f.path}: {ARCH}.expert_gating_func={gating!r} is neither softmax (1) nor sigmoid (2)")
    return gating


def deepseek2_config(f: GGUFFile):
    """The transformers config a deepseek2 file's metadata describes, rope scaling included: a ``DeepseekV3Config``
    for sigmoid routing, a ``DeepseekV2Config`` for softmax routing (DeepSeek-V2-Lite, DeepSeek-Coder-V2-Lite)."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    md = f.metadata

    def positive(key: str, default=None) -> int:
        return metadata_positive_int(f, f"{ARCH}.{key}", default)

    def count(key: str, default: int = 0) -> int:
        value = md.get(f"{ARCH}.{key}", default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise GGUFError(f"{f.path}: metadata {ARCH}.{key} must be a non-negative integer, got {value!r}")
        return value

    def number(key: str, default: float) -> float:
        value = metadata_number(f, f"{ARCH}.{key}")
        return default if value is None else value

    blocks = positive("block_count")
    layers = blocks - len(prediction_layers(f))
    heads = positive("attention.head_count")
    vocab = md.get(f"{ARCH}.vocab_size") or (f.info(EMBEDDING).shape[0] if EMBEDDING in f else None)
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise GGUFError(f"{f.path}: no vocabulary size ({ARCH}.vocab_size or the {EMBEDDING} tensor)")
    gating = _gating(f, blocks, vocab)
    rope = positive("rope.dimension_count")
    kv_lora = positive("attention.kv_lora_rank")
    if is_mla_file(f):
        key, value = positive("attention.key_length_mla"), positive("attention.value_length_mla")
    else:                                 # a pre-MLA file: the per-head sizes under the plain keys
        key, value = positive("attention.key_length"), positive("attention.value_length")
    if key <= rope:
        raise GGUFError(f"{f.path}: key head size {key} leaves no unrotated dimensions beside the {rope} rotated ones")
    q_lora = count("attention.q_lora_rank") or None
    if (q_lora is None) != ("blk.0.attn_q.weight" in f):
        raise GGUFError(f"{f.path}: {ARCH}.attention.q_lora_rank is {q_lora} but the file "
                        f"{'has no' if q_lora is None else 'has an'} uncompressed attn_q")
    experts = positive("expert_count")
    groups = count("expert_group_count", 1) or 1
    used_groups = count("expert_group_used_count", 1) or 1
    if groups > 1 and (experts % groups or not 1 <= used_groups <= groups):
        raise GGUFError(f"{f.path}: {groups} expert groups ({used_groups} used) do not divide {experts} experts")
    norm = bool(md.get(f"{ARCH}.expert_weights_norm", False))
    if gating == SIGMOID_GATING:
        cls = DeepseekV3Config
        routing = dict(norm_topk_prob=norm, n_group=groups, topk_group=used_groups if groups > 1 else 1,
                       rope_interleave=True, num_nextn_predict_layers=0)
    else:
        # transformers' DeepSeek-V2 router: softmax, the top k probabilities, unnormalized, times the scale
        if groups > 1:
            raise GGUFError(f"{f.path}: softmax routing limited to {used_groups} of {groups} expert groups "
                            f"(DeepSeek-V2, V2.5) is not supported: llama.cpp scores a group by its two best experts, transformers' "
                            f"DeepSeek-V2 by its best")
        if norm:
            raise GGUFError(f"{f.path}: softmax routing with {ARCH}.expert_weights_norm: transformers' DeepSeek-V2 "
                            f"does not renormalize the chosen experts' weights")
        cls, routing = DeepseekV2Config, dict(topk_method="greedy", n_group=1, topk_group=1)
    try:
        config = cls(
            vocab_size=vocab, hidden_size=positive("embedding_length"),
            intermediate_size=positive("feed_forward_length"),
            moe_intermediate_size=positive("expert_feed_forward_length"),
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            n_shared_experts=positive("expert_shared_count"), n_routed_experts=experts,
            num_experts_per_tok=expert_used_count(f, experts),
            routed_scaling_factor=number("expert_weights_scale", 1.0), **routing,
            first_k_dense_replace=count("leading_dense_block_count"),
            kv_lora_rank=kv_lora, q_lora_rank=q_lora, qk_rope_head_dim=rope, qk_nope_head_dim=key - rope,
            v_head_dim=value, max_position_embeddings=positive("context_length", 4096),
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-6),
            rope_parameters={"rope_type": "default", "rope_theta": number("rope.freq_base", 10000.0)},
            attention_bias=False, tie_word_embeddings=False,
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"), eos_token_id=md.get("tokenizer.ggml.eos_token_id"))
    except GGUFError:
        raise
    except Exception as exc:            # the config class's own checks
        raise GGUFError(f"{f.path}: cannot build a {cls.__name__} from the file's metadata "
                        f"({type(exc).__name__}: {exc})") from exc
    scaling = _rope_scaling(f)
    if scaling is not None:
        config.rope_parameters = {**config.rope_parameters, **scaling}
    return config


def _rope_scaling(f: GGUFFile) -> Optional[dict]:
    """YaRN as llama.cpp computes deepseek2's (module docstring); linear scaling as for any architecture."""
    scaling = read_rope_scaling(f, accept=("yarn_log_multiplier",))
    if scaling is None or scaling["rope_type"] != "yarn":
        return scaling
    log_mul = metadata_number(f, f"{ARCH}.rope.scaling.yarn_log_multiplier")
    if not log_mul:
        # llama.cpp then scales cos/sin by 1 + 0.1 ln(factor) and the attention by its square as well; DeepSeek's
        # files always carry the multiplier.
        raise GGUFError(f"{f.path}: YaRN without {ARCH}.rope.scaling.yarn_log_multiplier is not supported")
    mscale = log_mul / 0.1
    return {**scaling, "mscale": mscale, "mscale_all_dim": mscale}


def deepseek2_metadata(config) -> dict:
    """The deepseek2 keys (without the architecture prefix) llama.cpp reads beyond the common ones, for an MLA file;
    a ValueError for what llama.cpp would compute differently."""
    if getattr(config, "attention_bias", False):
        raise ValueError("save_gguf: llama.cpp's deepseek2 has no attention biases (attention_bias=True)")
    if not getattr(config, "rope_interleave", True):
        raise ValueError("save_gguf: llama.cpp's deepseek2 rotates adjacent pairs (rope_interleave=True); this "
                         "model rotates halves")
    if config.n_shared_experts < 1:
        raise ValueError("save_gguf: llama.cpp's deepseek2 needs at least one shared expert (n_shared_experts)")
    softmax = config.model_type == "deepseek_v2"
    if softmax and (getattr(config, "topk_method", "greedy") != "greedy" or (config.n_group or 1) > 1):
        raise ValueError(f"save_gguf: DeepSeek-V2 routing {config.topk_method!r} over {config.n_group} groups: "
                         f"llama.cpp scores a group by its two best experts, this model by its best")
    if softmax and config.norm_topk_prob:
        raise ValueError("save_gguf: transformers' DeepSeek-V2 ignores norm_topk_prob (it never renormalizes); "
                         "llama.cpp would renormalize")
    params = dict(getattr(config, "rope_parameters", None) or {})
    mscale, mscale_all = params.pop("mscale", None), params.pop("mscale_all_dim", None)
    yarn = params.get("rope_type") == "yarn"
    if yarn and not (mscale and mscale == mscale_all):
        raise ValueError(f"save_gguf: YaRN with mscale={mscale!r}, mscale_all_dim={mscale_all!r}: llama.cpp's "
                         f"deepseek2 computes it with one nonzero mscale for both")
    if not yarn and (mscale or mscale_all):
        raise ValueError("save_gguf: mscale without YaRN cannot be written")
    rope_md = config_rope_metadata(_WithRope(params))
    groups, used_groups = int(config.n_group or 1), int(config.topk_group or 1)
    kv_lora, rope = int(config.kv_lora_rank), int(config.qk_rope_head_dim)
    md = {**rope_md, "rope.dimension_count": rope, "attention.head_count_kv": 1,
          "attention.q_lora_rank": int(config.q_lora_rank or 0), "attention.kv_lora_rank": kv_lora,
          "attention.key_length": kv_lora + rope, "attention.value_length": kv_lora,
          "attention.key_length_mla": int(config.qk_nope_head_dim) + rope,
          "attention.value_length_mla": int(config.v_head_dim),
          "leading_dense_block_count": int(config.first_k_dense_replace),
          "expert_shared_count": int(config.n_shared_experts),
          "expert_weights_scale": float(config.routed_scaling_factor),
          "expert_weights_norm": bool(config.norm_topk_prob),
          "expert_gating_func": SOFTMAX_GATING if softmax else SIGMOID_GATING}
    if groups > 1 and not softmax:
        md.update({"expert_group_count": groups, "expert_group_used_count": used_groups})
    if yarn:
        md["rope.scaling.yarn_log_multiplier"] = 0.1 * float(mscale_all)
    return md


class _WithRope:
    """A stand-in config carrying only rope parameters (for config_rope_metadata)."""

    def __init__(self, params: dict):
        self.rope_parameters = params

