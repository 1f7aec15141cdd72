"""Benchmark of offload_kernels' Triton kernels: y = x @ W.T with W in GGUF blocks, on one CUDA device.

For each qtype, weight shape (N, K) and number of tokens M it times (triton.testing.do_bench: median with
p20/p80, L2 flushed between repetitions, so the weight comes from HBM as it would when streamed):

* ``auto``: qmatmul as dispatched (the kernel variant the crossover table picks is recorded), called
  eagerly: at small M this includes the host's launch overhead whenever it exceeds the kernels' time;
* ``auto_graph``: the same call captured once in a CUDA graph and replayed: the kernels' device time alone
  (what the kernels cost inside a captured decode step);
* ``gemv`` / ``gemm`` / ``dequant``: each family forced (GEMV only up to --gemv-max-m tokens);
* ``gemv_layout1_graph`` / ``gemv_layout2_graph`` / ``gemv_layout3_graph``: the GEMV's loop layouts (see
  kernels/gemv.py) with their heuristic configs, device time (graph replay): which one the untuned default
  should be (layouts 2 and 3 only up to 4 tokens, layout 3 with word-aligned bytes: where they run);
* ``gemm_exact_decode_graph`` / ``gemm_f16_decode_graph`` (fp16 activations): the fused GEMM's two weight
  decodes (see kernels/gemm.py) with its heuristic configs, device time: whether the fp16-arithmetic
  decode (fewer instructions per weight) is faster where it is the default;
* ``cublas_fp16``: torch.matmul on the fp16 dequantized weight (the dense baseline);
* ``int4_tinygemm``: torch's int4 weight-only kernel (``aten._weight_int4pack_mm``, group size 32, bf16
  activations), where this torch/GPU runs it;

and derives the weight bandwidth (quantized bytes / time), its fraction of the device-to-device copy
bandwidth measured in the same run, TFLOP/s, and speedups over both baselines timed in the same run; the
summary names the fastest family per M (what the crossovers in offload_kernels/kernels/configs.py should
follow). Rows are appended to ``<results>/<gpu-slug>/kernels.csv`` (with an ``autotune`` column: tuned and
heuristic configs are different kernels); ``kernels.md`` summarizes this run and ``kernels.png`` plots it.
Without CUDA it says so and exits 0.

    offload-kernels bench kernels                  # everything (long: tens of minutes with autotuning)
    offload-kernels bench kernels --quick          # q4_k, q3_k on 8192x8192, six values of M
    offload-kernels bench kernels --qtypes q4_k --shapes 8192x8192 --m 1,16,1024 --no-autotune
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from .results import (GB, Deadline, Recorder, RunInfo, Stats, Target, add_output_argument,
                      cuda_unavailable_reason, markdown_table, parse_list, plot_quietly, print_targets, results_dir,
                      time_cuda, time_cuda_graph, write_summary)

#: Formats benchmarked by default: the issue's (llama.cpp's main formats); --qtypes takes any of formats.QTYPES.
DEFAULT_QTYPES = ("q4_0", "q8_0", "q3_k", "q4_k", "q5_k", "q6_k")
ALL_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192))
ALL_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
QUICK = {"qtypes": ("q4_k", "q3_k"), "shapes": ((8192, 8192),), "m": (1, 4, 16, 256, 1024, 4096)}

# Targets printed as PASS/FAIL (informational; nothing asserts them): speedup of qmatmul over fp16 cuBLAS.
TARGETS_M1 = {"q4_k": 2.5, "q3_k": 3.0}     # at M = 1 on 8192x8192
TARGET_SHAPE = (8192, 8192)
TARGET_LARGE_M = 1024                         # at M >= this, on every shape measured
TARGET_LARGE_M_SPEEDUP = 0.9
BASELINE = "cublas_fp16"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qtypes", default=",".join(DEFAULT_QTYPES))
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in ALL_SHAPES), help="NxK,NxK,...")
    parser.add_argument("--m", default=",".join(map(str, ALL_M)), help="token counts")
    parser.add_argument("--families", default="gemv,gemm,dequant", help="forced families to time besides 'auto'")
    parser.add_argument("--gemv-max-m", type=int, default=16, help="largest M the forced GEMV is timed at")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time per measurement")
    parser.add_argument("--no-autotune", action="store_true",
                        help="heuristic configs only (no per-shape tuning; much faster, possibly slower kernels)")
    parser.add_argument("--quick", action="store_true", help="q4_k,q3_k on 8192x8192, M in 1,4,16,256,1024,4096")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="stop starting new measurements after this many seconds (results are still written)")
    add_output_argument(parser)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.lower().split("x")) for item in parse_list(text)]


def set_autotune(enabled: bool) -> None:
    """Switch the kernels' per-shape autotuning (read at every launch, so this works after import)."""
    import importlib

    importlib.import_module("offload_kernels.kernels.runtime").AUTOTUNE = enabled


# --------------------------------------------------------------------------------------------- inputs
def random_weight(qtype: str, n: int, k: int, device: str = "cuda"):
    """Random GGUF blocks on ``device`` with small finite fp16 scales (kernel speed does not depend on the
    values; finite outputs keep the baselines honest)."""
    import torch

    from offload_kernels.formats import QuantizedTensor, get_spec

    spec = get_spec(qtype)
    raw = torch.randint(0, 256, (n, spec.row_bytes(k)), dtype=torch.uint8, device=device)
    blocks = raw.view(-1, spec.block_bytes)
    for off in spec.fp16_offsets:
        d = (torch.rand(blocks.shape[0], device=device) * 2e-3 + 1e-4).to(torch.float16)
        blocks[:, off:off + 2] = d.view(torch.uint8).view(-1, 2)
    if spec.name == "mxfp4":        # exponent bytes for scales 2**-14 .. 2**-10, as the fp16 ones above
        blocks[:, 0] = torch.randint(114, 119, (blocks.shape[0],), dtype=torch.uint8, device=device)
    return QuantizedTensor(raw, spec, (n, k))


def int4_baseline(w16, group: int = 32):
    """torch's int4 weight-only matmul on an int4 (group-wise asymmetric) version of the weight: (closure over
    bf16 activations, weight bytes, None), or (None, 0, reason) where this torch/GPU cannot run it."""
    import torch

    try:
        n, k = w16.shape
        w = w16.float().view(n, k // group, group)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = ((w - lo) / scale).round().clamp(0, 15).to(torch.uint8).view(n, k)
        packed = torch._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).contiguous(), 8)
        # tinygemm dequantizes (q - 8) * scale + zero
        zero = lo.view(n, k // group) + 8 * scale.view(n, k // group)
        sz = torch.stack([scale.view(n, k // group), zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        fn = lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)  # noqa: E731
        fn(torch.randn(1, k, dtype=torch.bfloat16, device="cuda"))
        torch.cuda.synchronize()
        return fn, packed.numel() * packed.element_size() + sz.numel() * 2, None
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        return None, 0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def copy_bandwidth(rep_ms: int) -> Stats:
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / time, GB/s."""
    import torch

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return time_cuda(lambda: dst.copy_(src), rep_ms).reciprocal(2 * n / GB * 1e3)


# --------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Settings:
    families: tuple[str, ...]
    gemv_max_m: int
    rep_ms: int
    dtype: Any
    copy_gbs: float
    autotune: bool


@dataclass
class Timing:
    stats: Stats       # ms
    variant: str       # kernel variants that ran, e.g. "gemm_splitk" or "dequant"


def bench_point(rec: Recorder, qt, w16, int4, m: int, cfg: Settings) -> dict[str, Timing]:
    """Time every provider for one (qtype, N, K, M); returns provider -> Timing."""
    import torch

    from offload_kernels import kernels

    n, k = qt.shape
    point = {"qtype": qt.qtype, "N": n, "K": k, "M": m, "dtype": str(cfg.dtype).replace("torch.", ""),
             "autotune": "on" if cfg.autotune else "off"}
    x = torch.randn(m, k, device="cuda").to(cfg.dtype)
    timings: dict[str, Timing] = {}

    def record(provider: str, fn, nbytes: int, variant: str = "", timer=time_cuda) -> None:
        t = rec.add("time", provider, m, timer(fn, cfg.rep_ms), "ms", **point, variant=variant)
        bw = rec.add("weight_bandwidth", provider, m, t.reciprocal(nbytes / GB * 1e3), "GB/s", **point,
                     variant=variant)
        rec.add("hbm_fraction", provider, m, bw.scaled(1 / cfg.copy_gbs), "fraction of copy bandwidth", **point,
                variant=variant)
        rec.add("tflops", provider, m, t.reciprocal(2 * m * n * k / 1e12 * 1e3), "TFLOP/s", **point, variant=variant)
        timings[provider] = Timing(t, variant)

    def ran_variant(fn) -> str:
        kernels.reset_launch_counts()
        fn()
        return ",".join(f"{v}x{c}" if c > 1 else v for v, c in kernels.launch_counts().items() if c)

    auto = lambda: kernels.qmatmul(x, qt)  # noqa: E731
    record("auto", auto, qt.nbytes, ran_variant(auto))
    record("auto_graph", auto, qt.nbytes, timings["auto"].variant, timer=time_cuda_graph)
    for family in cfg.families:
        if family == "gemv" and m > cfg.gemv_max_m:
            continue
        fn = (lambda f: lambda: kernels.qmatmul(x, qt, backend="triton", kernel=f))(family)
        record(family, fn, qt.nbytes, ran_variant(fn))
    if "gemv" in cfg.families and m <= cfg.gemv_max_m:
        # The GEMV loop layouts head to head, untuned (heuristic configs), device time (graph replay).
        from offload_kernels.kernels.gemv import gemv

        from offload_kernels.kernels.configs import GEMV_LAYOUTS, gemv_heuristic_config, gemv_word_loads
        from offload_kernels.kernels.runtime import sm_count

        out = torch.empty(m, n, device="cuda", dtype=cfg.dtype)
        for layout in GEMV_LAYOUTS:
            # Where a layout cannot run (layouts 2 and 3 above 4 tokens, layout 3 on misaligned bytes) the
            # heuristic runs another instead: no row under a name that is not what ran.
            ran = gemv_heuristic_config(m, n, k, qt.qtype, sm_count(x.device), layout=layout,
                                        word_loads=gemv_word_loads(qt)).kwargs["LAYOUT"]
            if ran != layout:
                continue
            fn = (lambda lay: lambda: gemv(x, qt, None, out, layout=lay))(layout)
            record(f"gemv_layout{layout}_graph", fn, qt.nbytes, ran_variant(fn), timer=time_cuda_graph)
    if "gemm" in cfg.families and cfg.dtype == torch.float16:
        # The GEMM's two weight decodes head to head, untuned, device time (graph replay).
        from offload_kernels.kernels.gemm import gemm

        out = torch.empty(m, n, device="cuda", dtype=cfg.dtype)
        for name, f16 in (("exact", False), ("f16", True)):
            fn = (lambda f: lambda: gemm(x, qt, None, out, f16_decode=f))(f16)
            record(f"gemm_{name}_decode_graph", fn, qt.nbytes, ran_variant(fn), timer=time_cuda_graph)
    x16 = x.to(torch.float16)
    record(BASELINE, lambda: torch.matmul(x16, w16.T), w16.numel() * 2)
    if int4[0] is not None:
        xb = x.to(torch.bfloat16)
        record("int4_tinygemm", lambda: int4[0](xb), int4[1])

    for baseline, kernel in ((BASELINE, "speedup_vs_cublas_fp16"), ("int4_tinygemm", "speedup_vs_int4")):
        if baseline not in timings:
            continue
        base = timings[baseline].stats.median
        for provider, t in timings.items():
            if provider != baseline:
                rec.add(kernel, provider, m, t.stats.reciprocal(base), "x", **point, variant=t.variant)
    return timings


def best_family(t: dict[str, Timing], families) -> str:
    ours = {p: t[p].stats.median for p in families if p in t}
    return min(ours, key=ours.get) if ours else "-"


def speedup(t: dict[str, Timing], provider: str = "auto") -> float:
    return t[BASELINE].stats.median / t[provider].stats.median


# --------------------------------------------------------------------------------------------- report
def evaluate_targets(table: dict) -> list[Target]:
    targets = []
    for provider, how in (("auto", "eager"), ("auto_graph", "CUDA graph")):
        for qtype, want in TARGETS_M1.items():
            t = table.get((qtype, *TARGET_SHAPE), {}).get(1)
            if t is not None and provider in t:
                got = speedup(t, provider)
                targets.append(Target(f"{qtype} M=1 {TARGET_SHAPE[0]}x{TARGET_SHAPE[1]} >= {want}x fp16 cuBLAS ({how})",
                                      f"{got:.2f}x", got >= want))
        large = [(key, m, speedup(t, provider)) for key, rows in table.items() for m, t in rows.items()
                 if m >= TARGET_LARGE_M and provider in t]
        if large:
            key, m, worst = min(large, key=lambda r: r[2])
            targets.append(Target(f"M >= {TARGET_LARGE_M}: >= {TARGET_LARGE_M_SPEEDUP}x fp16 cuBLAS throughput "
                                  f"({how}, worst)", f"{worst:.2f}x ({key[0]} {key[1]}x{key[2]} M={m})",
                                  worst >= TARGET_LARGE_M_SPEEDUP))
    return targets


def summary_body(table: dict, copy_gbs: float, families) -> list[str]:
    body = [f"Device-to-device copy bandwidth in this run: {copy_gbs:.0f} GB/s. Times are medians in microseconds; "
            "\"picked\" is the variant qmatmul's dispatcher ran, \"best\" the fastest of our families; speedups are "
            "over fp16 cuBLAS timed in the same run.", ""]
    providers = ["auto", "auto_graph", *families, "gemv_layout1_graph", "gemv_layout2_graph", "gemv_layout3_graph",
                 "gemm_exact_decode_graph", "gemm_f16_decode_graph", BASELINE, "int4_tinygemm"]
    for (qtype, n, k), rows in table.items():
        body += [f"## {qtype}, N={n}, K={k}", ""]
        lines = []
        for m, t in rows.items():
            gbs = t["auto"].stats.reciprocal(rows_nbytes(qtype, n, k) / GB * 1e3).median
            lines.append([m, *(f"{t[p].stats.median * 1e3:.1f}" if p in t else "-" for p in providers),
                          t["auto"].variant, best_family(t, families), f"{speedup(t):.2f}x",
                          f"{speedup(t, 'auto_graph'):.2f}x" if "auto_graph" in t else "-", f"{gbs:.0f}"])
        body += markdown_table(["M", *(f"{p} (us)" for p in providers), "picked", "best", "auto vs cuBLAS",
                                "auto_graph vs cuBLAS", "weight GB/s (auto)"], lines)
    return body


def rows_nbytes(qtype: str, n: int, k: int) -> int:
    from offload_kernels.formats import get_spec

    return n * get_spec(qtype).row_bytes(k)


def run(args: argparse.Namespace) -> int:
    reason = cuda_unavailable_reason(triton=True)
    if reason is not None:
        print(f"bench kernels: needs CUDA ({reason}); nothing measured.")
        return 0
    import torch

    from offload_kernels import kernels

    set_autotune(not args.no_autotune)
    qtypes = QUICK["qtypes"] if args.quick else tuple(parse_list(args.qtypes))
    shapes = QUICK["shapes"] if args.quick else parse_shapes(args.shapes)
    ms = QUICK["m"] if args.quick else tuple(parse_list(args.m, int))
    run_info = RunInfo.collect("cuda")
    rec = Recorder(run_info)
    deadline = Deadline(args.time_budget_s)
    notes = [f"activations {args.dtype}; autotuning {'off' if args.no_autotune else 'on'}; crossovers in this build: "
             f"{kernels.KERNEL_BY_M}"]
    print(f"bench kernels: {run_info.describe()}\n{notes[0]}")

    copy = rec.add("copy_bandwidth", "torch_copy", 0, copy_bandwidth(args.rep_ms), "GB/s", dtype="uint8")
    print(f"device-to-device copy: {copy.median:.0f} GB/s")
    cfg = Settings(tuple(parse_list(args.families)), args.gemv_max_m, args.rep_ms, getattr(torch, args.dtype),
                   copy.median, not args.no_autotune)
    table: dict = {}
    try:
        measure_all(rec, table, qtypes, shapes, ms, cfg, deadline, notes)
    except KeyboardInterrupt:
        notes.append("interrupted: the results below are partial")
        print(f"\nnote: {notes[-1]}")
    targets = evaluate_targets(table)
    print_targets(targets)

    out_dir = results_dir(args.out, run_info.slug)
    rec.write(out_dir / "kernels.csv")
    plot_quietly(out_dir / "kernels.csv", notes)
    write_summary(out_dir / "kernels.md", "Kernel benchmark", run_info, summary_body(table, copy.median, cfg.families),
                  targets, notes)
    print(f"\nappended {len(rec.rows)} rows to {out_dir / 'kernels.csv'}; summary in {out_dir / 'kernels.md'}")
    return 0


def measure_all(rec: Recorder, table: dict, qtypes, shapes, ms, cfg: Settings, deadline: Deadline,
                notes: list[str]) -> None:
    import torch

    from offload_kernels import kernels

    int4_note_done = False
    for qtype in qtypes:
        for n, k in shapes:
            if deadline.expired():
                notes.append(f"time budget reached: {qtype} {n}x{k} and later points were not measured")
                print(f"note: {notes[-1]}")
                return
            qt = random_weight(qtype, n, k)
            w16 = kernels.dequantize_triton(qt, torch.float16)
            int4 = int4_baseline(w16)
            if int4[0] is None and not int4_note_done:
                notes.append(f"torch int4 weight-only baseline skipped: {int4[2]}")
                print(f"note: {notes[-1]}")
                int4_note_done = True
            rows = table.setdefault((qtype, n, k), {})
            for m in ms:
                if deadline.expired():
                    notes.append(f"time budget reached: {qtype} {n}x{k} M >= {m} not measured")
                    print(f"note: {notes[-1]}")
                    return
                t = rows[m] = bench_point(rec, qt, w16, int4, m, cfg)
                gbs = t["auto"].stats.reciprocal(qt.nbytes / GB * 1e3).median
                print(f"{qtype} {n}x{k} M={m:5d}: auto {t['auto'].stats.median * 1e3:9.1f} us [{t['auto'].variant}] "
                      f"(graph {t['auto_graph'].stats.median * 1e3:7.1f} us) "
                      f"{gbs:6.0f} GB/s ({gbs / cfg.copy_gbs:.2f} of copy)  cuBLAS fp16 "
                      f"{t[BASELINE].stats.median * 1e3:9.1f} us  -> {speedup(t):5.2f}x"
                      + (f"  int4 {t['int4_tinygemm'].stats.median * 1e3:8.1f} us" if "int4_tinygemm" in t else "")
                      + f"  best {best_family(t, cfg.families)}")
            del qt, w16, int4
            torch.cuda.empty_cache()
