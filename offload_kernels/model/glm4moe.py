"""GLM-4.5 (llama.cpp's glm4moe, transformers' glm4_moe): the config from a GGUF file's metadata, and the metadata
from a config.

transformers' GGUF reader has no glm4moe entry, so :func:`glm4moe_config` reads the keys llama.cpp's loader reads
(llama-model.cpp, LLM_ARCH_GLM4_MOE) into a ``Glm4MoeConfig``, and :func:`glm4moe_metadata` writes them back for
save_gguf. What llama.cpp computes and transformers' classes must agree on:

* the first ``leading_dense_block_count`` blocks have a dense MLP (``first_k_dense_replace``);
* routing: sigmoid scores, the top k of score + selection bias (``exp_probs_b``, transformers'
  ``e_score_correction_bias``) chosen, weighted by their scores, renormalized when ``expert_weights_norm``
  (``norm_topk_prob``) and scaled by ``expert_weights_scale`` (``routed_scaling_factor``). llama.cpp has no
  group-limited selection for this architecture: ``n_group`` = ``topk_group`` = 1;
* ``expert_shared_count`` shared experts, one MLP of that many experts' width, added unscaled;
* q and k rotated on their first ``rope.dimension_count`` dimensions (``partial_rotary_factor``), the neox
  layout, which transformers' ``rotate_half`` on the rotated part also is; biases on q, k and v; optional
  per-head q/k RMSNorms (``use_qk_norm``);
* ``nextn_predict_layers`` multi-token-prediction blocks at the end of the file, loaded by llama.cpp and never
  run: not part of the model (gguf_names.prediction_layers).
"""

from __future__ import annotations

from ..formats.gguf_io import GGUFError, GGUFFile
from .gguf_names import EMBEDDING, prediction_layers
from .gguf_rope import metadata_positive_int
from .shapes import expert_used_count

ARCH = "glm4moe"
#: llama.cpp's expert_gating_func values: 0 (none: glm4moe's loader then takes sigmoid), 1 softmax, 2 sigmoid.
_SIGMOID_GATING = (0, 2)


def glm4moe_config(f: GGUFFile):
    """The ``Glm4MoeConfig`` that a glm4moe file's metadata describes (the head size and partial rotary factor
    are set afterwards by gguf_model's _set_head_dim, rope scaling by _set_rope_scaling)."""
    from transformers import Glm4MoeConfig

    md = f.metadata

    def positive(key: str, default=None) -> int:
        return metadata_positive_int(f, f"{ARCH}.{key}", default)

    def number(key: str, default: float) -> float:
        value = md.get(f"{ARCH}.{key}", default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GGUFError(f"{f.path}: metadata {ARCH}.{key} must be a number, got {value!r}")
        return float(value)

    gating = md.get(f"{ARCH}.expert_gating_func", 0)
    if gating not in _SIGMOID_GATING:
        raise GGUFError(f"{f.path}: {ARCH}.expert_gating_func={gating!r}: only sigmoid routing (2) is what "
                        f"transformers' GLM-4.5 computes")
    dense = md.get(f"{ARCH}.leading_dense_block_count", 0)
    if isinstance(dense, bool) or not isinstance(dense, int) or dense < 0:
        raise GGUFError(f"{f.path}: metadata {ARCH}.leading_dense_block_count must be a non-negative integer, "
                        f"got {dense!r}")
    experts = positive("expert_count")
    layers = positive("block_count") - len(prediction_layers(f))
    heads = positive("attention.head_count")
    vocab = md.get(f"{ARCH}.vocab_size") or (f.info(EMBEDDING).shape[0] if EMBEDDING in f else None)
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise GGUFError(f"{f.path}: no vocabulary size ({ARCH}.vocab_size or the {EMBEDDING} tensor)")
    try:
        return Glm4MoeConfig(
            vocab_size=vocab, hidden_size=positive("embedding_length"),
            intermediate_size=positive("feed_forward_length"),
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=positive("attention.head_count_kv", heads),
            max_position_embeddings=positive("context_length", 4096),
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5),
            rope_parameters={"rope_type": "default", "rope_theta": number("rope.freq_base", 10000.0),
                             "partial_rotary_factor": 1.0},
            attention_bias="blk.0.attn_q.bias" in f, use_qk_norm="blk.0.attn_q_norm.weight" in f,
            moe_intermediate_size=positive("expert_feed_forward_length"),
            n_routed_experts=experts, num_experts_per_tok=expert_used_count(f, experts),
            n_shared_experts=positive("expert_shared_count"),
            routed_scaling_factor=number("expert_weights_scale", 1.0),
            norm_topk_prob=bool(md.get(f"{ARCH}.expert_weights_norm", False)),
            n_group=1, topk_group=1, first_k_dense_replace=dense, tie_word_embeddings=False,
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"), eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
            num_nextn_predict_layers=0)
    except GGUFError:
        raise
    except Exception as exc:            # the config class's own checks (heads not dividing, ...)
        raise GGUFError(f"{f.path}: cannot build a GLM-4.5 config from the file's metadata "
                        f"({type(exc).__name__}: {exc})") from exc


def rotary_dim(config, head_dim: int) -> int:
    """How many leading dimensions of a head are rotated (transformers: int(head_dim * partial_rotary_factor))."""
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return int(head_dim * (1.0 if factor is None else factor))


def glm4moe_metadata(config, head_dim: int) -> dict:
    """The glm4moe keys (without the architecture prefix) llama.cpp reads beyond the llama-style ones; a
    ValueError for what llama.cpp would compute differently (group-limited routing)."""
    if (getattr(config, "n_group", 1), getattr(config, "topk_group", 1)) != (1, 1):
        raise ValueError(f"save_gguf: n_group={config.n_group}, topk_group={config.topk_group}: llama.cpp's glm4moe "
                         f"chooses experts without groups (n_group = topk_group = 1)")
    if config.n_shared_experts < 1:
        raise ValueError("save_gguf: llama.cpp's glm4moe needs at least one shared expert (n_shared_experts)")
    rot = rotary_dim(config, head_dim)
    if rot <= 0 or rot % 2:
        raise ValueError(f"save_gguf: {rot} rotated dimensions per head (partial_rotary_factor) is not an even "
                         f"count llama.cpp can rotate")
    return {"rope.dimension_count": rot, "expert_shared_count": int(config.n_shared_experts),
            "leading_dense_block_count": int(config.first_k_dense_replace),
            "expert_weights_scale": float(config.routed_scaling_factor),
            "expert_weights_norm": bool(config.norm_topk_prob), "expert_gating_func": 2,
            "nextn_predict_layers": 0, "attention.key_length": int(head_dim), "attention.value_length": int(head_dim)}
