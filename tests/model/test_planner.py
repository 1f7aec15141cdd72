"""Placement planning and throughput prediction (pure arithmetic, checked by hand-computed cases)."""

import pytest

from offload_kernels.model.bandwidth import Hardware
from offload_kernels.model.planner import (BudgetError, LinearSpec, budget_for_resident_fraction, parse_bytes,
                                           plan_placement, predict_throughput)
from offload_kernels.model.shapes import PRESETS, llama_inventory, resolve_inventory


def blocks(n_blocks=4, layers_per_block=3, n=256, k=256, qtype="q8_0"):
    return [LinearSpec(f"b{b}.l{i}", n, k, qtype, f"b{b}") for b in range(n_blocks) for i in range(layers_per_block)]


LAYER = 256 * 256 // 32 * 34        # one q8_0 256x256 layer
BLOCK = 3 * LAYER


@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * 2**30), ("1.5 GB", 1_500_000_000), ("512MiB", 512 * 2**20), ("100", 100), ("3kb", 3000),
    (2**30, 2**30), (1e9, 10**9), (None, None), ("0", 0),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad, exc, match", [
    (-1, ValueError, "non-negative"), ("-3GiB", ValueError, "non-negative"), ("lots", ValueError, "cannot parse"),
    ("3 parsecs", ValueError, "unknown unit"), (True, TypeError, "not a bool"), ([1], TypeError, "bytes"),
    (float("nan"), ValueError, "non-negative"),
])
def test_parse_bytes_rejects(bad, exc, match):
    with pytest.raises(exc, match=match):
        parse_bytes(bad)


def test_no_budget_or_enough_budget_keeps_everything_resident():
    lin = blocks()
    for budget in (None, 100 + 4 * BLOCK):
        p = plan_placement(lin, budget, fixed_bytes=100)
        assert p.streamed_groups == [] and len(p.resident) == 12 and p.staging_bytes == 0
        assert p.device_bytes == 100 + 4 * BLOCK and p.resident_fraction == 1.0


def test_half_budget_streams_whole_blocks_interleaved():
    lin = blocks(n_blocks=6)
    budget = 2 * BLOCK + 2 * BLOCK          # two slots + two resident blocks
    p = plan_placement(lin, budget, num_slots=2)
    assert p.slot_bytes == BLOCK and p.staging_bytes == 2 * BLOCK
    assert len(p.streamed_groups) == 4 and p.streamed_bytes == 4 * BLOCK and p.resident_bytes == 2 * BLOCK
    streamed_blocks = sorted({g[0].split(".")[0] for g in p.streamed_groups})
    assert streamed_blocks == ["b0", "b2", "b3", "b5"]  # resident blocks spread between streamed ones
    assert p.device_bytes <= budget


def test_leftover_budget_keeps_single_layers_of_streamed_blocks():
    lin = blocks(n_blocks=4)
    p = plan_placement(lin, 2 * BLOCK + BLOCK + LAYER, num_slots=2)
    assert p.resident_bytes == BLOCK + LAYER
    assert sorted(len(g) for g in p.streamed_groups) == [2, 3, 3]
    assert all(len(g) >= 1 for g in p.streamed_groups)


def test_budget_too_small_for_slots_names_the_numbers():
    with pytest.raises(BudgetError, match=r"2 staging slots of 204.00 KiB need 408.00 KiB"):
        plan_placement(blocks(), BLOCK, fixed_bytes=0, num_slots=2)
    with pytest.raises(BudgetError, match="non-linear parameters need"):
        plan_placement(blocks(), 10 * BLOCK, fixed_bytes=10 * BLOCK)


def test_per_layer_streaming_units():
    p = plan_placement(blocks(n_blocks=2), 2 * LAYER + 2 * LAYER, num_slots=2, stream_whole_groups=False)  # 6 layers
    assert p.slot_bytes == LAYER and all(len(g) == 1 for g in p.streamed_groups)
    assert p.resident_bytes == 2 * LAYER and p.streamed_bytes == 4 * LAYER


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_slots"):
        plan_placement(blocks(), None, num_slots=0)
    with pytest.raises(ValueError, match="unique"):
        plan_placement(blocks(1) + blocks(1), None)


def test_prediction_matches_roofline_by_hand():
    lin = blocks(n_blocks=4)            # 12 layers of 256x256, LAYER bytes each
    hw = Hardware("test", link_bytes_per_s=1e6, hbm_bytes_per_s=1e9, matmul_flops=1e9)
    p = plan_placement(lin, 2 * BLOCK + BLOCK, num_slots=2)       # three blocks streamed
    (one, big) = predict_throughput(lin, p, hw, [1, 100_000])
    t_link = 3 * BLOCK / 1e6
    assert one.bound == "link" and one.seconds == pytest.approx(t_link)
    t_flops = 12 * 2 * 100_000 * 256 * 256 / 1e9
    assert big.bound == "compute" and big.seconds == pytest.approx(t_flops)
    assert big.tokens_per_s == pytest.approx(100_000 / t_flops)
    with pytest.raises(ValueError, match="positive"):
        predict_throughput(lin, p, hw, [0])


def test_llama_inventory_sizes():
    inv = llama_inventory(PRESETS["llama-3-8b"], "q4_k", lm_head_qtype="q6_k")
    assert len(inv.linears) == 32 * 7 + 1
    params = sum(lin.params for lin in inv.linears)
    assert 7.4e9 < params < 7.6e9           # Llama-3-8B without embeddings
    q = next(lin for lin in inv.linears if lin.name == "model.layers.0.self_attn.k_proj")
    assert (q.out_features, q.in_features) == (1024, 4096) and q.nbytes == 1024 * 4096 * 9 // 16


@pytest.mark.parametrize("preset, blocks, non_embedding", [("qwen3-8b", 36, 6.95e9), ("qwen3-32b", 64, 31.2e9)])
def test_qwen3_inventory_has_its_wide_heads(preset, blocks, non_embedding):
    """Qwen3's head_dim (128) is not hidden / heads for the 32B: q/o are 8192 x 5120. The published
    non-embedding parameter counts check the shapes."""
    inv = llama_inventory(PRESETS[preset], "q4_k")
    shape = PRESETS[preset]
    layers = {lin.name: lin for lin in inv.linears}
    q, o = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.o_proj"]
    assert (q.out_features, o.in_features) == (shape.heads * 128, shape.heads * 128)
    blocks_params = sum(lin.params for lin in inv.linears if lin.name != "lm_head")
    assert len(inv.linears) == blocks * 7 + 1 and abs(blocks_params / non_embedding - 1) < 0.01


@pytest.mark.parametrize("preset, total", [("gemma-2-27b", 27.2e9), ("gemma-3-12b", 12.2e9 - 0.42e9),
                                           ("gemma-3-27b", 27.4e9 - 0.42e9)])
def test_gemma_inventories_match_published_sizes(preset, total):
    """Published totals (Gemma 3's less its 0.42B SigLIP vision tower), embedding counted once (tied)."""
    shape = PRESETS[preset]
    inv = llama_inventory(shape, "q4_k")
    blocks_params = sum(lin.params for lin in inv.linears if lin.name != "lm_head")
    assert abs((blocks_params + shape.vocab * shape.hidden) / total - 1) < 0.01
    assert all(lin.in_features % 256 == 0 for lin in inv.linears)         # every linear takes the k-quants


@pytest.mark.parametrize("preset, total, active", [("glm-4.5-air", 106e9, 12e9), ("glm-4.5", 355e9, 32e9)])
def test_glm_inventories_match_published_sizes(preset, total, active):
    """GLM-4.5(-Air): dense first blocks, 128/160 routed experts (8 used) and a shared expert per MoE block; the
    published total (within 1%: the files' multi-token-prediction block is not part of the model) and active
    parameters per token (embedding and lm_head left out, within 2%)."""
    shape = PRESETS[preset]
    inv = llama_inventory(shape, "q4_k")
    params = sum(lin.params for lin in inv.linears) + shape.vocab * shape.hidden
    used = sum(lin.params * lin.active_fraction for lin in inv.linears if lin.name != "lm_head")
    assert abs(params / total - 1) < 0.01 and abs(used / active - 1) < 0.02
    names = {lin.name for lin in inv.linears}
    assert "model.layers.0.mlp.gate_proj" in names and "model.layers.0.mlp.experts.down_proj" not in names
    assert f"model.layers.{shape.layers - 1}.mlp.shared_experts.down_proj" in names


@pytest.mark.parametrize("budget, fixed", [(None, 0), (10**9, 100), (10, 1000)])
def test_no_linears_to_place_is_a_clear_error(budget, fixed):
    with pytest.raises(ValueError, match="no linear layers to place"):
        plan_placement([], budget, fixed_bytes=fixed)
    with pytest.raises(ValueError, match="no linear layers to place"):
        budget_for_resident_fraction([], fixed, 0.5)


@pytest.mark.parametrize("fraction, resident_blocks, planned", [
    (0.5, 3, 0.5), (0.0, 0, 0.0),
    (2 / 3, 4, 1.0),      # the two streamed blocks would fit in the two slots: the budget holds everything
])
def test_budget_for_resident_fraction_by_hand(fraction, resident_blocks, planned):
    lin = blocks(n_blocks=6)
    budget = budget_for_resident_fraction(lin, 100, fraction, num_slots=2)
    assert budget == 100 + 2 * BLOCK + resident_blocks * BLOCK
    p = plan_placement(lin, budget, fixed_bytes=100, num_slots=2)
    assert p.resident_fraction == planned and p.device_bytes <= budget


def test_budget_for_resident_fraction_edges():
    lin = blocks(n_blocks=4)
    full = budget_for_resident_fraction(lin, 100, 1.0, num_slots=2)
    assert full == 100 + 4 * BLOCK and plan_placement(lin, full, 100).streamed_groups == []
    # an ungrouped layer (lm_head) is a streaming unit of its own: the largest one sets the slot size
    head = LinearSpec("lm_head", 4 * 256, 256, "q8_0", "")
    assert budget_for_resident_fraction(lin + [head], 0, 0.0, num_slots=3) == 3 * 4 * LAYER
    assert budget_for_resident_fraction(lin, 0, 0.0, num_slots=2, stream_whole_groups=False) == 2 * LAYER
    for bad in (-0.1, 1.5, float("nan"), "half", True):
        with pytest.raises(ValueError, match="fraction"):
            budget_for_resident_fraction(lin, 0, bad)
    with pytest.raises(ValueError, match="num_slots"):
        budget_for_resident_fraction(lin, 0, 0.5, num_slots=0)
    for bad in (-1, 2.5, None):
        with pytest.raises(ValueError, match="fixed_bytes"):
            budget_for_resident_fraction(lin, bad, 0.5)


def test_budget_for_resident_fraction_on_a_preset_inventory():
    inv = llama_inventory(PRESETS["llama-3-8b"], "q4_k")
    for fraction in (0.2, 0.5):
        p = plan_placement(inv.linears, budget_for_resident_fraction(inv.linears, inv.fixed_bytes, fraction),
                           inv.fixed_bytes)
        assert fraction - 1 / 32 <= p.resident_fraction <= fraction + 1e-9     # within one of 32 blocks


def test_default_device():
    import torch

    from offload_kernels.units import default_device

    assert default_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert default_device("cpu") == torch.device("cpu") and default_device(torch.device("meta")).type == "meta"


def test_median_seconds_warms_up_then_times_each_repeat():
    from offload_kernels.model.bandwidth import median_seconds

    calls = []
    assert median_seconds(lambda: calls.append(1), "cpu", repeats=3) >= 0
    assert len(calls) == 4
    with pytest.raises(ValueError, match="repeats"):
        median_seconds(lambda: None, "cpu", repeats=0)


# ------------------------------------------------------------------------- MoE: experts on demand
def _moe_inventory(layers=8):
    from offload_kernels.model.shapes import LlamaShape

    shape = LlamaShape(512, 1024, layers, 8, 4, 1000, experts=16, experts_per_token=2, expert_intermediate=256)
    inv = llama_inventory(shape, "q4_k", lm_head_qtype=None)
    experts = [s.name for s in inv.linears if s.num_experts > 1]
    gate_up = next(s for s in inv.linears if s.name.endswith("gate_up_proj"))
    down = next(s for s in inv.linears if s.name.endswith("experts.down_proj"))
    from offload_kernels.model.planner import expert_slot_bytes_for

    return inv, experts, expert_slot_bytes_for(gate_up.nbytes // 16, down.nbytes // 16)


def test_experts_on_demand_only_for_the_blocks_that_stream():
    from offload_kernels.model.planner import plan_with_expert_cache

    inv, experts, slot = _moe_inventory()
    budget = budget_for_resident_fraction(inv.linears, inv.fixed_bytes, 0.5)
    whole = plan_placement(inv.linears, budget, inv.fixed_bytes)
    p = plan_with_expert_cache(inv.linears, experts, budget, inv.fixed_bytes, 2, True)
    assert p.device_bytes <= budget and p.expert_slot_bytes == slot
    assert all(n in p.resident or n in p.on_demand for n in experts)
    assert set(p.on_demand) and not set(p.on_demand) & {n for g in p.streamed_groups for n in g}
    assert p.slot_bytes < whole.slot_bytes                       # the blocks' slots no longer hold experts
    assert p.expert_count == 16 * len(p.on_demand) // 2 and p.expert_cache_slots >= 2
    # a budget without room for whole-block slots: every expert stack on demand
    units: dict[str, int] = {}
    for s in inv.linears:
        if s.num_experts == 1:
            units[s.group or s.name] = units.get(s.group or s.name, 0) + s.nbytes
    small = inv.fixed_bytes + 2 * max(units.values()) + 4 * slot
    q = plan_with_expert_cache(inv.linears, experts, small, inv.fixed_bytes, 2, True)
    assert sorted(q.on_demand) == sorted(experts) and q.device_bytes <= small
    # everything fits: the plain plan
    assert not plan_with_expert_cache(inv.linears, experts, None, inv.fixed_bytes, 2, True).on_demand


def test_expert_cache_miss_model():
    from offload_kernels.model.planner import Placement

    p = Placement([], [], [], 0, 2, 0, {"e": 1}, ["e"], expert_cache_slots=50, expert_slot_bytes=1, expert_count=100)
    assert p.expert_miss_fraction(1.0) == 1.0                     # every expert each forward: LRU cycles, misses
    assert p.expert_miss_fraction(0.1) == pytest.approx(0.9 ** 5)  # the last 5 forwards' experts are cached
    assert p.expert_miss_fraction(0.6) == 1.0                     # not even one forward fits
    full = Placement([], [], [], 0, 2, 0, {"e": 1}, ["e"], expert_cache_slots=100, expert_slot_bytes=1,
                     expert_count=100)
    assert full.expert_miss_fraction(1.0) == 0.0


def _config_json(tmp_path, **cfg):
    import json

    base = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=1000)
    (tmp_path / "config.json").write_text(json.dumps({**base, **cfg}))
    return tmp_path / "config.json"


def test_moe_config_inventories(tmp_path):
    from offload_kernels.model.shapes import config_inventory

    # GLM-4.5 / DeepSeek style: routed experts, n_shared_experts expert-wide shared ones, dense first block
    inv = config_inventory(_config_json(tmp_path, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                                        n_shared_experts=1, first_k_dense_replace=1), "q4_k")
    names = {s.name: s for s in inv.linears}
    assert "model.layers.0.mlp.down_proj" in names and "model.layers.0.mlp.experts.down_proj" not in names
    gate_up = names["model.layers.1.mlp.experts.gate_up_proj"]
    assert (gate_up.out_features, gate_up.num_experts, gate_up.experts_per_token) == (16 * 2 * 256, 16, 4)
    assert names["model.layers.3.mlp.shared_expert.down_proj"].in_features == 256
    # Qwen2-MoE style: the shared expert's own width
    inv = config_inventory(_config_json(tmp_path, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                                        shared_expert_intermediate_size=1024), "q4_k")
    assert {s.name: s for s in inv.linears}["model.layers.0.mlp.shared_expert.up_proj"].out_features == 1024
    # latent attention needs its head sizes (test_latent_attention_inventories_... plans whole configs)
    with pytest.raises(ValueError, match=r"latent-attention config \(kv_lora_rank\) needs qk_nope_head_dim, "
                                         r"qk_rope_head_dim, v_head_dim"):
        config_inventory(_config_json(tmp_path, n_routed_experts=16, kv_lora_rank=512), "q4_k")


@pytest.mark.parametrize("moe, match", [
    (dict(experts=8, experts_per_token=9, expert_intermediate=256), "experts_per_token <= experts"),
    (dict(experts=8, experts_per_token=2), "an expert width"),
])
def test_impossible_moe_shapes_are_refused(moe, match):
    from offload_kernels.model.shapes import LlamaShape

    with pytest.raises(ValueError, match=match):
        llama_inventory(LlamaShape(512, 1024, 2, 8, 4, 1000, **moe), "q4_k")


@pytest.mark.parametrize("preset, total, active", [("gpt-oss-20b", 21e9, 3.6e9), ("gpt-oss-120b", 117e9, 5.1e9)])
def test_gpt_oss_inventories_match_published_sizes(preset, total, active):
    """gpt-oss: every block MoE (32 / 128 experts of 2880 x 2880, 4 used); the published totals and active parameters
    per token (which count lm_head but not the embedding) within 1%. Its 2880-wide rows are no multiple of 256: a
    q4_k inventory takes llama-quantize's fallback there (q5_0), as save_gguf does, and q6_k's lm_head takes q8_0."""
    shape = PRESETS[preset]
    inv = llama_inventory(shape, "q4_k")
    params = sum(lin.params for lin in inv.linears) + shape.vocab * shape.hidden
    used = sum(lin.params * lin.active_fraction for lin in inv.linears)
    assert abs(params / total - 1) < 0.01 and abs(used / active - 1) < 0.01
    formats = {lin.name: lin.qtype for lin in inv.linears}
    assert formats["model.layers.0.mlp.experts.gate_up_proj"] == formats["model.layers.0.self_attn.q_proj"] == "q5_0"
    assert formats["model.layers.0.self_attn.o_proj"] == "q4_k" and formats["lm_head"] == "q8_0"   # o: 64 x 64 wide


def test_gpt_oss_presets_plan_their_experts_in_mxfp4_unless_told_otherwise():
    """resolve_inventory (what `plan` reads): a preset's experts in the format its published files keep them in
    (gpt-oss: mxfp4, 17 bytes per 32 weights) unless a qtype is given, which then applies to every linear."""
    default, told = resolve_inventory("gpt-oss-120b"), resolve_inventory("gpt-oss-120b", "q8_0")
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    by_name = {lin.name: lin for lin in default.linears}
    assert by_name[experts].qtype == "mxfp4" and by_name["model.layers.0.self_attn.q_proj"].qtype == "q5_0"
    assert by_name[experts].nbytes == 128 * 2 * 2880 * (2880 // 32) * 17
    assert {lin.name: lin.qtype for lin in told.linears}[experts] == "q8_0"
    assert {lin.name: lin.qtype for lin in resolve_inventory("qwen3-30b-a3b").linears}[experts] == "q4_k"
    with pytest.raises(ValueError, match="unknown qtype"):
        llama_inventory(PRESETS["gpt-oss-20b"], "q4_k", expert_qtype="q7")


@pytest.mark.parametrize("preset, total, active", [("deepseek-v3", 671e9, 37e9), ("kimi-k2", 1.03e12, 32.5e9),
                                                   ("deepseek-v2-lite", 15.7e9, 2.66e9)])
def test_latent_attention_inventories_match_published_sizes(preset, total, active, tmp_path):
    """DeepSeek-V3 (R1), Kimi K2 and DeepSeek-V2-Lite: latent attention (q through a 1536-wide latent, or directly
    for V2-Lite; k and v through a 512-wide one), dense first blocks, then routed and shared experts. Published
    totals (without the multi-token-prediction block) and active parameters per token (embedding included) within
    2%; a config.json of the same model plans the same linears."""
    import json

    from offload_kernels.model.shapes import config_inventory, transformers_config

    shape = PRESETS[preset]
    inv = llama_inventory(shape, "q4_k")
    params = sum(lin.params for lin in inv.linears) + shape.vocab * shape.hidden
    used = sum(lin.params * lin.active_fraction for lin in inv.linears) + shape.vocab * shape.hidden
    assert abs(params / total - 1) < 0.02 and abs(used / active - 1) < 0.02
    layers = {lin.name: lin for lin in inv.linears}
    kv_b = layers["model.layers.0.self_attn.kv_b_proj"]
    assert (kv_b.out_features, kv_b.in_features) == (shape.heads * 256, 512)
    assert ("model.layers.0.self_attn.q_a_proj" in layers) == (preset != "deepseek-v2-lite")
    assert "model.layers.0.mlp.gate_proj" in layers
    assert f"model.layers.{shape.layers - 1}.mlp.shared_experts.up_proj" in layers
    (tmp_path / "config.json").write_text(json.dumps(transformers_config(shape).to_dict()))
    planned = config_inventory(tmp_path / "config.json")
    assert [(lin.name, lin.out_features, lin.in_features, lin.num_experts) for lin in planned.linears] == \
        [(lin.name, lin.out_features, lin.in_features, lin.num_experts) for lin in inv.linears]
