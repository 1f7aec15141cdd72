"""Tiled GEMM with the dequantization fused into the K loop: y = x @ W.T + b, W read from GGUF blocks.

Each K step loads a (BLOCK_M, BLOCK_K) activation tile, decodes the (BLOCK_N, BLOCK_K) weight tile from
its blocks (one scale per BLOCK_K-aligned sub-block row) and feeds tl.dot with fp32 accumulation, so the
weights are read at their quantized size (2.6-8.5 bits per weight) instead of the 16 bits of a
dequantized copy. Two weight decodes (see f16_decode_default for which runs):

* exact: decode.decode_tile's fp32 values (bit-exact with ggml), rounded to the activation dtype;
* fp16 arithmetic (decode.decode_tile_f16), for fp16 activations: two weights per instruction, a
  little less accurate (its error bound is in decode_tile_f16; y's relative error on random q4_k
  weights ~7e-4 instead of ~3e-4, against a 1e-2 tolerance for fp16). On sm_90 its K loop is 11-27%
  shorter for q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q4_k and q5_k (Triton 3.6 and 3.9, mid-M and large-M tiles); for
  q3_k the gain is 0-14% with Triton 3.9 and none with 3.6, and q6_k's and iq4_nl's loops grow, so those keep
  the exact decode.

q4_k/q5_k blocks at a 4-byte-aligned address (HEAD_WORDS) read their 16-byte head (d, dmin, scales) as four
int32 words, which Triton's pipeliner copies asynchronously a step ahead like the quant bytes and x; read
byte by byte, those loads stayed in the loop with their latency exposed every step (sm_90: the loop then
has no synchronous global load and 2-3 barriers instead of 4-7).

fp32 activations use input_precision="tf32x3" (near-fp32 error on tensor cores; see dot_precision).

SWAP_AB (a config option, tuned) computes y.T = W @ x.T instead: the weight tile becomes the MMA's first
operand, which sm_90's wgmma takes from registers (no shared-memory copy of the decoded tile, and
wgmma stays asynchronous across K steps), and a few tokens become its N dimension (8..64) instead of
padding M to 16 or 64. On sm_90 machine code it trades that for a layout conversion of the tile (more
barriers), so only timing can choose: it is in the autotune space for BLOCK_M <= 64, never the default.

split_k > 1 cuts K into equal slices whose partial tiles the last program of each tile sums up in the same
launch (epilogue.store_output): for mid-size M, where the M x N output tiles alone are too few to fill the
GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .decode import BLOCK32, QTYPE_CODES, SUB_BLOCK, decode_tile, decode_tile_f16
from .epilogue import store_output
from .runtime import INTERPRETER, count_launch, launch_split_k, sm_count, tuning_key


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in the grouped tile order: GROUP_M consecutive row tiles share each
    weight tile while it is hot in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def gemm_k_slice(K, split_k, pid_k, BLOCK_K: tl.constexpr):
    """[begin, end) of the K tiles that K slice ``pid_k`` of ``split_k`` equal ones covers."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, split_k)
    kt_begin = pid_k * tiles_per_split
    return kt_begin, tl.minimum(kt_begin + tiles_per_split, k_tiles)


@triton.jit
def gemm_partial_tile(x_tile, w_rows, kt_begin, kt_end, K,
                      QTYPE: tl.constexpr, SUB: tl.constexpr, RN: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      F16_DECODE: tl.constexpr, HEAD_WORDS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr):
    """The fp32 (BLOCK_M, BLOCK_N) product of K tiles [kt_begin, kt_end): activation rows at ``x_tile``
    ((BLOCK_M, BLOCK_K) pointers to the first K tile) times the weight rows whose GGUF bytes start at
    ``w_rows`` ((BLOCK_N,) byte pointers), each weight tile decoded in the loop."""
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for kt in range(kt_begin, kt_end):
        k0 = kt * BLOCK_K
        if BLOCK32[QTYPE]:
            # A 32-weight block format: K is a multiple of 32 only, the last tile may run past it.
            x = tl.load(x_tile + k0, mask=(k0 + offs_k < K)[None, :], other=0.0)
        else:
            x = tl.load(x_tile + k0)  # a super-block format: K is a multiple of 256 and BLOCK_K divides 256
        if F16_DECODE:
            w = decode_tile_f16(w_rows, k0, K // 32, QTYPE, BLOCK_K // SUB, SUB, RN, HEAD_WORDS)
        else:
            w = decode_tile(w_rows, k0, K // 32, QTYPE, BLOCK_K // SUB, SUB, RN, HEAD_WORDS).to(x.dtype)
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, row_bytes, split_k,
                 M_BUCKET,
                 QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, SUB: tl.constexpr, RN: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr, F16_DECODE: tl.constexpr,
                 HEAD_WORDS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows are clamped onto the last valid one (loads in bounds, never stored).
    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * row_bytes
    x_tile = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    kt_begin, kt_end = gemm_k_slice(K, split_k, tl.program_id(1), BLOCK_K)
    acc = gemm_partial_tile(x_tile, w_rows, kt_begin, kt_end, K, QTYPE, SUB, RN, DOT_PRECISION, F16_DECODE,
                            HEAD_WORDS, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB)
    store_output(acc, offs_m, offs_n, M, N, bias_ptr, out_ptr, ws_ptr, cnt_ptr, pid, split_k, HAS_BIAS)


_GEMM_KEY = ("M_BUCKET", "N", "K", "QTYPE", "HAS_BIAS", "F16_DECODE", "HEAD_WORDS")

_gemm_tuned = triton.autotune(configs=configs.gemm_configs(), key=list(_GEMM_KEY),
                              prune_configs_by={"early_config_prune": configs.prune_gemm_configs})(_gemm_kernel)

#: Rows of M tiles that share a weight tile in the grouped launch order.
GROUP_M = 8


def dot_precision(x_dtype: torch.dtype) -> str:
    """tl.dot's input_precision for activations of ``x_dtype`` (a constexpr: one binary per choice).

    fp32: "tf32x3", three TF32 tensor-core products (hi*hi + hi*lo + lo*hi) whose error is near fp32's,
    where "ieee" would fall back to CUDA-core FMAs (several times slower on sm_90) and plain "tf32"
    (Triton's default) loses ~3e-4 relative. fp16/bf16: the option is ignored by Triton; "tf32" keeps those
    binaries what they were. Both strings are accepted by Triton 3.6 through 3.9."""
    return "tf32x3" if x_dtype == torch.float32 else "tf32"


def f16_decode_default(x_dtype: torch.dtype, qtype: str) -> bool:
    """Whether the GEMM decodes weight tiles in fp16 arithmetic (decode_tile_f16) by default: for fp16
    activations, in the formats where that shortens the K loop on sm_90 (see the module docstring)."""
    return x_dtype == torch.float16 and qtype in _F16_DECODE_QTYPES


_F16_DECODE_QTYPES = frozenset({"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q4_k", "q5_k"})


def head_words(data: torch.Tensor, qtype: str, expert_bytes: int = 0) -> bool:
    """Whether the kernel may read q4_k/q5_k 16-byte block heads as int32 words (HEAD_WORDS): the blocks
    (144, 176 bytes) keep 4-byte alignment when the first one has it, and, in a buffer of experts
    ``expert_bytes`` apart (the grouped expert GEMM), when that distance keeps it too."""
    return qtype in ("q4_k", "q5_k") and data.data_ptr() % 4 == 0 and expert_bytes % 4 == 0


def gemm(x2d: torch.Tensor, qt, bias: "torch.Tensor | None", out: torch.Tensor, *,
         split_k: "int | None" = None, f16_decode: "bool | None" = None) -> str:
    """out (M, N) = x2d (M, K) @ W.T (+ bias) with the fused tiled GEMM; returns the variant that ran
    ("gemm" or "gemm_splitk"). Inputs are validated by the caller (qmatmul): x2d has unit stride along K,
    out is contiguous of x2d's dtype. ``split_k`` forces that many K slices (no tuning); None tunes it.
    ``f16_decode`` forces the weight decode (True: fp16 arithmetic, fp16 activations only; False: exact
    fp32 then rounded) instead of f16_decode_default's choice, to compare the two (no tuning)."""
    if f16_decode and x2d.dtype != torch.float16:
        raise ValueError(f"f16_decode=True needs float16 activations, got {x2d.dtype}")
    m, k = x2d.shape
    n = qt.shape[0]
    fp32 = x2d.dtype == torch.float32
    args = dict(x_ptr=x2d, w_ptr=qt.data, bias_ptr=bias if bias is not None else out, out_ptr=out,
                M=m, N=n, K=k, stride_xm=x2d.stride(0), row_bytes=qt.row_bytes,
                M_BUCKET=configs.next_power_of_2(m), QTYPE=QTYPE_CODES[qt.qtype], HAS_BIAS=bias is not None,
                SUB=SUB_BLOCK[qt.qtype], RN=not INTERPRETER, DOT_PRECISION=dot_precision(x2d.dtype),
                GROUP_M=GROUP_M,
                F16_DECODE=f16_decode_default(x2d.dtype, qt.qtype) if f16_decode is None else bool(f16_decode),
                HEAD_WORDS=head_words(qt.data, qt.qtype))

    def grid(meta):
        return (configs.cdiv(m, meta["BLOCK_M"]) * configs.cdiv(n, meta["BLOCK_N"]), meta["split_k"])

    sms = sm_count(x2d.device)
    split = launch_split_k(_gemm_tuned, grid, args, tuning_key("gemm", args, _GEMM_KEY),
                           lambda: configs.gemm_heuristic_config(m, n, k, qt.qtype, sms, split_k, fp32=fp32),
                           tune=split_k is None and f16_decode is None, out=out)
    variant = "gemm_splitk" if split > 1 else "gemm"
    count_launch(variant)
    return variant
