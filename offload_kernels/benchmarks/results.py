"""What every benchmark shares: who, where and when a run happened; timing statistics; the long-format CSV
all benchmarks append to; markdown summaries with their targets; and where results go.

Results live in ``<base>/<device-slug>/`` where ``<base>`` is ``bench/results`` of the checkout this package
was imported from (``./bench-results`` for an installed copy) or ``--out DIR``, and the slug names the
device (``nvidia-h100-80gb-hbm3``, ``cpu-2core``). Every CSV row carries the core columns below plus
free-form extra columns (qtype, shape, M...); appending a row with a new column rewrites the file with the
union of the columns, so old rows survive schema growth.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

CORE_COLUMNS = ("kernel", "provider", "x", "median", "p20", "p80", "unit", "gpu", "torch", "triton", "version",
                "commit", "date")
GB = 1e9
REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------- the run
def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def device_name_and_slug(device: Any) -> tuple[str, str]:
    """("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3") for a CUDA device, (CPU model, "cpu-<n>core") else."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        return name, slugify(name)
    return cpu_name(), f"cpu-{os.cpu_count()}core"


def is_checkout(root: Path = REPO_ROOT) -> bool:
    return (root / "setup.py").is_file() and (root / "bench").is_dir()


def git_commit(root: Path = REPO_ROOT) -> str:
    """$OFFLOAD_KERNELS_COMMIT (for copies of a checkout without .git, like the GPU machine's), else the
    checkout's short HEAD with ``-dirty`` when tracked files are modified, else "unknown"."""
    if os.environ.get("OFFLOAD_KERNELS_COMMIT"):
        return os.environ["OFFLOAD_KERNELS_COMMIT"]
    if not is_checkout(root):
        return "unknown"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("-dirty" if dirty else "")) if head else "unknown"


def package_version(name: str) -> str:
    """Installed version without importing the package (importing triton would fix TRITON_INTERPRET)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


@dataclass(frozen=True)
class RunInfo:
    """One benchmark run on one device: the metadata columns of its CSV rows."""

    device: str
    slug: str
    torch: str
    triton: str
    version: str
    commit: str
    date: str

    @classmethod
    def collect(cls, device: Any = "cpu") -> "RunInfo":
        import torch

        import offload_kernels

        name, slug = device_name_and_slug(device)
        date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        return cls(name, slug, torch.__version__, package_version("triton"), offload_kernels.__version__,
                   git_commit(), date)

    def columns(self) -> dict[str, str]:
        return {"gpu": self.device, "torch": self.torch, "triton": self.triton, "version": self.version,
                "commit": self.commit, "date": self.date}

    def describe(self) -> str:
        return (f"{self.device}; torch {self.torch}, triton {self.triton}, offload_kernels {self.version}, "
                f"commit {self.commit}, {self.date}")


def default_results_base() -> Path:
    return REPO_ROOT / "bench" / "results" if is_checkout() else Path.cwd() / "bench-results"


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="base results directory; files go to DIR/<device-slug>/ (default: bench/results "
                             "of the checkout, or ./bench-results)")


def results_dir(base: "Path | None", slug: str) -> Path:
    return (base or default_results_base()) / slug


# ----------------------------------------------------------------------------------------- statistics
class Stats(NamedTuple):
    """Median and 20th/80th percentiles of one measurement (the p20-p80 band is the error bar)."""

    median: float
    p20: float
    p80: float

    def reciprocal(self, numerator: float) -> "Stats":
        """numerator / self: a time turned into a rate or a speedup. The percentiles swap sides, since the
        slow (p80) times give the low (p20) rates."""
        return Stats(numerator / self.median, numerator / self.p80, numerator / self.p20)

    def scaled(self, factor: float) -> "Stats":
        return Stats(self.median * factor, self.p20 * factor, self.p80 * factor)

    @classmethod
    def exact(cls, value: float) -> "Stats":
        """A figure without spread (a count, a setting, a value derived from other medians)."""
        return cls(float(value), float(value), float(value))


def summarize(samples: Iterable[float]) -> Stats:
    arr = np.asarray(list(samples), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no samples to summarize")
    return Stats(float(np.median(arr)), float(np.percentile(arr, 20)), float(np.percentile(arr, 80)))


# ----------------------------------------------------------------------------------------- timing
def time_cuda(fn: Callable[[], Any], rep_ms: int = 60, warmup_ms: "int | None" = None) -> Stats:
    """Device time of fn() in ms via triton.testing.do_bench (CUDA events, L2 flushed before every
    repetition so inputs come from HBM as streamed weights would). One call first compiles/autotunes."""
    import triton.testing

    fn()
    warmup = max(5, rep_ms // 4) if warmup_ms is None else warmup_ms
    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Stats(float(med), float(p20), float(p80))


def time_cuda_graph(fn: Callable[[], Any], rep_ms: int = 60, warmup_ms: "int | None" = None) -> Stats:
    """Device time of fn() in ms with the host out of the way: fn is captured once into a CUDA graph and the
    replays are timed as in time_cuda (L2 flushed before each). The difference to time_cuda(fn) is the host
    overhead of launching fn eagerly (Python, dispatch, Triton's launcher) that the GPU sat waiting for."""
    import torch

    fn()                                    # compile and autotune outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):           # a warm-up on a side stream, as torch.cuda.graphs recommends
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_cuda(graph.replay, rep_ms, warmup_ms)


def time_events(once: Callable[[], Any], reps: int, warmup: int = 2, stream: Any = None) -> list[float]:
    """Device time in ms of each of ``reps`` calls of once() on ``stream``, each one synchronized on its own
    (nothing pipelines across repetitions)."""
    import torch

    stream = torch.cuda.current_stream() if stream is None else stream
    times = []
    with torch.cuda.stream(stream):
        for i in range(warmup + reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            once()
            end.record(stream)
            end.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return times


def time_back_to_back(fn: Callable[[], Any], reps: int, warmup: int = 2, device: Any = "cuda") -> Stats:
    """ms per call of fn() in steady state: calls run back to back with no synchronization between them (as
    successive forwards would), each sample being the interval between consecutive boundaries (CUDA events
    on the current stream; the host clock on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    if torch.device(device).type != "cuda":
        stamps = [time.perf_counter()]
        for _ in range(reps):
            fn()
            stamps.append(time.perf_counter())
        return summarize((b - a) * 1e3 for a, b in zip(stamps, stamps[1:]))
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
    events[0].record()
    for i in range(reps):
        fn()
        events[i + 1].record()
    events[-1].synchronize()
    return summarize(a.elapsed_time(b) for a, b in zip(events, events[1:]))


def time_wall(fn: Callable[[], Any], reps: int, warmup: int = 1,
              sync: "Callable[[], Any] | None" = None) -> tuple[Stats, Any]:
    """(wall-clock ms of fn() over ``reps`` runs after ``warmup`` runs, the last result). ``sync`` (e.g.
    torch.cuda.synchronize) runs before each clock read, so device work is inside the interval."""
    result = None
    for _ in range(warmup):
        result = fn()
    if sync:
        sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times), result


class Deadline:
    """A time budget (seconds; None = unlimited) that long benchmarks check before each measurement, so
    they stop early and still write what they measured."""

    def __init__(self, seconds: "float | None") -> None:
        self.seconds = seconds
        self._end = None if seconds is None else time.monotonic() + seconds

    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end


# ----------------------------------------------------------------------------------------- CSV
def _cell(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def append_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows to a long-format CSV, creating it with a header, or rewriting it with the union of the
    columns when the rows bring new ones (existing rows get empty cells there)."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    header: list[str] = []
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
    columns = list(header or CORE_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    if header and columns != header:
        old = read_rows(path, all_runs=True)
        mode, todo = "w", old + list(rows)
    else:
        mode, todo = ("a" if header else "w"), list(rows)
    with path.open(mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        if mode == "w":
            writer.writeheader()
        for row in todo:
            writer.writerow({k: _cell(v) for k, v in row.items()})


def read_rows(path: Path, all_runs: bool = False) -> list[dict[str, str]]:
    """Rows of a results CSV: those of its latest run (one run shares one date) unless ``all_runs``."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if all_runs or not rows:
        return rows
    latest = max(r["date"] for r in rows)
    return [r for r in rows if r["date"] == latest]


class Recorder:
    """The rows of one run, in the CSV's long format."""

    def __init__(self, run: RunInfo) -> None:
        self.run = run
        self.rows: list[dict[str, Any]] = []

    def add(self, kernel: str, provider: str, x: Any, values: "Stats | Iterable[float]", unit: str,
            **extra: Any) -> Stats:
        """Record one measurement (Stats, or raw samples summarized here); returns its Stats."""
        stats = values if isinstance(values, Stats) else summarize(values)
        self.rows.append({"kernel": kernel, "provider": provider, "x": x, "median": stats.median, "p20": stats.p20,
                          "p80": stats.p80, "unit": unit, **self.run.columns(), **extra})
        return stats

    def write(self, path: Path) -> None:
        append_csv(path, self.rows)


# ----------------------------------------------------------------------------------------- reports
@dataclass(frozen=True)
class Target:
    """A performance target, printed PASS/FAIL (informational: nothing asserts it)."""

    name: str
    measured: str
    ok: bool

    @property
    def verdict(self) -> str:
        return "PASS" if self.ok else "FAIL"


def print_targets(targets: Sequence[Target]) -> None:
    print("\ntargets (informational, not asserted):")
    for t in targets:
        print(f"  [{t.verdict}] {t.name}: {t.measured}")
    if not targets:
        print("  none could be evaluated in this run")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return lines + [""]


def write_summary(path: Path, title: str, run: RunInfo, body: Sequence[str], targets: Sequence[Target] = (),
                  notes: Sequence[str] = ()) -> None:
    """A markdown summary of one run: title, run metadata, the benchmark's own sections, targets, notes."""
    lines = [f"# {title}: {run.device}", "", run.describe(), "", *body]
    if targets:
        lines += ["## Targets (informational)", ""]
        lines += markdown_table(["target", "measured", "verdict"], [(t.name, t.measured, t.verdict) for t in targets])
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def plot_quietly(csv_path: Path, notes: list[str]) -> None:
    """Draw the PNG beside a results CSV; a missing matplotlib or a plotting error becomes a note, since the
    measurements are already saved."""
    try:
        from .plots import plot_csv

        print(f"plot: {plot_csv(csv_path)}")
    except Exception as exc:  # noqa: BLE001 - a plot must never cost the run's results
        notes.append(f"no plot ({type(exc).__name__}: {exc})")
        print(f"note: {notes[-1]}")


# ----------------------------------------------------------------------------------------- environment
def cuda_unavailable_reason(triton: bool = False, engine: bool = False) -> "str | None":
    """Why a CUDA benchmark cannot run here (None if it can): no CUDA device; with ``triton``, Triton missing
    or in interpreter mode; with ``engine``, a host-only build of the native extension."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    if triton:
        if package_version("triton") == "none":
            return "triton is not installed"
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return "TRITON_INTERPRET is set (the interpreter cannot be benchmarked)"
    if engine:
        try:
            from offload_kernels._native import native_module

            if not native_module().BUILT_WITH_CUDA:
                return "offload_kernels._C was built host-only (rebuild it with nvcc available)"
        except ImportError as exc:
            return str(exc)
    return None


def parse_list(text: str, kind: Callable[[str], Any] = str) -> list[Any]:
    """"a, b,c" -> [kind("a"), kind("b"), kind("c")] (empty items dropped)."""
    return [kind(item.strip()) for item in text.split(",") if item.strip()]


def median_of(values: Iterable[float]) -> float:
    return float(statistics.median(values))
