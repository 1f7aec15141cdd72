"""DeepSeek-V3-style GGUF files (llama.cpp's deepseek2): multi-head latent attention, whose key/value expansion MLA
files store split per head (attn_k_b transposed, attn_v_b), a dense first block, then MoE blocks with group-limited
sigmoid routing, a selection bias and a shared expert; YaRN with DeepSeek's attention-scale correction;
DeepSeek-V2-Lite's softmax routing (transformers' deepseek_v2). transformers has no GGUF reader for the
architecture, so the references are the transformers model itself (its expert stacks set to the file's dequantized
bytes) and, when installed, llama.cpp."""

import pytest
import torch

from offload_kernels import OffloadedExperts, OffloadedLinear
from offload_kernels.formats import dequantize, quantize
from offload_kernels.formats.gguf_io import GGUFError, GGUFFile
from offload_kernels.model.deepseek2 import LatentKVProjection
from offload_kernels.model.gguf_export import save_gguf
from offload_kernels.model.gguf_model import load_gguf_model
from offload_kernels.model.shapes import gguf_inventory

from .moe_files import assert_matches_file_experts, assert_on_demand_equals_resident, resaved, save_test_files
from .test_gguf_model import IDS, _rewrite, needs_llama_cpp, parity_quantized_and_dequantized

transformers = pytest.importorskip("transformers")
if not hasattr(pytest.importorskip("transformers.integrations.moe"), "use_experts_implementation"):
    pytest.skip("this transformers has no 3-D expert modules (use_experts_implementation: transformers 5)",
                allow_module_level=True)
if not hasattr(transformers, "DeepseekV3ForCausalLM"):
    pytest.skip("this transformers has no DeepSeek-V3 (deepseek_v3)", allow_module_level=True)

EXPERTS, USED, WIDTH, LAYERS, HEADS = 8, 2, 256, 3, 4
NOPE, ROPE, V_HEAD, KV_LORA = 32, 16, 32, 128


def tiny_deepseek_v3(seed=0, **config):
    """Block 0 dense, blocks 1-2 MoE over 4 groups of 2 experts (2 groups used); sharp attention, router and
    selection bias, so a wrong latent split, rotation, expert choice or weighting shows."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=320, hidden_size=256, intermediate_size=512, moe_intermediate_size=WIDTH,
              num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=128,
              kv_lora_rank=KV_LORA, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V_HEAD,
              n_routed_experts=EXPERTS, num_experts_per_tok=USED, n_group=4, topk_group=2, n_shared_experts=1,
              first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=128)
    kw.update(config)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kw)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_b_proj if attn.q_lora_rank else attn.q_proj, attn.kv_b_proj):
                proj.weight.mul_(4)
            for norm in (attn.kv_a_layernorm, getattr(attn, "q_a_layernorm", None)):
                if norm is not None:
                    norm.weight.uniform_(0.5, 1.5)
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 0.3)
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    return model


def _yarn_model(seed=3):
    """YaRN past a 4-token original context (the test ids reach position 9), DeepSeek's mscale correction."""
    return tiny_deepseek_v3(seed=seed, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4,
        "mscale": 0.707, "mscale_all_dim": 0.707})


@pytest.fixture(scope="module")
def model():
    return tiny_deepseek_v3()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    return save_test_files(model, tmp_path_factory.mktemp("gguf_deepseek2"))


def test_an_f32_file_gives_the_transformers_models_logits(model, files):
    """Names, the MLA split and its transposed k half, the latent norms, group-limited routing with its selection
    bias and scaling, the shared expert, the dense first block: on the f32 file the loaded model is the original
    (its experts at the file's q8_0 values) to float rounding."""
    f = GGUFFile(files["f32"])
    md = {k.partition(".")[2]: v for k, v in f.metadata.items() if k.startswith("deepseek2.")}
    assert (md["attention.key_length"], md["attention.value_length"]) == (KV_LORA + ROPE, KV_LORA)   # latent widths
    assert (md["attention.key_length_mla"], md["attention.value_length_mla"]) == (NOPE + ROPE, V_HEAD)
    assert (md["attention.head_count_kv"], md["rope.dimension_count"]) == (1, ROPE)
    assert (md["expert_group_count"], md["expert_group_used_count"], md["expert_gating_func"]) == (4, 2, 2)
    assert f.info("blk.1.attn_k_b.weight").shape == (HEADS, KV_LORA, NOPE)
    assert f.info("blk.1.attn_v_b.weight").shape == (HEADS, V_HEAD, KV_LORA)
    assert "blk.0.attn_kv_b.weight" not in f and "blk.0.ffn_gate_exps.weight" not in f
    # the split is the transformers weight's per-head k rows, transposed, and v rows
    kv_b = model.model.layers[1].self_attn.kv_b_proj.weight.view(HEADS, NOPE + V_HEAD, KV_LORA)
    assert torch.equal(f.tensor("blk.1.attn_k_b.weight"), kv_b[:, :NOPE].transpose(1, 2))
    assert torch.equal(f.tensor("blk.1.attn_v_b.weight"), kv_b[:, NOPE:])

    loaded = load_gguf_model(files["f32"], dtype=torch.float32, device="cpu")
    cfg = loaded.config
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == \
        (128, KV_LORA, NOPE, ROPE, V_HEAD)
    assert (cfg.n_group, cfg.topk_group, cfg.first_k_dense_replace, cfg.routed_scaling_factor, cfg.norm_topk_prob,
            cfg.rope_interleave) == (4, 2, 1, 2.5, True, True)
    assert isinstance(loaded.model.layers[0].self_attn.kv_b_proj, LatentKVProjection)
    torch.testing.assert_close(loaded.model.layers[1].mlp.gate.e_score_correction_bias,
                               model.model.layers[1].mlp.gate.e_score_correction_bias, rtol=0, atol=0)
    assert_matches_file_experts(loaded, model, IDS)


@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_quantized_files_load_over_their_own_bytes(model, files, name, tmp_path):
    """v_proj is an OffloadedLinear over attn_v_b's bytes, the experts over the stacks'; attn_k_b, whose rows run
    along the head dimension, is the one matrix held dequantized (and counted as such by the planner)."""
    path = files[name]
    loaded, report = load_gguf_model(path, dtype=torch.float32, device="cpu", return_report=True)
    f = GGUFFile(path)
    kv = loaded.model.layers[2].self_attn.kv_b_proj
    assert isinstance(kv.v_proj, OffloadedLinear) and type(kv.k_proj) is torch.nn.Linear
    assert torch.equal(kv.v_proj.weight, f.tensor("blk.2.attn_v_b.weight").data.view(kv.v_proj.weight.shape))
    k_b = dequantize(f.tensor("blk.2.attn_k_b.weight"), torch.float32).view(HEADS, KV_LORA, NOPE)
    assert torch.equal(kv.k_proj.weight, k_b.transpose(1, 2).reshape(HEADS * NOPE, KV_LORA))
    experts = loaded.model.layers[2].mlp.experts
    assert isinstance(experts, OffloadedExperts) and not hasattr(loaded.model.layers[0].mlp, "experts")
    assert report.experts == ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]
    # exactly the model of the file's dequantized values (every tensor but the expert stacks, which load only
    # quantized, dequantized to f32 by the reference path)
    dense = {n: _float(f, n) for n in f if f.info(n).is_quantized and "_exps." not in n}
    dequantized = load_gguf_model(_rewrite(tmp_path, path, "dequantized.gguf", tensors=dense), dtype=torch.float32,
                                  device="cpu")
    with torch.no_grad():
        ours, exact, original = loaded(IDS).logits, dequantized(IDS).logits, model(IDS).logits
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    # and the original within what the formats cost (q4_k's error on this sharp tiny model flips a few routings)
    span = float(original.max() - original.min())
    assert float((ours - original).abs().max()) <= (0.05 if name == "q8_0" else 0.15) * span
    inventory = gguf_inventory(path)
    names = {s.name for s in inventory.linears}
    assert "model.layers.2.self_attn.kv_b_proj.v_proj" in names
    assert not any(n.endswith("k_proj") for n in names)


def test_saving_a_loaded_model_writes_the_same_bytes(files, tmp_path):
    """Everything quantized comes back byte for byte, attn_k_b too (requantized from its exact dequantized values:
    its fallback format's blocks reproduce themselves)."""
    a, b = resaved(files["q4_k_m"], tmp_path)
    assert a.info("blk.1.attn_k_b.weight").type_name not in ("q4_k", "f16")      # 32-wide rows: a fallback format
    for name in a:
        if a.info(name).is_quantized or "exp_probs_b" in name:
            assert a.info(name).shape == b.info(name).shape, name
            assert torch.equal(b.raw_bytes(name), a.raw_bytes(name)), name
    for key in ("attention.key_length", "attention.value_length", "attention.key_length_mla",
                "attention.value_length_mla", "attention.q_lora_rank", "attention.kv_lora_rank",
                "attention.head_count_kv",
                "rope.dimension_count", "expert_group_count", "expert_group_used_count", "expert_gating_func"):
        assert a.metadata[f"deepseek2.{key}"] == b.metadata[f"deepseek2.{key}"], key


def _float(f: GGUFFile, name: str) -> torch.Tensor:
    t = f.tensor(name)
    return (dequantize(t, torch.float32) if f.info(name).is_quantized else t.float()).reshape(f.info(name).shape)


def _legacy_file(tmp_path, path, name="legacy.gguf"):
    """``path`` as pre-MLA converters wrote it: one attn_kv_b per block (q8_0) and the per-head sizes under the plain
    keys, no _mla keys."""
    f = GGUFFile(path)
    tensors = {}
    for i in range(LAYERS):
        k_b, v_b = _float(f, f"blk.{i}.attn_k_b.weight"), _float(f, f"blk.{i}.attn_v_b.weight")
        kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, KV_LORA)
        tensors[f"blk.{i}.attn_kv_b.weight"] = quantize(kv_b, "q8_0")
    drop = [f"blk.{i}.attn_{p}_b.weight" for i in range(LAYERS) for p in "kv"]
    drop += ["deepseek2.attention.key_length_mla", "deepseek2.attention.value_length_mla"]
    return _rewrite(tmp_path, path, name, {"deepseek2.attention.key_length": NOPE + ROPE,
                                           "deepseek2.attention.value_length": V_HEAD,
                                           "deepseek2.attention.head_count_kv": HEADS}, tensors, drop=drop)


def test_a_pre_mla_file_with_one_kv_b_matrix(model, files, tmp_path):
    legacy = _legacy_file(tmp_path, files["f32"])
    loaded = load_gguf_model(legacy, dtype=torch.float32, device="cpu")
    kv = loaded.model.layers[1].self_attn.kv_b_proj
    assert isinstance(kv, OffloadedLinear) and kv.qtype == "q8_0" and kv.out_features == HEADS * (NOPE + V_HEAD)
    mla = load_gguf_model(files["f32"], dtype=torch.float32, device="cpu")
    with torch.no_grad():
        ours, exact = loaded(IDS).logits, mla(IDS).logits
    assert float((ours - exact).abs().max()) <= 0.02 * float(exact.max() - exact.min())


def test_yarn_with_deepseeks_attention_scale(tmp_path):
    """llama.cpp's converter writes 0.1 * mscale_all_dim as yarn_log_multiplier; read back, transformers computes
    unscaled cos/sin and the attention scale times (1 + 0.1 mscale_all_dim ln factor)^2, as llama.cpp does."""
    model = _yarn_model()
    path = save_gguf(model, tmp_path / "f32.gguf", "f32", qtype_overrides={"*_exps.weight": "q8_0"})
    md = GGUFFile(path).metadata
    assert md["deepseek2.rope.scaling.type"] == "yarn" and md["deepseek2.rope.scaling.factor"] == 4.0
    assert md["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707)
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    params = loaded.config.rope_parameters
    assert params["mscale"] == params["mscale_all_dim"] == pytest.approx(0.707)
    assert params["original_max_position_embeddings"] == 4
    assert_matches_file_experts(loaded, model, IDS)
    # the correction matters here: without it the logits move
    plain = _rewrite(tmp_path, path, "plain.gguf", drop=[k for k in md if ".rope.scaling." in k])
    with torch.no_grad():
        assert not torch.allclose(load_gguf_model(plain, dtype=torch.float32, device="cpu")(IDS).logits,
                                  loaded(IDS).logits, atol=1e-3)


def test_without_a_q_latent(tmp_path):
    """DeepSeek-V2-Lite-style attention: q projected directly (attn_q), q_lora_rank written as 0."""
    model = tiny_deepseek_v3(seed=4, q_lora_rank=None)
    path = save_gguf(model, tmp_path / "f32.gguf", "f32", qtype_overrides={"*_exps.weight": "q8_0"})
    f = GGUFFile(path)
    assert "blk.0.attn_q.weight" in f and "blk.0.attn_q_a.weight" not in f
    assert f.metadata["deepseek2.attention.q_lora_rank"] == 0
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert loaded.config.q_lora_rank is None
    assert_matches_file_experts(loaded, model, IDS)


def test_prediction_layers_at_the_end_of_the_file_are_skipped(files, tmp_path):
    path = files["q8_0"]
    f = GGUFFile(path)
    extra = {n.replace("blk.2.", f"blk.{LAYERS}."): f.tensor(n) for n in f if n.startswith("blk.2.")}
    shapes = {n: f.info(n.replace(f"blk.{LAYERS}.", "blk.2.")).shape for n in extra
              if len(f.info(n.replace(f"blk.{LAYERS}.", "blk.2.")).shape) > 2}
    g = torch.Generator().manual_seed(0)
    extra[f"blk.{LAYERS}.nextn.eh_proj.weight"] = quantize(torch.randn(256, 512, generator=g), "q8_0")
    for norm in ("enorm", "hnorm", "shared_head_norm"):
        extra[f"blk.{LAYERS}.nextn.{norm}.weight"] = torch.ones(256)
    with_mtp = _rewrite(tmp_path, path, "mtp.gguf", {"deepseek2.block_count": LAYERS + 1,
                                                      "deepseek2.nextn_predict_layers": 1}, extra, shapes=shapes)
    plain = load_gguf_model(path, dtype=torch.float32, device="cpu")
    loaded = load_gguf_model(with_mtp, dtype=torch.float32, device="cpu")
    assert loaded.config.num_hidden_layers == LAYERS
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, plain(IDS).logits, rtol=0, atol=0)


def test_what_transformers_would_compute_differently_is_refused(files, tmp_path):
    path = files["q8_0"]
    for i, (md, drop, match) in enumerate((
            ({"deepseek2.expert_gating_func": 1}, (), "softmax routing limited to 2 of 4 expert groups"),
            ({"deepseek2.expert_group_count": 3}, (), "3 expert groups .* do not divide 8 experts"),
            ({"deepseek2.attention.q_lora_rank": 0}, (), "q_lora_rank is None but the file has no uncompressed"),
            ({"deepseek2.attention.key_length_mla": ROPE}, (), "leaves no unrotated dimensions"),
            ({"deepseek2.attention.kv_lora_rank": 64}, (), r"attn_kv_a_mqa.weight' has shape \(144, 256\)"),
            ({"deepseek2.rope.scaling.type": "yarn", "deepseek2.rope.scaling.factor": 4.0,
              "deepseek2.rope.scaling.original_context_length": 4}, (), "YaRN without .*yarn_log_multiplier"),
            ({}, ("blk.1.attn_v_b.weight",), r"missing weights for model\.layers\.1\.self_attn\.kv_b_proj\.v_proj"))):
        with pytest.raises(GGUFError, match=match):
            load_gguf_model(_rewrite(tmp_path, path, f"bad{i}.gguf", md, drop=drop), device="cpu")
    for bad, match in (({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                             "original_max_position_embeddings": 4, "mscale": 1.0,
                                             "mscale_all_dim": 0.5}}, "one nonzero mscale for both"),
                       ({"attention_bias": True}, "no attention biases"),
                       ({"rope_interleave": False}, "rotates adjacent pairs")):
        with pytest.raises(ValueError, match=match):
            save_gguf(tiny_deepseek_v3(**bad), tmp_path / "m.gguf", "q8_0")
        assert not (tmp_path / "m.gguf").exists()


def test_experts_on_demand_from_a_file(files):
    assert_on_demand_equals_resident(files["q4_k_m"], "4MiB", 3, IDS)


@needs_llama_cpp
@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_parity_with_llama_cpp(files, name, tmp_path):
    """llama.cpp (its MLA path: attention over the latent, k_b absorbed into q, v_b after) is the reference for what
    our exporter and loader both assume: on the file with every quantized tensor dequantized, it and we agree to
    float rounding; on the quantized file its 8-bit activations leave a few percent of the logit range."""
    f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(files[name], tmp_path,
                                                                                f"deepseek2 {name}")
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
    assert max_diff <= 0.05 * span and round(top1 * IDS.shape[1]) >= 8


@needs_llama_cpp
@pytest.mark.parametrize("variant", ["yarn", "no_q_latent", "pre_mla", "fused_gate_up"])
def test_variants_parity_with_llama_cpp(files, variant, tmp_path):
    if variant == "yarn":
        path = save_gguf(_yarn_model(), tmp_path / "q8_0.gguf", "q8_0")
    elif variant == "no_q_latent":
        path = save_gguf(tiny_deepseek_v3(seed=4, q_lora_rank=None), tmp_path / "q8_0.gguf", "q8_0")
    elif variant == "fused_gate_up":        # one ffn_gate_up_exps per block, as --fuse-gate-up-exps converts
        path = save_gguf(tiny_deepseek_v3(), tmp_path / "q8_0.gguf", "q8_0", fuse_gate_up_exps=True)
        assert "blk.1.ffn_gate_up_exps.weight" in GGUFFile(path) and "blk.1.ffn_up_exps.weight" not in GGUFFile(path)
    else:                                   # llama.cpp's non-MLA path: attention over expanded heads
        path = _legacy_file(tmp_path, files["q8_0"], "pre_mla.gguf")
    f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(path, tmp_path, f"deepseek2 {variant}")
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
    assert max_diff <= 0.05 * span and round(top1 * IDS.shape[1]) >= 8


def tiny_deepseek_v2(seed=5, **config):
    """DeepSeek-V2-Lite-style: no q latent, softmax routing over all experts (greedy), unnormalized, scaled."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=320, hidden_size=256, intermediate_size=512, moe_intermediate_size=WIDTH,
              num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=None,
              kv_lora_rank=KV_LORA, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V_HEAD,
              n_routed_experts=EXPERTS, num_experts_per_tok=USED, n_shared_experts=2, first_k_dense_replace=1,
              routed_scaling_factor=1.5, topk_method="greedy", max_position_embeddings=128)
    kw.update(config)
    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**kw)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.kv_b_proj.weight.mul_(4)
            layer.self_attn.kv_a_layernorm.weight.uniform_(0.5, 1.5)
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 0.3)
    return model


def test_softmax_routing_loads_as_deepseek_v2(tmp_path):
    """DeepSeek-V2-Lite and Coder-V2-Lite files route by softmax (expert_gating_func 1, or unset in older files):
    transformers' DeepSeek-V2 model, greedy top k, unnormalized, scaled."""
    model = tiny_deepseek_v2()
    path = save_gguf(model, tmp_path / "f32.gguf", "f32", qtype_overrides={"*_exps.weight": "q8_0"})
    md = GGUFFile(path).metadata
    assert (md["deepseek2.expert_gating_func"], md["deepseek2.expert_weights_norm"]) == (1, False)
    assert "deepseek2.expert_group_count" not in md and "blk.1.exp_probs_b.bias" not in GGUFFile(path)
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert loaded.config.model_type == "deepseek_v2" and loaded.config.routed_scaling_factor == 1.5
    assert_matches_file_experts(loaded, model, IDS)
    unset = load_gguf_model(_rewrite(tmp_path, path, "unset.gguf", drop=("deepseek2.expert_gating_func",)),
                            dtype=torch.float32, device="cpu")
    assert unset.config.model_type == "deepseek_v2"
    for i, (md_change, match) in enumerate((
            ({"deepseek2.expert_weights_norm": True}, "does not renormalize"),
            ({"deepseek2.expert_group_count": 4, "deepseek2.expert_group_used_count": 2},
             "scores a group by its two best experts"),
            ({"deepseek2.expert_gating_func": 3}, "neither softmax"))):
        with pytest.raises(GGUFError, match=match):
            load_gguf_model(_rewrite(tmp_path, path, f"bad_v2_{i}.gguf", md_change), device="cpu")
    for bad, match in (({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}, "its best"),
                       ({"norm_topk_prob": True}, "ignores norm_topk_prob")):
        with pytest.raises(ValueError, match=match):
            save_gguf(tiny_deepseek_v2(**bad), tmp_path / "m.gguf", "q8_0")


@needs_llama_cpp
@pytest.mark.parametrize("yarn", [False, True])
def test_softmax_routing_parity_with_llama_cpp(tmp_path, yarn):
    rope = ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 4, "mscale": 0.707, "mscale_all_dim": 0.707}}
            if yarn else {})
    path = save_gguf(tiny_deepseek_v2(**rope), tmp_path / "q8_0.gguf", "q8_0")
    f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(path, tmp_path,
                                                                                f"deepseek2 softmax yarn={yarn}")
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
    assert max_diff <= 0.05 * span and round(top1 * IDS.shape[1]) >= 8


def test_an_offloaded_model_saves_its_latent_projections(model, tmp_path):
    """offload() of the transformers model quantizes kv_b_proj whole; saved, it is split into attn_k_b/attn_v_b
    again (dequantized, the k rows transposed per head, each part quantized along its own rows)."""
    import copy

    import offload_kernels as ok

    m = copy.deepcopy(model)
    ok.offload(m, qtype="q8_0", device="cpu")
    kv = m.model.layers[1].self_attn.kv_b_proj
    assert isinstance(kv, OffloadedLinear)
    f = GGUFFile(save_gguf(m, tmp_path / "offloaded.gguf", "q8_0"))
    rows = kv.dequantized_weight(torch.float32).view(HEADS, NOPE + V_HEAD, KV_LORA)
    k_b = dequantize(f.tensor("blk.1.attn_k_b.weight"), torch.float32).view(HEADS, KV_LORA, NOPE)
    v_b = dequantize(f.tensor("blk.1.attn_v_b.weight"), torch.float32).view(HEADS, V_HEAD, KV_LORA)
    for ours, expected in ((k_b, rows[:, :NOPE].transpose(1, 2)), (v_b, rows[:, NOPE:])):
        assert float((ours - expected).norm() / expected.norm()) < 0.01          # one more q8_0 rounding
    with torch.no_grad():
        again, before = load_gguf_model(f.path, dtype=torch.float32, device="cpu")(IDS).logits, m(IDS).logits
    assert float((again - before).abs().max()) <= 0.05 * float(before.max() - before.min())


@pytest.mark.gpu
@pytest.mark.parametrize("experts", ["with_block", "on_demand"])
def test_cuda_streamed_file_matches_the_cpu_model(files, experts):
    """On the GPU: the Triton kernels over attn_v_b's and the expert stacks' bytes, streamed block by block through
    the transfer engine (or the experts through the cache), the dense k half beside them; the CPU model (the torch
    reference path over the same bytes) is the reference."""
    from .test_gguf_moe import _one_block_budget

    path = files["q4_k_m"]
    cpu = load_gguf_model(path, dtype=torch.float32, device="cpu")
    gpu, report = load_gguf_model(path, dtype=torch.float32, device="cuda", gpu_budget=_one_block_budget(path),
                                  num_slots=1, experts=experts, return_report=True)
    assert report.placement.streamed_groups
    with torch.no_grad():
        expected = cpu(IDS).logits
        for _ in range(2):                  # the second pass runs the learned prefetch order
            ours = gpu(IDS.cuda()).logits.cpu()
            torch.testing.assert_close(ours, expected, rtol=0, atol=1e-3 * float(expected.max() - expected.min()))


def test_selection_biases_are_optional(files, tmp_path):
    """llama.cpp's deepseek2 loader takes exp_probs_b as optional (routing by the scores alone without it): a file
    without them is the model with zero selection biases."""
    path = files["q8_0"]
    bare = _rewrite(tmp_path, path, "bare.gguf", drop=[f"blk.{i}.exp_probs_b.bias" for i in (1, 2)])
    loaded = load_gguf_model(bare, dtype=torch.float32, device="cpu")
    reference = load_gguf_model(path, dtype=torch.float32, device="cpu")
    for i in (1, 2):
        assert not loaded.model.layers[i].mlp.gate.e_score_correction_bias.any()
        reference.model.layers[i].mlp.gate.e_score_correction_bias.zero_()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, reference(IDS).logits, rtol=0, atol=0)


@needs_llama_cpp
def test_selection_biases_are_optional_in_llama_cpp_too(files, tmp_path):
    bare = _rewrite(tmp_path, files["q8_0"], "bare.gguf", drop=[f"blk.{i}.exp_probs_b.bias" for i in (1, 2)])
    f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(bare, tmp_path, "deepseek2 no bias")
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
