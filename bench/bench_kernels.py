#!/usr/bin/env python
"""Benchmark of offload_kernels' Triton kernels: y = x @ W.T with W in GGUF blocks, on one CUDA device.

For each qtype, weight shape (N, K) and number of tokens M it times (triton.testing.do_bench: median with
p20/p80, L2 flushed between repetitions, so the weight comes from HBM as it would when streamed):

* ``auto``: qmatmul as dispatched (the kernel family the crossover table picks is recorded);
* ``gemv`` / ``gemm`` / ``dequant``: each family forced (GEMV only up to --gemv-max-m tokens);
* ``cublas_fp16``: torch.matmul on the fp16 dequantized weight (the dense baseline);
* ``int4_tinygemm``: torch's int4 weight-only kernel (``aten._weight_int4pack_mm``, group size 32, bf16
  activations), where this torch/GPU runs it;

and derives the weight bandwidth (quantized bytes / time), its fraction of the device-to-device copy
bandwidth measured in the same run, and speedups over both baselines; the summary names the fastest
family per M (what the crossovers in offload_kernels/kernels/configs.py should follow).

Rows are appended (long format) to ``bench/results/<gpu-slug>/kernels.csv``; ``kernels.md`` next to it
gets a summary of this run; ``bench/plot_kernels.py`` draws the CSV. Without CUDA it says so and exits 0.

    python bench/bench_kernels.py                      # everything (long: tens of minutes with autotuning)
    python bench/bench_kernels.py --quick              # q4_k, q3_k on 8192x8192, six values of M
    python bench/bench_kernels.py --qtypes q4_k --shapes 8192x8192 --m 1,16,1024 --no-autotune
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSV_COLUMNS = ["kernel", "provider", "x", "median", "p20", "p80", "unit", "gpu", "torch", "triton", "version",
               "commit", "date", "qtype", "N", "K", "M", "dtype", "variant"]
GB = 1e9

ALL_QTYPES = ("q4_0", "q8_0", "q3_k", "q4_k", "q5_k", "q6_k")
ALL_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192))
ALL_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
QUICK = {"qtypes": ("q4_k", "q3_k"), "shapes": ((8192, 8192),), "m": (1, 4, 16, 256, 1024, 4096)}

# Targets printed as PASS/FAIL (informational; nothing asserts them): speedup of qmatmul over fp16 cuBLAS.
TARGETS_M1 = {"q4_k": 2.5, "q3_k": 3.0}     # at M = 1 on 8192x8192
TARGET_SHAPE = (8192, 8192)
TARGET_LARGE_M = 1024                         # at M >= this, on every shape measured
TARGET_LARGE_M_SPEEDUP = 0.9


def cuda_unavailable_reason() -> "str | None":
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set (the interpreter cannot be benchmarked)"
    return None


# --------------------------------------------------------------------------------------------- results
class Results:
    """Rows of this run, in the CSV's long format."""

    def __init__(self, meta: dict[str, str]) -> None:
        self.meta = meta
        self.rows: list[dict[str, object]] = []

    def add(self, kernel: str, provider: str, point: dict, median: float, p20: float, p80: float, unit: str,
            variant: str = "") -> None:
        self.rows.append({"kernel": kernel, "provider": provider, "x": point["M"], "median": median, "p20": p20,
                          "p80": p80, "unit": unit, **self.meta, **point, "variant": variant})

    def append_csv(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            if new:
                writer.writeheader()
            for r in self.rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# --------------------------------------------------------------------------------------------- timing
def time_ms(fn, rep_ms: int) -> tuple[float, float, float]:
    """(median, p20, p80) device time of fn() in ms; L2 is flushed before every repetition."""
    import triton.testing

    fn()  # compile / autotune outside the timed region
    med, p20, p80 = triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(p20), float(p80)


def copy_bandwidth_gbs(rep_ms: int) -> tuple[float, float, float]:
    """Device-to-device copy of 1 GiB: (read + written bytes) / time, GB/s (median, p20, p80)."""
    import torch

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    med, p20, p80 = time_ms(lambda: dst.copy_(src), rep_ms)
    return 2 * n / (med * 1e-3) / GB, 2 * n / (p80 * 1e-3) / GB, 2 * n / (p20 * 1e-3) / GB


# --------------------------------------------------------------------------------------------- weights
def random_weight(qtype: str, n: int, k: int):
    """Random GGUF blocks on the GPU with small finite fp16 scales (kernel speed does not depend on the
    values; finite outputs keep the baselines honest)."""
    import torch

    from offload_kernels.formats import QuantizedTensor, get_spec

    spec = get_spec(qtype)
    raw = torch.randint(0, 256, (n, spec.row_bytes(k)), dtype=torch.uint8, device="cuda")
    blocks = raw.view(-1, spec.block_bytes)
    for off in spec.fp16_offsets:
        d = (torch.rand(blocks.shape[0], device="cuda") * 2e-3 + 1e-4).to(torch.float16)
        blocks[:, off:off + 2] = d.view(torch.uint8).view(-1, 2)
    return QuantizedTensor(raw, spec, (n, k))


def int4_baseline(w16, group: int = 32):
    """torch's int4 weight-only matmul on an int4 (group-wise asymmetric) version of the weight, as a
    closure over bf16 activations, or (None, reason) where this torch/GPU cannot run it."""
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
        fn(torch.zeros(1, k, dtype=torch.bfloat16, device="cuda"))
        torch.cuda.synchronize()
        return fn, packed.numel() * packed.element_size() + sz.numel() * 2, None
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        return None, 0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


# --------------------------------------------------------------------------------------------- bench
def bench_point(results: Results, qt, w16, int4, m: int, dtype, families: list[str], gemv_max_m: int,
                rep_ms: int, copy_gbs: float) -> dict[str, tuple]:
    """Time every provider for one (qtype, N, K, M); returns provider -> (median ms, variant)."""
    import torch

    from offload_kernels import kernels

    n, k = qt.shape
    point = {"qtype": qt.qtype, "N": n, "K": k, "M": m, "dtype": str(dtype).replace("torch.", "")}
    x = torch.randn(m, k, device="cuda").to(dtype)
    timings: dict[str, tuple] = {}

    def record(provider: str, fn, nbytes: int, variant: str = "") -> None:
        med, p20, p80 = time_ms(fn, rep_ms)
        results.add("time", provider, point, med, p20, p80, "ms", variant)
        bw = [nbytes / (t * 1e-3) / GB for t in (med, p80, p20)]
        results.add("weight_bandwidth", provider, point, *bw, "GB/s", variant)
        results.add("hbm_fraction", provider, point, *(b / copy_gbs for b in bw), "fraction of copy bandwidth",
                    variant)
        results.add("tflops", provider, point, *(2 * m * n * k / (t * 1e-3) / 1e12 for t in (med, p80, p20)),
                    "TFLOP/s", variant)
        timings[provider] = (med, p20, p80, variant)

    def ran_variant(fn) -> str:
        kernels.reset_launch_counts()
        fn()
        return ",".join(f"{v}x{c}" if c > 1 else v for v, c in kernels.launch_counts().items() if c)

    auto = lambda: kernels.qmatmul(x, qt)  # noqa: E731
    record("auto", auto, qt.nbytes, ran_variant(auto))
    for family in families:
        if family == "gemv" and m > gemv_max_m:
            continue
        fn = (lambda f: lambda: kernels.qmatmul(x, qt, backend="triton", kernel=f))(family)
        record(family, fn, qt.nbytes, ran_variant(fn))
    x16 = x.to(torch.float16)
    record("cublas_fp16", lambda: torch.matmul(x16, w16.T), w16.numel() * 2)
    if int4[0] is not None:
        xb = x.to(torch.bfloat16)
        record("int4_tinygemm", lambda: int4[0](xb), int4[1])

    base = timings["cublas_fp16"][0]
    for provider, (med, p20, p80, variant) in timings.items():
        if provider != "cublas_fp16":
            results.add("speedup_vs_cublas_fp16", provider, point, base / med, base / p80, base / p20, "x", variant)
        if "int4_tinygemm" in timings and provider != "int4_tinygemm":
            i4 = timings["int4_tinygemm"][0]
            results.add("speedup_vs_int4", provider, point, i4 / med, i4 / p80, i4 / p20, "x", variant)
    return timings


def write_markdown(path: Path, meta: dict, table: dict, copy_gbs: float, targets: list, notes: list[str],
                   families: list[str]) -> None:
    lines = [f"# Kernel benchmark: {meta['gpu']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, offload_kernels {meta['version']}, commit "
             f"{meta['commit']}, {meta['date']}", "",
             f"Device-to-device copy bandwidth in this run: {copy_gbs:.0f} GB/s. Times are medians in microseconds; "
             "\"picked\" is the variant qmatmul's dispatcher ran, \"best\" the fastest of our families; "
             "speedups are over fp16 cuBLAS.", ""]
    providers = ["auto"] + families + ["cublas_fp16", "int4_tinygemm"]
    for (qtype, n, k), rows in table.items():
        lines += [f"## {qtype}, N={n}, K={k}", "",
                  "| M | " + " | ".join(f"{p} (us)" for p in providers) + " | picked | best | auto vs cuBLAS | "
                  "weight GB/s (auto) |", "|---|" + "---|" * (len(providers) + 4)]
        for m, t in rows.items():
            cells = [f"{t[p][0] * 1e3:.1f}" if p in t else "-" for p in providers]
            ours = {p: t[p][0] for p in families if p in t}
            best = min(ours, key=ours.get) if ours else "-"
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {t['auto'][3]} | {best} | "
                         f"{t['cublas_fp16'][0] / t['auto'][0]:.2f}x | {t['auto_gbs']:.0f} |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {name} | {measured} | {verdict(ok)} |" for name, measured, ok in targets]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    path.write_text("\n".join(lines) + "\n")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        if item.strip():
            n, k = item.lower().split("x")
            out.append((int(n), int(k)))
    return out


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qtypes", default=",".join(ALL_QTYPES))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in ALL_SHAPES), help="NxK,NxK,...")
    ap.add_argument("--m", default=",".join(map(str, ALL_M)), help="token counts")
    ap.add_argument("--families", default="gemv,gemm,dequant", help="forced families to time besides 'auto'")
    ap.add_argument("--gemv-max-m", type=int, default=16, help="largest M the forced GEMV is timed at")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time per measurement")
    ap.add_argument("--no-autotune", action="store_true",
                    help="heuristic configs only (no per-shape tuning; much faster, possibly slower kernels)")
    ap.add_argument("--quick", action="store_true", help="q4_k,q3_k on 8192x8192, M in 1,4,16,256,1024,4096")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)

    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"bench_kernels: needs CUDA ({reason}); nothing measured.")
        return 0
    if args.no_autotune:
        os.environ["OFFLOAD_KERNELS_AUTOTUNE"] = "0"   # read when offload_kernels.kernels is imported

    import torch
    import triton

    import offload_kernels
    from offload_kernels import kernels

    qtypes = QUICK["qtypes"] if args.quick else tuple(q.strip() for q in args.qtypes.split(",") if q.strip())
    shapes = QUICK["shapes"] if args.quick else parse_shapes(args.shapes)
    ms = QUICK["m"] if args.quick else tuple(int(v) for v in args.m.split(",") if v.strip())
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name()
    meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "version": offload_kernels.__version__, "commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()}
    results = Results(meta)
    notes: list[str] = [f"activations {args.dtype}; autotuning {'off' if args.no_autotune else 'on'}; "
                        f"crossovers in this build: {kernels.KERNEL_BY_M}"]
    print(f"GPU: {gpu}; torch {torch.__version__}; triton {triton.__version__}; {notes[0]}")

    copy = copy_bandwidth_gbs(args.rep_ms)
    results.rows.append({"kernel": "copy_bandwidth", "provider": "torch_copy", "x": 0, "median": copy[0],
                         "p20": copy[1], "p80": copy[2], "unit": "GB/s", **meta, "qtype": "", "N": "", "K": "",
                         "M": "", "dtype": "uint8", "variant": ""})
    print(f"device-to-device copy: {copy[0]:.0f} GB/s")

    table: dict = {}
    int4_note_done = False
    for qtype in qtypes:
        for n, k in shapes:
            qt = random_weight(qtype, n, k)
            w16 = kernels.dequantize_triton(qt, torch.float16)
            int4 = int4_baseline(w16)
            if int4[0] is None and not int4_note_done:
                notes.append(f"torch int4 weight-only baseline skipped: {int4[2]}")
                print(f"note: {notes[-1]}")
                int4_note_done = True
            rows = table.setdefault((qtype, n, k), {})
            for m in ms:
                t = bench_point(results, qt, w16, int4, m, dtype, families, args.gemv_max_m, args.rep_ms, copy[0])
                t["auto_gbs"] = qt.nbytes / (t["auto"][0] * 1e-3) / GB
                rows[m] = t
                ours = {p: t[p][0] for p in families if p in t}
                print(f"{qtype} {n}x{k} M={m:5d}: auto {t['auto'][0] * 1e3:9.1f} us [{t['auto'][3]}] "
                      f"{t['auto_gbs']:6.0f} GB/s ({t['auto_gbs'] / copy[0]:.2f} of copy)  cuBLAS fp16 "
                      f"{t['cublas_fp16'][0] * 1e3:9.1f} us  -> {t['cublas_fp16'][0] / t['auto'][0]:5.2f}x"
                      + (f"  int4 {t['int4_tinygemm'][0] * 1e3:8.1f} us" if "int4_tinygemm" in t else "")
                      + (f"  best {min(ours, key=ours.get)}" if ours else ""))
            del qt, w16, int4
            torch.cuda.empty_cache()

    targets = []
    for qtype, want in TARGETS_M1.items():
        t = table.get((qtype, *TARGET_SHAPE), {}).get(1)
        if t is not None:
            got = t["cublas_fp16"][0] / t["auto"][0]
            targets.append((f"{qtype} M=1 {TARGET_SHAPE[0]}x{TARGET_SHAPE[1]} >= {want}x fp16 cuBLAS", f"{got:.2f}x",
                            got >= want))
    large = [(key, m, t["cublas_fp16"][0] / t["auto"][0]) for key, rows in table.items() for m, t in rows.items()
             if m >= TARGET_LARGE_M]
    if large:
        key, m, worst = min(large, key=lambda r: r[2])
        targets.append((f"M >= {TARGET_LARGE_M}: >= {TARGET_LARGE_M_SPEEDUP}x fp16 cuBLAS throughput (worst case)",
                        f"{worst:.2f}x ({key[0]} {key[1]}x{key[2]} M={m})", worst >= TARGET_LARGE_M_SPEEDUP))
    print("\ntargets:")
    for name, measured, ok in targets:
        print(f"  [{verdict(ok)}] {name}: {measured}")

    out_dir = args.out_dir / slug(gpu)
    results.append_csv(out_dir / "kernels.csv")
    write_markdown(out_dir / "kernels.md", meta, table, copy[0], targets, notes, families)
    print(f"\nappended {len(results.rows)} rows to {out_dir / 'kernels.csv'}; summary in {out_dir / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
