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
from offload_kernels.kernels.expert_gemm import _expert_gemm_kernel
from offload_kernels.kernels.gemm import GROUP_M, _gemm_kernel, dot_precision, f16_decode_default
from offload_kernels.kernels.sm90 import (ALIGNED, EXPERT_GEMM_SIGNATURE, GEMV_SIGNATURE, compile_kernel, gemv_loop_report,
                                          loop_body, resources_of, sass_of)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


#: Barriers, shared-memory accesses and shuffles in a loop: the cost of layout conversions.
SYNC_OPS = ("BAR", "LDS", "STS", "SHFL")


def main() -> int:
    report = {"compiled": [], "dequant_ffma": {}, "gemv_layout2_loop_sync": {}, "gemv_layout3_loop": {},
              "expert_gemv_loop": {}, "expert_gemm_loop": {},
              "gemm_fp16_loop_instructions": {}, "gemm_loop_global_loads": {}, "triton": triton.__version__}
    for qtype, code in QTYPE_CODES.items():
        for x in ("fp32", "fp16", "bf16"):
            sig = {name: t.format(x=x) for name, t in GEMV_SIGNATURE.items()}     # the GEMM's arguments too
            gemv_builds = [(block_m, None, None) for block_m in ((1, 4) if x == "fp16" else (1,))]
            if x == "fp16":
                # layout 1; layout 2 unpipelined and layout 3 (their loops are inspected)
                gemv_builds += [(1, 1, None), (1, 2, 1)] + ([(1, 3, None)] if qtype in configs.GEMV3_ALIGNMENT else [])
            for block_m, layout, stages in gemv_builds:
                r = gemv_loop_report(qtype, x, block_m, layout, stages=stages)
                report["compiled"].append(f"gemv/{qtype}/{x}/m{block_m}/layout{r['layout']}/stages{r['stages']}")
                if "loop_instructions" not in r:        # no cuobjdump: the machine code cannot be read
                    continue
                sync = {op: r[op] for op in SYNC_OPS}
                if r["layout"] == 2 and r["stages"] == 1:
                    report["gemv_layout2_loop_sync"][qtype] = sync
                if layout == 3:         # the fp16 build asked for, not the formats' default builds
                    report["gemv_layout3_loop"][qtype] = {
                        **sync, "PRMT": r["PRMT"], "weights_per_thread": r["weights_per_thread"],
                        "loop_instructions": r["loop_instructions"],
                        "instructions_per_weight": r["instructions_per_weight_token"]}
            if x == "fp16":
                # the grouped expert GEMV in its default layout at one token: its loop should be the GEMV's
                r = gemv_loop_report(qtype, x, 1, experts=True)
                report["compiled"].append(f"expert_gemv/{qtype}/{x}/layout{r['layout']}")
                if "loop_instructions" in r:
                    report["expert_gemv_loop"][qtype] = {
                        "layout": r["layout"], "loop_instructions": r["loop_instructions"],
                        "registers": r.get("registers", -1), "stack_bytes": r.get("stack_bytes", -1)}
                # and sorted into blocks of 4 pairs sharing an expert
                r = gemv_loop_report(qtype, x, 4, experts=True, sorted_pairs=True)
                report["compiled"].append(f"expert_gemv_sorted/{qtype}/{x}/m4/layout{r['layout']}")
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
            if x == "fp16":
                # the grouped expert GEMM in its heuristic config with blocks of 16 pairs: the dense GEMM's tile
                # at 16 tokens (16 x 64 x 64, 4 warps, 3 stages), so its K loop should be the GEMM's. The expert
                # stride is 16-byte aligned as Triton specializes it at a launch whenever it is (a stack of rows
                # whose count is a multiple of 16, or the expert cache's 256-byte slots): without that, no
                # asynchronous copy of the weight bytes can be proven aligned, and the loop waits on its loads.
                c = configs.expert_gemm_heuristic_config()
                sig = {name: t.format(x=x) for name, t in EXPERT_GEMM_SIGNATURE.items()}
                k = compile_kernel(_expert_gemm_kernel, sig,
                                   dict(QTYPE=code, HAS_BIAS=True, SUB=SUB_BLOCK[qtype], RN=True,
                                        DOT_PRECISION=dot_precision(DTYPES[x]), GROUP_M=GROUP_M, F16_DECODE=default,
                                        HEAD_WORDS=qtype in ("q4_k", "q5_k"), BLOCK_M=16,
                                        **{key: c.kwargs[key] for key in ("BLOCK_N", "BLOCK_K", "SWAP_AB")}),
                                   ALIGNED + ["expert_bytes"], num_warps=c.num_warps, num_stages=c.num_stages)
                report["compiled"].append(f"expert_gemm/{qtype}/{x}/m16")
                sass = sass_of(k)
                if sass is not None:
                    body = loop_body(sass) or []
                    report["expert_gemm_loop"][qtype] = {
                        "loop_instructions": len(body), "decode": "f16" if default else "f32",
                        "global_loads": sum(op.startswith("LDG.") for op in body),
                        **{key: (resources_of(k) or {}).get(key, -1) for key in ("registers", "stack_bytes")}}
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
