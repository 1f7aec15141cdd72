"""GLM-4.5 GGUF files (llama.cpp's glm4moe): a dense first block, then MoE blocks with sigmoid routing, a selection
bias and a shared expert; q and k rotated on half their dimensions; multi-token-prediction blocks at the end of
the file that llama.cpp loads and never runs. transformers has no GGUF reader for the architecture, so the
references are the transformers model itself (its expert stacks set to the file's dequantized bytes) and, when
installed, llama.cpp."""

import pytest
import torch

from offload_kernels import OffloadedExperts
from offload_kernels.formats import quantize
from offload_kernels.formats.gguf_io import GGUFError, GGUFFile
from offload_kernels.model.gguf_export import save_gguf
from offload_kernels.model.gguf_model import load_gguf_model
from offload_kernels.model.shapes import gguf_inventory

from .moe_files import (assert_matches_file_experts, assert_on_demand_equals_resident, resaved, save_test_files,
                        with_file_experts)
from .test_gguf_model import IDS, _rewrite, needs_llama_cpp, parity_quantized_and_dequantized

transformers = pytest.importorskip("transformers")
if not hasattr(pytest.importorskip("transformers.integrations.moe"), "use_experts_implementation"):
    pytest.skip("this transformers has no 3-D expert modules (use_experts_implementation: transformers 5)",
                allow_module_level=True)
if not hasattr(transformers, "Glm4MoeForCausalLM"):
    pytest.skip("this transformers has no GLM-4.5 (glm4_moe)", allow_module_level=True)

EXPERTS, USED, WIDTH, LAYERS = 8, 2, 256, 3


def tiny_glm4_moe(seed=0, **config):
    """Block 0 dense, blocks 1-2 MoE; 64-wide heads rotated on 32 dimensions; sharp attention, router and selection
    bias (a wrong rotary split, expert choice or weighting shows)."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=320, hidden_size=256, intermediate_size=512, moe_intermediate_size=WIDTH,
              num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=128, n_routed_experts=EXPERTS, num_experts_per_tok=USED, n_shared_experts=1,
              first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True)
    kw.update(config)
    model = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**kw)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.mul_(6)
            attn.k_proj.weight.mul_(6)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.bias.normal_(0, 0.5)
            if getattr(attn, "q_norm", None) is not None:
                attn.q_norm.weight.uniform_(0.5, 1.5)
                attn.k_norm.weight.uniform_(0.5, 1.5)
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 0.3)
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_glm4_moe()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    return save_test_files(model, tmp_path_factory.mktemp("gguf_glm4moe"))


def test_an_f32_file_gives_the_transformers_models_logits(model, files):
    """Names, the dense first block, the router with its selection bias and scaling, the shared expert, the
    partial rotary embedding, attention biases: on the f32 file the loaded model is the original (its experts
    at the file's q8_0 values) to float rounding."""
    path = files["f32"]
    info = GGUFFile(path).tensor_infos
    assert info["blk.1.exp_probs_b.bias"].shape == (EXPERTS,) and info["blk.1.exp_probs_b.bias"].type_name == "f32"
    assert "blk.0.ffn_gate_exps.weight" not in info and info["blk.0.ffn_gate.weight"].shape == (512, 256)
    assert GGUFFile(path).metadata["glm4moe.rope.dimension_count"] == 32
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    cfg = loaded.config
    assert (cfg.first_k_dense_replace, cfg.routed_scaling_factor, cfg.norm_topk_prob, cfg.n_shared_experts) == \
        (1, 2.5, True, 1)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5 and cfg.head_dim == 64
    torch.testing.assert_close(loaded.model.layers[1].mlp.gate.e_score_correction_bias,
                               model.model.layers[1].mlp.gate.e_score_correction_bias, rtol=0, atol=0)
    assert loaded.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert_matches_file_experts(loaded, model, IDS)


@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_quantized_files_load_as_offloaded_experts(model, files, name):
    path = files[name]
    loaded, report = load_gguf_model(path, dtype=torch.float32, device="cpu", return_report=True)
    experts = loaded.model.layers[2].mlp.experts
    assert isinstance(experts, OffloadedExperts) and not hasattr(loaded.model.layers[0].mlp, "experts")
    assert experts.qtypes == ({"gate_up_proj": "q4_k", "down_proj": "q6_k"} if name == "q4_k_m"
                              else {"gate_up_proj": "q8_0", "down_proj": "q8_0"})
    assert report.experts == ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]
    f = GGUFFile(path)
    gate = f.tensor("blk.2.ffn_gate_exps.weight")
    assert torch.equal(experts.gate_up_proj.weight.view(EXPERTS, 2, WIDTH, -1)[:, 0].reshape(gate.data.shape),
                       gate.data)
    with torch.no_grad():
        ours, expected = loaded(IDS).logits, with_file_experts(model, loaded)(IDS).logits
    # the other linears are quantized in the file: within what their formats cost
    assert float((ours - expected).abs().max()) <= 0.05 * float(expected.max() - expected.min())
    inventory = gguf_inventory(path)
    assert {s.name for s in inventory.linears if s.num_experts > 1} == {
        f"model.layers.{i}.mlp.experts.{p}" for i in (1, 2) for p in ("gate_up_proj", "down_proj")}


def test_saving_a_loaded_model_writes_the_same_bytes(files, tmp_path):
    a, b = resaved(files["q4_k_m"], tmp_path)
    for name in a:
        if a.info(name).is_quantized or "exp_probs_b" in name:
            assert torch.equal(b.raw_bytes(name), a.raw_bytes(name)), name
    for key in ("rope.dimension_count", "expert_shared_count", "leading_dense_block_count", "expert_weights_scale",
                "expert_weights_norm", "expert_gating_func", "attention.key_length"):
        assert a.metadata[f"glm4moe.{key}"] == b.metadata[f"glm4moe.{key}"], key


def test_prediction_layers_at_the_end_of_the_file_are_skipped(files, tmp_path):
    """llama.cpp's converter writes GLM-4.5's multi-token-prediction layer as one more block (its attention and
    MoE tensors plus nextn.*), counted in block_count; llama.cpp loads and never runs it, and neither do we."""
    path = files["q8_0"]
    f = GGUFFile(path)
    extra = {n.replace("blk.2.", f"blk.{LAYERS}."): f.tensor(n) for n in f if n.startswith("blk.2.")}
    shapes = {n: f.info(n.replace(f"blk.{LAYERS}.", "blk.2.")).shape for n in extra if "_exps." in n}
    g = torch.Generator().manual_seed(0)
    extra[f"blk.{LAYERS}.nextn.eh_proj.weight"] = quantize(torch.randn(256, 512, generator=g), "q8_0")
    for norm in ("enorm", "hnorm", "shared_head_norm"):
        extra[f"blk.{LAYERS}.nextn.{norm}.weight"] = torch.ones(256)
    with_mtp = _rewrite(tmp_path, path, "mtp.gguf", {"glm4moe.block_count": LAYERS + 1,
                                                      "glm4moe.nextn_predict_layers": 1}, extra, shapes=shapes)
    plain = load_gguf_model(path, dtype=torch.float32, device="cpu")
    loaded = load_gguf_model(with_mtp, dtype=torch.float32, device="cpu")
    assert loaded.config.num_hidden_layers == LAYERS
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, plain(IDS).logits, rtol=0, atol=0)
    # without the count, the extra block is a block the model does not have
    no_count = _rewrite(tmp_path, with_mtp, "no_count.gguf", drop=("glm4moe.nextn_predict_layers",))
    with pytest.raises(GGUFError, match="nextn"):
        load_gguf_model(no_count, device="cpu")


def test_what_transformers_would_compute_differently_is_refused(files, tmp_path):
    path = files["q8_0"]
    for i, (md, drop, match) in enumerate((
            ({"glm4moe.expert_gating_func": 1}, (), "expert_gating_func=1: only sigmoid routing"),
            ({}, ("glm4moe.expert_shared_count",), "expert_shared_count must be a positive integer"),
            ({}, ("blk.1.exp_probs_b.bias",), r"missing tensors for model\.layers\.1\.mlp\.gate\.e_score_correction"),
            ({"glm4moe.rope.dimension_count": 33}, (), "rope.dimension_count 33 is not an even number"),
            ({"glm4moe.nextn_predict_layers": LAYERS}, (), "leaves none of the 3 blocks"))):
        with pytest.raises(GGUFError, match=match):
            load_gguf_model(_rewrite(tmp_path, path, f"bad{i}.gguf", md, drop=drop), device="cpu")
    with pytest.raises(ValueError, match="without groups"):
        save_gguf(tiny_glm4_moe(n_group=2, topk_group=1), tmp_path / "m.gguf", "q8_0")
    assert not (tmp_path / "m.gguf").exists()


def test_qk_norm_variant(tmp_path):
    """GLM-4.5 (355B) normalizes q and k per head (attn_q_norm, attn_k_norm): present in the file, used."""
    model = tiny_glm4_moe(seed=1, use_qk_norm=True)
    path = save_gguf(model, tmp_path / "f32.gguf", "f32", qtype_overrides={"*_exps.weight": "q8_0"})
    assert "blk.0.attn_q_norm.weight" in GGUFFile(path)
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert loaded.config.use_qk_norm
    assert_matches_file_experts(loaded, model, IDS)


def test_experts_on_demand_from_a_file(files):
    assert_on_demand_equals_resident(files["q4_k_m"], "4MiB", 3, IDS)


@needs_llama_cpp
@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_parity_with_llama_cpp(files, name, tmp_path):
    """llama.cpp is the reference for what both our exporter and loader assume about glm4moe: on the file with
    every quantized tensor dequantized, llama.cpp and we agree to float rounding; on the quantized file its
    8-bit activations leave a few percent of the logit range."""
    f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(files[name], tmp_path,
                                                                                f"glm4moe {name}")
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
    assert max_diff <= 0.05 * span and round(top1 * IDS.shape[1]) >= 8


@needs_llama_cpp
def test_qk_norm_variant_parity_with_llama_cpp(tmp_path):
    path = save_gguf(tiny_glm4_moe(seed=2, use_qk_norm=True), tmp_path / "q8_0.gguf", "q8_0")
    f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(path, tmp_path, "glm4moe qk_norm")
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
    assert max_diff <= 0.05 * span and round(top1 * IDS.shape[1]) >= 8
