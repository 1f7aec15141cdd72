"""Ahead-of-time compilation of the kernels for sm_90 (H100) without a GPU, and a reader for the machine code:
the static side of the kernel work (instructions in the main loop, registers, spills, barriers), used by
tests/kernels/test_compile_sm90.py and `offload-kernels bench sass`.

Needs Triton's compiler, not its interpreter: under TRITON_INTERPRET=1 the kernels are interpreted
functions that cannot be compiled (``compile_kernel`` then raises).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from typing import Any

import triton

from . import configs
from .decode import QTYPE_CODES
from .runtime import INTERPRETER

#: Arguments the kernels receive 16-byte aligned (pointers from torch, strides and sizes from the launchers).
ALIGNED = ["x_ptr", "w_ptr", "out_ptr", "ws_ptr", "row_bytes", "K", "stride_xm"]
#: The GEMV kernel's runtime arguments, by activation dtype name ("fp16", "bf16", "fp32").
GEMV_SIGNATURE = {"x_ptr": "*{x}", "w_ptr": "*u8", "bias_ptr": "*{x}", "out_ptr": "*{x}", "ws_ptr": "*fp32",
                  "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "row_bytes": "i32",
                  "split_k": "i32", "M_BUCKET": "i32"}
#: The grouped expert GEMV's runtime arguments (expert_gemv.py): the GEMV's and the routing's.
EXPERT_GEMV_SIGNATURE = {**GEMV_SIGNATURE, "ids_ptr": "*i64", "rows_ptr": "*i32", "expert_bytes": "i32",
                         "num_experts": "i32", "X_GROUP": "i32"}
#: The grouped expert GEMM's (expert_gemm.py): the GEMM's and the sorted blocks' (their experts as int32).
EXPERT_GEMM_SIGNATURE = {**GEMV_SIGNATURE, "ids_ptr": "*i32", "rows_ptr": "*i32", "expert_bytes": "i32",
                         "num_experts": "i32", "num_blocks": "i32", "X_GROUP": "i32"}


def compile_kernel(fn, signature: dict, constexprs: dict, aligned: "list[str]" = ALIGNED, **options):
    """``fn`` compiled for sm_90 with the given argument types, constexpr values and compile options."""
    if INTERPRETER:
        raise RuntimeError("sm_90 compilation needs Triton's compiler: unset TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned if name in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=options)


def _cuobjdump() -> "str | None":
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return tool if os.path.exists(tool) else None


def _cuobjdump_of(kernel, flag: str) -> "str | None":
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def sass_of(kernel) -> "str | None":
    """The kernel's SASS listing (None where this Triton ships no cuobjdump)."""
    return _cuobjdump_of(kernel, "-sass")


def resources_of(kernel) -> "dict[str, int] | None":
    """Registers per thread and stack bytes (register spills) of the compiled kernel."""
    out = _cuobjdump_of(kernel, "-res-usage")
    if out is None:
        return None
    regs, stack = re.findall(r"REG:(\d+)", out), re.findall(r"STACK:(\d+)", out)
    return {"registers": int(regs[0]) if regs else -1, "stack_bytes": int(stack[0]) if stack else -1}


def loop_body(sass: str) -> "list[str] | None":
    """The opcodes of the kernel's main loop: the instructions between the backward branch spanning the
    most code and its target (None if the kernel has no loop)."""
    instrs = [(int(a, 16), op) for a, op in
              re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)[^;]*;", sass)]
    branches = [(int(t, 16), int(a, 16)) for a, t in
                re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", sass)]
    loops = [(t, a) for t, a in branches if t < a]
    if not loops:
        return None
    begin, end = max(loops, key=lambda ta: ta[1] - ta[0])
    return [op for addr, op in instrs if begin <= addr <= end]


def opcode_counts(body: "list[str]") -> Counter:
    """Loop opcodes by mnemonic without modifiers (LDG.E.128 -> LDG)."""
    return Counter(op.split(".")[0] for op in body)


def gemv_loop_report(qtype: str, x: str, m: int, layout: "int | None" = None, n: int = 4096, k: int = 4096,
                     stages: "int | None" = None, experts: bool = False,
                     sorted_pairs: bool = False) -> "dict[str, Any]":
    """The GEMV's heuristic config for ``m`` tokens on an n x k ``qtype`` matrix (in ``layout``, default the
    heuristic's own), compiled for sm_90 with ``x`` activations: its main loop's instruction count per
    weight and token, barriers, shared-memory accesses, shuffles and byte permutes, registers and spills.
    ``layout`` is the layout that ran (the heuristic falls back where the one asked for cannot).
    ``experts``: the grouped expert GEMV (expert_gemv.py) instead, one pair per program, or with
    ``sorted_pairs`` blocks of ``m`` pairs sharing an expert."""
    from .expert_gemv import _expert_gemv_kernel
    from .gemv import _gemv_kernel

    word_loads = qtype in configs.GEMV3_ALIGNMENT          # word-aligned bytes, wherever the format has them
    c = configs.gemv_heuristic_config(m, n, k, qtype, 132, layout=layout, word_loads=word_loads)
    block_m, block_n = configs.gemv_block_m(m), c.kwargs["BLOCK_N"]
    stages = c.kwargs["STAGES"] if stages is None else stages
    tile_a, tile_b = configs.GEMV_TILE[qtype]
    fn, signature = (_expert_gemv_kernel, EXPERT_GEMV_SIGNATURE) if experts else (_gemv_kernel, GEMV_SIGNATURE)
    if experts and block_m != 1 and not sorted_pairs:
        raise ValueError("the unsorted grouped expert GEMV runs one pair per program")
    constexprs = dict(QTYPE=QTYPE_CODES[qtype], HAS_BIAS=True, BLOCK_M=block_m, BLOCK_N=block_n, TILE_A=tile_a,
                      TILE_B=tile_b, WORD_LOADS=word_loads, LAYOUT=c.kwargs["LAYOUT"], STAGES=stages)
    if experts:
        constexprs["SORTED"] = sorted_pairs
    kernel = compile_kernel(fn, {name: t.format(x=x) for name, t in signature.items()}, constexprs,
                            num_warps=c.num_warps)
    report: dict[str, Any] = {"layout": c.kwargs["LAYOUT"], "block_m": block_m, "block_n": block_n,
                              "warps": c.num_warps, "stages": stages, "kernel": kernel}
    sass = sass_of(kernel)
    if sass is None:
        return report
    body = loop_body(sass)
    if body is None:
        raise ValueError(f"no main loop found in the {qtype} GEMV's machine code")
    ops = opcode_counts(body)
    weights = block_n * configs.GEMV_STEP_K / (32 * c.num_warps)      # per thread and loop iteration
    report.update({"loop_instructions": len(body), "weights_per_thread": weights,
                   "instructions_per_weight_token": len(body) / (weights * block_m),
                   **{op: ops[op] for op in ("BAR", "LDS", "STS", "SHFL", "PRMT", "FFMA", "LDG")},
                   **(resources_of(kernel) or {})})
    return report
