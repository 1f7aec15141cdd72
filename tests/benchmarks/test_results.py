"""The benchmarks' shared plumbing: run metadata, statistics, the long-format CSV, summaries, timing."""

import csv
import dataclasses
import os

import numpy as np
import pytest

from offload_kernels.benchmarks import results
from offload_kernels.benchmarks.results import CORE_COLUMNS, Recorder, RunInfo, Stats, Target

RUN = RunInfo("Test GPU 80GB", "test-gpu-80gb", "2.13.0", "3.9.0", "0.1.0", "abc1234", "2026-01-01T00:00:00+00:00")


def header_and_rows(path):
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_slugs_name_the_device():
    assert results.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert results.slugify("  ") == "unknown"
    name, slug = results.device_name_and_slug("cpu")
    assert name and slug == f"cpu-{os.cpu_count()}core"


def test_commit_from_environment_or_unknown_outside_a_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFLOAD_KERNELS_COMMIT", "deadbee")
    assert results.git_commit() == "deadbee"
    monkeypatch.delenv("OFFLOAD_KERNELS_COMMIT")
    assert results.git_commit(tmp_path) == "unknown"
    assert results.git_commit() != ""


def test_run_info_columns_are_the_metadata_columns():
    run = RunInfo.collect("cpu")
    assert set(run.columns()) == set(CORE_COLUMNS) - {"kernel", "provider", "x", "median", "p20", "p80", "unit"}
    assert run.date.endswith("+00:00") and run.version and run.torch


def test_results_dir_defaults_to_the_checkout(tmp_path):
    assert results.results_dir(tmp_path, "cpu-2core") == tmp_path / "cpu-2core"
    if results.is_checkout():
        assert results.results_dir(None, "x") == results.REPO_ROOT / "bench" / "results" / "x"


def test_summarize_gives_median_and_quintiles():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0, 100.0]
    s = results.summarize(samples)
    assert s == Stats(np.median(samples), np.percentile(samples, 20), np.percentile(samples, 80))
    assert s.p20 <= s.median <= s.p80
    with pytest.raises(ValueError):
        results.summarize([])


def test_reciprocal_swaps_percentiles():
    rate = Stats(2.0, 1.0, 4.0).reciprocal(8.0)     # ms -> "things per ms"
    assert rate == Stats(4.0, 2.0, 8.0) and rate.p20 <= rate.median <= rate.p80
    assert Stats(1.0, 0.5, 2.0).scaled(3) == Stats(3.0, 1.5, 6.0)


def test_csv_append_keeps_header_and_grows_columns(tmp_path):
    path = tmp_path / "slug" / "bench.csv"
    rec = Recorder(RUN)
    rec.add("time", "auto", 1, [1.0, 2.0, 3.0], "ms", qtype="q4_k")
    rec.write(path)
    header, rows = header_and_rows(path)
    assert header == [*CORE_COLUMNS, "qtype"]
    assert rows[0]["median"] == "2" and rows[0]["gpu"] == RUN.device and rows[0]["qtype"] == "q4_k"

    rec.write(path)                                             # same columns: plain append
    assert len(header_and_rows(path)[1]) == 2

    more = Recorder(RUN)
    more.add("time", "gemv", 2, Stats(1.0, 0.5, 1.5), "ms", qtype="q8_0", M=2)
    more.write(path)                                            # a new column: union header, old rows kept
    header, rows = header_and_rows(path)
    assert header == [*CORE_COLUMNS, "qtype", "M"]
    assert [r["provider"] for r in rows] == ["auto", "auto", "gemv"]
    assert rows[0]["M"] == "" and rows[2]["M"] == "2" and rows[2]["p80"] == "1.5"


def test_read_rows_takes_the_latest_run(tmp_path):
    path = tmp_path / "r.csv"
    for date in ("2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"):
        rec = Recorder(dataclasses.replace(RUN, date=date))
        rec.add("time", "auto", 1, [1.0], "ms")
        rec.write(path)
    assert [r["date"] for r in results.read_rows(path)] == ["2026-02-01T00:00:00+00:00"]
    assert len(results.read_rows(path, all_runs=True)) == 2


def test_summary_has_metadata_sections_targets_and_notes(tmp_path):
    path = tmp_path / "s.md"
    targets = [Target("fast enough", "1.2x", True), Target("faster", "0.5x", False)]
    body = ["## Table", ""] + results.markdown_table(["a", "b"], [[1, 2]])
    results.write_summary(path, "Bench", RUN, body, targets, ["a note"])
    text = path.read_text()
    assert text.startswith("# Bench: Test GPU 80GB")
    assert "commit abc1234" in text and "| a | b |" in text and "| 1 | 2 |" in text
    assert "| fast enough | 1.2x | PASS |" in text and "| faster | 0.5x | FAIL |" in text
    assert "- a note" in text


def test_host_timers_return_stats_and_results():
    calls = []
    stats, result = results.time_wall(lambda: calls.append(1) or len(calls), reps=3, warmup=2)
    assert result == 5 and len(calls) == 5 and 0 <= stats.p20 <= stats.median <= stats.p80
    stats = results.time_back_to_back(lambda: calls.append(1), reps=4, warmup=1, device="cpu")
    assert len(calls) == 10 and stats.median >= 0


def test_deadline_and_lists():
    assert not results.Deadline(None).expired()
    assert results.Deadline(0).expired()
    assert results.parse_list(" 1, 2,,4 ", int) == [1, 2, 4]
