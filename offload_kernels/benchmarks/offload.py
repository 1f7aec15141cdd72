"""End-to-end benchmark of ``offload(model)`` (issue 5): tokens/s of a Llama-3-8B-shaped model whose q4_k
weights are 100%, 50% and 20% resident on the GPU, the rest streamed from pinned host memory.

Model: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads (Llama-3-8B) with random weights
built directly on the GPU in fp16. The vocabulary is reduced to 32000 (Llama 3 has 128256; ``--vocab``):
embeddings and lm_head stay fp16 and resident in every placement (offload() skips lm_head), so this trims
the same work from every placement and saves ~1.6 GB and the time to initialize it.

Placements (providers), each timed at T tokens per forward, T = 1, 2, 4, ..., 4096, as one sequence of T
tokens (layout ``prefill``: input (1, T), use_cache=False) and, for T <= --batch-max, as T sequences of one
token (layout ``batch``: input (T, 1)):

* ``dense_fp16``: the fp16 model fully resident (cuBLAS), when it fits;
* ``q4_k_100pct``, ``q4_k_50pct``, ``q4_k_20pct``: ``offload(model, "q4_k", gpu_budget=B)`` where B =
  non-quantized parameters + staging slots + that fraction of the quantized bytes (the planner's own
  accounting; the fraction it actually kept is reported);
* ``accelerate_cpu_offload``: Hugging Face accelerate's ``cpu_offload`` on the same fp16 model (weights in
  CPU RAM, copied per module every forward), at --accelerate-tokens only: it is slow;
* the link-bound ideal of each streamed placement: max(streamed bytes / pinned link bandwidth, time of
  the fully resident q4_k model at the same T). Every layer computes in every placement, so the resident
  compute term is the *whole* resident model's measured time (not scaled by the resident fraction: that
  would leave out the streamed layers' compute, and no placement could reach it at large T); with
  copies perfectly overlapping compute, the slower of the two sets the time.

Streamed placements also report the engine's achieved link GB/s (bytes_copied / copy_time_s) against the
pinned link bandwidth measured in the same run, the fraction of the time the link was busy, bytes over
the link per forward, the streamer's mispredictions, and the planner's predicted tokens/s.

Timing: forwards run back to back with no synchronization between them (as successive forwards of a
generation would); CUDA events between consecutive forwards give the samples; median/p20/p80 of --reps
after --warmup forwards (the first forward of each shape autotunes the kernels and teaches the streamer its
order; --no-autotune keeps the heuristic configs). Run order, so that a time budget (--time-budget-s) cuts
the least telling part: dense, 100% (its warm-ups autotune the kernels the others reuse), the most streamed
placement, accelerate, the other placements. Each is built fresh and freed before the next (peak GPU memory:
the fp16 model plus its quantized copy). Targets (printed, never asserted): >= 0.9x the ideal at every point;
>= 10x accelerate at T = 1; at T >= 2048, streamed placements >= 0.8x the fully resident q4_k model. Writes
``<results>/<gpu-slug>/offload.{csv,md,png}``. Without CUDA it says so and exits 0 (``--device cpu --shape
tiny`` runs the same code on the CPU path, to check the benchmark itself).

    offload-kernels bench offload                         # everything (~5-8 minutes on an H100)
    offload-kernels bench offload --quick                 # 8 layers, 4 token counts
    offload-kernels bench offload --fractions 0.2 --tokens 1,2048 --skip-accelerate
"""

from __future__ import annotations

import argparse
import gc
import inspect
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..units import human_bytes
from .results import (Deadline, Recorder, RunInfo, Stats, Target, add_output_argument,
                      cuda_unavailable_reason, markdown_table, parse_list, plot_quietly, print_targets, results_dir,
                      time_back_to_back, write_summary)

DEFAULT_TOKENS = tuple(2**i for i in range(13))            # 1 .. 4096
QUICK = {"layers": 8, "tokens": (1, 16, 256, 2048), "batch_max": 16, "reps": 3, "accelerate_tokens": (1,)}
ACCELERATE = "accelerate_cpu_offload"

TARGET_IDEAL = 0.9            # measured / link-bound ideal tokens/s, every streamed point
TARGET_VS_ACCELERATE = 10.0   # streamed placements vs accelerate's cpu_offload at T = 1
TARGET_LARGE_T = 2048         # at T >= this ...
TARGET_VS_RESIDENT = 0.8      # ... streamed placements vs the fully resident q4_k model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from offload_kernels.model.shapes import PRESETS

    parser.add_argument("--shape", default="llama-3-8b", choices=[*PRESETS, *SMOKE_SHAPES],
                        help="model shape (tiny, tiny-moe: 256-wide smoke-test models, dense and MoE)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's; 32)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (0: the shape's own)")
    parser.add_argument("--qtype", default="q4_k")
    parser.add_argument("--tokens", default=None, help="tokens per forward (default 1,2,4,...,4096)")
    parser.add_argument("--batch-max", type=int, default=None,
                        help="also time B sequences x 1 token for B <= this (default 64)")
    parser.add_argument("--fractions", default="1,0.5,0.2", help="resident fractions of the quantized bytes")
    parser.add_argument("--num-slots", type=int, default=2, help="staging slots of the transfer engine")
    parser.add_argument("--experts-on-demand", action="store_true",
                        help="MoE shapes: also run each streamed placement with experts='on_demand' (the chosen "
                             "experts copied through an expert cache) at the same budget")
    parser.add_argument("--expert-prefetch", action="store_true",
                        help="with --experts-on-demand: also run those placements with expert_prefetch=True "
                             "(each layer copies the experts the next one's router guesses)")
    parser.add_argument("--reps", type=int, default=None, help="timed forwards per point (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per point")
    parser.add_argument("--accelerate-tokens", default=None, help="token counts timed with accelerate (default 1,256)")
    parser.add_argument("--skip-accelerate", action="store_true", help="no accelerate cpu_offload baseline")
    parser.add_argument("--skip-fp16", action="store_true", help="no dense fp16 baseline")
    parser.add_argument("--no-autotune", action="store_true",
                        help="heuristic kernel configs (no per-shape tuning during the first forwards)")
    parser.add_argument("--quick", action="store_true",
                        help="8 layers, T in 1,16,256,2048, batch up to 16, 3 reps, accelerate at T=1 only")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu runs the CPU path (host engine, torch kernels) to check the benchmark itself")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="stop starting new measurements after this many seconds (results are still written)")
    add_output_argument(parser)


# ----------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Point:
    layout: str   # "prefill": one sequence of `tokens` tokens; "batch": `tokens` sequences of one token
    tokens: int

    @property
    def input_shape(self) -> tuple[int, int]:
        return (1, self.tokens) if self.layout == "prefill" else (self.tokens, 1)


def points_for(tokens: list[int], batch_max: int) -> list[Point]:
    return [Point("prefill", t) for t in tokens] + [Point("batch", t) for t in tokens if 1 < t <= batch_max]


def _smoke_shapes():
    from offload_kernels.model.shapes import LlamaShape

    return {"tiny": LlamaShape(256, 512, 4, 4, 2, 320),
            "tiny-moe": LlamaShape(256, 512, 4, 4, 2, 320, experts=4, experts_per_token=2, expert_intermediate=256,
                                   arch="qwen3_moe")}


SMOKE_SHAPES = ("tiny", "tiny-moe")


def shape_of(name: str):
    """A preset shape, or one of the smoke-test shapes."""
    from offload_kernels.model.shapes import PRESETS

    return _smoke_shapes()[name] if name in SMOKE_SHAPES else PRESETS[name]


def llama_config(args: argparse.Namespace, layers: int, max_tokens: int):
    """The transformers config of the shape: a LlamaConfig, or for a MoE shape its own family's (Mixtral,
    Qwen3-MoE: every block a router and experts)."""
    from offload_kernels.model.shapes import transformers_config

    return transformers_config(shape_of(args.shape), layers, args.vocab or None, max(8192, max_tokens))


def build_model(config, device, dtype, seed: int):
    """The config's causal LM with random N(0, 0.02) matrices (linears, embeddings, routers, expert stacks),
    created directly on ``device`` in ``dtype`` (no slow CPU initialization of billions of fp32 parameters)."""
    import torch
    import transformers

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)     # same weights in every build
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:                                # norms keep their ones
                param.normal_(0.0, 0.02, generator=gen)
    return model


def count_params(config) -> int:
    import torch
    import transformers

    with torch.device("meta"):
        return sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())


def budget_for(model, fraction: float, qtype: str, num_slots: int, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """gpu_budget keeping ``fraction`` of the quantized bytes resident, by offload()'s own accounting
    (select_linears: every non-quantized parameter and buffer stays; blocks are the streaming units)."""
    from offload_kernels.model.offload import select_linears
    from offload_kernels.model.planner import budget_for_resident_fraction

    sel = select_linears(model, qtype, skip)
    return budget_for_resident_fraction(sel.specs, sel.fixed_bytes, fraction, num_slots)


def free_memory(device) -> None:
    """Collect the dropped model and give its cached device memory back. Never raises: after a failed step the
    CUDA context may be broken, and the results measured so far must still be written."""
    import torch

    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except RuntimeError as exc:
            print(f"warning: could not free device memory ({exc})", flush=True)


# ----------------------------------------------------------------------------------------- the run
@dataclass
class Placement:
    """One offloaded placement as offload() planned it."""

    provider: str
    target: float
    resident_fraction: float
    resident_bytes: int
    streamed_bytes: int
    offload_s: float
    peak_gpu_bytes: int = 0
    predicted: dict[int, float] = field(default_factory=dict)   # prefill T -> planner tokens/s


@dataclass
class Measurement:
    time: Stats                             # ms per forward
    warmup_s: float                         # the untimed forwards (the first one per shape autotunes)
    link: "dict[str, float] | None" = None  # engine statistics over the timed forwards (streamed only)
    experts: "dict[str, float] | None" = None   # expert cache statistics (experts on demand only)


class OffloadBench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.cuda = args.device == "cuda"
        # an explicit index: accelerate, the engine and measure_hardware's cache all see the same device
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.dtype = torch.float16 if self.cuda else torch.float32     # CPU matmuls are fp32
        q = args.quick
        self.layers = args.layers or (QUICK["layers"] if q else None)
        self.tokens = parse_list(args.tokens, int) if args.tokens else list(QUICK["tokens"] if q else DEFAULT_TOKENS)
        batch_max = args.batch_max if args.batch_max is not None else (QUICK["batch_max"] if q else 64)
        self.points = points_for(self.tokens, batch_max)
        self.reps = args.reps or (QUICK["reps"] if q else 5)
        self.accelerate_tokens = (parse_list(args.accelerate_tokens, int) if args.accelerate_tokens
                                  else list(QUICK["accelerate_tokens"] if q else (1, 256)))
        fractions = set(parse_list(args.fractions, float))
        self.fractions = sorted(fractions, key=lambda f: (f < 1, f))     # 100% first, then the most streamed
        self.dtype_name = str(self.dtype).replace("torch.", "")
        self.dense = f"dense_{self.dtype_name.replace('float', 'fp')}"
        self.resident = f"{args.qtype}_100pct"
        self.run = RunInfo.collect(self.device)
        self.rec = Recorder(self.run)
        self.deadline = Deadline(args.time_budget_s)
        self.notes: list[str] = []
        self.times: dict[str, dict[Point, Measurement]] = defaultdict(dict)
        self.placements: dict[str, Placement] = {}
        self.gen = torch.Generator().manual_seed(args.seed)
        self.link_bps = 0.0
        self.config = None
        self.forward_kwargs: dict[str, Any] = {}

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from offload_kernels.model import measure_hardware
        from offload_kernels.model.shapes import PRESETS

        default_layers = shape_of(self.args.shape).layers
        self.layers = self.layers or default_layers
        self.config = llama_config(self.args, self.layers, max(self.tokens))
        if self.args.shape not in SMOKE_SHAPES and self.config.vocab_size != PRESETS[self.args.shape].vocab:
            self.note(f"vocabulary reduced from {PRESETS[self.args.shape].vocab} to {self.config.vocab_size} "
                      "(embeddings and lm_head are fp16 and resident in every placement)")
        if self.layers != default_layers:
            self.note(f"{self.layers} decoder layers instead of the shape's {default_layers}")
        hw = measure_hardware(self.device)
        self.link_bps = hw.link_bytes_per_s
        for kernel, value, unit in (("link_bandwidth", hw.link_bytes_per_s / 1e9, "GB/s"),
                                    ("memory_bandwidth", hw.hbm_bytes_per_s / 1e9, "GB/s"),
                                    ("matmul_tflops", hw.matmul_flops / 1e12, "TFLOP/s")):
            self.rec.add(kernel, "measure_hardware", 0, Stats.exact(value), unit)
        print(f"measured: pinned link {hw.link_bytes_per_s / 1e9:.1f} GB/s, memory {hw.hbm_bytes_per_s / 1e9:.0f} "
              f"GB/s, matmul {hw.matmul_flops / 1e12:.0f} TFLOP/s", flush=True)

    def build_device(self):
        """The device models are built on: the GPU when the full-precision model fits there with headroom."""
        import torch

        if not self.cuda:
            return self.device
        need = count_params(self.config) * torch.finfo(self.dtype).bits // 8
        free, _ = torch.cuda.mem_get_info(self.device)
        if need * 1.2 + (4 << 30) < free:
            return self.device
        self.note(f"the {need / 2**30:.1f} GiB {self.dtype_name} model does not fit in {free / 2**30:.1f} GiB free: "
                  "built on the CPU (slow), no dense baseline and no accelerate baseline")
        return torch.device("cpu")

    def extra(self, point: Point, provider: str) -> dict[str, Any]:
        p = self.placements.get(provider)
        fraction = p.resident_fraction if p else (1.0 if provider == self.dense else 0.0)
        return {"layout": point.layout, "resident_fraction": round(fraction, 4), "qtype": self.args.qtype,
                "layers": self.layers, "vocab": self.config.vocab_size}

    # ------------------------------------------------------------------ timing
    def config_is_moe(self) -> bool:
        return shape_of(self.args.shape).experts > 0

    def time_point(self, model, point: Point, streamer=None, reps: "int | None" = None,
                   warmup: "int | None" = None, cache=None) -> Measurement:
        import torch

        ids = torch.randint(0, self.config.vocab_size, point.input_shape, generator=self.gen).to(self.device)

        def forward():
            return model(input_ids=ids, use_cache=False, **self.forward_kwargs)

        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(self.args.warmup if warmup is None else warmup):
                forward()
            if self.cuda:
                torch.cuda.synchronize()
            warmup_s = time.perf_counter() - t0
            if cache is not None:
                cache.reset_stats()
            if streamer is None:
                stats = time_back_to_back(forward, reps or self.reps, 0, self.device)
                return Measurement(stats, warmup_s, experts=self._expert_stats(cache, reps or self.reps))
            streamer.engine.synchronize()
            streamer.engine.reset_stats()
            missed = streamer.mispredictions
            stats = time_back_to_back(forward, reps or self.reps, 0, self.device)
            streamer.engine.synchronize()
            s = streamer.engine.stats()
        n = reps or self.reps
        link = {"bytes_per_forward": s["bytes_copied"] / n, "gbs": s["bytes_copied"] / s["copy_time_s"] / 1e9
                if s["copy_time_s"] > 0 else float("nan"),
                "busy": s["copy_time_s"] / (n * stats.median * 1e-3), "hits": s["hits"] / n,
                "mispredictions": float(streamer.mispredictions - missed)}
        return Measurement(stats, warmup_s, link, self._expert_stats(cache, n))

    @staticmethod
    def _expert_stats(cache, n: int) -> "dict[str, float] | None":
        """Per forward of the timed ones: bytes the expert cache copied, its hits and misses."""
        if cache is None:
            return None
        s = cache.stats()
        return {"expert_bytes_per_forward": s["bytes_copied"] / n, "expert_hits_per_forward": s["hits"] / n,
                "expert_misses_per_forward": s["misses"] / n}

    def measure(self, provider: str, model, points: list[Point], streamer=None, cache=None, **kw) -> None:
        for point in points:
            if self.deadline.expired():
                self.note(f"time budget reached: {provider} at {point.layout} T >= {point.tokens} not measured")
                return
            m = self.times[provider][point] = self.time_point(model, point, streamer, cache=cache, **kw)
            tps = m.time.reciprocal(point.tokens * 1e3)
            extra = self.extra(point, provider)
            self.rec.add("forward_time", provider, point.tokens, m.time, "ms", **extra)
            self.rec.add("tokens_per_s", provider, point.tokens, tps, "tokens/s", **extra)
            self.rec.add("warmup_seconds", provider, point.tokens, Stats.exact(m.warmup_s), "s", **extra)
            line = (f"  {provider:>22} {point.layout:>7} T={point.tokens:4d}: {m.time.median:9.2f} ms "
                    f"{tps.median:9.1f} tok/s (warm-up {m.warmup_s:5.1f} s)")
            if m.link:
                frac = m.link["gbs"] * 1e9 / self.link_bps
                for kernel, value, unit in (("link_gbs", m.link["gbs"], "GB/s"),
                                            ("link_fraction", frac, "fraction of pinned link"),
                                            ("link_busy_fraction", m.link["busy"], "fraction of forward time"),
                                            ("link_bytes_per_forward", m.link["bytes_per_forward"], "bytes"),
                                            ("slot_hits_per_forward", m.link["hits"], "count"),
                                            ("mispredictions", m.link["mispredictions"], "count")):
                    self.rec.add(kernel, provider, point.tokens, Stats.exact(value), unit, **extra)
                line += (f"  link {m.link['gbs']:5.1f} GB/s ({frac:.2f} of pinned, busy {m.link['busy']:.2f}), "
                         f"{m.link['bytes_per_forward'] / 1e6:.0f} MB/forward, "
                         f"{m.link['mispredictions']:.0f} mispredicted")
            if m.experts:
                for kernel, value in m.experts.items():
                    self.rec.add(kernel, provider, point.tokens, Stats.exact(value),
                                 "bytes" if kernel.endswith("bytes_per_forward") else "count", **extra)
                line += (f"  experts: {m.experts['expert_bytes_per_forward'] / 1e6:.0f} MB/forward copied, "
                         f"{m.experts['expert_hits_per_forward']:.0f} hits / "
                         f"{m.experts['expert_misses_per_forward']:.0f} misses per forward")
            print(line, flush=True)

    # ------------------------------------------------------------------ providers
    def fresh_model(self, device):
        """A newly built full-precision model (same weights every time) on ``device``."""
        if self.deadline.expired():
            return None
        model = build_model(self.config, device, self.dtype, self.args.seed)
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            self.forward_kwargs = {"logits_to_keep": 1}   # prefill needs the last position's logits only
        return model

    def run_dense(self) -> None:
        model = self.fresh_model(self.device)
        if model is None:
            return self.note("time budget reached before the dense baseline")
        try:
            print(f"\n{self.dense}: fully resident {self.dtype_name} model", flush=True)
            self.measure(self.dense, model, self.points)
        finally:
            del model
            free_memory(self.device)

    def run_accelerate(self) -> None:
        try:
            from accelerate import cpu_offload
        except ImportError as exc:
            return self.note(f"accelerate is not installed ({exc}): no cpu_offload baseline")
        model = self.fresh_model(self.device)
        if model is None:
            return self.note("time budget reached before the accelerate baseline")
        try:
            print(f"\n{ACCELERATE}: {self.dtype_name} weights in CPU RAM, moved per module each forward", flush=True)
            cpu_offload(model, execution_device=self.device)   # copies the weights to the host, frees the GPU's
            free_memory(self.device)
            self.measure(ACCELERATE, model, [Point("prefill", t) for t in self.accelerate_tokens], reps=2, warmup=1)
        finally:
            del model
            free_memory(self.device)

    def run_placement(self, fraction: float, build_device, experts: str = "with_block",
                      prefetch: bool = False) -> None:
        import torch

        from offload_kernels import offload
        from offload_kernels.model import streamer_of
        from offload_kernels.model.offload import expert_cache_of

        provider = (f"{self.args.qtype}_{round(fraction * 100)}pct" + ("_on_demand" if experts == "on_demand" else "")
                    + ("_prefetch" if prefetch else ""))
        model = self.fresh_model(build_device)
        if model is None:
            return self.note(f"time budget reached before {provider}")
        try:
            budget = None if fraction >= 1 else budget_for(model, fraction, self.args.qtype, self.args.num_slots)
            t0 = time.perf_counter()
            report = offload(model, self.args.qtype, gpu_budget=budget, device=self.device,
                             num_slots=self.args.num_slots, progress=False, measure=True, experts=experts,
                             expert_prefetch=prefetch,
                             token_counts=[p.tokens for p in self.points if p.layout == "prefill"])
            free_memory(self.device)
            p = self.placements[provider] = Placement(
                provider, fraction, report.placement.resident_fraction, report.bytes_resident,
                report.bytes_streamed_per_forward, time.perf_counter() - t0,
                predicted={pr.tokens: pr.tokens_per_s for pr in report.predictions})
            print(f"\n{provider}: offload() took {p.offload_s:.1f} s (quantize + place); target {fraction:.0%} "
                  f"resident, planned {p.resident_fraction:.1%}\n{report}", flush=True)
            if self.cuda:       # the peak of running the offloaded model, not of building the dense one
                torch.cuda.reset_peak_memory_stats(self.device)
            self.measure(provider, model, self.points, streamer_of(model), cache=expert_cache_of(model))
            if self.cuda:
                p.peak_gpu_bytes = torch.cuda.max_memory_allocated(self.device)
        finally:
            streamer, cache = streamer_of(model), expert_cache_of(model)
            if streamer is not None:
                streamer.engine.close()      # frees slots and pinned storage now, not at garbage collection
            if cache is not None:
                cache.close()
            del model, streamer, cache
            free_memory(self.device)

    def run_all(self) -> None:
        self.setup()
        build_device = self.build_device()
        gpu_built = build_device == self.device
        placements = [lambda f=f: self.run_placement(f, build_device) for f in self.fractions]
        if self.args.experts_on_demand and self.config_is_moe():
            placements += [lambda f=f: self.run_placement(f, build_device, "on_demand")
                           for f in self.fractions if f < 1]
            if self.args.expert_prefetch:
                placements += [lambda f=f: self.run_placement(f, build_device, "on_demand", prefetch=True)
                               for f in self.fractions if f < 1]
        # Most telling first, should the time budget run out: the dense baseline, the fully resident placement
        # (whose warm-ups autotune the kernels for the others), the most streamed one, accelerate, the rest.
        steps = [self.run_dense] if gpu_built and not self.args.skip_fp16 else []
        steps += placements[:2]
        steps += [self.run_accelerate] if gpu_built and self.cuda and not self.args.skip_accelerate else []
        steps += placements[2:]
        for step in steps:
            try:
                step()
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one failing placement must not cost the others' results
                traceback.print_exc()
                first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
                self.note(f"a step failed ({type(exc).__name__}: {first_line}); its results are missing")
                free_memory(self.device)

    # ------------------------------------------------------------------ derived figures
    def ideal_ms(self, provider: str, point: Point, overlap: bool = True) -> "float | None":
        """The link-bound ideal forward time of a streamed placement.

        With R the fully resident model's time and f the resident fraction:
        overlap=True (the stricter, primary one): copies overlap all compute, so max(link, R).
        overlap=False (the issue's "streamed bytes / link + resident compute", with the streamed layers'
        own compute hidden under their copies where it fits): max(link, (1 - f) R) + f R. When the link
        dominates, this is exactly link + resident compute.
        """
        p = self.placements.get(provider)
        if p is None or p.streamed_bytes == 0:
            return None
        link_ms = p.streamed_bytes / self.link_bps * 1e3
        resident = self.times.get(self.resident, {}).get(point)
        if resident is None:
            return link_ms
        if overlap:
            return max(link_ms, resident.time.median)
        streamed_compute = (1 - p.resident_fraction) * resident.time.median
        return max(link_ms, streamed_compute) + p.resident_fraction * resident.time.median

    def derive(self) -> None:
        """Ratios to the baselines timed in this run, the ideal, and the planner's predictions."""
        if not self.times.get(self.resident) and any(p.streamed_bytes for p in self.placements.values()):
            self.note("no fully resident q4_k run: the ideal is the link time alone (no compute term)")
        baselines = (("ratio_to_resident", self.resident), ("speedup_vs_dense", self.dense),
                     ("speedup_vs_accelerate", ACCELERATE))
        for provider, by_point in self.times.items():
            for point, m in by_point.items():
                extra = self.extra(point, provider)
                for kernel, base in baselines:
                    ref = self.times.get(base, {}).get(point)
                    if ref is not None and base != provider:
                        self.rec.add(kernel, provider, point.tokens, m.time.reciprocal(ref.time.median), "x", **extra)
                ideal = self.ideal_ms(provider, point)
                if ideal is not None:
                    tps = point.tokens * 1e3 / ideal
                    self.rec.add("ideal_tokens_per_s", provider, point.tokens, Stats.exact(tps), "tokens/s", **extra)
                    self.rec.add("ratio_to_ideal", provider, point.tokens, m.time.reciprocal(ideal), "x", **extra)
                    serial = self.ideal_ms(provider, point, overlap=False)
                    self.rec.add("ratio_to_link_plus_resident", provider, point.tokens, m.time.reciprocal(serial), "x",
                                 **extra)
                placement = self.placements.get(provider)
                predicted = placement.predicted.get(point.tokens) if placement else None
                if predicted and point.layout == "prefill":
                    self.rec.add("predicted_tokens_per_s", provider, point.tokens, Stats.exact(predicted), "tokens/s",
                                 **extra)
        for p in self.placements.values():
            extra = {"resident_fraction": round(p.resident_fraction, 4), "qtype": self.args.qtype,
                     "layers": self.layers}
            for kernel, value, unit in (("offload_seconds", p.offload_s, "s"),
                                        ("streamed_bytes", p.streamed_bytes, "bytes"),
                                        ("resident_bytes", p.resident_bytes, "bytes"),
                                        ("peak_gpu_memory", p.peak_gpu_bytes / 2**30, "GiB")):
                self.rec.add(kernel, p.provider, 0, Stats.exact(value), unit, **extra)

    def streamed(self) -> list[str]:
        return [name for name, p in self.placements.items() if p.streamed_bytes and name in self.times]

    def targets(self) -> list[Target]:
        out = []
        ratios = [(self.ideal_ms(name, pt) / m.time.median, name, pt)
                  for name in self.streamed() for pt, m in self.times[name].items()]
        if ratios:
            worst = min(ratios, key=lambda r: r[0])
            out.append(Target(f">= {TARGET_IDEAL}x the link-bound ideal max(link, resident model) at every point "
                              f"(worst)", f"{worst[0]:.2f}x ({worst[1]}, {worst[2].layout} T={worst[2].tokens})",
                              worst[0] >= TARGET_IDEAL))
            serial = [(self.ideal_ms(name, pt, overlap=False) / m.time.median, name, pt)
                      for name in self.streamed() for pt, m in self.times[name].items()]
            worst = min(serial, key=lambda r: r[0])
            out.append(Target(f">= {TARGET_IDEAL}x the issue's ideal, link + resident compute, at every point (worst)",
                              f"{worst[0]:.2f}x ({worst[1]}, {worst[2].layout} T={worst[2].tokens})",
                              worst[0] >= TARGET_IDEAL))
        one = Point("prefill", 1)
        acc = self.times.get(ACCELERATE, {}).get(one)
        vs_acc = [(acc.time.median / self.times[n][one].time.median, n) for n in self.streamed()
                  if acc and one in self.times[n]]
        if vs_acc:
            worst = min(vs_acc)
            out.append(Target(f">= {TARGET_VS_ACCELERATE:g}x accelerate cpu_offload at T=1 (worst placement)",
                              f"{worst[0]:.1f}x ({worst[1]})", worst[0] >= TARGET_VS_ACCELERATE))
        res = self.times.get(self.resident, {})
        large = [(res[pt].time.median / m.time.median, n, pt) for n in self.streamed()
                 for pt, m in self.times[n].items() if pt.tokens >= TARGET_LARGE_T and pt in res]
        if large:
            worst = min(large, key=lambda r: r[0])
            out.append(Target(f"T >= {TARGET_LARGE_T}: offloaded >= {TARGET_VS_RESIDENT}x fully resident (worst)",
                              f"{worst[0]:.2f}x ({worst[1]}, T={worst[2].tokens})", worst[0] >= TARGET_VS_RESIDENT))
        return out

    # ------------------------------------------------------------------ report
    def tokens_table(self, layout: str) -> tuple[list[str], list[list[str]]]:
        providers = [p for p in self.times if any(pt.layout == layout for pt in self.times[p])]
        ideals = [p for p in self.streamed() if p in providers]
        head = ["T", *providers, *(f"{p} ideal" for p in ideals)]
        rows = []
        for t in sorted({pt.tokens for p in providers for pt in self.times[p] if pt.layout == layout}):
            pt = Point(layout, t)
            cells = [f"{t * 1e3 / self.times[p][pt].time.median:.1f}" if pt in self.times[p] else "-"
                     for p in providers]
            cells += [f"{t * 1e3 / self.ideal_ms(p, pt):.1f}" for p in ideals]
            rows.append([t, *cells])
        return head, rows

    def summary_body(self) -> list[str]:
        a, dtype = self.args, self.dtype_name
        body = [f"Llama-shaped model ({a.shape}): {self.layers} layers, hidden {self.config.hidden_size}, intermediate "
                f"{self.config.intermediate_size}, {self.config.num_attention_heads} heads / "
                f"{self.config.num_key_value_heads} KV heads, vocab {self.config.vocab_size}; {dtype} activations, "
                f"{a.qtype} linears (lm_head kept {dtype}), {a.num_slots} staging slots. Forwards back to back, "
                f"use_cache=False; median of {self.reps} after {a.warmup} warm-up forwards. Pinned link bandwidth "
                f"(measure_hardware, this run): {self.link_bps / 1e9:.1f} GB/s. Ideal = max(streamed bytes / link, "
                "fully resident q4_k time at the same T).", "", "## Placements", ""]
        body += markdown_table(
            ["provider", "target resident", "planned resident", "resident weights", "streamed / forward",
             "offload() s", "peak GPU memory"],
            [[p.provider, f"{p.target:.0%}", f"{p.resident_fraction:.1%}", human_bytes(p.resident_bytes),
              human_bytes(p.streamed_bytes), f"{p.offload_s:.1f}", human_bytes(p.peak_gpu_bytes) if self.cuda else "-"]
             for p in self.placements.values()])
        for layout, title in (("prefill", "one sequence of T tokens"), ("batch", "T sequences of one token")):
            head, rows = self.tokens_table(layout)
            if rows:
                body += [f"## Tokens/s, {layout} ({title})", ""] + markdown_table(head, rows)
        diag = []
        for name in self.streamed():
            for pt, m in self.times[name].items():
                ideal = self.ideal_ms(name, pt)
                res = self.times.get(self.resident, {}).get(pt)
                pred = self.placements[name].predicted.get(pt.tokens) if pt.layout == "prefill" else None
                diag.append([name, pt.layout, pt.tokens, f"{m.time.median:.2f}", f"{ideal / m.time.median:.2f}",
                             f"{res.time.median / m.time.median:.2f}" if res else "-", f"{m.link['gbs']:.1f}",
                             f"{m.link['gbs'] * 1e9 / self.link_bps:.2f}", f"{m.link['busy']:.2f}",
                             f"{m.link['bytes_per_forward'] / 1e6:.0f}", f"{m.link['mispredictions']:.0f}",
                             f"{pt.tokens * 1e3 / m.time.median / pred:.2f}" if pred else "-"])
        if diag:
            body += ["## Streaming", ""] + markdown_table(
                ["placement", "layout", "T", "ms", "vs ideal", "vs resident", "link GB/s", "of pinned link",
                 "link busy", "MB / forward", "mispredictions", "measured / planner"], diag)
        return body

    def write(self) -> None:
        # The Llama-3-8B run (issue 5's benchmark) and its smoke test are offload.*; other shapes get their own
        # files (offload_<shape>.*), so a MoE run neither mixes its rows in nor replaces the summary.
        name = "offload" if self.args.shape in ("llama-3-8b", "tiny") else f"offload_{self.args.shape}"
        out_dir = results_dir(self.args.out, self.run.slug)
        self.rec.write(out_dir / f"{name}.csv")
        targets = self.targets()
        print_targets(targets)
        for layout in ("prefill", "batch"):
            head, rows = self.tokens_table(layout)
            if rows:
                from offload_kernels.cli.table import format_table

                print(f"\ntokens/s, {layout}:\n{format_table(head, rows)}")
        plot_quietly(out_dir / f"{name}.csv", self.notes)
        write_summary(out_dir / f"{name}.md", f"offload() end to end ({self.args.shape})", self.run, self.summary_body(), targets,
                      self.notes)
        print(f"\nappended {len(self.rec.rows)} rows to {out_dir / f'{name}.csv'}; summary in {out_dir / f'{name}.md'}")


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda":
        reason = cuda_unavailable_reason(triton=True, engine=True)
        if reason is not None:
            print(f"bench offload: needs CUDA ({reason}); nothing measured. (--device cpu --shape tiny checks the "
                  "benchmark on the CPU path.)")
            return 0
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"bench offload: needs transformers ({exc}); nothing measured.")
        return 0
    if args.no_autotune and args.device == "cuda":
        from .kernels import set_autotune

        set_autotune(False)
    bench = OffloadBench(args)
    print(f"bench offload: {bench.run.describe()}", flush=True)
    try:
        bench.run_all()
    except KeyboardInterrupt:
        bench.note("interrupted: the results are partial")
    bench.derive()
    bench.write()
    return 0
