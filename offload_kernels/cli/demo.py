"""``offload-kernels demo``: the README's main job.

1. Formats: quantize a realistic weight to every GGUF format; bytes, bits per weight, speed, error.
2. Offload: build a Llama-architecture model with random weights sized for this machine, run it fully
   resident (quantized) and with part of its layers streamed through the transfer engine, and compare
   tokens/s, bytes over the link, achieved vs measured link bandwidth, and error against the
   unquantized model; then a short greedy generation with the streamed model.

3. Mixture of experts: a Qwen3-MoE-architecture model (many experts, a few per token), its blocks half
   streamed, run with the streamed blocks' experts streamed whole, copied on demand (only the chosen
   experts, through the expert cache), and copied on demand with speculative prefetch, at the same budget:
   tokens/s, bytes over the link per forward, cache hits, guesses used, error against the unquantized model.

Without a GPU every part runs the CPU path (torch kernels, the engine's host backend, where the "link"
is a host memcpy) and says so.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, replace

import torch

from ..model.bandwidth import median_seconds
from ..model.shapes import PRESETS, LlamaShape
from ..units import default_device
from .table import format_table, human_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--qtype", default="q4_k", help="format of the offloaded model's linears")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: sized for the machine)")
    parser.add_argument("--streamed", type=float, default=0.5, help="fraction of quantized bytes to stream")
    parser.add_argument("--skip-formats", action="store_true", help="skip part 1 (the formats table)")
    parser.add_argument("--format-rows", type=int, default=4096, help="rows of the weight in the formats table")
    parser.add_argument("--format-cols", type=int, default=4096, help="columns (a multiple of 256)")
    parser.add_argument("--skip-moe", action="store_true", help="skip part 3 (the mixture-of-experts model)")
    parser.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------------------------------- part 1
def realistic_weight(rows: int, cols: int, seed: int, device: torch.device) -> torch.Tensor:
    """A transformer-like weight: normal entries, per-row scales spread over a decade, rare outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w *= torch.exp(torch.empty(rows, 1).uniform_(-1.2, 1.2, generator=g))
    outliers = torch.rand(rows, cols, generator=g) < 1e-4
    w[outliers] *= 20
    return w.to(device)


def formats_report(rows: int, cols: int, seed: int, device: torch.device) -> str:
    from offload_kernels import QTYPES, dequantize, quantize

    w = realistic_weight(rows, cols, seed, device)
    fp16_bytes = w.numel() * 2
    table = []
    for qtype in QTYPES:
        t_q = median_seconds(lambda: quantize(w, qtype), device, repeats=1)
        qt = quantize(w, qtype)
        t_dq = median_seconds(lambda: dequantize(qt, torch.float16), device, repeats=3)
        w_hat = dequantize(qt)
        err = (w.double() - w_hat.double()).pow(2).sum()
        rel_rms = float((err / w.double().pow(2).sum()).sqrt())
        snr = float(10 * torch.log10(w.double().pow(2).sum() / err))
        table.append([qtype, human_bytes(qt.nbytes), qt.bits_per_weight, fp16_bytes / qt.nbytes,
                      t_q * 1e3, w.numel() / t_q / 1e6, t_dq * 1e3, w.numel() / t_dq / 1e6, rel_rms, snr])
    headers = ["qtype", "bytes", "bits/w", "x smaller than fp16", "quantize ms", "Mweights/s", "dequant ms",
               "Mweights/s", "rel RMS err", "SNR dB"]
    title = (f"Part 1 - GGUF formats on a {rows}x{cols} realistic weight ({device.type}; fp16 would be "
             f"{human_bytes(fp16_bytes)}). Quantized bytes are ggml's reference quantizers' bytes.")
    return title + "\n" + format_table(headers, table)


# ---------------------------------------------------------------------------------------------- part 2
@dataclass
class DemoSize:
    shape: LlamaShape
    tokens: tuple[int, ...]          # tokens per forward to time
    dtype: torch.dtype


def size_for(device: torch.device, layers: "int | None") -> DemoSize:
    """Llama-3-8B-shaped blocks on a GPU (as many as fit comfortably), a small model on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        block_fp16 = 2 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)
        fit = int(0.25 * free // block_fp16)          # fp16 original + quantized copies stay well inside
        shape = replace(PRESETS["llama-3-8b"], layers=layers or max(2, min(16, fit)), vocab=32000)
        return DemoSize(shape, (1, 16, 256, 2048), torch.float16)
    return DemoSize(LlamaShape(512, 1536, layers or 6, 8, 4, 2048), (1, 8, 64), torch.float32)


def build_model(size: DemoSize, device: torch.device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = size.shape
    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      max_position_embeddings=4096)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(size.dtype).eval()
    return model


def _budget_streaming(model, qtype: str, streamed: float) -> int:
    """The gpu_budget that streams about ``streamed`` of the quantized linear bytes through 2 slots."""
    from offload_kernels.model.offload import select_linears
    from offload_kernels.model.planner import budget_for_resident_fraction

    sel = select_linears(model, qtype)
    return budget_for_resident_fraction(sel.specs, sel.fixed_bytes, 1 - streamed, num_slots=2)


def offload_report(args: argparse.Namespace, device: torch.device) -> str:
    from offload_kernels import offload
    from offload_kernels.model import measure_hardware, streamer_of

    size = size_for(device, args.layers)
    hw = measure_hardware(device)
    original = build_model(size, device, args.seed)
    n_params = sum(p.numel() for p in original.parameters())
    ids = torch.randint(0, size.shape.vocab, (1, max(size.tokens)), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ref_logits = original(ids[:, :64]).logits.float()

    resident = copy.deepcopy(original)
    resident_report = offload(resident, args.qtype, device=device, progress=False, measure=False)
    if resident_report.placement.streamed_groups:       # the default budget (free memory) was too small
        raise SystemExit(f"the demo model does not fit in {device}'s free memory fully resident "
                         f"({human_bytes(resident_report.placement.resident_bytes)} resident, "
                         f"{human_bytes(resident_report.bytes_streamed_per_forward)} streamed); "
                         "try fewer --layers")
    streamed = copy.deepcopy(original)
    budget = _budget_streaming(original, args.qtype, args.streamed)
    report = offload(streamed, args.qtype, gpu_budget=budget, device=device, progress=False, measure=False)
    del original
    streamer = streamer_of(streamed)

    rows = []
    with torch.no_grad():
        for name, model in (("fully resident", resident), ("offloaded", streamed)):
            logits = model(ids[:, :64]).logits.float()
            rel = float((logits - ref_logits).norm() / ref_logits.norm())
            top1 = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
            for t in size.tokens:
                x = ids[:, :t]
                if streamer is not None and model is streamed:
                    streamer.engine.reset_stats()
                secs = median_seconds(lambda: model(x, use_cache=False), device, repeats=3)
                link_bytes = achieved = ""
                if model is streamed and streamer is not None:
                    streamer.engine.synchronize()   # the copies queued for the next pass report their time
                    st = streamer.stats()
                    per_forward = st["bytes_copied"] / 4          # warm-up + 3 timed forwards
                    link_bytes = human_bytes(per_forward)
                    if st["copy_time_s"] > 0:
                        achieved = f"{st['bytes_copied'] / st['copy_time_s'] / 1e9:.1f}"
                rows.append([name, t, secs * 1e3, t / secs, link_bytes, achieved, rel, f"{top1:.0%}"])
        prompt = ids[:, :8]
        gen_streamed = streamed.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                         do_sample=False, pad_token_id=0)
        gen_resident = resident.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                         do_sample=False, pad_token_id=0)
    where = "GPU" if device.type == "cuda" else "CPU (no GPU: torch kernels, host engine; link = host memcpy)"
    lines = [
        f"Part 2 - a Llama-architecture model with random weights on {where}: {size.shape.layers} layers, "
        f"hidden {size.shape.hidden}, {n_params / 1e6:.0f}M parameters, {args.qtype}.",
        f"  offloaded: {human_bytes(report.bytes_resident)} resident, {human_bytes(report.bytes_streamed_per_forward)} "
        f"streamed per forward through {report.num_slots} slots of {human_bytes(report.placement.slot_bytes)} "
        f"({report.placement.resident_fraction:.0%} of quantized weights resident)",
        f"  measured link {hw.link_bytes_per_s / 1e9:.1f} GB/s, memory {hw.hbm_bytes_per_s / 1e9:.0f} GB/s",
        format_table(["model", "tokens/forward", "ms/forward", "tokens/s", "link bytes/forward",
                      "achieved link GB/s", "logit rel err vs fp", "top-1 vs fp"], rows),
        f"  greedy generation, 16 tokens: offloaded == fully resident: {torch.equal(gen_streamed, gen_resident)}; "
        f"streamer mispredictions: {streamer.mispredictions if streamer else 0}"
        + ("" if device.type != "cuda" else " (on a GPU, split-K kernels add partial sums atomically in a varying "
           "order, so a near-tie between two tokens may break differently)"),
        "  (errors are against the same model unquantized; with random weights they compound over the layers "
        "more than in trained models: try --qtype q8_0 for the ~1% floor)",
    ]
    return "\n".join(lines)


def moe_size_for(device: torch.device, layers: "int | None") -> DemoSize:
    """Qwen3-30B-A3B-shaped blocks (128 experts, 8 per token) on a GPU, as many as fit comfortably; a small
    MoE (8 experts, 2 per token) on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        preset = PRESETS["qwen3-30b-a3b"]
        block_fp16 = 2 * (3 * preset.experts * preset.expert_intermediate * preset.hidden + 4 * 4096 * preset.hidden)
        fit = int(0.25 * free // block_fp16)
        return DemoSize(replace(preset, layers=layers or max(2, min(12, fit)), vocab=32000), (1, 16, 256, 2048),
                        torch.float16)
    return DemoSize(LlamaShape(512, 1536, layers or 8, 8, 4, 2048, experts=8, experts_per_token=2,
                               expert_intermediate=512, arch="qwen3_moe"), (1, 8, 64), torch.float32)


def moe_report(args: argparse.Namespace, device: torch.device) -> str:
    from transformers import AutoModelForCausalLM

    from offload_kernels import offload
    from offload_kernels.model import streamer_of
    from offload_kernels.model.offload import expert_cache_of
    from offload_kernels.model.shapes import transformers_config

    size = moe_size_for(device, args.layers)
    s = size.shape
    torch.manual_seed(args.seed)
    with torch.device(device):
        original = AutoModelForCausalLM.from_config(transformers_config(s, max_positions=4096)).to(size.dtype).eval()
    n_params = sum(p.numel() for p in original.parameters())
    ids = torch.randint(0, s.vocab, (1, max(size.tokens)), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        ref_logits = original(ids[:, :64]).logits.float()
    budget = _budget_streaming(original, args.qtype, args.streamed)
    rows, notes = [], []
    for mode, prefetch in (("with_block", False), ("on_demand", False), ("on_demand", True)):
        model = copy.deepcopy(original)
        report = offload(model, args.qtype, gpu_budget=budget, device=device, progress=False, measure=False,
                         experts=mode, expert_prefetch=prefetch)
        label = mode + ("+prefetch" if prefetch else "")
        streamer, cache = streamer_of(model), expert_cache_of(model)
        p = report.placement
        notes.append(f"  experts {label}: {p.resident_fraction:.0%} of quantized weights resident, "
                     f"{human_bytes(p.streamed_bytes)} streamed whole per forward"
                     + (f", {human_bytes(p.on_demand_bytes)} of experts on demand through a cache of "
                        f"{p.expert_cache_slots} of their {p.expert_count} experts" if p.on_demand else ""))
        with torch.no_grad():
            logits = model(ids[:, :64]).logits.float()
            rel = float((logits - ref_logits).norm() / ref_logits.norm())
            for t in size.tokens:
                x = ids[:, :t]
                for counters in (streamer.engine if streamer else None, cache):
                    if counters is not None:
                        counters.reset_stats()
                secs = median_seconds(lambda: model(x, use_cache=False), device, repeats=3)
                if streamer is not None:
                    streamer.engine.synchronize()
                copied = (streamer.stats()["bytes_copied"] if streamer else 0) + \
                    (cache.stats()["bytes_copied"] if cache else 0)
                stats = cache.stats() if cache else {}
                hits = f"{stats['hits'] / 4:.0f} / {stats['misses'] / 4:.0f}" if cache else ""
                guesses = f"{stats['prefetch_hits'] / 4:.0f} of {stats['prefetched'] / 4:.0f}" if prefetch and cache else ""
                rows.append([label, t, secs * 1e3, t / secs, human_bytes(copied / 4), hits, guesses, rel])
        if streamer is not None:
            streamer.close()
        if cache is not None:
            cache.close()
        del model
    where = "GPU" if device.type == "cuda" else "CPU"
    return "\n".join([
        f"Part 3 - a mixture-of-experts model (Qwen3-MoE architecture, random weights) on {where}: {s.layers} layers, "
        f"{s.experts} experts of width {s.expert_intermediate}, {s.experts_per_token} per token, "
        f"{n_params / 1e6:.0f}M parameters, {args.qtype}, the same budget for all three:",
        *notes,
        format_table(["experts", "tokens/forward", "ms/forward", "tokens/s", "link bytes/forward",
                      "cache hits / misses per forward", "prefetches used per forward", "logit rel err vs fp"],
                     rows),
        "  (+prefetch: each MoE layer copies the experts the next layer's router picks for its own input; of those "
        "guesses, 'used' were chosen by the next layer. Random weights: a trained model's residual stream, and so "
        "its guesses, change less from layer to layer.)",
    ])


def run(args: argparse.Namespace) -> int:
    device = default_device(args.device)
    if args.format_cols % 256:
        raise SystemExit(f"--format-cols must be a multiple of 256 (the k-quant block), got {args.format_cols}")
    if not 0 < args.streamed < 1:
        raise SystemExit(f"--streamed must be between 0 and 1, got {args.streamed}")
    if device.type == "cpu":
        print("No CUDA device: running the CPU path (torch reference kernels, host transfer backend).\n")
    if not args.skip_formats:
        print(formats_report(args.format_rows, args.format_cols, args.seed, device), "\n", flush=True)
    print(offload_report(args, device))
    if not args.skip_moe:
        print("\n" + moe_report(args, device))
    return 0
