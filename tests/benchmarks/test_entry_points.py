"""Every benchmark entry point answers --help, and the CUDA ones exit 0 with a message on a machine without
CUDA: through ``offload-kernels bench`` and through the bench/*.py scripts."""

import runpy
import sys

import pytest
import torch

from offload_kernels.benchmarks.results import REPO_ROOT
from offload_kernels.cli import bench as bench_cli
from offload_kernels.cli.main import main as cli_main

BENCH_DIR = REPO_ROOT / "bench"
SCRIPTS = ["bench_kernels.py", "bench_transfer.py", "bench_quantize.py", "bench_offload.py", "bench_experts.py",
           "bench_sass.py", "plot.py", "profile_qmatmul.py"]


def test_bench_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in bench_cli.BENCHMARKS)


@pytest.mark.parametrize("name", list(bench_cli.BENCHMARKS))
def test_cli_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", name, "--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA these would run the real benchmarks")
@pytest.mark.parametrize("name", ["kernels", "transfer", "offload", "experts"])
def test_gpu_benchmarks_exit_0_without_cuda(name, capsys, tmp_path):
    assert cli_main(["bench", name, "--out", str(tmp_path)]) == 0
    assert "needs CUDA" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not BENCH_DIR.is_dir(), reason="not a checkout")
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_scripts_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", [str(BENCH_DIR), *sys.path])   # as `python bench/<script>` would have it
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCH_DIR / script), run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_plot_without_results_says_so(tmp_path, capsys):
    assert cli_main(["bench", "plot", "--results", str(tmp_path)]) == 0
    assert "no results CSVs" in capsys.readouterr().out


@pytest.mark.skipif(not BENCH_DIR.is_dir(), reason="not a checkout")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_profile_qmatmul_without_cuda_says_so(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["profile_qmatmul.py", "--points", "q4_k:1"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCH_DIR / "profile_qmatmul.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "needs a CUDA device" in capsys.readouterr().out


@pytest.mark.skipif(not BENCH_DIR.is_dir(), reason="not a checkout")
@pytest.mark.parametrize("argv, message", [(["--shape", "8192by8192"], "--shape must be NxK"),
                                           (["--points", "q4_k:0"], "qtype:M"),
                                           (["--points", "q9_k:1"], "qtype:M"),
                                           (["--shape", "64x100", "--points", "q4_k:1"], "multiple of q4_k's 256")])
def test_profile_qmatmul_rejects_bad_arguments(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["profile_qmatmul.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCH_DIR / "profile_qmatmul.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, match", [(["--tokens", "0,4"], "--tokens must be positive"),
                                         (["--shapes", "llama-3-8b"], "not a MoE shape"),
                                         (["--rep-ms", "0"], "--rep-ms must be at least 1"),
                                         (["--shapes", "gpt-oss-20b", "--qtype", "q4_k"],
                                          "rows .2880 weights. are not a whole number of q4_k blocks")])
def test_experts_benchmark_names_bad_arguments_anywhere(args, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        cli_main(["bench", "experts", *args, "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_experts_benchmark_times_each_preset_in_its_files_format_unless_told():
    from offload_kernels.benchmarks.experts import moe_shapes, shape_formats

    names = ("qwen3-30b-a3b", "gpt-oss-20b")
    assert {n: s.name for n, s in shape_formats(names, None, moe_shapes()).items()} == {
        "qwen3-30b-a3b": "q4_k", "gpt-oss-20b": "mxfp4"}
    assert {s.name for s in shape_formats(names, "q8_0", moe_shapes()).values()} == {"q8_0"}
