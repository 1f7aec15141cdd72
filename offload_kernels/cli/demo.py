"""``offload-kernels demo``: the README's main job.

Part 1 quantizes a realistic weight to every supported GGUF format and reports bytes, bits per weight,
quantize/dequantize speed and error.
"""

from __future__ import annotations

import argparse
import time

import torch

from .table import format_table, human_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=4096, help="weight rows (out_features) for the format table")
    parser.add_argument("--cols", type=int, default=4096, help="weight columns (in_features), a multiple of 256")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)


def realistic_weight(rows: int, cols: int, seed: int, device: torch.device) -> torch.Tensor:
    """A transformer-like weight: normal entries, per-row scales spread over a decade, rare outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w *= torch.exp(torch.empty(rows, 1).uniform_(-1.2, 1.2, generator=g))
    outliers = torch.rand(rows, cols, generator=g) < 1e-4
    w[outliers] *= 20
    return w.to(device)


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def formats_report(rows: int, cols: int, seed: int, device: torch.device) -> str:
    from offload_kernels import QTYPES, dequantize, quantize

    w = realistic_weight(rows, cols, seed, device)
    fp16_bytes = w.numel() * 2
    table = []
    for qtype in QTYPES:
        qt, t_q = _timed(lambda: quantize(w, qtype), device)
        w_hat, t_dq = _timed(lambda: dequantize(qt, torch.float16), device)
        err = (w.double() - w_hat.double()).pow(2).sum()
        rel_rms = float((err / w.double().pow(2).sum()).sqrt())
        snr = float(10 * torch.log10(w.double().pow(2).sum() / err))
        table.append([qtype, human_bytes(qt.nbytes), qt.bits_per_weight, fp16_bytes / qt.nbytes,
                      t_q * 1e3, w.numel() / t_q / 1e6, t_dq * 1e3, w.numel() / t_dq / 1e6, rel_rms, snr])
    headers = ["qtype", "bytes", "bits/w", "vs fp16", "quantize ms", "Mw/s", "dequant ms", "Mw/s",
               "rel RMS err", "SNR dB"]
    title = (f"GGUF formats on a {rows}x{cols} realistic weight ({device.type}, "
             f"fp16 would be {human_bytes(fp16_bytes)}):")
    return title + "\n" + format_table(headers, table)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cols % 256:
        raise SystemExit(f"--cols must be a multiple of 256 (the k-quant block), got {args.cols}")
    if device.type == "cpu":
        print("No CUDA device: running the CPU path (torch reference kernels).\n")
    print(formats_report(args.rows, args.cols, args.seed, device))
    return 0
