"""Benchmark of quantize / dequantize on a 4096x4096 fp32 weight, against ggml's C reference and gguf.

Per qtype it times, in the same run (median, p20, p80 of --reps runs after a warm-up, wall clock, in ms,
plus the throughput in millions of weights per second and the speedup over each baseline):

* ``quantize``: offload_kernels.quantize on CPU (torch's default threads, or each count in --threads) and on
  CUDA when present,
  next to ggml's single-threaded C reference ``quantize_row_*_ref`` called through ctypes
  (libggml-base.so from --ggml-lib or $OFFLOAD_KERNELS_GGML_LIB, via the checkout's
  tests/vectors/ggml_ref.py; skipped without them), and checks that the bytes are identical;
* ``dequantize``: offload_kernels.dequantize (CPU, CUDA) next to gguf's numpy dequantizer and ggml's C
  ``dequantize_row_*``.

The weight is LLM-like: normal rows whose scale varies over two orders of magnitude. A table with
ratios is printed; rows are appended to ``<results>/<device-slug>/formats.csv`` (CPU rows under
``cpu-<cores>core``, CUDA rows under the GPU's slug), each directory also getting ``formats.md`` and
``formats.png``. (The files keep the name of the first results recorded: the GGUF formats' speed.)

    offload-kernels bench quantize --ggml-lib /path/to/libggml-base.so
    offload-kernels bench quantize --qtypes q4_k,q6_k --reps 3
    offload-kernels bench quantize --threads 1,2      # like-for-like with ggml (1 thread), then 2 threads
    offload-kernels bench quantize --cpu-chunk-weights 4194304   # weights per quantize_blocks call on CPU
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from typing import Any

import numpy as np

from .results import (REPO_ROOT, Recorder, RunInfo, Stats, add_output_argument, markdown_table,
                      parse_list, plot_quietly, results_dir, time_wall, write_summary)

#: Formats benchmarked by default: the issue's (llama.cpp's main formats); --qtypes takes any of formats.QTYPES.
DEFAULT_QTYPES = ("q4_0", "q8_0", "q3_k", "q4_k", "q5_k", "q6_k")
OURS = "offload_kernels"
RESULTS = "formats"            # <results>/<slug>/formats.{csv,md,png}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ggml-lib", help="libggml-base.so (default: $OFFLOAD_KERNELS_GGML_LIB)")
    parser.add_argument("--qtypes", default=",".join(DEFAULT_QTYPES))
    parser.add_argument("--shape", default="4096x4096", help="ROWSxCOLS of the weight")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-cuda", action="store_true", help="skip CUDA even when present")
    parser.add_argument("--threads", help="comma-separated torch CPU thread counts to run the CPU rows with, one "
                                          "pass each (default: torch's current setting); ggml's reference is "
                                          "single-threaded, so --threads 1 is the like-for-like comparison")
    parser.add_argument("--cpu-chunk-weights", type=int,
                        help="override quantize()'s weights per block-quantizer call on CPU (an experiment; the "
                             "provider is then recorded as offload_kernels[cpu_chunk=N])")
    add_output_argument(parser)


def realistic_weight(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    w = g.standard_normal((rows, cols)) * np.exp(g.uniform(-3.0, 1.0, size=(rows, 1))) * 0.02
    return w.astype(np.float32)


def load_ggml_reference(explicit: "str | None") -> tuple[Any, "str | None"]:
    """(GgmlRef, None), or (None, why the ggml columns are skipped). The ctypes bindings live with the test
    vectors in a checkout (tests/vectors/ggml_ref.py), not in the package."""
    path = REPO_ROOT / "tests" / "vectors" / "ggml_ref.py"
    if not path.is_file():
        return None, f"{path} not found (not a checkout): ggml columns skipped"
    spec = importlib.util.spec_from_file_location("offload_kernels_ggml_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lib = module.find_library(explicit)
    if lib is None:
        return None, "no libggml-base.so (--ggml-lib or $OFFLOAD_KERNELS_GGML_LIB): ggml columns skipped"
    return module.GgmlRef(lib), None


class QtypeBench:
    """Times one qtype on every provider, recording rows and the medians (ms) for the table."""

    def __init__(self, qtype: str, w_np: np.ndarray, reps: int, ours: str) -> None:
        self.qtype, self.w_np, self.reps, self.ours = qtype, w_np, reps, ours
        self.shape = f"{w_np.shape[0]}x{w_np.shape[1]}"
        self.threads = torch_threads()
        self.row: dict[str, Any] = {"qtype": qtype, "threads": self.threads}

    def time(self, rec: Recorder, kernel: str, provider: str, key: str, fn, sync=None,
             baselines: tuple[str, ...] = ()) -> Any:
        """Time fn, record time/throughput and the speedup over each already-timed baseline (row keys)."""
        stats, result = time_wall(fn, self.reps, warmup=1, sync=sync)
        extra = {"qtype": self.qtype, "shape": self.shape, "threads": self.threads}
        rec.add(kernel, provider, self.qtype, stats, "ms", **extra)
        rec.add(f"{kernel}_throughput", provider, self.qtype, stats.reciprocal(self.w_np.size / 1e6 * 1e3),
                "Mweights/s", **extra)
        for base in baselines:
            if base in self.row:
                rec.add(f"{kernel}_speedup_vs_{BASELINE_NAMES[base]}", provider, self.qtype,
                        stats.reciprocal(self.row[base]), "x", **extra)
        self.row[key] = stats.median
        return result

    def identical(self, rec: Recorder, key: str, provider: str, same: bool) -> None:
        self.row[key] = same
        rec.add("bytes_identical", provider, self.qtype, Stats.exact(same), "bool", qtype=self.qtype,
                shape=self.shape, threads=self.threads)

    def run_cpu(self, rec: Recorder, ggml) -> Any:
        import gguf
        import torch

        import offload_kernels

        w = torch.from_numpy(self.w_np)
        if ggml is not None:
            ref_bytes = self.time(rec, "quantize", "ggml_ref_c", "q_ggml", lambda: ggml.quantize(self.w_np, self.qtype))
        qt = self.time(rec, "quantize", self.ours, "q_ours", lambda: offload_kernels.quantize(w, self.qtype),
                       baselines=("q_ggml",))
        ours_bytes = qt.data.numpy()
        if ggml is not None:
            self.identical(rec, "identical", "ggml_ref_c", bool(np.array_equal(ref_bytes, ours_bytes)))
            self.time(rec, "dequantize", "ggml_ref_c", "dq_ggml",
                      lambda: ggml.dequantize(ours_bytes, self.qtype, self.w_np.shape[1]))
        self.time(rec, "dequantize", "gguf_numpy", "dq_gguf",
                  lambda: gguf.quants.dequantize(ours_bytes, qt.spec.ggml_type))
        self.time(rec, "dequantize", self.ours, "dq_ours", lambda: offload_kernels.dequantize(qt),
                  baselines=("dq_gguf", "dq_ggml"))
        return ours_bytes

    def run_cuda(self, rec: Recorder, ours_bytes: np.ndarray) -> None:
        import torch

        import offload_kernels

        wc = torch.from_numpy(self.w_np).cuda()
        sync = torch.cuda.synchronize
        qtc = self.time(rec, "quantize", self.ours, "q_cuda", lambda: offload_kernels.quantize(wc, self.qtype), sync,
                        baselines=("q_ggml", "q_ours"))
        self.identical(rec, "identical_cuda", "offload_kernels_cpu", bool(np.array_equal(qtc.data.cpu().numpy(),
                                                                                         ours_bytes)))
        self.time(rec, "dequantize", self.ours, "dq_cuda", lambda: offload_kernels.dequantize(qtc), sync,
                  baselines=("dq_gguf", "dq_ours"))


# row key of a baseline -> its name in the speedup rows
BASELINE_NAMES = {"q_ggml": "ggml_ref_c", "q_ours": "cpu", "dq_gguf": "gguf_numpy", "dq_ggml": "ggml_ref_c",
                  "dq_ours": "cpu"}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if v >= 10 else f"{v:.3f}"
    return "-" if v is None else str(v)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"


def table(rows: list[dict], cuda: bool) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the summary table (medians in ms, ratios baseline / ours)."""
    head = ["qtype", "threads", "quantize ours", "ggml C", "ggml/ours", "identical", "dequant ours", "gguf numpy",
            "gguf/ours", "ggml C dq", "ggml dq/ours"]
    if cuda:
        head += ["quantize cuda", "ggml/cuda", "identical cuda", "dequant cuda", "gguf/cuda"]
    cells = []
    for r in rows:
        g = r.get
        line = [r["qtype"], _fmt(g("threads")), _fmt(g("q_ours")), _fmt(g("q_ggml")),
                _ratio(g("q_ggml"), g("q_ours")), _fmt(g("identical")), _fmt(g("dq_ours")), _fmt(g("dq_gguf")), _ratio(g("dq_gguf"), g("dq_ours")),
                _fmt(g("dq_ggml")), _ratio(g("dq_ggml"), g("dq_ours"))]
        if cuda:
            line += [_fmt(g("q_cuda")), _ratio(g("q_ggml"), g("q_cuda")), _fmt(g("identical_cuda")), _fmt(g("dq_cuda")),
                     _ratio(g("dq_gguf"), g("dq_cuda"))]
        cells.append(line)
    return head, cells


def run(args: argparse.Namespace) -> int:
    import torch

    from offload_kernels.cli.table import format_table

    rows_, cols_ = (int(v) for v in args.shape.lower().split("x"))
    ours = OURS
    if args.cpu_chunk_weights:
        importlib.import_module("offload_kernels.formats.quantize")._CHUNK_WEIGHTS["cpu"] = args.cpu_chunk_weights
        ours = f"{OURS}[cpu_chunk={args.cpu_chunk_weights}]"
    ggml, why_not = load_ggml_reference(args.ggml_lib)
    bad_threads = f"--threads: thread counts must be integers >= 1, got {args.threads!r}"
    try:
        thread_counts = [int(t) for t in parse_list(args.threads)] if args.threads else [torch.get_num_threads()]
    except ValueError:
        raise SystemExit(bad_threads) from None
    if not thread_counts or any(t < 1 for t in thread_counts):
        raise SystemExit(bad_threads)
    notes = [f"{rows_}x{cols_} fp32 weight; ours = {ours} with the torch CPU thread count in the threads column "
             "(the CUDA columns, when present, come from the first pass); ggml's C reference is single-threaded; "
             "wall-clock medians in ms (CUDA timings synchronize); \"A/B\" columns are A's time over B's "
             "(above 1: B is faster)"]
    if why_not:
        notes.append(why_not)
        print(why_not)
    cuda = torch.cuda.is_available() and not args.no_cuda
    recorders = {"cpu": Recorder(RunInfo.collect("cpu"))}
    if cuda:
        recorders["cuda"] = Recorder(RunInfo.collect("cuda"))
    w_np = realistic_weight(rows_, cols_)

    rows = []
    threads_before = torch.get_num_threads()
    try:
        for pass_index, n_threads in enumerate(thread_counts):
            torch.set_num_threads(n_threads)
            for qtype in parse_list(args.qtypes):
                bench = QtypeBench(qtype, w_np, args.reps, ours)
                ours_bytes = bench.run_cpu(recorders["cpu"], ggml)
                if cuda and pass_index == 0:
                    bench.run_cuda(recorders["cuda"], ours_bytes)
                rows.append(bench.row)
                print(f"{qtype} ({n_threads} threads): done", flush=True)
    finally:
        torch.set_num_threads(threads_before)

    head, cells = table(rows, cuda)
    print("\n" + notes[0] + "\n" + format_table(head, cells))
    for rec in recorders.values():
        out_dir = results_dir(args.out, rec.run.slug)
        csv_path = out_dir / f"{RESULTS}.csv"
        rec.write(csv_path)
        run_notes = list(notes)
        plot_quietly(csv_path, run_notes)
        write_summary(csv_path.with_suffix(".md"), "Quantize/dequantize benchmark", rec.run,
                      ["## Medians (ms) and speedups", ""] + markdown_table(head, cells), notes=run_notes)
        print(f"appended {len(rec.rows)} rows to {csv_path}; summary in {csv_path.with_suffix('.md')}")
    return 0
