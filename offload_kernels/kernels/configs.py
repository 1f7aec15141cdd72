"""Kernel selection and launch configurations: the crossover table (which kernel family runs for a given
number of tokens M), autotune config spaces with their early pruners, and the heuristic configs used
where tuning is off (the interpreter, CUDA graph capture before a shape was tuned, forced split_k).

Nothing here was measured (it was written without a GPU): the crossovers and heuristics are reasoned
defaults for an H100-class GPU; ``bench/bench_kernels.py`` measures every family per M so they can be
set from data.
"""

from __future__ import annotations

import math
import sys

import triton

from .decode import BLOCK32_QTYPES, QTYPE_CODES, SUB_BLOCK
from .runtime import INTERPRETER, sm_count

# ----------------------------------------------------------------------------------------- crossovers
#: Kernel family by M (tokens in the call = product of x's leading dims): the first row whose bound is
#: >= M wins. From the first H100 run (bench/results/nvidia-h100-80gb-hbm3/, q4_k and q3_k on 8192x8192,
#: autotuned, device time of the kernels from torch.profiler and CUDA-graph replay):
#:  * M <= 4, "gemv": reading the quantized bytes once is the whole cost (q4_k M=1: 44 us of kernels
#:    against 60 us for fp16 cuBLAS). One FMA per weight per token on CUDA cores; no padding of M to 16.
#:  * M <= 64, "gemm": fused dequantize + tl.dot reads 4.5 bits per weight instead of writing and
#:    re-reading a 16-bit copy (~60 us of traffic at 8192x8192): 82 us at M=16 where dequant + cuBLAS
#:    costs ~120 us. The fused kernel's tensor-core rate is ~3x below cuBLAS (635 us against 198 us at
#:    M=1024), so it loses once the matmul outweighs that traffic: 224 us against 133 us at M=256.
#:    The bound between 16 and 256 is interpolated (M=64, 128 unmeasured).
#:  * above, "dequant": Triton dequantize to the activation dtype (~60 us, at the HBM copy rate), then
#:    cuBLAS (torch.matmul).
KERNEL_BY_M: tuple[tuple[int, str], ...] = (
    (4, "gemv"),
    (64, "gemm"),
    (sys.maxsize, "dequant"),
)

#: Kernel families a caller may force with ``qmatmul(..., kernel=...)``.
KERNEL_FAMILIES = ("gemv", "gemm", "dequant")


def select_kernel(m: int) -> str:
    """The kernel family KERNEL_BY_M picks for M tokens."""
    for bound, family in KERNEL_BY_M:
        if m <= bound:
            return family
    return KERNEL_BY_M[-1][1]


# ----------------------------------------------------------------------------------------- shared
def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: triton.cdiv is a JIT-callable whose Python call costs microseconds, and the
    launch grids call this on every launch."""
    return -(-a // b)


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of n that is <= cap (at least 1): split-K factors that cut K into equal slices."""
    for d in range(max(1, min(n, cap)), 0, -1):
        if n % d == 0:
            return d
    return 1


def _args(named_args: dict, kwargs: dict) -> dict:
    return {**named_args, **kwargs}


#: Most configs an autotuner benchmarks per shape: each distinct one costs a compile (~1 s) on first use.
MAX_TUNED_CONFIGS = 12


def _closest(configs: list[triton.Config], programs_of, target: float, limit: int = MAX_TUNED_CONFIGS):
    """The ``limit`` configs whose program count is closest (in log2) to ``target``."""
    if len(configs) <= limit:
        return configs
    return sorted(configs, key=lambda c: abs(math.log2(programs_of(c) / target)))[:limit]


_QTYPE_NAMES = {code: name for name, code in QTYPE_CODES.items()}


def _qtype_name(a: dict) -> str:
    return _QTYPE_NAMES[int(a["QTYPE"])]


# ----------------------------------------------------------------------------------------- GEMV
#: Weights per GEMV loop iteration: one k-quant super-block, or eight 32-weight blocks.
GEMV_STEP_K = 256
#: Largest number of tokens one GEMV program handles (the accumulator grows with it).
GEMV_MAX_BLOCK_M = 8
#: GEMV loop layouts (the LAYOUT constexpr, see gemv.py). 1: per-format storage-order tiles, the x tile
#: and scales converted into the weight tile's layout every step (through shared memory, with barriers);
#: 2: per-thread 16-byte chunks, every load of a step in one layout, software-pipelined loop; 3: word-wide
#: decode with the step's structure unrolled (word-aligned weight bytes only). All are in the autotune space;
#: the heuristic (untuned) config uses layout 3 for a few tokens, else GEMV_DEFAULT_LAYOUT.
GEMV_LAYOUTS = (1, 2, 3)
#: Layout of the heuristic config, per format, for more tokens than GEMV3_DEFAULT_MAX_BLOCK_M and wherever
#: layout 3 cannot run (misaligned weight bytes, more than GEMV3_MAX_BLOCK_M tokens). From sm_90
#: machine code, not yet timed on a GPU (tests/kernels/test_compile_sm90.py checks these properties with
#: whichever Triton is installed): for q4_k and q5_k (16-byte-aligned blocks) layout 2's loop has no
#: conversion, barrier or shared-memory access with Triton 3.6 and 3.9, and ~80 registers instead of ~170.
#: For the 2-byte-aligned formats Triton 3.6 still converts layouts inside layout 2's loop (3.9 does not),
#: so they stay on layout 1 until a GPU run says otherwise.
GEMV_DEFAULT_LAYOUT = {**dict.fromkeys(QTYPE_CODES, 1), "q4_k": 2, "q5_k": 2}
#: Most tokens per program for which layout 3 is the heuristic's default (word-aligned bytes permitting).
#: sm_90 code, Triton 3.6 and 3.9 (bench/results/static-sm90/): at 1 token layout 3 has the fewest loop
#: instructions per weight for every format (q4_0 5.6, q8_0 5.6, q3_k 6.3, q4_k 5.3, q5_k 5.9, q6_k 5.9, fp16
#: activations; layout 1 6.1-11.8, layout 2 8.7-13.8) and no conversion, barrier or shared-memory access in
#: its loop; at 2 tokens 3.4-4.0 per weight and token (layout 1 3.7-7.4), without spills.
GEMV3_DEFAULT_MAX_BLOCK_M = 2
#: Layout 3's fewest rows per warp. With fewer (e.g. 64 rows on 4 warps) every thread still gets 8 bytes,
#: but ptxas got the byte-permute selectors from registers (one more move per weight: 7.7 instead of 6.3
#: instructions per weight for q3_k on sm_90).
GEMV3_ROWS_PER_WARP = 32
#: Most tokens per program layout 3 runs (when asked for, or tuned): at 4 it is still the shortest loop (2.6-2.8
#: instructions per weight and token) but spills registers with Triton 3.9 (not 3.6, but for q6_k): the
#: tuner times it, the untuned default stops at GEMV3_DEFAULT_MAX_BLOCK_M.
GEMV3_MAX_BLOCK_M = 4
#: Layout 1: per-row accumulator shape (TILE_A, TILE_B) of each format's step: the storage order of the
#: quant bytes it decodes; TILE_A * TILE_B fp32 registers per row per token, over the CTA.
GEMV_TILE = {**dict.fromkeys(QTYPE_CODES, (8, 16)), "q8_0": (8, 32), "q2_k": (4, 16), "q3_k": (4, 16), "q4_k": (4, 32),
             "q5_k": (4, 32)}
#: Accumulator elements per row per token, either layout: one per quant byte a step decodes per row
#: (layout 2 arranges the same bytes as (A, B, 16)).
GEMV_ROW_ELEMS = {qtype: a * b for qtype, (a, b) in GEMV_TILE.items()}
#: Layout 2: software-pipelining stages (tl.range num_stages) the tuner tries.
GEMV2_STAGES = (1, 3)


def gemv_block_m(m: int) -> int:
    return min(next_power_of_2(m), GEMV_MAX_BLOCK_M)


#: Alignment of the weight bytes' start that layout 3's word loads need (4-byte for the 84-, 144-, 176- and 136-byte
#: blocks, read as int32 words; 2-byte for the 110-, 210- and 32-weight blocks (18 to 34 bytes), whose words
#: are two 16-bit loads). mxfp4's 17-byte blocks put every other block's quants at odd addresses, so its words are
#: two aligned 32-bit loads joined by a byte permute (gemv._u8_word): any alignment.
GEMV3_ALIGNMENT = {**{name: 2 for name in QTYPE_CODES}, "q2_k": 4, "q4_k": 4, "q5_k": 4, "iq4_xs": 4, "mxfp4": 1}


def gemv_word_loads(qt) -> bool:
    """Whether layout 3 may read ``qt``'s bytes as words (the WORD_LOADS constexpr): whether they start
    GEMV3_ALIGNMENT-aligned (their blocks, rows and runs then are too: q4_k blocks are 144 bytes, q3_k's
    110). Part of the tuning key, so a config tuned on aligned bytes never runs on misaligned ones."""
    return word_loads_ok(qt.data, qt.qtype)


def word_loads_ok(data, qtype: str, expert_bytes: int = 0) -> bool:
    """gemv_word_loads for raw bytes ``data`` of ``qtype``, and for a buffer of experts ``expert_bytes`` apart
    (the grouped expert GEMV): the start and the distance between experts both GEMV3_ALIGNMENT-aligned."""
    align = GEMV3_ALIGNMENT.get(qtype)
    return align is not None and data.data_ptr() % align == 0 and expert_bytes % align == 0


def gemv_layouts(qtype: str, word_loads: bool) -> tuple[int, ...]:
    """The GEMV layouts that can run for ``qtype`` (layout 3 only with word loads)."""
    return tuple(layout for layout in GEMV_LAYOUTS if layout != 3 or word_loads)


def _gemv_accumulator_fits(block_m: int, block_n: int, qtype: str, num_warps: int, layout: int = 1) -> bool:
    if layout == 3 and block_m > GEMV3_MAX_BLOCK_M:
        return False
    row_elems = 16 if layout == 3 else GEMV_ROW_ELEMS[qtype]
    return block_m * block_n * row_elems <= 64 * 32 * num_warps      # <= 64 fp32 per thread


def _gemv_enough_work(block_n: int, qtype: str, num_warps: int, layout: int) -> bool:
    """Each thread gets at least 16 weights (layout 1) or one full 16-byte run (layout 2) per step and token:
    decode overheads are per row and step, and layout 2's loads are 16 bytes wide only then; layout 3: one
    or two rows of 16 bytes per thread (fp16 x: two threads per row each take 8, as 16-byte loads of x, and
    two rows each: then every thread's bytes sit at compile-time-known positions in their words, which the
    byte permutes need as immediates; sm_90 code checked, see GEMV3_ROWS_PER_WARP)."""
    if layout == 3:
        return GEMV3_ROWS_PER_WARP * num_warps <= block_n <= 2 * GEMV3_ROWS_PER_WARP * num_warps
    if layout == 2:
        return block_n * GEMV_ROW_ELEMS[qtype] >= 16 * 32 * num_warps
    return block_n * GEMV_STEP_K >= 16 * 32 * num_warps


def _gemv2_min_block_n(qtype: str, num_warps: int = 4) -> int:
    """Layout 2's fewest rows per program that give each of the threads a full 16-byte run."""
    return max(4, (16 * 32 * num_warps) // GEMV_ROW_ELEMS[qtype])


def _gemv_config(block_n: int, split_k: int, num_warps: int, layout: int, stages: int = 1) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "split_k": split_k, "LAYOUT": layout, "STAGES": stages},
                         num_warps=num_warps, num_stages=2)


def gemv_configs(interpreter: bool = INTERPRETER) -> list[triton.Config]:
    """The GEMV autotune space (a single config under the interpreter, which never tunes)."""
    if interpreter:
        return [_gemv_config(32, 1, 4, 1)]       # never launched: the interpreter runs the heuristic config
    splits = (1, 2, 4, 8, 16, 32)
    return ([_gemv_config(bn, sk, w, 1) for bn in (8, 16, 32, 64) for sk in splits for w in (2, 4, 8)]
            + [_gemv_config(bn, sk, w, 2, st) for bn in (8, 16, 32, 64) for sk in splits
               for w in (2, 4, 8) for st in GEMV2_STAGES]
            + [_gemv_config(bn, sk, w, 3, st) for bn in (64, 128, 256) for sk in splits
               for w in (2, 4, 8) for st in GEMV2_STAGES])


def prune_gemv_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Early pruner: split_k must cut the K steps into equal slices (a correctness-neutral but required
    load balance: no idle or double-length programs), the accumulator must fit in registers and each
    thread get enough work per step (see _gemv_enough_work), tiles no wider than the matrix, no more
    split-K programs than can be useful (atomics are not free), layout 3 only where it can run (see
    gemv_layouts); then, per layout, at most MAX_TUNED_CONFIGS over the number of layouts, those whose
    program count is closest to ~4 per SM."""
    a = _args(named_args, kwargs)
    m, n, k, block_m, qtype = a["M"], a["N"], a["K"], a["BLOCK_M"], _qtype_name(a)
    sms = sm_count(a["x_ptr"].device)
    steps = cdiv(k, GEMV_STEP_K)
    layouts = gemv_layouts(qtype, bool(a.get("WORD_LOADS", False)))

    def programs(c):
        return cdiv(n, c.kwargs["BLOCK_N"]) * cdiv(m, block_m) * c.kwargs["split_k"]

    kept: dict[int, list[triton.Config]] = {layout: [] for layout in layouts}
    for c in configs:
        bn, sk, layout = c.kwargs["BLOCK_N"], c.kwargs["split_k"], c.kwargs["LAYOUT"]
        if layout not in kept or steps % sk or bn > max(8, next_power_of_2(n)):
            continue
        if not _gemv_accumulator_fits(block_m, bn, qtype, c.num_warps, layout):
            continue
        if not _gemv_enough_work(bn, qtype, c.num_warps, layout):
            continue
        if sk > 1 and programs(c) > 16 * sms:
            continue
        kept[layout].append(c)
    quota = MAX_TUNED_CONFIGS // len(layouts)
    chosen = [c for layout in layouts for c in _closest(kept[layout], programs, 4 * sms, quota)]
    return chosen or [gemv_heuristic_config(m, n, k, qtype, sms, word_loads=bool(a.get("WORD_LOADS", False)))]


def gemv_heuristic_config(m: int, n: int, k: int, qtype: str, sms: int, split_k: "int | None" = None,
                          layout: "int | None" = None, word_loads: bool = True) -> triton.Config:
    """A GEMV config without tuning, in ``layout`` (default: 3 up to GEMV3_DEFAULT_MAX_BLOCK_M tokens, else
    GEMV_DEFAULT_LAYOUT[qtype]): 4 warps; layout 1 with 32-row tiles (16/8 for more tokens or wide
    accumulators), layout 2 with the fewest rows that give every thread a 16-byte run (fewer registers, more
    resident programs), pipelined 3 deep, layout 3 with 32 rows per warp (2 warps up to 64 rows, else 4), not
    pipelined; and enough equal K slices for ~4 resident programs per SM (so the loads in flight cover HBM
    latency). Layout 3 falls back to GEMV_DEFAULT_LAYOUT where it cannot run (``word_loads`` False: see
    gemv_word_loads) or for more than GEMV3_MAX_BLOCK_M tokens; layout 2 to layout 1 where its accumulator
    would spill (8 tokens)."""
    block_m = gemv_block_m(m)
    if layout is None:
        layout = 3 if block_m <= GEMV3_DEFAULT_MAX_BLOCK_M else GEMV_DEFAULT_LAYOUT[qtype]
    if layout == 3 and (3 not in gemv_layouts(qtype, word_loads) or block_m > GEMV3_MAX_BLOCK_M):
        layout = GEMV_DEFAULT_LAYOUT[qtype]
    if layout == 2 and not _gemv_accumulator_fits(block_m, _gemv2_min_block_n(qtype), qtype, 4):
        layout = 1          # 8 tokens: layout 2's accumulator would spill; layout 1 shrinks its row tile
    warps = 4
    if layout == 3:
        warps = 2 if n <= 64 else 4     # a narrow matrix: half the rows per program
        block_n = GEMV3_ROWS_PER_WARP * warps
        stages = 1      # the pipelined loop copies through shared memory: ~40% more loop instructions
    elif layout == 2:
        block_n = _gemv2_min_block_n(qtype)
        stages = 3
    else:
        block_n = 32
        while block_n > 4 and not _gemv_accumulator_fits(block_m, block_n, qtype, 4):
            block_n //= 2
        stages = 1
    if split_k is None:
        tiles = cdiv(n, block_n) * cdiv(m, block_m)
        split_k = largest_divisor_at_most(cdiv(k, GEMV_STEP_K), max(1, (4 * sms) // tiles))
    return _gemv_config(block_n, split_k, warps, layout, stages)


# ----------------------------------------------------------------------------------------- grouped experts
def expert_gemv_heuristic_config(programs_m: int, block_m: int, n: int, k: int, qtype: str, sms: int,
                                 split_k: "int | None" = None, layout: "int | None" = None,
                                 word_loads: bool = True) -> triton.Config:
    """The GEMV heuristic config for ``block_m`` tokens (gemv_heuristic_config) for each of ``programs_m``
    program rows (pairs, or blocks of pairs sharing an expert), with the K split sized for all of their
    tiles together (~4 resident programs per SM)."""
    one = gemv_heuristic_config(block_m, n, k, qtype, sms, 1, layout, word_loads)
    block_n = one.kwargs["BLOCK_N"]
    if split_k is None:
        tiles = cdiv(n, block_n) * programs_m
        split_k = largest_divisor_at_most(cdiv(k, GEMV_STEP_K), max(1, (4 * sms) // tiles))
    return _gemv_config(block_n, split_k, one.num_warps, one.kwargs["LAYOUT"], one.kwargs["STAGES"])


#: The grouped expert GEMV sorts the (token, expert) pairs by expert into blocks of up to
#: experts_block_m(pairs, experts) pairs (each block decodes its expert's bytes once for all its pairs) when
#: there are more than this many pairs per expert on average; with fewer, repeats are rare and one program
#: row per pair needs no sorting (no launches before the kernel).
EXPERTS_SORT_MIN_PAIRS_PER_EXPERT = 0.5


def experts_block_m(pairs: int, experts: int) -> int:
    """Pairs per block of the sorted grouped expert GEMV (1: unsorted): twice the mean pairs per expert,
    as a power of two from 2 to GEMV3_MAX_BLOCK_M (the GEMV's measured range is up to 4 tokens)."""
    if pairs <= EXPERTS_SORT_MIN_PAIRS_PER_EXPERT * experts:
        return 1
    return max(2, min(GEMV3_MAX_BLOCK_M, next_power_of_2(cdiv(2 * pairs, experts))))


#: qmatmul_experts' kernel by mean (token, expert) pairs per expert: the grouped expert GEMV (CUDA cores, one
#: FMA per weight and pair, unsorted or in sorted blocks of up to GEMV3_MAX_BLOCK_M) up to this many, the
#: grouped tensor-core GEMM over sorted blocks (expert_gemm.py) above. The dense crossover's reasoning
#: (KERNEL_BY_M: the GEMV up to 4 tokens, measured on an H100) carried over per expert; not yet timed for
#: experts (``offload-kernels bench experts`` does).
EXPERTS_GEMV_MAX_PAIRS_PER_EXPERT = 4


def select_experts_kernel(pairs: int, experts: int) -> str:
    """"gemv" or "gemm": the grouped expert kernel for ``pairs`` (token, expert) pairs over ``experts``."""
    return "gemv" if pairs <= EXPERTS_GEMV_MAX_PAIRS_PER_EXPERT * experts else "gemm"


#: Pairs per block the grouped expert GEMM takes (its BLOCK_M: tl.dot needs 16 rows at least).
EXPERT_GEMM_BLOCK_MS = (16, 32, 64)


def expert_gemm_block_m(pairs: int, experts: int) -> int:
    """Pairs per block of the grouped expert GEMM: the mean pairs per expert rounded up to a power of two, 16
    to 64. Rounding up, a typical expert is one block (its bytes read once); rounding down pads as many rows
    (at a mean of 20: one block of 32, or 16 + 4 of two blocks of 16) and reads it twice."""
    return max(EXPERT_GEMM_BLOCK_MS[0], min(EXPERT_GEMM_BLOCK_MS[-1], next_power_of_2(cdiv(pairs, experts))))


# ----------------------------------------------------------------------------------------- GEMM
#: Tallest BLOCK_M whose tiles are also tried with swapped operands (SWAP_AB).
GEMM_SWAP_MAX_BLOCK_M = 64


def gemm_configs(interpreter: bool = INTERPRETER) -> list[triton.Config]:
    """The tiled GEMM autotune space (BLOCK_M x BLOCK_N x BLOCK_K, warps, stages) x split_k, and the
    swapped-operand variant (SWAP_AB, see gemm.py) of the tiles with a short M side."""
    if interpreter:
        return [_gemm_config(16, 64, 64, 1, 4, 2)]
    tiles = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (16, 64, 128, 4, 3), (32, 64, 64, 4, 3), (32, 128, 64, 4, 3),
        (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 32, 4, 4), (64, 256, 64, 8, 3),
        (128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    ]
    return [_gemm_config(bm, bn, bk, sk, w, s, swap)
            for bm, bn, bk, w, s in tiles for sk in (1, 2, 4, 8, 16)
            for swap in ((False, True) if bm <= GEMM_SWAP_MAX_BLOCK_M else (False,))]


def _gemm_config(bm: int, bn: int, bk: int, split_k: int, num_warps: int, num_stages: int,
                 swap_ab: bool = False) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "split_k": split_k, "SWAP_AB": swap_ab},
                         num_warps=num_warps, num_stages=num_stages)


def gemm_block_k_ok(block_k: int, qtype: str) -> bool:
    """Correctness constraint of decode_tile: BLOCK_K a multiple of the sub-block (one scale per tile row),
    and for k-quants a divisor of the 256-weight super-block (a tile never straddles two)."""
    sub = SUB_BLOCK[qtype]
    if block_k % sub:
        return False
    return qtype in BLOCK32_QTYPES or 256 % block_k == 0


def prune_gemm_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Early pruner: BLOCK_K legal for the format (see gemm_block_k_ok), split_k dividing the number of
    K tiles and only when the output tiles alone cannot fill the GPU, BLOCK_M no taller than needed
    (and not tiny for large M), fp32 activations (tf32x3: 3 MMAs, fp32 operand tiles) on smaller tiles;
    then at most MAX_TUNED_CONFIGS, those with a program count closest to two waves (up to a third of them
    with swapped operands)."""
    a = _args(named_args, kwargs)
    m, n, k, qtype = a["M"], a["N"], a["K"], _qtype_name(a)
    fp32 = a["x_ptr"].element_size() == 4
    sms = sm_count(a["x_ptr"].device)
    m_cap = max(16, next_power_of_2(m))
    kept = []
    for c in configs:
        bm, bn, bk, sk = (c.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "split_k"))
        if not gemm_block_k_ok(bk, qtype) or bm > m_cap or bm < min(64, m_cap) // 2 or bn > max(16, next_power_of_2(n)):
            continue
        if fp32 and bm * bn > 128 * 128:
            continue
        k_tiles = cdiv(k, bk)
        tiles = cdiv(m, bm) * cdiv(n, bn)
        if k_tiles % sk or (sk > 1 and tiles * sk > 4 * sms) or (sk > 1 and tiles >= sms):
            continue
        kept.append(c)

    def programs(c):
        return (cdiv(m, c.kwargs["BLOCK_M"]) * cdiv(n, c.kwargs["BLOCK_N"])) * c.kwargs["split_k"]

    return _plain_and_swapped(kept, programs, 2 * sms) or [gemm_heuristic_config(m, n, k, qtype, sms, fp32=fp32)]


def _plain_and_swapped(kept: list[triton.Config], programs_of, target: float) -> list[triton.Config]:
    """At most MAX_TUNED_CONFIGS of ``kept`` with a program count closest to ``target``, a third of them with
    swapped operands: those get slots of their own (they would otherwise tie with their unswapped twins on
    program count and crowd out other tile shapes)."""
    swapped = _closest([c for c in kept if c.kwargs["SWAP_AB"]], programs_of, target, MAX_TUNED_CONFIGS // 3)
    plain = _closest([c for c in kept if not c.kwargs["SWAP_AB"]], programs_of, target,
                     MAX_TUNED_CONFIGS - len(swapped))
    return plain + swapped


def gemm_heuristic_config(m: int, n: int, k: int, qtype: str, sms: int, split_k: "int | None" = None,
                          fp32: bool = False) -> triton.Config:
    """A GEMM config without tuning: BLOCK_M the next power of two of M (16..128), 64/128-wide N tiles,
    BLOCK_K 64, and equal K slices when the output tiles alone would leave SMs idle."""
    bm = min(64 if fp32 else 128, max(16, next_power_of_2(m)))
    bn = 64 if (m <= 64 or fp32) else 128
    bk = 64
    warps = 8 if bm * bn >= 128 * 128 else 4
    if split_k is None:
        tiles = cdiv(m, bm) * cdiv(n, bn)
        split_k = largest_divisor_at_most(cdiv(k, bk), min(16, sms // tiles)) if tiles < sms else 1
    return _gemm_config(bm, bn, bk, split_k, warps, 3)


# ----------------------------------------------------------------------------------------- grouped expert GEMM
def expert_gemm_configs(interpreter: bool = INTERPRETER) -> list[triton.Config]:
    """The grouped expert GEMM's autotune space: BLOCK_N x BLOCK_K, warps, stages, swapped operands (BLOCK_M is
    the sort's block size, fixed before the launch; no K split: a batch that needs this kernel has enough
    (block, N tile) programs)."""
    if interpreter:
        return [_expert_gemm_config(64, 64, 1, 4, 2)]
    return [_expert_gemm_config(bn, bk, 1, w, s, swap) for bn in (32, 64, 128) for bk in (32, 64, 128)
            for w in (4, 8) for s in (3, 4) for swap in (False, True)]


def _expert_gemm_config(bn: int, bk: int, split_k: int, num_warps: int, num_stages: int,
                        swap_ab: bool = False) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "split_k": split_k, "SWAP_AB": swap_ab},
                         num_warps=num_warps, num_stages=num_stages)


def prune_expert_gemm_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Early pruner: BLOCK_K legal for the format (gemm_block_k_ok), N tiles no wider than the matrix, 8 warps
    only for tiles of 64 x 128 or more; then, as for the GEMM, the configs whose program count (blocks x N
    tiles) is closest to two waves, a third of the slots for swapped operands."""
    a = _args(named_args, kwargs)
    n, qtype, block_m, blocks = a["N"], _qtype_name(a), a["BLOCK_M"], a["num_blocks"]
    sms = sm_count(a["x_ptr"].device)
    kept = [c for c in configs if gemm_block_k_ok(c.kwargs["BLOCK_K"], qtype)
            and c.kwargs["BLOCK_N"] <= max(32, next_power_of_2(n))
            and (c.num_warps == 4 or block_m * c.kwargs["BLOCK_N"] >= 64 * 128)]

    def programs(c):
        return blocks * cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["split_k"]

    return _plain_and_swapped(kept, programs, 2 * sms) or [expert_gemm_heuristic_config()]


def expert_gemm_heuristic_config(split_k: "int | None" = None) -> triton.Config:
    """A grouped expert GEMM config without tuning, whatever the shape: 64 x 64 weight tiles (BLOCK_N x
    BLOCK_K, legal for every format), 4 warps, 3 stages; no K split unless forced."""
    return _expert_gemm_config(64, 64, split_k or 1, 4, 3)


# ----------------------------------------------------------------------------------------- dequantize
#: Weights per dequantize program along K: one k-quant super-block or eight 32-weight blocks.
DEQUANT_BLOCK_K = 256


def dequant_configs(interpreter: bool = INTERPRETER) -> list[triton.Config]:
    """The dequantize autotune space (rows per program, warps)."""
    if interpreter:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=1) for bn in (8, 16, 32, 64) for w in (4, 8)]


def prune_dequant_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Early pruner: no tile taller than the matrix, and register use bounded (<= 64 fp32 values per thread)."""
    a = _args(named_args, kwargs)
    n = a["N"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max(8, next_power_of_2(n))
            and c.kwargs["BLOCK_N"] * DEQUANT_BLOCK_K <= 64 * 32 * c.num_warps]
    return kept or [dequant_heuristic_config()]


def dequant_heuristic_config() -> triton.Config:
    return triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)
