"""Compile every kernel for sm_90 (H100) ahead of time, without a GPU, and inspect the machine code.

Run by test_compile_sm90.py in a subprocess with the interpreter off (under TRITON_INTERPRET=1 the kernels
are interpreted functions that cannot be compiled). Catches what the interpreter cannot: code generation
errors, and FMA contraction in the dequantize kernel (its SASS must contain no FFMA). Prints one JSON line.
"""

from __future__ import annotations

import json
import re
import sys

import torch
import triton

from offload_kernels.kernels import configs
from offload_kernels.kernels.decode import QTYPE_CODES, SUB_BLOCK
from offload_kernels.kernels.dequant import _dequant_kernel
from offload_kernels.kernels.gemm import GROUP_M, _gemm_kernel, dot_precision, f16_decode_default
from offload_kernels.kernels.gemv import _gemv_kernel
from offload_kernels.kernels.sm90 import ALIGNED, compile_kernel, loop_body, sass_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def loop_sync_ops(sass: str) -> dict[str, int]:
    """Barriers, shared-memory accesses and shuffles inside the kernel's main loop: the layout conversions'
    cost."""
    body = loop_body(sass)
    if body is None:
        return {"no_loop": 1}
    return {kind: sum(op.startswith(prefix) for op in body)
            for kind, prefix in (("BAR", "BAR"), ("LDS", "LDS"), ("STS", "STS"), ("SHFL", "SHFL"))}


def main() -> int:
    report = {"compiled": [], "dequant_ffma": {}, "gemv_layout2_loop_sync": {}, "gemv_layout3_loop": {},
              "gemm_fp16_loop_instructions": {}, "gemm_loop_global_loads": {}, "triton": triton.__version__}
    for qtype, code in QTYPE_CODES.items():
        for x in ("fp32", "fp16", "bf16"):
            sig = {"x_ptr": f"*{x}", "w_ptr": "*u8", "bias_ptr": f"*{x}", "out_ptr": f"*{x}", "ws_ptr": "*fp32",
                   "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "row_bytes": "i32",
                   "split_k": "i32", "M_BUCKET": "i32"}
            tile_a, tile_b = configs.GEMV_TILE[qtype]
            gemv_builds = [(block_m, None, None) for block_m in ((1, 4) if x == "fp16" else (1,))]
            if x == "fp16":
                # layout 1; layout 2 unpipelined and layout 3 (their loops are inspected)
                gemv_builds += [(1, 1, None), (1, 2, 1), (1, 3, None)]
            for block_m, layout, stages in gemv_builds:
                c = configs.gemv_heuristic_config(block_m, 4096, 4096, qtype, 132, layout=layout)
                stages = c.kwargs["STAGES"] if stages is None else stages
                k = compile_kernel(_gemv_kernel, sig, dict(QTYPE=code, HAS_BIAS=True, BLOCK_M=block_m,
                                                           BLOCK_N=c.kwargs["BLOCK_N"], TILE_A=tile_a, TILE_B=tile_b,
                                                           WORD_LOADS=True, LAYOUT=c.kwargs["LAYOUT"], STAGES=stages),
                                   ALIGNED, num_warps=c.num_warps)
                report["compiled"].append(f"gemv/{qtype}/{x}/m{block_m}/layout{c.kwargs['LAYOUT']}/stages{stages}")
                if c.kwargs["LAYOUT"] == 2 and stages == 1:
                    sass = sass_of(k)
                    if sass is not None:
                        report["gemv_layout2_loop_sync"][qtype] = loop_sync_ops(sass)
                if layout == 3:         # the fp16 build asked for, not the formats' default builds
                    sass = sass_of(k)
                    if sass is not None:
                        body = loop_body(sass) or []
                        weights = c.kwargs["BLOCK_N"] * configs.GEMV_STEP_K / (32 * c.num_warps)   # per thread
                        report["gemv_layout3_loop"][qtype] = {
                            **loop_sync_ops(sass), "PRMT": sum(op.startswith("PRMT") for op in body),
                            "weights_per_thread": weights, "instructions_per_weight": len(body) / weights}
            default = f16_decode_default(DTYPES[x], qtype)
            # fp16: both weight decodes at a mid-M (16) and a large-M (512) tile, to compare their loops.
            # Every dtype: the swapped-operand variant at a mid-M tile too (a tuned option, compiled only here).
            builds = [(16, True, False), (16, False, False), (512, True, False), (512, False, False)] \
                if x == "fp16" else [(512, default, False)]
            for m, f16_decode, swap in builds + [(16, default, True)]:
                c = configs.gemm_heuristic_config(m, 4096, 4096, qtype, 132, fp32=x == "fp32")
                k = compile_kernel(_gemm_kernel, sig, dict(QTYPE=code, HAS_BIAS=True, SUB=SUB_BLOCK[qtype], RN=True,
                                                           DOT_PRECISION=dot_precision(DTYPES[x]), GROUP_M=GROUP_M,
                                                           F16_DECODE=f16_decode,
                                                           HEAD_WORDS=qtype in ("q4_k", "q5_k"), SWAP_AB=swap,
                                                           **{k: c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}),
                                   ALIGNED, num_warps=c.num_warps, num_stages=c.num_stages)
                report["compiled"].append(f"gemm/{qtype}/{x}/m{m}/{'f16' if f16_decode else 'f32'}_decode"
                                          + ("/swap_ab" if swap else ""))
                if x == "fp16" and not swap:
                    sass = sass_of(k)
                    if sass is not None:
                        body = loop_body(sass) or []
                        tag = f"m{m}/{'f16' if f16_decode else 'f32'}"
                        report["gemm_fp16_loop_instructions"].setdefault(qtype, {})[tag] = len(body)
                        report["gemm_loop_global_loads"].setdefault(qtype, {})[tag] = sum(
                            op.startswith("LDG.") for op in body)      # synchronous loads (not LDGSTS)
            d = configs.dequant_heuristic_config()
            k = compile_kernel(_dequant_kernel, {"w_ptr": "*u8", "out_ptr": f"*{x}", "N": "i32", "K": "i32",
                                                 "row_bytes": "i32"},
                               dict(QTYPE=code, SUB=SUB_BLOCK[qtype], RN=True, BLOCK_K=configs.DEQUANT_BLOCK_K,
                                    BLOCK_N=d.kwargs["BLOCK_N"]), ALIGNED, num_warps=d.num_warps)
            report["compiled"].append(f"dequant/{qtype}/{x}")
            sass = sass_of(k)
            if sass is not None:
                report["dequant_ffma"][f"{qtype}/{x}"] = len(re.findall(r"\bFFMA\b", sass))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
