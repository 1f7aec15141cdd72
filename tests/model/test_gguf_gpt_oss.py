"""OpenAI gpt-oss GGUF files (llama.cpp's gpt-oss): attention with biases and per-head sinks, sliding-window layers
alternating with full ones, YaRN, and MoE blocks whose router and expert stacks have biases, gate and up rows
interleaved in transformers and separate in llama.cpp. The references are the transformers model itself (its expert
stacks set to the file's dequantized bytes) and, when installed, llama.cpp."""

import pytest
import torch

from offload_kernels import OffloadedExperts, OffloadedLinear
from offload_kernels.formats import dequantize
from offload_kernels.formats.gguf_io import GGUFError, GGUFFile
from offload_kernels.model.gguf_export import save_gguf
from offload_kernels.model.gguf_model import load_gguf_model
from offload_kernels.model.shapes import gguf_inventory

from .moe_files import (assert_matches_file_experts, assert_on_demand_equals_resident, resaved, save_test_files,
                        with_file_experts)
from .test_gguf_model import (IDS, _llama_cpp_python, _parity, _rewrite, needs_llama_cpp,
                              parity_quantized_and_dequantized)

transformers = pytest.importorskip("transformers")
if not hasattr(pytest.importorskip("transformers.integrations.moe"), "use_experts_implementation"):
    pytest.skip("this transformers has no 3-D expert modules (use_experts_implementation: transformers 5)",
                allow_module_level=True)
if not hasattr(transformers, "GptOssForCausalLM"):
    pytest.skip("this transformers has no gpt-oss (gpt_oss)", allow_module_level=True)

# hidden 288 (as gpt-oss's 2880) is no multiple of 256: the k-quants fall back there as llama-quantize's do;
# the 4 heads of 64 make o_proj 256 wide, which q4_k tiles.
EXPERTS, USED, WIDTH, HIDDEN, LAYERS, WINDOW = 8, 3, 160, 288, 4, 4
# YaRN over an original context of 32: the correction range ends at 4.37 dimensions, which llama.cpp rounds to 5
# (transformers' truncate=True); with gpt-oss's truncate=False the logits differ (test_parity_with_llama_cpp).
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": True, "rope_theta": 150000.0}


def tiny_gpt_oss(seed=0, **config):
    """4 blocks (sliding, full, sliding, full: the 10-token IDS exceed the 4-token window); sharp attention and
    router; nonzero sinks and biases everywhere; gate_up weights large enough that SwiGLU's clamp at 7 acts."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=320, hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
              sliding_window=WINDOW, num_local_experts=EXPERTS, num_experts_per_tok=USED, rope_parameters=dict(YARN))
    kw.update(config)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**kw)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.mul_(6)
            attn.k_proj.weight.mul_(6)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.bias.normal_(0, 0.5)
            attn.sinks.normal_(0, 1.0)
            layer.mlp.router.weight.normal_(0, 0.3)
            layer.mlp.router.bias.normal_(0, 0.5)
            experts = layer.mlp.experts
            experts.gate_up_proj.mul_(20)
            experts.gate_up_proj_bias.normal_(0, 0.5)
            experts.down_proj_bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_gpt_oss()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    return save_test_files(model, tmp_path_factory.mktemp("gguf_gpt_oss"))


def _with_file_weights(model, loaded):
    """A copy of ``model`` with every weight the file holds quantized (expert stacks, linears, the embedding) at
    ``loaded``'s dequantized values: what the loaded model must compute to float rounding."""
    ref = with_file_experts(model, loaded)
    with torch.no_grad():
        for name, module in loaded.named_modules():
            if isinstance(module, OffloadedLinear) and ".mlp.experts." not in name:
                ref.get_submodule(name).weight.copy_(module.dequantized_weight(torch.float32))
        ref.model.embed_tokens.weight.copy_(loaded.model.embed_tokens.weight)
    return ref


def test_an_f32_file_gives_the_transformers_models_logits(model, files):
    """Names, sinks, router and expert biases, interleaved gate/up rows, the sliding-window pattern and YaRN: on the
    f32 file the loaded model is the original (its experts at the file's q8_0 values) to float rounding, and
    generates the same tokens (past the window, through the cache)."""
    path = files["f32"]
    f = GGUFFile(path)
    info = f.tensor_infos
    assert info["blk.0.attn_sinks.weight"].shape == (4,) and info["blk.0.attn_sinks.weight"].type_name == "f32"
    assert info["blk.0.ffn_gate_inp.bias"].shape == (EXPERTS,)
    gate_bias = info["blk.1.ffn_gate_exps.bias"]
    assert gate_bias.shape == (EXPERTS, WIDTH) and gate_bias.type_name == "f32"
    assert info["blk.1.ffn_down_exps.bias"].shape == (EXPERTS, HIDDEN)
    assert info["blk.1.post_attention_norm.weight"].shape == (HIDDEN,) and "output.weight" in info
    md = f.metadata
    assert (md["gpt-oss.attention.sliding_window"], md["gpt-oss.attention.key_length"], md["gpt-oss.rope.scaling.type"],
            md["gpt-oss.rope.scaling.original_context_length"]) == (WINDOW, 64, "yarn", 32)
    assert "gpt-oss.attention.sliding_window_pattern" not in md      # llama.cpp's default period, 2
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    cfg = loaded.config
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * 2 and cfg.sliding_window == WINDOW
    assert cfg.rope_parameters["truncate"] is True and cfg.rope_parameters["factor"] == 4.0
    assert (cfg.swiglu_alpha, cfg.swiglu_limit) == (1.702, 7.0) and cfg.head_dim == 64
    torch.testing.assert_close(loaded.model.layers[1].self_attn.sinks, model.model.layers[1].self_attn.sinks,
                               rtol=0, atol=0)
    experts = loaded.model.layers[1].mlp.experts
    original = model.model.layers[1].mlp.experts
    torch.testing.assert_close(experts.gate_up_proj.bias, original.gate_up_proj_bias.reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(experts.down_proj.bias, original.down_proj_bias.reshape(-1), rtol=0, atol=0)
    reference = with_file_experts(model, loaded)
    with torch.no_grad():
        ours, expected = loaded(IDS).logits, reference(IDS).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    generate = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(IDS, **generate), reference.generate(IDS, **generate))


@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_quantized_files_load_as_offloaded_experts(model, files, name):
    """The expert stacks are OffloadedExperts over the file's bytes, gate and up rows interleaved as transformers'
    gpt-oss computes them: the logits are the original model's with every quantized weight at the file's values,
    to float rounding (sharp attention and routing make the model itself far more sensitive to those values)."""
    path = files[name]
    loaded, report = load_gguf_model(path, dtype=torch.float32, device="cpu", return_report=True)
    experts = loaded.model.layers[2].mlp.experts
    assert isinstance(experts, OffloadedExperts)
    # 288-wide rows: q4_k falls back to q5_0 (gate/up), q6_k (Q4_K_M's down) to q8_0, as llama-quantize does
    assert experts.qtypes == ({"gate_up_proj": "q5_0", "down_proj": "q8_0"} if name == "q4_k_m"
                              else {"gate_up_proj": "q8_0", "down_proj": "q8_0"})
    assert report.experts == [f"model.layers.{i}.mlp.experts" for i in range(LAYERS)]
    f = GGUFFile(path)
    rows = experts.gate_up_proj.weight.view(EXPERTS, WIDTH, 2, -1)          # row 2i: gate i, row 2i + 1: up i
    for j, part in enumerate(("gate", "up")):
        stack = f.tensor(f"blk.2.ffn_{part}_exps.weight")
        assert torch.equal(rows[:, :, j].reshape(stack.data.shape), stack.data)
        bias = f.tensor(f"blk.2.ffn_{part}_exps.bias")
        assert torch.equal(experts.gate_up_proj.bias.view(EXPERTS, WIDTH, 2)[:, :, j], bias)
    with torch.no_grad():
        ours, expected = loaded(IDS).logits, _with_file_weights(model, loaded)(IDS).logits
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    inventory = gguf_inventory(path)
    assert {s.name for s in inventory.linears if s.num_experts > 1} == {
        f"model.layers.{i}.mlp.experts.{p}" for i in range(LAYERS) for p in ("gate_up_proj", "down_proj")}


def test_k_quants_fall_back_where_their_blocks_do_not_tile_the_rows(files):
    """save_gguf(qtype="q4_k") on gpt-oss shapes: the 288-wide rows (2880 in the real models) take llama-quantize's
    fallbacks, o_proj's 256-wide rows stay q4_k; the router, sinks and every bias stay f32."""
    info = GGUFFile(files["q4_k_m"]).tensor_infos
    types = {n: info[f"blk.0.{n}"].type_name for n in ("attn_q.weight", "attn_v.weight", "attn_output.weight",
                                                        "ffn_gate_exps.weight", "ffn_down_exps.weight",
                                                        "ffn_gate_inp.weight", "attn_sinks.weight",
                                                        "ffn_up_exps.bias", "attn_q.bias")}
    assert types == {"attn_q.weight": "q5_0", "attn_v.weight": "q8_0", "attn_output.weight": "q4_k",
                     "ffn_gate_exps.weight": "q5_0", "ffn_down_exps.weight": "q8_0", "ffn_gate_inp.weight": "f32",
                     "attn_sinks.weight": "f32", "ffn_up_exps.bias": "f32", "attn_q.bias": "f32"}
    assert info["output.weight"].type_name == "q8_0" and info["token_embd.weight"].type_name == "q5_0"


def test_saving_a_loaded_model_writes_the_same_bytes(files, tmp_path):
    a, b = resaved(files["q4_k_m"], tmp_path)
    for name in a:
        if a.info(name).is_quantized or name.endswith(".bias") or "sinks" in name:
            assert a.info(name).shape == b.info(name).shape, name
            assert torch.equal(b.raw_bytes(name), a.raw_bytes(name)), name
    assert {k: v for k, v in a.metadata.items() if k.startswith("gpt-oss.")} == \
        {k: v for k, v in b.metadata.items() if k.startswith("gpt-oss.")}


def test_fused_gate_up_stacks_and_biases(model, files, tmp_path):
    """A file with fused ffn_gate_up_exps weights and biases (gate rows, then up rows, as llama.cpp's converter
    fuses them) loads into transformers' interleaved gate_up_proj exactly as the split file does; saved again with
    fuse_gate_up_exps it is the same file."""
    fused = save_gguf(model, tmp_path / "fused.gguf", "q4_k", mix="q4_k_m", fuse_gate_up_exps=True)
    f = GGUFFile(fused)
    assert f.info("blk.0.ffn_gate_up_exps.bias").shape == (EXPERTS, 2 * WIDTH)
    assert "blk.0.ffn_gate_exps.bias" not in f and "blk.0.ffn_up_exps.weight" not in f
    loaded = load_gguf_model(fused, dtype=torch.float32, device="cpu")
    split = load_gguf_model(files["q4_k_m"], dtype=torch.float32, device="cpu")
    for a, b in zip(loaded.model.layers, split.model.layers):
        assert torch.equal(a.mlp.experts.gate_up_proj.weight, b.mlp.experts.gate_up_proj.weight)
        assert torch.equal(a.mlp.experts.gate_up_proj.bias, b.mlp.experts.gate_up_proj.bias)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, split(IDS).logits, rtol=0, atol=0)
    again = GGUFFile(save_gguf(loaded, tmp_path / "again.gguf", "q4_k", mix="q4_k_m", fuse_gate_up_exps=True))
    assert set(again) == set(f)
    for name in f:
        assert torch.equal(again.raw_bytes(name), f.raw_bytes(name)), name


def test_a_sliding_window_period_other_than_two(tmp_path):
    """attention.sliding_window_pattern p: layer i slides unless i % p == p - 1 (llama.cpp's set_swa_pattern);
    written only when p is not 2, read back into layer_types; patterns no period gives are refused."""
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    model = tiny_gpt_oss(seed=1, layer_types=types)
    path = save_gguf(model, tmp_path / "f32.gguf", "f32", qtype_overrides={"*_exps.weight": "q8_0"})
    assert GGUFFile(path).metadata["gpt-oss.attention.sliding_window_pattern"] == 3
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert loaded.config.layer_types == types
    assert_matches_file_experts(loaded, model, IDS)
    odd = ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="not a pattern llama.cpp can express"):
        save_gguf(tiny_gpt_oss(layer_types=odd), tmp_path / "odd.gguf", "q8_0")
    assert not (tmp_path / "odd.gguf").exists()


def test_what_llama_cpp_would_compute_differently_is_not_saved(tmp_path):
    """gpt-oss's own config defaults to YaRN without truncate, which llama.cpp does not compute; llama.cpp hard-codes
    the SwiGLU constants."""
    for i, (config, match) in enumerate((
            ({"rope_parameters": dict(YARN, truncate=False)}, "truncate=False"),
            ({"rope_parameters": None}, "truncate=False"),                      # GptOssConfig's default rope
            ({"swiglu_limit": 5.0}, "swiglu_limit=5.0"),
            ({"sliding_window": None}, "need a positive sliding_window"))):
        with pytest.raises(ValueError, match=match):
            save_gguf(tiny_gpt_oss(**config), tmp_path / f"m{i}.gguf", "q8_0")
    assert not list(tmp_path.iterdir())


def test_missing_ill_shaped_and_unsupported_tensors_and_metadata_are_named(files, tmp_path):
    path = files["q8_0"]
    f = GGUFFile(path)
    gate_bias = f.tensor("blk.1.ffn_gate_exps.bias")
    for i, (md, drop, tensors, match) in enumerate((
            ({}, ("blk.1.attn_sinks.weight",), {}, r"missing tensors for model\.layers\.1\.self_attn\.sinks"),
            ({}, (), {"blk.1.attn_sinks.weight": torch.zeros(3)},
             r"'blk\.1\.attn_sinks\.weight' has shape \(3,\), expected \(4,\)"),
            ({}, ("blk.0.ffn_gate_inp.bias",), {}, r"missing tensors for model\.layers\.0\.mlp\.router\.bias"),
            ({}, ("blk.1.ffn_up_exps.bias",), {}, r"missing tensors for model\.layers\.1\.mlp\.experts's biases: "
                                                  r"blk\.1\.ffn_up_exps\.bias"),
            ({}, (), {"blk.1.ffn_gate_exps.bias": gate_bias[:, :-1].contiguous()},
             r"'blk\.1\.ffn_gate_exps\.bias' has shape \(8, 159\), expected \(8, 160\)"),
            ({}, ("blk.2.attn_k.bias",), {}, r"missing tensors for model\.layers\.2\.self_attn\.k_proj\.bias"),
            ({}, (), {"blk.0.ffn_gate_shexp.weight": torch.zeros(4, HIDDEN)}, "tensors not understood"),
            ({}, ("gpt-oss.attention.sliding_window",), {}, "gpt-oss.attention.sliding_window must be a positive"),
            ({"gpt-oss.attention.sliding_window_pattern": -1}, (), {}, "sliding_window_pattern must be a non-negative"),
            ({"gpt-oss.rope.freq_base_swa": 1000.0}, (), {}, "rope.freq_base_swa=1000.0 differs"),
            ({"gpt-oss.expert_weights_scale": 2.0}, (), {}, "expert_weights_scale=2.0"),
            ({"gpt-oss.rope.dimension_count": 32}, (), {}, "partial rotary embeddings are not supported for gpt-oss"),
            ({"gpt-oss.attention.key_length_swa": 32}, (), {}, "key_length_swa=32 differs"),
            ({"gpt-oss.rope.scaling.yarn_beta_fast": 16.0}, (), {}, r"YaRN settings \{'yarn_beta_fast': 16.0\}"),
            ({"gpt-oss.expert_used_count": EXPERTS + 1}, (), {}, "expert_used_count must be an integer from 1"))):
        bad = _rewrite(tmp_path, path, f"bad{i}.gguf", md, tensors, drop=drop)
        with pytest.raises(GGUFError, match=match):
            load_gguf_model(bad, device="cpu")


def test_experts_on_demand_from_a_file(files):
    assert_on_demand_equals_resident(files["q4_k_m"], "2MiB", 4, IDS)


# On the quantized files llama.cpp rounds the activations to 8 bits before each quantized matmul. This model's
# experts are driven into SwiGLU's clamp (gate_up weights x20: pre-activations of std ~7), so the down projections'
# inputs reach ~50 and the rounding of their 32-value blocks costs 1-2% of the logit range at every position, 3-6%
# where it flips an expert choice (6 seeds: 2.9-5.4% on the q8_0 file; with gate_up unscaled 0.4-0.5%, as for the
# other architectures). The dequantized files are the exact check, clamp included.
QUANTIZED_FILE_BOUND = 0.08


@needs_llama_cpp
@pytest.mark.parametrize("name", ["f32", "q8_0", "q4_k_m"])
def test_parity_with_llama_cpp(files, name, tmp_path):
    """llama.cpp is the reference for what both our exporter and loader assume about gpt-oss: on the file with every
    quantized tensor dequantized, llama.cpp and we agree to float rounding; on the quantized file its 8-bit
    activations leave a few percent of the logit range (QUANTIZED_FILE_BOUND). YaRN's rounded correction range is
    what llama.cpp computes: with transformers' truncate=False the dequantized file's logits differ by far more."""
    f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(files[name], tmp_path,
                                                                                f"gpt-oss {name}")
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
    assert max_diff <= QUANTIZED_FILE_BOUND * span and round(top1 * IDS.shape[1]) >= 7
    if name == "f32":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

        loaded = load_gguf_model(files[name], dtype=torch.float32, device="cpu")
        loaded.config.rope_parameters["truncate"] = False
        loaded.model.rotary_emb = GptOssRotaryEmbedding(loaded.config)
        f = GGUFFile(files[name])
        dense = {n: dequantize(f.tensor(n), torch.float32).reshape(f.info(n).shape) for n in f
                 if f.info(n).is_quantized}
        untruncated_diff, _, _ = _parity(_rewrite(tmp_path, files[name], "dense.gguf", tensors=dense), loaded)
        print(f"llama.cpp parity gpt-oss f32 with truncate=False: max |logit diff| {untruncated_diff:.2e}")
        assert untruncated_diff > 20 * max(f32_diff, 5e-4 * span)


def test_mxfp4_expert_stacks_as_the_published_files_keep_them(model, tmp_path):
    """MXFP4 (ggml type 39) is one more 32-weight block format to the loader: no special case."""
    path = save_gguf(model, tmp_path / "mxfp4.gguf", "f32", qtype_overrides={"*_exps.weight": "mxfp4"})
    assert GGUFFile(path).info("blk.0.ffn_gate_exps.weight").type_name == "mxfp4"
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert loaded.model.layers[0].mlp.experts.qtypes == {"gate_up_proj": "mxfp4", "down_proj": "mxfp4"}
    with torch.no_grad():
        ours, expected = loaded(IDS).logits, _with_file_weights(model, loaded)(IDS).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    if _llama_cpp_python() is not None:
        f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(path, tmp_path, "gpt-oss mxfp4")
        assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
        assert max_diff <= QUANTIZED_FILE_BOUND * span and round(top1 * IDS.shape[1]) >= 7


@needs_llama_cpp
def test_sliding_window_period_parity_with_llama_cpp(tmp_path):
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    path = save_gguf(tiny_gpt_oss(seed=2, layer_types=types), tmp_path / "q8_0.gguf", "q8_0")
    f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(path, tmp_path, "gpt-oss period 3")
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
    assert max_diff <= QUANTIZED_FILE_BOUND * span and round(top1 * IDS.shape[1]) >= 7
