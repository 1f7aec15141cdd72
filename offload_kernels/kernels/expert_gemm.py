"""Grouped expert GEMM: a mixture-of-experts layer's (token, chosen expert) pairs on tensor cores, in one launch.

At prefill or batched decode a MoE layer routes many tokens to each expert (Qwen3-30B-A3B at 2048 tokens: 8 of
128 experts each, ~128 tokens per expert). Run expert by expert, that is a host read of the per-expert counts
and two or three launches per expert and projection (hundreds per layer); the grouped expert GEMV
(expert_gemv.py) avoids those but runs on CUDA cores, one FMA per weight and token. This kernel is the tiled
GEMM of gemm.py over the pairs sorted by expert (qmatmul_experts.sort_pairs_by_expert, on the device: the
same sort as vLLM's fused MoE and llama.cpp's ``mul_mat_id``): each program takes one block of up to BLOCK_M
pairs routed to one expert and one BLOCK_N tile of that expert's rows, gathers the pairs' activation rows,
decodes the expert's weight tile from its GGUF bytes in the K loop and feeds tl.dot:

    out[p] = x[p // X_GROUP] @ W[expert of p's block].T (+ that expert's bias)

An expert's bytes are read once per block of its pairs. The grid holds as many blocks as any routing can
need; blocks of padding (their pairs all equal P) run no K step and store nothing, and so does the routing:
it never goes through the host, so a CUDA graph replays the launch for any routing. Expert ids are clamped
into [0, E) by the sort and again here, so no id reads outside the weight buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .decode import QTYPE_CODES, SUB_BLOCK
from .epilogue import store_output
from .gemm import (GROUP_M, dot_precision, f16_decode_default, gemm_k_slice, gemm_partial_tile, grouped_tile,
                   head_words)
from .runtime import INTERPRETER, count_launch, launch_split_k, tuning_key


@triton.jit
def _expert_gemm_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, ids_ptr, rows_ptr, M, N, K, stride_xm,
                        row_bytes, expert_bytes, num_experts, num_blocks, X_GROUP, split_k, M_BUCKET,
                        QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, SUB: tl.constexpr, RN: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr, F16_DECODE: tl.constexpr,
                        HEAD_WORDS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr):
    pid = tl.program_id(0)
    # GROUP_M consecutive blocks (mostly one expert's, when it has several) share each weight tile in L2
    block, pid_n = grouped_tile(pid, num_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    pairs = tl.load(rows_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    live = tl.sum((pairs < M).to(tl.int32), axis=0)
    expert = tl.load(ids_ptr + block).to(tl.int64)
    expert = tl.minimum(tl.maximum(expert, 0), num_experts - 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + expert * expert_bytes + tl.minimum(offs_n, N - 1).to(tl.int64) * row_bytes
    # padding entries (P) read the last pair's row: in bounds, never stored
    x_tile = (x_ptr + (tl.minimum(pairs, M - 1) // X_GROUP).to(tl.int64)[:, None] * stride_xm
              + tl.arange(0, BLOCK_K)[None, :])
    kt_begin, kt_end = gemm_k_slice(K, split_k, tl.program_id(1), BLOCK_K)
    kt_end = tl.where(live > 0, kt_end, kt_begin)
    acc = gemm_partial_tile(x_tile, w_rows, kt_begin, kt_end, K, QTYPE, SUB, RN, DOT_PRECISION, F16_DECODE,
                            HEAD_WORDS, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB)
    # each result row goes to its pair's output row (masked: padding is M)
    store_output(acc, pairs, offs_n, M, N, bias_ptr + expert * N, out_ptr, ws_ptr, cnt_ptr, pid, split_k, HAS_BIAS)


_KEY = ("M_BUCKET", "N", "K", "QTYPE", "HAS_BIAS", "F16_DECODE", "HEAD_WORDS", "BLOCK_M")

_expert_gemm_tuned = triton.autotune(configs=configs.expert_gemm_configs(), key=list(_KEY),
                                     prune_configs_by={"early_config_prune": configs.prune_expert_gemm_configs}
                                     )(_expert_gemm_kernel)


def expert_gemm(x2d: torch.Tensor, data: torch.Tensor, qtype: str, n: int, k: int, row_bytes: int,
                expert_bytes: int, num_experts: int, block_experts: torch.Tensor, block_rows: torch.Tensor,
                x_group: int, bias: "torch.Tensor | None", out: torch.Tensor, *, split_k: "int | None" = None,
                f16_decode: "bool | None" = None) -> str:
    """out (P, N): for each pair p, x2d[p // x_group] times its expert's (N, K) matrix, which starts
    ``expert_bytes`` * id bytes into ``data`` (N rows of ``row_bytes``), plus that expert's N entries of
    ``bias`` (num_experts * N,). ``block_rows`` (B, BLOCK_M) lists the pairs of each block (P for padding) and
    ``block_experts`` (B,) the block's expert (sort_pairs_by_expert); BLOCK_M (16, 32 or 64) is
    block_rows.shape[1]. Returns the variant that ran ("expert_gemm" or "expert_gemm_splitk").

    Arguments are validated by the caller (qmatmul_experts): x2d has unit stride along K, out is contiguous
    of x2d's dtype, the index tensors are contiguous. ``split_k``/``f16_decode`` as for gemm() (forced: no
    tuning)."""
    if f16_decode and x2d.dtype != torch.float16:
        raise ValueError(f"f16_decode=True needs float16 activations, got {x2d.dtype}")
    pairs = out.shape[0]
    num_blocks, block_m = block_rows.shape
    if block_m not in configs.EXPERT_GEMM_BLOCK_MS:
        raise ValueError(f"blocks of {block_m} pairs; the grouped expert GEMM takes {configs.EXPERT_GEMM_BLOCK_MS}")
    args = dict(x_ptr=x2d, w_ptr=data, bias_ptr=bias if bias is not None else out, out_ptr=out,
                ids_ptr=block_experts, rows_ptr=block_rows, M=pairs, N=n, K=k, stride_xm=x2d.stride(0),
                row_bytes=row_bytes, expert_bytes=expert_bytes, num_experts=num_experts, num_blocks=num_blocks,
                X_GROUP=x_group, M_BUCKET=configs.next_power_of_2(pairs), QTYPE=QTYPE_CODES[qtype],
                HAS_BIAS=bias is not None, SUB=SUB_BLOCK[qtype], RN=not INTERPRETER,
                DOT_PRECISION=dot_precision(x2d.dtype), GROUP_M=GROUP_M,
                F16_DECODE=f16_decode_default(x2d.dtype, qtype) if f16_decode is None else bool(f16_decode),
                HEAD_WORDS=head_words(data, qtype, expert_bytes), BLOCK_M=block_m)

    def grid(meta):
        return (num_blocks * configs.cdiv(n, meta["BLOCK_N"]), meta["split_k"])

    split = launch_split_k(_expert_gemm_tuned, grid, args, tuning_key("expert_gemm", args, _KEY),
                           lambda: configs.expert_gemm_heuristic_config(split_k),
                           tune=split_k is None and f16_decode is None, out=out)
    variant = "expert_gemm_splitk" if split > 1 else "expert_gemm"
    count_launch(variant)
    return variant
