"""``offload-kernels plan``: predicted tokens/s of a model for a VRAM budget, before buying hardware.

For a model (preset, GGUF file or config.json), prints the predicted tokens/s per batch size when the
quantized weights are fully resident, 50% resident and 20% resident (the rest streamed over the link),
and at the given VRAM budget. Ceilings are measured on this machine (``--measure``), taken from a
hardware preset (spec-sheet numbers, labelled as such), or given explicitly.
"""

from __future__ import annotations

import argparse

from .table import format_table, human_bytes

# Spec-sheet ceilings: (VRAM bytes, link GB/s, memory GB/s, dense fp16 TFLOP/s). Not measurements.
HARDWARE_PRESETS = {
    "rtx3090": (24 * 2**30, 25.0, 936.0, 71.0),
    "rtx4090": (24 * 2**30, 25.0, 1008.0, 165.0),
    "a100-40gb": (40 * 2**30, 25.0, 1555.0, 312.0),
    "h100-pcie": (80 * 2**30, 55.0, 2000.0, 756.0),
    "h100-sxm": (80 * 2**30, 55.0, 3350.0, 989.0),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from offload_kernels.model.shapes import PRESETS

    parser.add_argument("model", help=f"a preset ({', '.join(PRESETS)}), a .gguf file, or a config.json")
    parser.add_argument("--qtype", default=None,
                        help="format of the linears (presets/config only; default q4_k, and a preset's experts in "
                             "their published format: gpt-oss's mxfp4)")
    parser.add_argument("--vram", default=None, help="VRAM budget for weights + staging, e.g. 24GiB")
    parser.add_argument("--hardware", choices=sorted(HARDWARE_PRESETS), default=None,
                        help="spec-sheet ceilings of a GPU (not measured)")
    parser.add_argument("--measure", action="store_true", help="measure the ceilings on this machine")
    parser.add_argument("--link-gbps", type=float, help="host->device GB/s (overrides)")
    parser.add_argument("--hbm-gbps", type=float, help="device memory GB/s (overrides)")
    parser.add_argument("--tflops", type=float, help="dense fp16 TFLOP/s (overrides)")
    parser.add_argument("--slots", type=int, default=2, help="staging slots")
    parser.add_argument("--tokens", default="1,8,64,512,2048", help="tokens per forward to predict")


def _hardware(args):
    from offload_kernels.model.bandwidth import Hardware, measure_hardware

    if args.measure:
        hw, source = measure_hardware(), "measured on this machine"
    elif args.hardware:
        mem, link, hbm, tf = HARDWARE_PRESETS[args.hardware]
        hw, source = Hardware(args.hardware, link * 1e9, hbm * 1e9, tf * 1e12, mem, args.hardware), \
            f"{args.hardware} spec sheet (not measured)"
    else:
        hw, source = None, ""
    link = args.link_gbps * 1e9 if args.link_gbps else (hw.link_bytes_per_s if hw else None)
    hbm = args.hbm_gbps * 1e9 if args.hbm_gbps else (hw.hbm_bytes_per_s if hw else None)
    flops = args.tflops * 1e12 if args.tflops else (hw.matmul_flops if hw else None)
    if None in (link, hbm, flops):
        raise SystemExit("plan needs ceilings: pass --measure, --hardware NAME, or all of --link-gbps, "
                         "--hbm-gbps and --tflops")
    if args.link_gbps or args.hbm_gbps or args.tflops:
        source = (source + "; " if source else "") + "overridden by flags"
    return Hardware(hw.device if hw else "given", link, hbm, flops, hw.memory_bytes if hw else None,
                    hw.name if hw else "given"), source


def run(args: argparse.Namespace) -> int:
    from offload_kernels.model.planner import (BudgetError, budget_for_resident_fraction, parse_bytes,
                                               plan_placement, predict_throughput)
    from offload_kernels.model.shapes import resolve_inventory

    inv = resolve_inventory(args.model, args.qtype)
    hw, source = _hardware(args)
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    total_q = sum(lin.nbytes for lin in inv.linears)
    print(f"{inv.name}: {len(inv.linears)} linears, {human_bytes(total_q)} quantized + "
          f"{human_bytes(inv.fixed_bytes)} embeddings/norms (fp16)")
    print(f"ceilings ({source}): link {hw.link_bytes_per_s / 1e9:.1f} GB/s, memory {hw.hbm_bytes_per_s / 1e9:.0f} "
          f"GB/s, matmul {hw.matmul_flops / 1e12:.0f} TFLOP/s")

    columns, plans = [], []
    full = plan_placement(inv.linears, None, inv.fixed_bytes, args.slots)
    columns.append(f"100% resident ({human_bytes(full.device_bytes)})")
    plans.append(full)
    for frac in (0.5, 0.2):
        budget = budget_for_resident_fraction(inv.linears, inv.fixed_bytes, frac, args.slots)
        p = plan_placement(inv.linears, budget, inv.fixed_bytes, args.slots)
        columns.append(f"{p.resident_fraction:.0%} resident ({human_bytes(p.device_bytes)})")
        plans.append(p)
    vram = parse_bytes(args.vram)
    if vram is None and hw.memory_bytes:
        vram = hw.memory_bytes
    if vram is not None:
        try:
            p = plan_placement(inv.linears, vram, inv.fixed_bytes, args.slots)
            columns.append(f"at {human_bytes(vram)}: {p.resident_fraction:.0%} resident")
            plans.append(p)
        except BudgetError as exc:
            print(f"at {human_bytes(vram)}: does not fit ({exc})")
        moe = _on_demand_plan(inv, vram, args.slots)
        if moe is not None:
            columns.append(f"at {human_bytes(vram)}, experts on demand: {moe.resident_fraction:.0%} resident, cache "
                           f"of {moe.expert_cache_slots}/{moe.expert_count}")
            plans.append(moe)
    preds = [predict_throughput(inv.linears, p, hw, tokens) for p in plans]
    rows = [[t] + [f"{pr[i].tokens_per_s:.3g} ({pr[i].bound})" for pr in preds] for i, t in enumerate(tokens)]
    print(format_table(["tokens/forward"] + columns, rows))
    print("tokens/s predicted from the ceilings above: max(streamed bytes / link, sum of per-layer rooflines)")
    if any(p.on_demand for p in plans):
        print("experts on demand: the experts each forward's tokens choose cross the link unless the LRU cache holds "
              "them from recent forwards (routing taken as uniform and independent; skewed routing hits more)")
    return 0


def _on_demand_plan(inv, vram: int, slots: int):
    """The plan with a MoE model's expert stacks copied on demand through an expert cache (offload(...,
    experts="on_demand")); None for a dense model or a budget that cannot hold it."""
    from offload_kernels.model.planner import BudgetError, plan_with_expert_cache

    names = [lin.name for lin in inv.linears if lin.num_experts > 1]
    if not names:
        return None
    try:
        return plan_with_expert_cache(inv.linears, names, vram, inv.fixed_bytes, slots, True)
    except BudgetError as exc:
        print(f"at {human_bytes(vram)} with experts on demand: does not fit ({exc})")
        return None
