"""The benchmarks that run without a GPU, run end to end on tiny inputs: the quantize benchmark, the offload
benchmark on its CPU path (host engine, torch kernels), and the plots of every CSV kind."""

import csv

import pytest
import torch

from offload_kernels.benchmarks.results import Recorder, RunInfo, Stats, results_dir
from offload_kernels.cli.main import main as cli_main


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run far faster (and steadier) on one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows_of(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_quantize_benchmark_on_cpu(tmp_path, one_thread):
    assert cli_main(["bench", "quantize", "--shape", "256x512", "--qtypes", "q4_0,q4_k", "--reps", "1", "--no-cuda",
                          "--out", str(tmp_path)]) == 0
    out = results_dir(tmp_path, RunInfo.collect("cpu").slug)
    rows = rows_of(out / "formats.csv")
    got = {(r["kernel"], r["provider"], r["x"]) for r in rows}
    for qtype in ("q4_0", "q4_k"):
        assert {("quantize", "offload_kernels", qtype), ("dequantize", "offload_kernels", qtype),
                ("dequantize", "gguf_numpy", qtype), ("quantize_throughput", "offload_kernels", qtype),
                ("dequantize_speedup_vs_gguf_numpy", "offload_kernels", qtype)} <= got
    assert {r["unit"] for r in rows if r["kernel"] == "quantize"} == {"ms"}
    assert "| q4_k |" in (out / "formats.md").read_text()
    assert (out / "formats.png").stat().st_size > 0


def test_quantize_benchmark_times_each_thread_count(tmp_path, one_thread):
    assert cli_main(["bench", "quantize", "--shape", "64x256", "--qtypes", "q4_0", "--reps", "1", "--no-cuda",
                     "--threads", "1,2", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == 1                       # restored after the passes
    out = results_dir(tmp_path, RunInfo.collect("cpu").slug)
    rows = [r for r in rows_of(out / "formats.csv") if r["kernel"] == "quantize" and r["provider"] == "offload_kernels"]
    assert sorted(r["threads"] for r in rows) == ["1", "2"]
    table = (out / "formats.md").read_text()
    assert "| q4_0 | 1 |" in table and "| q4_0 | 2 |" in table


@pytest.mark.parametrize("threads", ["0", "two", "1,-2"])
def test_quantize_benchmark_rejects_bad_thread_counts(tmp_path, threads):
    with pytest.raises(SystemExit, match="thread counts must be integers >= 1"):
        cli_main(["bench", "quantize", "--shape", "64x256", "--qtypes", "q4_0", "--reps", "1", "--no-cuda",
                  "--threads", threads, "--out", str(tmp_path)])


@pytest.mark.parametrize("shape", ["tiny", "tiny-moe"])
def test_offload_benchmark_on_the_cpu_path(tmp_path, one_thread, shape):
    on_demand = ["--experts-on-demand", "--expert-prefetch"] if shape == "tiny-moe" else []
    assert cli_main(["bench", "offload", "--device", "cpu", "--shape", shape, "--layers", "8", "--tokens", "1,4",
                     "--batch-max", "4", "--fractions", "1,0.2", "--reps", "2", "--warmup", "1",
                     "--out", str(tmp_path), *on_demand]) == 0
    out = results_dir(tmp_path, RunInfo.collect("cpu").slug)
    name = "offload" if shape == "tiny" else f"offload_{shape}"
    rows = rows_of(out / f"{name}.csv")
    by = {(r["kernel"], r["provider"], r["x"], r.get("layout", "")): r for r in rows}
    for provider in ("dense_fp32", "q4_k_100pct", "q4_k_20pct"):
        for tokens, layout in (("1", "prefill"), ("4", "prefill"), ("4", "batch")):
            assert ("tokens_per_s", provider, tokens, layout) in by
    streamed = float(by[("streamed_bytes", "q4_k_20pct", "0", "")]["median"])
    assert streamed > 0 and float(by[("streamed_bytes", "q4_k_100pct", "0", "")]["median"]) == 0
    # what crossed the "link" per forward is exactly what the plan streams
    assert float(by[("link_bytes_per_forward", "q4_k_20pct", "1", "prefill")]["median"]) == pytest.approx(streamed)
    assert ("ratio_to_ideal", "q4_k_20pct", "4", "batch") in by
    assert ("ratio_to_resident", "q4_k_20pct", "1", "prefill") in by
    if on_demand:       # the same budget with the chosen experts copied through the cache
        assert ("tokens_per_s", "q4_k_20pct_on_demand", "4", "batch") in by
        assert ("tokens_per_s", "q4_k_20pct_on_demand_prefetch", "1", "prefill") in by
        assert float(by[("expert_bytes_per_forward", "q4_k_20pct_on_demand", "1", "prefill")]["median"]) >= 0
    assert ("ratio_to_ideal", "q4_k_100pct", "1", "prefill") not in by     # nothing streamed: no ideal
    fraction = float(by[("tokens_per_s", "q4_k_20pct", "1", "prefill")]["resident_fraction"])
    assert 0.1 < fraction < 0.3
    text = (out / f"{name}.md").read_text()
    assert "## Streaming" in text and "## Targets" in text and shape in text
    assert (out / f"{name}.png").stat().st_size > 0


def fake_rows(rec: Recorder, kernel: str, providers, xs, **extra):
    for p in providers:
        for i, x in enumerate(xs):
            rec.add(kernel, p, x, Stats(1.0 + i, 0.9 + i, 1.1 + i), "x", **extra)


@pytest.mark.parametrize("kind", ["kernels", "transfer"])
def test_plots_of_the_gpu_csvs(kind, tmp_path):
    """The GPU benchmarks' CSV layouts, synthesized, plot without errors (the real ones come from a GPU)."""
    rec = Recorder(RunInfo.collect("cpu"))
    if kind == "kernels":
        rec.add("copy_bandwidth", "torch_copy", 0, Stats(3000.0, 2900.0, 3100.0), "GB/s", dtype="uint8")
        for kernel in ("speedup_vs_cublas_fp16", "hbm_fraction"):
            for qtype in ("q4_k", "q3_k"):
                fake_rows(rec, kernel, ["auto", "auto_graph", "gemv", "gemm", "dequant"], [1, 16, 1024], qtype=qtype, N=8192,
                          K=8192, dtype="float16", autotune="on")
    else:
        fake_rows(rec, "h2d_bandwidth", ["torch_pinned", "engine"], [1e6, 64e6])
        fake_rows(rec, "overlap_time_ratio", ["engine"], [0.5, 1.0])
        fake_rows(rec, "overlap_bandwidth_fraction", ["engine"], [0.5, 1.0])
    path = tmp_path / f"{kind}.csv"
    rec.write(path)
    assert cli_main(["bench", "plot", str(path)]) == 0
    assert path.with_suffix(".png").stat().st_size > 0


def test_sass_benchmark_compiles_for_sm90(tmp_path):
    """``bench sass`` in a subprocess with the compiler (this process runs Triton's interpreter): the rows of
    the layouts asked for, and a layout the heuristic would not run for those tokens left out."""
    import os
    import subprocess
    import sys

    from offload_kernels.benchmarks.results import REPO_ROOT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "offload_kernels.cli.main", "bench", "sass", "--qtypes", "q4_k",
                           "--tokens", "1,8", "--layouts", "2,3", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    if "no cuobjdump" in proc.stderr:
        pytest.skip("this Triton ships no cuobjdump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of(tmp_path / "static-sm90" / "gemv_sass.csv")
    assert {(r["provider"], r["x"]) for r in rows} == {("layout2", "1"), ("layout3", "1")}   # layout 3 not at 8
    layout3 = next(r for r in rows if r["provider"] == "layout3")
    assert float(layout3["median"]) < 6 and layout3["loop_sync_ops"] == "0" and layout3["spill_bytes"] == "0"
    assert layout3["unit"] == "instructions/weight/token"
    assert "| q4_k | fp16 | 1 | 3 |" in next((tmp_path / "static-sm90").glob("gemv_sass_triton*.md")).read_text()


def test_sass_benchmark_refuses_the_interpreter(capsys):
    assert cli_main(["bench", "sass", "--qtypes", "q4_k"]) == 2
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--qtypes", "iq2_xxs"], "unknown qtypes ['iq2_xxs']"),
                                           (["--dtypes", "fp8"], "unknown dtypes ['fp8']"),
                                           (["--layouts", "4"], "unknown layouts [4]"),
                                           (["--tokens", "0"], "--tokens must be positive")])
def test_sass_benchmark_names_bad_arguments(argv, message, capsys, tmp_path):
    """Checked first, before anything compiles or is written."""
    assert cli_main(["bench", "sass", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_experts_benchmark_logic_on_cpu(tmp_path, one_thread, monkeypatch):
    """The experts benchmark's measurement loop, CSV, summary and plot, on the CPU (torch backends) with the
    CUDA timers replaced by one timed call: every provider is recorded against the same baseline."""
    pytest.importorskip("transformers.models.qwen3_moe")
    import time

    from offload_kernels.benchmarks import experts
    from offload_kernels.benchmarks.results import Deadline
    from offload_kernels.kernels import configs
    from offload_kernels.layers import offloaded_experts

    if not hasattr(__import__("transformers.integrations.moe", fromlist=["x"]), "use_experts_implementation"):
        pytest.skip("this transformers has no 3-D expert modules")

    def once(fn, rep_ms=0):
        start = time.perf_counter()
        fn()
        return Stats.exact((time.perf_counter() - start) * 1e3)

    monkeypatch.setattr(experts, "time_cuda", once)
    monkeypatch.setattr(experts, "time_cuda_graph", once)
    run = RunInfo.collect("cpu")
    rec, table = Recorder(run), {}
    limit = offloaded_experts.GROUPED_MAX_PAIRS_PER_EXPERT
    gemv_limit = configs.EXPERTS_GEMV_MAX_PAIRS_PER_EXPERT
    experts.bench_shape(rec, "tiny-moe", experts.moe_shapes()["tiny-moe"], "q4_k", [1, 3], 1, 1000.0, table,
                        Deadline(None), device="cpu")
    assert offloaded_experts.GROUPED_MAX_PAIRS_PER_EXPERT == limit          # the crossovers are restored
    assert configs.EXPERTS_GEMV_MAX_PAIRS_PER_EXPERT == gemv_limit
    got = {(r["kernel"], r["provider"], r["x"]) for r in rec.rows}
    for t in (1, 3):
        for provider in ("grouped", "grouped_graph", "grouped_gemv", "grouped_gemm", "by_expert", "fp16_transformers"):
            assert ("time", provider, t) in got and ("hbm_ideal_fraction", provider, t) in got
        assert ("speedup_vs_fp16", "grouped", t) in got and ("speedup_vs_fp16", "fp16_transformers", t) not in got
    assert set(table) == {("tiny-moe", 1), ("tiny-moe", 3)}
    out = results_dir(tmp_path, run.slug)
    rec.write(out / "experts.csv")
    experts.write_summary(out / "experts.md", "MoE experts benchmark", run, experts.summary_body(table))
    assert "| tiny-moe | 3 |" in (out / "experts.md").read_text()
    assert cli_main(["bench", "plot", str(out / "experts.csv")]) == 0
    assert (out / "experts.png").stat().st_size > 0
