"""Each benchmark end to end on a GPU with tiny settings (seconds each): run by the GPU suite's test stage, so a
mistake in the benchmarks' CUDA code shows before the long benchmark stages. Skipped without CUDA."""

import csv
import importlib

import pytest

from offload_kernels.benchmarks.results import RunInfo, results_dir
from offload_kernels.cli.main import main as cli_main

pytestmark = pytest.mark.gpu


@pytest.fixture
def out(tmp_path, monkeypatch):
    """A results directory, and the kernels' autotune switch restored afterwards (--no-autotune flips it)."""
    runtime = importlib.import_module("offload_kernels.kernels.runtime")
    monkeypatch.setattr(runtime, "AUTOTUNE", runtime.AUTOTUNE)
    return tmp_path


def rows(out, device, name):
    path = results_dir(out, RunInfo.collect(device).slug) / f"{name}.csv"
    with path.open(newline="") as f:
        found = list(csv.DictReader(f))
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").is_file()
    return {(r["kernel"], r["provider"]) for r in found}


def test_kernels(out):
    assert cli_main(["bench", "kernels", "--qtypes", "q4_k", "--shapes", "512x256", "--m", "1,16", "--no-autotune",
                     "--rep-ms", "5", "--out", str(out)]) == 0
    got = rows(out, "cuda", "kernels")
    assert {("time", "auto"), ("time", "auto_graph"), ("time", "gemv"), ("time", "cublas_fp16"),
            ("speedup_vs_cublas_fp16", "auto"), ("copy_bandwidth", "torch_copy")} <= got


def test_transfer(out):
    assert cli_main(["bench", "transfer", "--sizes-mb", "1,4", "--reps", "3", "--overlap-mb", "4", "--layers", "4",
                     "--spin-ratios", "1", "--pinned-items", "8", "--quick", "--out", str(out)]) == 0
    got = rows(out, "cuda", "transfer")
    assert {("h2d_bandwidth", "engine"), ("h2d_bandwidth", "torch_pinned"), ("overlap_time_ratio", "engine"),
            ("pinned_bytes_ratio", "engine_register_many")} <= got


def test_quantize(out):
    assert cli_main(["bench", "quantize", "--shape", "256x512", "--qtypes", "q4_k", "--reps", "1",
                     "--out", str(out)]) == 0
    assert {("quantize", "offload_kernels"), ("bytes_identical", "offload_kernels_cpu")} <= rows(out, "cuda", "formats")


def test_offload(out):
    assert cli_main(["bench", "offload", "--shape", "tiny", "--layers", "8", "--tokens", "1,16", "--batch-max", "4",
                     "--fractions", "1,0.2", "--reps", "2", "--warmup", "1", "--accelerate-tokens", "1",
                     "--no-autotune", "--out", str(out)]) == 0
    got = rows(out, "cuda", "offload")
    assert {("tokens_per_s", "dense_fp16"), ("tokens_per_s", "q4_k_100pct"), ("tokens_per_s", "q4_k_20pct"),
            ("tokens_per_s", "accelerate_cpu_offload"), ("ratio_to_ideal", "q4_k_20pct"),
            ("link_gbs", "q4_k_20pct"), ("speedup_vs_accelerate", "q4_k_20pct")} <= got


def test_experts(out):
    assert cli_main(["bench", "experts", "--shapes", "tiny-moe", "--tokens", "1,5", "--no-autotune", "--rep-ms", "5",
                     "--out", str(out)]) == 0
    got = rows(out, "cuda", "experts")
    assert {("time", "grouped"), ("time", "grouped_graph"), ("time", "by_expert"), ("time", "fp16_transformers"),
            ("speedup_vs_fp16", "grouped"), ("hbm_ideal_fraction", "by_expert"), ("hbm_ideal_time", "ideal")} <= got
