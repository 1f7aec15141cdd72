"""Qwen3-MoE GGUF files (llama.cpp's qwen3moe): save_gguf writes the expert stacks, load_gguf_model reads them
into OffloadedExperts over the file's bytes; checked against transformers' GGUF loader and, when installed,
llama.cpp itself."""

import pytest
import torch

from offload_kernels import OffloadedExperts, dequantize
from offload_kernels.formats.gguf_io import GGUFError, GGUFFile
from offload_kernels.model.gguf_export import save_gguf
from offload_kernels.model.gguf_model import load_gguf_model
from offload_kernels.model.shapes import gguf_inventory

from .test_gguf_model import IDS, _rewrite, hf_reference_logits, needs_llama_cpp, parity_quantized_and_dequantized

transformers = pytest.importorskip("transformers")
if not hasattr(pytest.importorskip("transformers.integrations.moe"), "use_experts_implementation"):
    pytest.skip("this transformers has no 3-D expert modules (use_experts_implementation: transformers 5)",
                allow_module_level=True)

EXPERTS, USED, WIDTH = 8, 2, 256


def tiny_qwen3_moe(seed=0, **config):
    torch.manual_seed(seed)
    kw = dict(vocab_size=320, hidden_size=256, intermediate_size=512, moe_intermediate_size=WIDTH,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              num_experts=EXPERTS, num_experts_per_tok=USED, norm_topk_prob=True)
    kw.update(config)
    model = sharpened(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**kw)).eval())
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in ("q_norm", "k_norm"):
                getattr(layer.self_attn, norm).weight.uniform_(0.5, 1.5)
    return model


def sharpened(model):
    """Sharp attention (a wrong q/k layout shows) and a sharp router (a wrong expert choice shows)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
            layer.mlp.gate.weight.mul_(20)
    return model


def write_files(model, root):
    """``model`` as a q8_0 file and a Q4_K_M-style file (q6_k down projections)."""
    root.mkdir(parents=True, exist_ok=True)
    return {"q8_0": save_gguf(model, root / "q8_0.gguf", "q8_0"),
            "q4_k_m": save_gguf(model, root / "q4_k_m.gguf", "q4_k", mix="q4_k_m")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tiny_qwen3_moe(), tmp_path_factory.mktemp("gguf_moe"))


def _reference(path, model):
    """transformers' own GGUF loader given our config (its reader misses expert_feed_forward_length)."""
    cfg = transformers.Qwen3MoeConfig(**{k: v for k, v in model.config.to_dict().items()
                                         if k not in ("model_type", "transformers_version", "architectures")})
    return hf_reference_logits(path, IDS, config=cfg)


@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_logits_match_transformers_gguf_loader(files, name):
    path = files[name]
    info = GGUFFile(path).tensor_infos
    assert info["blk.0.ffn_gate_exps.weight"].shape == (EXPERTS, WIDTH, 256)
    assert info["blk.0.ffn_down_exps.weight"].shape == (EXPERTS, 256, WIDTH)
    assert info["blk.0.ffn_gate_inp.weight"].type_name == "f32"          # the router stays f32, as in llama.cpp
    if name == "q4_k_m":
        assert info["blk.1.ffn_down_exps.weight"].type_name == "q6_k"
        assert info["blk.1.ffn_up_exps.weight"].type_name == "q4_k"
    model, report = load_gguf_model(path, dtype=torch.float32, device="cpu", return_report=True)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, OffloadedExperts)
    assert experts.qtypes == ({"gate_up_proj": "q4_k", "down_proj": "q6_k"} if name == "q4_k_m"
                              else {"gate_up_proj": "q8_0", "down_proj": "q8_0"})
    assert report.experts == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    with torch.no_grad():
        ours = model(IDS).logits
    expected = _reference(path, model)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_experts_hold_the_files_bytes(files):
    path = files["q4_k_m"]
    model = load_gguf_model(path, dtype=torch.float32, device="cpu")
    f = GGUFFile(path)
    for i, layer in enumerate(model.model.layers):
        gate, up, down = (f.tensor(f"blk.{i}.ffn_{p}_exps.weight") for p in ("gate", "up", "down"))
        gate_up = layer.mlp.experts.gate_up_proj.weight.view(EXPERTS, 2, WIDTH, -1)
        assert torch.equal(gate_up[:, 0].reshape(gate.data.shape), gate.data)     # each expert: gate rows ...
        assert torch.equal(gate_up[:, 1].reshape(up.data.shape), up.data)         # ... then its up rows
        assert torch.equal(layer.mlp.experts.down_proj.weight.reshape(-1), down.data.reshape(-1))


def test_saving_a_loaded_model_writes_the_same_bytes(files, tmp_path):
    path = files["q4_k_m"]
    model = load_gguf_model(path, dtype=torch.float32, device="cpu")
    again = save_gguf(model, tmp_path / "again.gguf", "q4_k", mix="q4_k_m")
    a, b = GGUFFile(path), GGUFFile(again)
    for name in a:
        if "exps" in name or "ffn_gate_inp" in name:
            assert b.info(name).shape == a.info(name).shape and b.info(name).ggml_type == a.info(name).ggml_type
            assert torch.equal(b.raw_bytes(name), a.raw_bytes(name)), name


def test_fused_gate_up_stacks(files, tmp_path):
    """llama.cpp's converter with --fuse-gate-up-exps writes one ffn_gate_up_exps per block (each expert's gate
    rows, then its up rows): exactly the bytes of the two stacks, which the loader takes as gate_up_proj as they
    are; the logits are those of the split file. A block with both fused and split stacks is refused. (llama.cpp
    0.3.36 reads fused stacks for deepseek2 only: the parity check is test_gguf_deepseek2's.)"""
    fused = save_gguf(tiny_qwen3_moe(), tmp_path / "fused.gguf", "q4_k", mix="q4_k_m", fuse_gate_up_exps=True)
    f, split = GGUFFile(fused), GGUFFile(files["q4_k_m"])
    assert "blk.0.ffn_gate_exps.weight" not in f and "blk.0.ffn_up_exps.weight" not in f
    assert f.info("blk.0.ffn_gate_up_exps.weight").shape == (EXPERTS, 2 * WIDTH, 256)
    loaded = load_gguf_model(fused, dtype=torch.float32, device="cpu")
    for i, layer in enumerate(loaded.model.layers):
        gate, up = (split.tensor(f"blk.{i}.ffn_{p}_exps.weight").data.view(EXPERTS, WIDTH, -1) for p in ("gate", "up"))
        stack = f.tensor(f"blk.{i}.ffn_gate_up_exps.weight").data
        assert torch.equal(stack.view(EXPERTS, 2 * WIDTH, -1), torch.cat([gate, up], dim=1))
        assert torch.equal(layer.mlp.experts.gate_up_proj.weight.reshape(-1), stack.reshape(-1))
    assert {s.name for s in gguf_inventory(fused).linears} == {s.name for s in gguf_inventory(files["q4_k_m"]).linears}
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits,
                                   load_gguf_model(files["q4_k_m"], dtype=torch.float32, device="cpu")(IDS).logits,
                                   rtol=0, atol=0)
    both = _rewrite(tmp_path, fused, "both.gguf", tensors={"blk.0.ffn_gate_exps.weight": split.tensor(
        "blk.0.ffn_gate_exps.weight")}, shapes={"blk.0.ffn_gate_exps.weight": (EXPERTS, WIDTH, 256)})
    with pytest.raises(GGUFError, match="has both ffn_gate_up_exps and ffn_gate_exps"):
        load_gguf_model(both, device="cpu")


def test_a_split_file_loads_as_one(files, tmp_path):
    """Big MoE models ship split by gguf-split (name-00001-of-0000N.gguf, ...): given the first part, the model
    is the unsplit file's, every stack read from the part that holds it; the planner sees it whole."""
    first = save_gguf(tiny_qwen3_moe(), tmp_path / "moe.gguf", "q4_k", mix="q4_k_m", split_max_tensors=4)
    f, whole = GGUFFile(first), GGUFFile(files["q4_k_m"])
    parts = -(-len(whole) // 4)
    assert len(f.parts) == parts and first.name == f"moe-00001-of-{parts:05d}.gguf" and set(f) == set(whole)
    assert len({f.info(f"blk.{i}.ffn_{p}_exps.weight").part for i in range(2) for p in ("gate", "up", "down")}) > 1
    split = load_gguf_model(first, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(split(IDS).logits,
                                   load_gguf_model(files["q4_k_m"], dtype=torch.float32, device="cpu")(IDS).logits,
                                   rtol=0, atol=0)
    assert gguf_inventory(first).linears == gguf_inventory(files["q4_k_m"]).linears


@needs_llama_cpp
def test_split_file_parity_with_llama_cpp(tmp_path):
    first = save_gguf(tiny_qwen3_moe(seed=1), tmp_path / "moe.gguf", "q8_0", split_max_tensors=6)
    f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(first, tmp_path, "qwen3moe split")
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
    assert max_diff <= 0.05 * span and round(top1 * IDS.shape[1]) >= 8


def _one_block_budget(path):
    """A budget (fp32 model) with one staging slot for a block and 64 KiB more: nearly everything streams."""
    inventory = gguf_inventory(path)
    blocks = {}
    for spec in inventory.linears:
        blocks[spec.group] = blocks.get(spec.group, 0) + spec.nbytes
    return 2 * inventory.fixed_bytes + max(blocks.values()) + (64 << 10)     # the inventory counts fp16


def test_streamed_experts_give_the_same_logits(files):
    path = files["q8_0"]
    resident = load_gguf_model(path, dtype=torch.float32, device="cpu")
    streamed, report = load_gguf_model(path, dtype=torch.float32, device="cpu", gpu_budget=_one_block_budget(path),
                                       num_slots=1, return_report=True)
    assert any("experts" in n for group in report.placement.streamed_groups for n in group)
    with torch.no_grad():
        expected = resident(IDS).logits
        for _ in range(3):
            torch.testing.assert_close(streamed(IDS).logits, expected, rtol=0, atol=0)


def test_inventory_counts_the_experts_each_token_uses(files):
    inventory = gguf_inventory(files["q4_k_m"])
    spec = next(s for s in inventory.linears if s.name == "model.layers.0.mlp.experts.gate_up_proj")
    assert (spec.num_experts, spec.experts_per_token, spec.qtype) == (EXPERTS, USED, "q4_k")
    assert (spec.out_features, spec.in_features) == (EXPERTS * 2 * WIDTH, 256)


def test_malformed_moe_files_fail_before_anything_is_built(files, tmp_path):
    path = files["q8_0"]
    f = GGUFFile(path)
    no_width = _rewrite(tmp_path, path, "no_width.gguf", drop=("qwen3moe.expert_feed_forward_length",))
    with pytest.raises(GGUFError, match="expert_feed_forward_length is missing"):
        load_gguf_model(no_width, device="cpu")
    no_up = _rewrite(tmp_path, path, "no_up.gguf", drop=("blk.1.ffn_up_exps.weight",))
    with pytest.raises(GGUFError, match="model.layers.1.mlp.experts has no ffn_up_exps tensor"):
        load_gguf_model(no_up, device="cpu")
    from offload_kernels import quantize
    up = dequantize(f.tensor("blk.0.ffn_up_exps.weight"), torch.float32)
    mixed = _rewrite(tmp_path, path, "mixed.gguf", tensors={"blk.0.ffn_up_exps.weight": quantize(up, "q4_0")},
                     shapes={"blk.0.ffn_up_exps.weight": (EXPERTS, WIDTH, 256)})
    with pytest.raises(GGUFError, match="must have one type and shape: they become one gate_up_proj"):
        load_gguf_model(mixed, device="cpu")
    bad_k = _rewrite(tmp_path, path, "bad_k.gguf", metadata={"qwen3moe.expert_used_count": EXPERTS + 1})
    with pytest.raises(GGUFError, match="expert_used_count must be an integer from 1 to the 8 experts"):
        load_gguf_model(bad_k, device="cpu")


def test_save_gguf_refuses_what_llama_cpp_would_compute_differently(tmp_path):
    with pytest.raises(ValueError, match="norm_topk_prob=False"):
        save_gguf(tiny_qwen3_moe(norm_topk_prob=False), tmp_path / "m.gguf", "q8_0")
    with pytest.raises(ValueError, match="expert stacks are written in a block format"):
        save_gguf(tiny_qwen3_moe(), tmp_path / "m.gguf", "f16")
    assert not list(tmp_path.iterdir())
    # f16 for everything else, the stacks quantized: loads
    path = save_gguf(tiny_qwen3_moe(), tmp_path / "m.gguf", "f16", qtype_overrides={"*_exps.weight": "q8_0"})
    model = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert model.model.layers[0].mlp.experts.qtypes == {"gate_up_proj": "q8_0", "down_proj": "q8_0"}


@needs_llama_cpp
@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_parity_with_llama_cpp(files, name, tmp_path):
    """As for the dense models (test_gguf_model.test_parity_with_llama_cpp): on the file with every quantized
    tensor dequantized, llama.cpp and we agree to float rounding (router, expert choice and weighting, the
    gate/up split, the experts' width all included); on the quantized file llama.cpp's 8-bit activations
    leave a few percent of the logit range."""
    f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(files[name], tmp_path,
                                                                                f"qwen3moe {name}")
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
    assert max_diff <= 0.05 * span and round(top1 * IDS.shape[1]) >= 8


@pytest.mark.parametrize("slots", [2, None])
def test_experts_on_demand_from_a_file(files, slots):
    from offload_kernels.model.offload import expert_cache_of

    path = files["q4_k_m"]
    resident = load_gguf_model(path, dtype=torch.float32, device="cpu")
    on_demand, report = load_gguf_model(path, dtype=torch.float32, device="cpu", gpu_budget=_one_block_budget(path),
                                        num_slots=1, experts="on_demand", expert_cache_slots=slots,
                                        return_report=True)
    p = report.placement
    cache = expert_cache_of(on_demand)
    assert p.on_demand and cache.num_slots == p.expert_cache_slots and (slots is None or slots == cache.num_slots)
    assert p.expert_count == EXPERTS * len(p.on_demand) // 2 and "experts on demand" in str(report)
    with torch.no_grad():
        expected = resident(IDS).logits
        for _ in range(2):
            assert torch.equal(on_demand(IDS).logits, expected)
    with pytest.raises(ValueError, match="experts must be 'with_block' or 'on_demand'"):
        load_gguf_model(path, device="cpu", experts="sometimes")


# ------------------------------------------------------------------------- Mixtral: a llama file with experts
def tiny_mixtral(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     num_local_experts=4, num_experts_per_tok=2)
    return sharpened(transformers.MixtralForCausalLM(cfg).eval())      # llama.cpp permutes its q/k rows


@pytest.fixture(scope="module")
def mixtral_files(tmp_path_factory):
    model = tiny_mixtral()
    return model, write_files(model, tmp_path_factory.mktemp("gguf_mixtral"))


@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_mixtral_files_load_as_mixtral(mixtral_files, name):
    from .test_offload_moe import dequantized_reference

    original, files = mixtral_files
    path = files[name]
    f = GGUFFile(path)
    assert f.architecture == "llama" and f.metadata["llama.expert_count"] == 4
    model = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.sliding_window is None
    assert (model.config.num_local_experts, model.config.num_experts_per_tok, model.config.intermediate_size) == \
        (4, 2, 512)
    assert isinstance(model.model.layers[0].mlp.experts, OffloadedExperts)
    # the original model with every weight replaced by what the file holds, dequantized
    ref = dequantized_reference(original, model)
    ref.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.clone()
    with torch.no_grad():
        expected = ref(IDS).logits
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    again = save_gguf(model, path.with_name(f"again_{name}.gguf"), "q4_k", mix="q4_k_m" if "k_m" in name else None)
    b = GGUFFile(again)
    for tensor in (n for n in f if "exps" in n):
        assert torch.equal(b.raw_bytes(tensor), f.raw_bytes(tensor)), tensor


@needs_llama_cpp
@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_mixtral_parity_with_llama_cpp(mixtral_files, name, tmp_path):
    f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(mixtral_files[1][name], tmp_path,
                                                                                f"mixtral {name}")
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
    assert max_diff <= 0.05 * span and round(top1 * IDS.shape[1]) >= 8


# ------------------------------------------------------------------------- Qwen2-MoE: a shared expert per block
def tiny_qwen2_moe(seed=0, **config):
    torch.manual_seed(seed)
    kw = dict(vocab_size=320, hidden_size=256, intermediate_size=512, moe_intermediate_size=WIDTH,
              shared_expert_intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, num_experts=EXPERTS, num_experts_per_tok=USED, norm_topk_prob=False)
    kw.update(config)
    model = sharpened(transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**kw)).eval())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.shared_expert_gate.weight.mul_(20)    # a sigmoid far from 1/2: a wrong gate shows
            for proj in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, proj).bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def qwen2_moe_files(tmp_path_factory):
    return write_files(tiny_qwen2_moe(), tmp_path_factory.mktemp("gguf_qwen2moe"))


@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_qwen2_moe_files_match_transformers_gguf_loader(qwen2_moe_files, name):
    path = qwen2_moe_files[name]
    info = GGUFFile(path).tensor_infos
    assert info["blk.0.ffn_gate_inp_shexp.weight"].shape == (256,)          # one row, stored 1-D
    if name == "q4_k_m":
        assert info["blk.0.ffn_down_shexp.weight"].type_name == "q6_k"
    model = load_gguf_model(path, dtype=torch.float32, device="cpu")
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.experts, OffloadedExperts) and model.config.norm_topk_prob is False
    assert model.config.shared_expert_intermediate_size == 512 and mlp.shared_expert_gate.weight.shape == (1, 256)
    cfg = transformers.Qwen2MoeConfig(**{k: v for k, v in model.config.to_dict().items()
                                         if k not in ("model_type", "transformers_version", "architectures")})
    expected = hf_reference_logits(path, IDS, config=cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_qwen2_moe_checks(qwen2_moe_files, tmp_path):
    with pytest.raises(ValueError, match="does not renormalize .* norm_topk_prob=True"):
        save_gguf(tiny_qwen2_moe(norm_topk_prob=True), tmp_path / "m.gguf", "q8_0")
    no_width = _rewrite(tmp_path, qwen2_moe_files["q8_0"], "no_shared.gguf",
                        drop=("qwen2moe.expert_shared_feed_forward_length",))
    with pytest.raises(GGUFError, match="expert_shared_feed_forward_length is missing"):
        load_gguf_model(no_width, device="cpu")


@needs_llama_cpp
@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_qwen2_moe_parity_with_llama_cpp(qwen2_moe_files, name, tmp_path):
    f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(qwen2_moe_files[name], tmp_path,
                                                                                f"qwen2moe {name}")
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
    assert max_diff <= 0.05 * span and round(top1 * IDS.shape[1]) >= 8
