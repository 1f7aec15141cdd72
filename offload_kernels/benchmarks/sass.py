"""The GEMV's loop in sm_90 machine code, per layout, format, activation dtype and token count: compiled ahead
of time with the installed Triton (no GPU needed; not under TRITON_INTERPRET=1).

Per heuristic config (the untuned default's shape, 4096 x 4096): instructions in the main loop per weight and
token, registers per thread, spill stack, barriers and shared-memory accesses in the loop (layout
conversions), byte permutes. A static proxy, not a timing: at M = 1 a loop cannot keep up with HBM once its
instructions per weight exceed what the SMs issue in the time HBM delivers a weight (H100 SXM: 132 SMs x 128
thread-instructions per clock x ~1.75 GHz against 3.35 TB/s: ~5 per q4_k weight, ~3.8 per q3_k weight);
below that it is latency-bound. `bench kernels` times the layouts (gemv_layout*_graph). The numbers behind
configs.GEMV_DEFAULT_LAYOUT and GEMV3_DEFAULT_MAX_BLOCK_M.

Appends to <out>/static-sm90/gemv_sass.csv (one row per build; ``median`` = instructions per weight and
token) and writes gemv_sass_triton<version>.md beside it.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..formats import QTYPES
from .results import RunInfo, add_output_argument, append_csv, markdown_table, parse_list, results_dir, write_summary

#: Formats compiled by default (the issue's); --qtypes takes any of formats.QTYPES.
DEFAULT_QTYPES = ("q4_0", "q8_0", "q3_k", "q4_k", "q5_k", "q6_k")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qtypes", type=lambda s: parse_list(s), default=list(DEFAULT_QTYPES), help="formats (comma list)")
    parser.add_argument("--dtypes", type=lambda s: parse_list(s), default=["fp16"],
                        help="activation dtypes: fp16, bf16, fp32 (comma list; default fp16)")
    parser.add_argument("--tokens", type=lambda s: parse_list(s, int), default=[1, 2], help="tokens M (comma list)")
    parser.add_argument("--layouts", type=lambda s: parse_list(s, int), default=[1, 2, 3], help="GEMV layouts")
    add_output_argument(parser)


def run(args: argparse.Namespace) -> int:
    for name, values, known in (("qtypes", args.qtypes, QTYPES), ("dtypes", args.dtypes, ("fp16", "bf16", "fp32")),
                                ("layouts", args.layouts, (1, 2, 3))):
        unknown = [v for v in values if v not in known]
        if unknown:
            raise ValueError(f"unknown {name} {unknown}; known: {list(known)}")
    if not args.tokens or min(args.tokens) < 1:
        raise ValueError(f"--tokens must be positive token counts, got {args.tokens}")
    from ..kernels.runtime import INTERPRETER

    if INTERPRETER:
        raise ValueError("bench sass compiles for sm_90: unset TRITON_INTERPRET")
    import triton

    from ..kernels.sm90 import gemv_loop_report

    host = RunInfo.collect("cpu")
    info = dataclasses.replace(host, device=f"sm_90 machine code, compiled on {host.device}", slug="static-sm90",
                               triton=triton.__version__)     # the Triton imported (a PYTHONPATH one too)
    out = results_dir(args.out, info.slug)
    rows, table = [], []
    for qtype in args.qtypes:
        for x in args.dtypes:
            for m in args.tokens:
                for layout in args.layouts:
                    r = gemv_loop_report(qtype, x, m, layout)
                    if r["layout"] != layout:       # the heuristic runs another layout for these tokens
                        continue
                    if "loop_instructions" not in r:
                        raise ValueError("this Triton ships no cuobjdump: the SASS cannot be read")
                    ipw = r["instructions_per_weight_token"]
                    sync = r["BAR"] + r["LDS"] + r["STS"] + r["SHFL"]
                    rows.append({"kernel": "gemv_loop_sm90", "provider": f"layout{layout}", "x": m, "median": ipw,
                                 "p20": ipw, "p80": ipw, "unit": "instructions/weight/token",
                                 **info.columns(), "qtype": qtype, "dtype": x, "block_n": r["block_n"],
                                 "warps": r["warps"], "stages": r["stages"], "registers": r.get("registers"),
                                 "spill_bytes": r.get("stack_bytes"), "loop_sync_ops": sync, "prmt": r["PRMT"]})
                    table.append((qtype, x, m, layout, f"{r['block_n']}/{r['warps']}/{r['stages']}", f"{ipw:.2f}",
                                  r.get("registers"), r.get("stack_bytes"), sync))
                    print(f"{qtype} {x} M={m} layout {layout}: {ipw:.2f} instructions/weight/token, "
                          f"{r.get('registers')} registers, {r.get('stack_bytes')} B spilled, {sync} sync ops",
                          flush=True)
    append_csv(out / "gemv_sass.csv", rows)
    body = [f"Triton {triton.__version__}; heuristic configs on 4096 x 4096; main loop only.", "",
            *markdown_table(["qtype", "x", "M", "layout", "BLOCK_N/warps/stages", "instr/weight/token",
                             "registers", "spill B", "BAR+LDS+STS+SHFL"], table)]
    md = out / f"gemv_sass_triton{triton.__version__}.md"
    write_summary(md, "GEMV loop", info, body)
    print(f"wrote {out / 'gemv_sass.csv'} and {md}")
    return 0
