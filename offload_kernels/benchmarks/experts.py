"""Benchmark of one mixture-of-experts layer (OffloadedExperts, weights resident) from decode to prefill token counts.

For each model shape (the experts of one MoE block: Qwen3-30B-A3B, 8 of 128 experts of 768 x 2048; Mixtral 8x7B,
2 of 8 of 14336 x 4096; on request GLM-4.5-Air, 8 of 128 of 1408 x 4096, or gpt-oss-20b, 4 of 32 of 2880 x 2880,
with a format whose blocks tile 2880: q5_0, q8_0, ...) and tokens T per call, with random
routing (k distinct experts per token, uniform), it times (triton.testing.do_bench: median, p20/p80, L2 flushed
between repetitions):

* ``grouped``: OffloadedExperts' grouped path (two launches, one per projection, over every (token, expert)
  pair, sorted by expert on the device where experts repeat; no host read of the routing but the eager check
  of the ids), eager, at every token count (the layer's own crossover, GROUPED_MAX_PAIRS_PER_EXPERT, is what
  these numbers should set), with the kernel qmatmul_experts picks by pairs per expert;
* ``grouped_gemv`` / ``grouped_gemm``: the same with the grouped expert GEMV or the grouped tensor-core GEMM
  forced (configs.EXPERTS_GEMV_MAX_PAIRS_PER_EXPERT, the crossover between them, is what these set);
* ``grouped_graph``: the same forward captured in a CUDA graph and replayed (the check is skipped inside
  a capture): device time, what a captured decode step pays;
* ``by_expert``: the tokens grouped by expert (one host read of the counts, a qmatmul per chosen expert and
  projection, which reads each chosen expert once), eager;
* ``fp16_transformers``: the transformers experts module itself with fp16 weights (its configured experts
  implementation), eager: the unquantized peer;

and derives the speedup over the fp16 module and the fraction of the HBM-bound ideal: the quantized
bytes of the distinct experts the routing chose, at the device-to-device copy bandwidth measured in the
same run. The grouped path reads an expert once per pair that chose it, so with repeats it can exceed
that ideal's bytes: the ratio shows what that costs, and where GROUPED_MAX_PAIRS_PER_EXPERT
(layers/offloaded_experts.py, the crossover between the two paths) should sit. Rows are appended to
``<results>/<gpu-slug>/experts.csv``; ``experts.md`` summarizes the run and ``experts.png`` plots it.
Without CUDA it says so and exits 0.

    offload-kernels bench experts                      # both shapes, T in 1, 2, 4, ..., 1024
    offload-kernels bench experts --quick              # Qwen3-30B-A3B, T in 1, 4, 16, 64, 256
    offload-kernels bench experts --shapes mixtral-8x7b --tokens 1,2,3,4,6,8 --qtype q4_k
"""

from __future__ import annotations

import argparse
import contextlib

from .kernels import copy_bandwidth, random_weight, set_autotune
from .results import (GB, Deadline, Recorder, RunInfo, Stats, add_output_argument, cuda_unavailable_reason, markdown_table,
                      parse_list, plot_quietly, results_dir, time_cuda, time_cuda_graph, write_summary)

DEFAULT_SHAPES = ("qwen3-30b-a3b", "mixtral-8x7b")
DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUICK = {"shapes": ("qwen3-30b-a3b",), "tokens": (1, 4, 16, 64, 256)}
BASELINE = "fp16_transformers"
#: The transformers experts class of each MoE architecture of model.shapes.
EXPERTS_CLASS = {"qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeExperts"),
                 "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts"),
                 "glm4_moe": ("transformers.models.glm4_moe.modeling_glm4_moe", "Glm4MoeExperts"),
                 "gpt_oss": ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssExperts"),
                 "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3Experts"),
                 "deepseek_v2": ("transformers.models.deepseek_v2.modeling_deepseek_v2", "DeepseekV2Experts")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                        help="MoE presets of model.shapes, or tiny-moe (a 256-wide smoke test)")
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)), help="tokens per call")
    parser.add_argument("--qtype", default=None,
                        help="format of both projections (default: the one the preset's published files keep "
                             "their experts in, mxfp4 for gpt-oss, else q4_k)")
    parser.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time per measurement")
    parser.add_argument("--no-autotune", action="store_true", help="heuristic kernel configs only")
    parser.add_argument("--quick", action="store_true", help="Qwen3-30B-A3B at 1, 4, 16, 64 and 256 tokens")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="start no new (shape, tokens) point after this many seconds; results so far are kept")
    add_output_argument(parser)


def moe_shapes() -> dict:
    """The MoE shapes this benchmark takes: model.shapes' presets of the architectures in EXPERTS_CLASS, and
    the offload benchmark's tiny-moe."""
    from offload_kernels.model.shapes import PRESETS

    from .offload import _smoke_shapes

    shapes = {**PRESETS, "tiny-moe": _smoke_shapes()["tiny-moe"]}
    return {n: s for n, s in shapes.items() if s.experts > 1 and s.arch in EXPERTS_CLASS}


def experts_modules(shape, qtype: str, device: str = "cuda"):
    """(the fp16 transformers experts module on ``device``, an OffloadedExperts over random ``qtype`` bytes of
    the same shapes, resident there)."""
    import importlib

    import torch

    from offload_kernels.layers import OffloadedExperts, OffloadedLinear
    from offload_kernels.layers.offloaded_experts import is_experts_module, projection_names, projection_shape
    from offload_kernels.model.shapes import transformers_config

    module, name = EXPERTS_CLASS[shape.arch]
    cls = getattr(importlib.import_module(module), name)
    config = transformers_config(shape, layers=1)
    with torch.device(device):
        dense = cls(config).to(torch.float16)
    if not is_experts_module(dense):
        raise SystemExit(f"bench experts: this transformers' {name} is not a 3-D experts module "
                         "(use_experts_implementation: transformers 5 or later)")
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.02)
    projections = {}
    for proj in projection_names(dense):
        e, out, k = projection_shape(dense, proj)
        bias = dense._parameters[f"{proj}_bias"].detach().reshape(-1) if dense.has_bias else None   # gpt-oss
        projections[proj] = OffloadedLinear.from_quantized(random_weight(qtype, e * out, k, device), bias)
    return dense, OffloadedExperts(dense, projections)


def routing(tokens: int, experts: int, k: int, seed: int, device: str = "cuda"):
    """k distinct uniformly random experts per token and softmax weights, on ``device``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=g), -1)
    return index.to(device), weights.to(torch.float16).to(device)


@contextlib.contextmanager
def grouped_path(enabled: bool):
    """OffloadedExperts' crossover set so that every call takes the grouped path (or none does)."""
    from offload_kernels.layers import offloaded_experts

    before = offloaded_experts.GROUPED_MAX_PAIRS_PER_EXPERT
    offloaded_experts.GROUPED_MAX_PAIRS_PER_EXPERT = float("inf") if enabled else 0
    try:
        yield
    finally:
        offloaded_experts.GROUPED_MAX_PAIRS_PER_EXPERT = before


@contextlib.contextmanager
def grouped_kernel(family: str):
    """qmatmul_experts' choice between the grouped GEMV and GEMM forced to ``family`` ("gemv" or "gemm")."""
    from offload_kernels.kernels import configs

    before = configs.EXPERTS_GEMV_MAX_PAIRS_PER_EXPERT
    configs.EXPERTS_GEMV_MAX_PAIRS_PER_EXPERT = float("inf") if family == "gemv" else -1
    try:
        yield
    finally:
        configs.EXPERTS_GEMV_MAX_PAIRS_PER_EXPERT = before


def bench_shape(rec: Recorder, shape_name: str, shape, qtype: str, tokens_list, rep_ms: int, copy_gbs: float,
                table: dict, deadline: Deadline, device: str = "cuda") -> None:
    """Every provider at each token count on one shape (``device`` other than CUDA: the benchmark's own
    tests, with the timers replaced)."""
    import torch

    dense, oe = experts_modules(shape, qtype, device)
    e, k = shape.experts, shape.experts_per_token
    expert_bytes = sum(oe._modules[p].weight_nbytes for p in oe._expert_shapes) // e
    for t in tokens_list:
        if deadline.expired():
            return
        x = torch.randn(t, shape.hidden, device=device, dtype=torch.float16)
        index, weights = routing(t, e, k, seed=t, device=device)
        distinct = len(set(index.flatten().tolist()))
        point = {"shape": shape_name, "qtype": qtype, "experts": e, "top_k": k, "tokens": t,
                 "distinct_experts": distinct,
                 "fp16_implementation": getattr(getattr(dense, "config", None), "_experts_implementation", None)}
        ideal_ms = distinct * expert_bytes / GB / copy_gbs * 1e3
        rec.add("hbm_ideal_time", "ideal", t, Stats.exact(ideal_ms), "ms", **point)
        timings: dict[str, Stats] = {}
        with torch.no_grad():
            with grouped_path(True):
                timings["grouped"] = time_cuda(lambda: oe(x, index, weights), rep_ms)
                timings["grouped_graph"] = time_cuda_graph(lambda: oe(x, index, weights), rep_ms)
                for family in ("gemv", "gemm"):
                    with grouped_kernel(family):
                        timings[f"grouped_{family}"] = time_cuda(lambda: oe(x, index, weights), rep_ms)
            with grouped_path(False):
                timings["by_expert"] = time_cuda(lambda: oe(x, index, weights), rep_ms)
            timings[BASELINE] = time_cuda(lambda: dense(x, index, weights), rep_ms)
        for provider, stats in timings.items():
            rec.add("time", provider, t, stats, "ms", **point)
            rec.add("hbm_ideal_fraction", provider, t, stats.reciprocal(ideal_ms), "fraction of ideal", **point)
            if provider != BASELINE:
                rec.add("speedup_vs_fp16", provider, t, stats.reciprocal(timings[BASELINE].median), "x", **point)
        table[(shape_name, t)] = (distinct, ideal_ms, {p: s.median for p, s in timings.items()})
        print(f"  {shape_name:>14} T={t:<3} distinct experts {distinct:>3}: " + ", ".join(
            f"{p} {s.median * 1e3:8.1f} us" for p, s in timings.items()) + f"  (HBM ideal {ideal_ms * 1e3:.1f} us)")
    del dense, oe
    if device == "cuda":
        torch.cuda.empty_cache()


def summary_body(table: dict) -> list[str]:
    providers = ("grouped", "grouped_graph", "grouped_gemv", "grouped_gemm", "by_expert", BASELINE)
    lines = ["## One MoE layer's experts, resident, fp16 activations", "",
             "Times are medians in microseconds; `x fp16` is the speedup over the transformers module with fp16 "
             "weights; `of ideal` is the HBM-bound ideal (distinct chosen experts' quantized bytes at the measured "
             "copy bandwidth) over the time.", ""]
    rows = []
    for (shape, t), (distinct, ideal, times) in table.items():
        base = times[BASELINE]
        rows.append([shape, t, distinct, f"{ideal * 1e3:.1f}",
                     *[f"{times[p] * 1e3:.1f} ({base / times[p]:.2f}x fp16, {ideal / times[p]:.2f} of ideal)"
                       if p != BASELINE else f"{times[p] * 1e3:.1f}" for p in providers]])
    return lines + markdown_table(["shape", "tokens", "distinct experts", "ideal us", *providers], rows)


def shape_formats(names, qtype: "str | None", shapes: dict) -> dict:
    """{shape name: the FormatSpec its experts are timed in (model.shapes.expert_format: ``qtype`` if given, else
    the preset's published one, else q4_k)}; SystemExit where the experts' rows are no whole number of that
    format's blocks."""
    from offload_kernels.formats import get_spec
    from offload_kernels.model.shapes import expert_format

    formats = {name: get_spec(expert_format(shapes[name], qtype)) for name in names}
    for name, spec in formats.items():
        widths = {shapes[name].hidden, shapes[name].expert_intermediate}
        if any(w % spec.block_size for w in widths):
            raise SystemExit(f"bench experts: {name}'s rows ({' and '.join(map(str, sorted(widths)))} weights) are not "
                             f"a whole number of {spec.name} blocks ({spec.block_size}); give --qtype q5_0, q8_0, ...")
    return formats


def run(args: argparse.Namespace) -> int:
    names = QUICK["shapes"] if args.quick else tuple(parse_list(args.shapes))
    tokens = QUICK["tokens"] if args.quick else tuple(parse_list(args.tokens, int))
    if not tokens or any(t < 1 for t in tokens):
        raise SystemExit(f"bench experts: --tokens must be positive token counts, got {args.tokens!r}")
    if args.rep_ms < 1:
        raise SystemExit(f"bench experts: --rep-ms must be at least 1, got {args.rep_ms}")
    shapes = moe_shapes()
    for name in names:
        if name not in shapes:
            raise SystemExit(f"bench experts: {name!r} is not a MoE shape (one of {', '.join(sorted(shapes))})")
    formats = shape_formats(names, args.qtype, shapes)
    reason = cuda_unavailable_reason(triton=True)       # after the arguments: a typo is reported anywhere
    if reason is not None:
        print(f"bench experts: needs CUDA ({reason}); nothing measured.")
        return 0
    deadline = Deadline(args.time_budget_s)
    set_autotune(not args.no_autotune)
    run_info = RunInfo.collect("cuda")
    rec = Recorder(run_info)
    print(f"bench experts: {run_info.describe()}")
    copy = rec.add("copy_bandwidth", "torch_copy", 0, copy_bandwidth(args.rep_ms), "GB/s", dtype="uint8")
    print(f"device-to-device copy: {copy.median:.0f} GB/s")
    table: dict = {}
    weights = ", ".join(f"{name} {spec.name}" for name, spec in formats.items())
    notes = [f"weights {weights}, autotuning {'off' if args.no_autotune else 'on'}, routing uniform random"]
    try:
        for name in names:
            bench_shape(rec, name, shapes[name], formats[name].name, tokens, args.rep_ms, copy.median, table, deadline)
    except KeyboardInterrupt:
        notes.append("interrupted: the results below are partial")
    if deadline.expired():
        notes.append(f"time budget of {args.time_budget_s:g} s reached: later points were not measured")
    out_dir = results_dir(args.out, run_info.slug)
    rec.write(out_dir / "experts.csv")
    plot_quietly(out_dir / "experts.csv", notes)
    write_summary(out_dir / "experts.md", "MoE experts benchmark", run_info, summary_body(table), notes=notes)
    print(f"\nappended {len(rec.rows)} rows to {out_dir / 'experts.csv'}; summary in {out_dir / 'experts.md'}")
    return 0
