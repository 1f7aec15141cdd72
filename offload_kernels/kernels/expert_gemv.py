"""Grouped expert GEMV: every (token, chosen expert) pair of a mixture-of-experts layer in one launch.

A MoE layer at decode routes each token to k of E experts. Run expert by expert, that is two qmatmul
launches per chosen expert plus the gathers and scatters around them (Qwen3-30B-A3B at one token: 16
GEMVs and ~50 small launches per layer), and reading how many tokens each expert got is a device-to-host
sync that CUDA graphs cannot capture. This kernel does what llama.cpp's ``mul_mat_id`` does for a few
tokens: one launch computes

    out[p] = x[p // X_GROUP] @ W[expert_ids[p]].T (+ bias[expert_ids[p]])     for every pair p

where the experts' (N, K) matrices are ``expert_bytes`` apart in one buffer (a stacked ``ffn_*_exps``
weight, whose expert e is rows e * N ... (e + 1) * N, or an expert cache's slots). The expert of a pair is
read from device memory by the kernel, so nothing about the routing goes through the host.

Each program owns one pair's BLOCK_N rows and one K slice and runs the GEMV loop of gemv.py on them
(any of its three layouts, split-K finished in the same launch by the last program of a tile), with the
token axis of size 1: two pairs routed to the same expert read its bytes twice, which at a few tokens costs
less than the launches it saves. With more pairs than experts, the pairs are sorted by expert first
(qmatmul_experts.sort_pairs_by_expert, on the device) and each program takes a block of up to BLOCK_M pairs
of one expert (SORTED): the expert's bytes are decoded once per block, as the GEMV decodes them once for
its BLOCK_M tokens. Beyond a few pairs per expert (configs.EXPERTS_GEMV_MAX_PAIRS_PER_EXPERT) the grouped
tensor-core GEMM (expert_gemm.py) takes over.
Expert ids are clamped into [0, E) in the kernel, so a bad id can never read outside the buffer; the
Python side checks them (one device-to-host read) unless told not to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .decode import QTYPE_CODES
from .epilogue import store_output
from .gemv import gemv_k_slice, gemv_partial_sums
from .runtime import count_launch, launch_split_k, sm_count, tuning_key


@triton.jit
def _expert_gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, ids_ptr, rows_ptr, M, N, K, stride_xm,
                        row_bytes, expert_bytes, num_experts, X_GROUP, split_k, M_BUCKET,
                        QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        TILE_A: tl.constexpr, TILE_B: tl.constexpr, WORD_LOADS: tl.constexpr,
                        LAYOUT: tl.constexpr, STAGES: tl.constexpr, SORTED: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    step_begin, step_end = gemv_k_slice(K, split_k, pid_k)
    if SORTED:
        # A block of up to BLOCK_M pairs routed to one expert (sort_pairs_by_expert): the expert's bytes are
        # decoded once for all of them. Padding entries hold M; a block of padding only (the grid is sized for
        # the most blocks any routing can need) runs no K steps and stores nothing.
        pairs = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        live = tl.sum((pairs < M).to(tl.int32), axis=0)
        step_end = tl.where(live > 0, step_end, step_begin)
        expert = tl.load(ids_ptr + pid_m).to(tl.int64)
    else:
        tl.static_assert(BLOCK_M == 1, "unsorted, the grouped expert GEMV runs one (token, expert) pair per program")
        pairs = pid_m + tl.arange(0, BLOCK_M)
        expert = tl.load(ids_ptr + pid_m).to(tl.int64)
    expert = tl.minimum(tl.maximum(expert, 0), num_experts - 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + expert * expert_bytes + tl.minimum(offs_n, N - 1).to(tl.int64) * row_bytes
    x_rows = x_ptr + (tl.minimum(pairs, M - 1) // X_GROUP).to(tl.int64) * stride_xm
    y = gemv_partial_sums(w_rows, x_rows, step_begin, step_end, K, QTYPE, BLOCK_M, BLOCK_N, TILE_A, TILE_B,
                          WORD_LOADS, LAYOUT, STAGES)
    # offs_m = the pairs: each result row goes to its pair's output row (masked: padding is M)
    store_output(y, pairs, offs_n, M, N, bias_ptr + expert * N, out_ptr, ws_ptr, cnt_ptr,
                 pid_m * tl.num_programs(0) + pid_n, split_k, HAS_BIAS)


_KEY = ("M_BUCKET", "N", "K", "QTYPE", "HAS_BIAS", "WORD_LOADS", "BLOCK_M", "SORTED")

_expert_gemv_tuned = triton.autotune(configs=configs.gemv_configs(), key=list(_KEY),
                                     prune_configs_by={"early_config_prune": configs.prune_gemv_configs}
                                     )(_expert_gemv_kernel)


def expert_gemv(x2d: torch.Tensor, data: torch.Tensor, qtype: str, n: int, k: int, row_bytes: int,
                expert_bytes: int, num_experts: int, expert_ids: torch.Tensor, x_group: int, bias: "torch.Tensor | None",
                out: torch.Tensor, *, block_rows: "torch.Tensor | None" = None, split_k: "int | None" = None,
                layout: "int | None" = None) -> str:
    """out (P, N): for each pair p, x2d[p // x_group] times its expert's (N, K) matrix, which starts
    ``expert_bytes`` * id bytes into ``data`` (N rows of ``row_bytes``), plus that expert's N entries of
    ``bias`` (num_experts * N,). Unsorted (``block_rows`` None): ``expert_ids`` (P,) gives each pair's expert,
    one program row per pair. Sorted: ``block_rows`` (B, BLOCK_M) lists the pairs of each block (P for
    padding) and ``expert_ids`` (B,) the block's expert (sort_pairs_by_expert). Returns the variant that ran.
    Arguments are validated by the caller (qmatmul_experts): x2d has unit stride along K, out is contiguous of
    x2d's dtype, the index tensors are contiguous. ``split_k``/``layout`` as for gemv()."""
    if layout is not None and layout not in configs.GEMV_LAYOUTS:
        raise ValueError(f"unknown GEMV layout {layout!r}; expected one of {configs.GEMV_LAYOUTS}")
    pairs = out.shape[0]
    sorted_ = block_rows is not None
    programs_m, block_m = tuple(block_rows.shape) if sorted_ else (pairs, 1)
    tile_a, tile_b = configs.GEMV_TILE[qtype]
    word_loads = configs.word_loads_ok(data, qtype, expert_bytes)
    args = dict(x_ptr=x2d, w_ptr=data, bias_ptr=bias if bias is not None else out, out_ptr=out, ids_ptr=expert_ids,
                rows_ptr=block_rows if sorted_ else expert_ids, M=pairs, N=n, K=k, stride_xm=x2d.stride(0),
                row_bytes=row_bytes, expert_bytes=expert_bytes, num_experts=num_experts, X_GROUP=x_group,
                M_BUCKET=configs.next_power_of_2(pairs), QTYPE=QTYPE_CODES[qtype], HAS_BIAS=bias is not None,
                BLOCK_M=block_m, TILE_A=tile_a, TILE_B=tile_b, WORD_LOADS=word_loads, SORTED=sorted_)

    def grid(meta):
        return (configs.cdiv(n, meta["BLOCK_N"]), meta["split_k"], programs_m)

    sms = sm_count(x2d.device)
    split = launch_split_k(_expert_gemv_tuned, grid, args, tuning_key("expert_gemv", args, _KEY),
                           lambda: configs.expert_gemv_heuristic_config(programs_m, block_m, n, k, qtype, sms,
                                                                        split_k, layout, word_loads=word_loads),
                           tune=split_k is None and layout is None, out=out)
    variant = "expert_gemv_splitk" if split > 1 else "expert_gemv"
    count_launch(variant)
    return variant
