"""Kernel selection, config pruning and the capture-safe launch logic (pure Python: no kernel runs)."""

from __future__ import annotations

import importlib

import pytest
import torch
import triton

from offload_kernels import kernels
from offload_kernels.formats import QTYPES, get_spec
from offload_kernels.kernels import configs
from offload_kernels.kernels.decode import BLOCK32_QTYPES, QTYPE_CODES, SUB_BLOCK

runtime = importlib.import_module("offload_kernels.kernels.runtime")

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192), (40, 256), (7, 800)]


def test_crossover_table():
    bounds = [b for b, _ in configs.KERNEL_BY_M]
    assert bounds == sorted(bounds) and {f for _, f in configs.KERNEL_BY_M} <= set(configs.KERNEL_FAMILIES)
    for bound, family in configs.KERNEL_BY_M[:-1]:
        assert kernels.select_kernel(bound) == family
        assert kernels.select_kernel(bound + 1) != family
    assert kernels.select_kernel(1) == "gemv" and kernels.select_kernel(10**9) == "dequant"


def test_largest_divisor_at_most():
    assert configs.largest_divisor_at_most(16, 5) == 4
    assert configs.largest_divisor_at_most(7, 6) == 1
    assert configs.largest_divisor_at_most(56, 100) == 56
    assert configs.largest_divisor_at_most(1, 0) == 1


def _args(x_dtype=torch.float16, **kw):
    return {"x_ptr": torch.empty(1, dtype=x_dtype), **kw}


@pytest.mark.parametrize("word_loads", [True, False])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("qtype", QTYPES)
def test_gemv_pruner(qtype, m, word_loads):
    layouts = (1, 2, 3) if word_loads else (1, 2)
    assert configs.gemv_layouts(qtype, word_loads) == layouts
    for n, k in SHAPES:
        if k % get_spec(qtype).block_size:
            continue
        block_m = configs.gemv_block_m(m)
        kept = configs.prune_gemv_configs(configs.gemv_configs(interpreter=False), {},
                                          **_args(M=m, N=n, K=k, BLOCK_M=block_m, QTYPE=QTYPE_CODES[qtype],
                                                  WORD_LOADS=word_loads))
        assert 1 <= len(kept) <= configs.MAX_TUNED_CONFIGS
        steps = triton.cdiv(k, configs.GEMV_STEP_K)
        by_layout = {layout: [c for c in kept if c.kwargs["LAYOUT"] == layout] for layout in configs.GEMV_LAYOUTS}
        assert not by_layout[3] or 3 in layouts         # layout 3 only where it can run
        for layout, group in by_layout.items():
            assert len(group) <= configs.MAX_TUNED_CONFIGS // len(layouts)       # no layout crowds others out
            for c in group:
                assert steps % c.kwargs["split_k"] == 0
                rows = block_m * c.kwargs["BLOCK_N"]
                threads = 32 * c.num_warps
                if layout == 1:
                    a, b = configs.GEMV_TILE[qtype]
                    assert rows * a * b <= 64 * threads
                elif layout == 2:   # one fp32 accumulator per quant byte and token; every thread a 16-byte run
                    assert rows * configs.GEMV_ROW_ELEMS[qtype] <= 64 * threads
                    assert c.kwargs["BLOCK_N"] * configs.GEMV_ROW_ELEMS[qtype] >= 16 * threads
                    assert c.kwargs["STAGES"] in configs.GEMV2_STAGES
                else:               # 16 accumulators per row and token; one or two rows per two threads;
                    assert block_m <= 4     # at most 4 tokens (more would spill everywhere)
                    assert rows * 16 <= 64 * threads
                    assert threads <= c.kwargs["BLOCK_N"] <= 2 * threads
        if m == 1 and n >= 1024:
            assert all(by_layout[layout] for layout in layouts), "the tuner must get to time every GEMV layout"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [5, 16, 64, 200, 1024, 4096])
@pytest.mark.parametrize("qtype", QTYPES)
def test_gemm_pruner(qtype, m, dtype):
    for n, k in SHAPES:
        if k % get_spec(qtype).block_size:
            continue
        kept = configs.prune_gemm_configs(configs.gemm_configs(interpreter=False), {},
                                          **_args(dtype, M=m, N=n, K=k, QTYPE=QTYPE_CODES[qtype]))
        assert 1 <= len(kept) <= configs.MAX_TUNED_CONFIGS
        for c in kept:
            bk = c.kwargs["BLOCK_K"]
            assert bk % SUB_BLOCK[qtype] == 0 and (qtype in BLOCK32_QTYPES or 256 % bk == 0)
            assert triton.cdiv(k, bk) % c.kwargs["split_k"] == 0
            assert c.kwargs["BLOCK_M"] <= max(16, configs.next_power_of_2(m))
            assert not c.kwargs["SWAP_AB"] or c.kwargs["BLOCK_M"] <= configs.GEMM_SWAP_MAX_BLOCK_M
        swapped = sum(c.kwargs["SWAP_AB"] for c in kept)
        assert swapped <= configs.MAX_TUNED_CONFIGS // 3
        if m <= 64 and n >= 64:     # (narrower weights keep only the heuristic config)
            assert swapped, "the tuner must get to time swapped operands for a few tokens"


def test_expert_kernel_choice_and_gemm_block_sizes():
    """The grouped expert GEMV up to EXPERTS_GEMV_MAX_PAIRS_PER_EXPERT pairs per expert, the GEMM above, whose
    blocks are the mean pairs per expert rounded up to a power of two within 16..64."""
    limit = configs.EXPERTS_GEMV_MAX_PAIRS_PER_EXPERT
    assert configs.select_experts_kernel(limit * 128, 128) == "gemv"
    assert configs.select_experts_kernel(limit * 128 + 1, 128) == "gemm"
    assert configs.select_experts_kernel(1, 1) == "gemv"
    for pairs, experts, block_m in [(600, 128, 16), (2048, 128, 16), (2049, 128, 32), (4096, 128, 32),
                                    (5000, 128, 64), (16384, 128, 64), (10**6, 8, 64)]:
        assert configs.expert_gemm_block_m(pairs, experts) == block_m, (pairs, experts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_expert_gemm_pruner(qtype, dtype):
    """Legal BLOCK_K for the format, N tiles no wider than the matrix, no K split (not in the space), at most
    MAX_TUNED_CONFIGS of which a third swapped; the heuristic config legal too."""
    space = configs.expert_gemm_configs(interpreter=False)
    for n, k in [(768, 2048), (2048, 768), (14336, 4096), (40, 256)]:
        if k % get_spec(qtype).block_size:
            continue
        for block_m, blocks in [(16, 200), (64, 400)]:
            kept = configs.prune_expert_gemm_configs(space, {}, **_args(dtype, N=n, K=k, QTYPE=QTYPE_CODES[qtype],
                                                                        BLOCK_M=block_m, num_blocks=blocks))
            assert 1 <= len(kept) <= configs.MAX_TUNED_CONFIGS
            assert sum(c.kwargs["SWAP_AB"] for c in kept) <= configs.MAX_TUNED_CONFIGS // 3
            for c in kept:
                assert configs.gemm_block_k_ok(c.kwargs["BLOCK_K"], qtype) and c.kwargs["split_k"] == 1
                assert c.kwargs["BLOCK_N"] <= max(32, configs.next_power_of_2(n))
            c = configs.expert_gemm_heuristic_config()
            assert configs.gemm_block_k_ok(c.kwargs["BLOCK_K"], qtype) and c.kwargs["split_k"] == 1
    assert configs.expert_gemm_heuristic_config(split_k=3).kwargs["split_k"] == 3


def test_gemm_block_k_constraint():
    assert configs.gemm_block_k_ok(64, "q4_k") and configs.gemm_block_k_ok(16, "q3_k")
    assert not configs.gemm_block_k_ok(16, "q4_k")          # half a sub-block: two scales in one tile row
    assert not configs.gemm_block_k_ok(512, "q6_k")         # straddles two super-blocks
    assert configs.gemm_block_k_ok(512, "q8_0")


@pytest.mark.parametrize("qtype", QTYPES)
def test_heuristic_configs_are_legal(qtype):
    for n, k in SHAPES:
        if k % get_spec(qtype).block_size:
            continue
        for m in (1, 2, 3, 8):
            for layout in configs.GEMV_LAYOUTS:
                for word_loads in (True, False):
                    c = configs.gemv_heuristic_config(m, n, k, qtype, 132, layout=layout, word_loads=word_loads)
                    rows = configs.gemv_block_m(m) * c.kwargs["BLOCK_N"]
                    if c.kwargs["LAYOUT"] == 1:
                        a, b = configs.GEMV_TILE[qtype]
                        assert rows * a * b <= 64 * 32 * c.num_warps
                    elif c.kwargs["LAYOUT"] == 2:
                        assert rows * configs.GEMV_ROW_ELEMS[qtype] <= 64 * 32 * c.num_warps
                    else:
                        assert c.kwargs["LAYOUT"] in configs.gemv_layouts(qtype, word_loads)
                        assert rows * 16 <= 64 * 32 * c.num_warps
                        assert c.kwargs["BLOCK_N"] == 32 * c.num_warps
                    assert triton.cdiv(k, configs.GEMV_STEP_K) % c.kwargs["split_k"] == 0
            # the default: layout 3 up to 2 tokens (with word loads), else the
            # format's default layout, except layout 2 for 8 tokens (would spill: layout 1)
            for word_loads in (True, False):
                got = configs.gemv_heuristic_config(m, n, k, qtype, 132, word_loads=word_loads).kwargs["LAYOUT"]
                expect = configs.GEMV_DEFAULT_LAYOUT[qtype]
                if word_loads and m <= 2:
                    expect = 3
                if expect == 2 and m > 4:
                    expect = 1
                assert got == expect, (m, word_loads, got)
        for m in (5, 100, 3000):
            c = configs.gemm_heuristic_config(m, n, k, qtype, 132)
            assert configs.gemm_block_k_ok(c.kwargs["BLOCK_K"], qtype)
            assert triton.cdiv(k, c.kwargs["BLOCK_K"]) % c.kwargs["split_k"] == 0
        assert configs.gemv_heuristic_config(1, n, k, qtype, 132, split_k=3).kwargs["split_k"] == 3


class FakeTuner:
    """Stands in for a triton.autotune'd kernel: records how it was launched."""

    def __init__(self):
        self.tuned_calls = 0
        self.direct_calls = []
        self.best_config = triton.Config({"BLOCK": 64}, num_warps=8)
        tuner = self

        class _Fn:
            def __getitem__(self, grid):
                return lambda **kw: tuner.direct_calls.append(kw)

        self.fn = _Fn()

    def __getitem__(self, grid):
        def run(**kw):
            self.tuned_calls += 1
        return run


def test_launch_tunes_once_then_reuses(monkeypatch):
    monkeypatch.setattr(runtime, "INTERPRETER", False)
    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    monkeypatch.setattr(runtime, "capturing", lambda device: False)
    runtime.forget_tuned_configs()
    tuner, heuristic = FakeTuner(), triton.Config({"BLOCK": 16}, num_warps=4)
    key = ("k", 1)
    cfg = runtime.launch(tuner, None, {"a": 1}, key, lambda: heuristic, tune=True, device=torch.device("meta"))
    assert cfg is tuner.best_config and tuner.tuned_calls == 1 and not tuner.direct_calls
    cfg = runtime.launch(tuner, None, {"a": 1}, key, lambda: heuristic, tune=True, device=torch.device("meta"))
    assert cfg is tuner.best_config and tuner.tuned_calls == 1
    assert tuner.direct_calls == [{"a": 1, **tuner.best_config.all_kwargs()}]
    runtime.forget_tuned_configs()


def test_launch_never_tunes_during_capture(monkeypatch):
    """Inside a CUDA graph capture an untuned shape gets the heuristic config (benchmarking would break
    the capture); a shape tuned before the capture keeps its tuned config."""
    monkeypatch.setattr(runtime, "INTERPRETER", False)
    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    monkeypatch.setattr(runtime, "capturing", lambda device: True)
    runtime.forget_tuned_configs()
    hooked = []
    heuristic = triton.Config({"BLOCK": 16}, num_warps=4, pre_hook=lambda nargs: hooked.append(nargs["a"]))
    tuner = FakeTuner()
    cfg = runtime.launch(tuner, None, {"a": 7}, ("k", 2), lambda: heuristic, tune=True, device=torch.device("meta"))
    assert cfg is heuristic and tuner.tuned_calls == 0 and hooked == [7]
    runtime._tuned[("k", 3)] = tuner.best_config
    cfg = runtime.launch(tuner, None, {"a": 7}, ("k", 3), lambda: heuristic, tune=True, device=torch.device("meta"))
    assert cfg is tuner.best_config and tuner.tuned_calls == 0
    runtime.forget_tuned_configs()


def test_launch_without_tuning(monkeypatch):
    monkeypatch.setattr(runtime, "INTERPRETER", False)
    monkeypatch.setattr(runtime, "AUTOTUNE", False)
    monkeypatch.setattr(runtime, "capturing", lambda device: False)
    tuner, heuristic = FakeTuner(), triton.Config({"BLOCK": 16}, num_warps=4)
    assert runtime.launch(tuner, None, {}, ("k", 4), lambda: heuristic, tune=True,
                          device=torch.device("meta")) is heuristic
    assert tuner.tuned_calls == 0


def test_poison_outputs_context(monkeypatch):
    """new_output NaN-fills only inside poison_outputs() (nesting restores the outer setting)."""
    cpu, fills, real_full = torch.device("cpu"), [], torch.full
    monkeypatch.setattr(torch, "full", lambda *a, **kw: fills.append(a[0]) or real_full(*a, **kw))
    runtime.new_output((4,), torch.float32, cpu)
    assert fills == []
    with kernels.poison_outputs():
        assert torch.isnan(runtime.new_output((4,), torch.float16, cpu)).all()
        with kernels.poison_outputs(False):
            runtime.new_output((4,), torch.float16, cpu)
        assert fills == [(4,)]
        runtime.new_output((3,), torch.float16, cpu)
    runtime.new_output((4,), torch.float16, cpu)
    assert fills == [(4,), (3,)]


def test_format_tables_agree_with_the_specs():
    """The kernels' per-code constexpr tables (decode.BLOCK32_*, HAS_MIN) describe the same blocks as the
    format specs: every format has a code, block sizes match, fp16 fields (d, and m or dmin) where the specs
    put them (mxfp4: none, an exponent byte at 0), and the quants after them."""
    from offload_kernels.kernels import decode

    assert set(QTYPE_CODES) == set(QTYPES) and sorted(QTYPE_CODES.values()) == list(range(len(QTYPES)))
    assert BLOCK32_QTYPES == {q for q in QTYPES if get_spec(q).block_size == 32}
    for qtype, code in QTYPE_CODES.items():
        spec = get_spec(qtype)
        assert decode.HAS_MIN[code] == (len(spec.fp16_offsets) == 2)
        if qtype not in BLOCK32_QTYPES:
            continue
        assert decode.BLOCK32_BYTES[code] == spec.block_bytes
        assert spec.fp16_offsets == ((0, 2) if decode.HAS_MIN[code] else () if qtype == "mxfp4" else (0,))
        quant_bytes = 32 if qtype == "q8_0" else 16
        assert decode.BLOCK32_QS_AT[code] + quant_bytes == spec.block_bytes
        qh = decode.BLOCK32_QH_AT[code]
        assert (qh != 0) == qtype.startswith("q5_") and (qh == 0 or qh + 4 == decode.BLOCK32_QS_AT[code])
