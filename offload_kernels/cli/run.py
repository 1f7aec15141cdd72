"""``offload-kernels run model.gguf --prompt ...``: generate text from a llama.cpp GGUF file.

Every linear keeps the file's quantized bytes; what does not fit in ``--gpu-budget`` streams from pinned
host memory. Prints the completion and tokens/s for the prompt (prefill) and for generation (decode).
"""

from __future__ import annotations

import argparse
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="path to a .gguf file (architecture llama, mistral, qwen2, qwen3, phi3, gemma2, "
                                      "gemma3, qwen2moe, qwen3moe, glm4moe, gpt-oss, deepseek2, or a Mixtral: llama "
                                      "with experts)")
    parser.add_argument("--tokenizer", default=None,
                        help="a transformers tokenizer (hub name or directory) to use instead of the file's own "
                             "(default: the one the file's metadata describes)")
    parser.add_argument("--prompt", default="Once upon a time", help="text to continue")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message through the tokenizer's chat template (the file's "
                             "tokenizer.chat_template) and print only the reply")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--gpu-budget", default=None, help="device bytes for weights + staging, e.g. 20GiB "
                                                           "(default on CUDA: the free device memory less 10%% "
                                                           "and 1 GiB for activations; on the CPU: no limit)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--slots", type=int, default=2, help="staging slots for streamed layers")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--experts", default="with_block", choices=["with_block", "on_demand"],
                        help="MoE files: stream the experts with their block, or copy only the chosen experts "
                             "through a device cache (on_demand)")
    parser.add_argument("--expert-cache-slots", type=int, default=None,
                        help="with --experts on_demand: the cache's size in experts (default: what the budget holds)")
    parser.add_argument("--expert-prefetch", action="store_true",
                        help="with --experts on_demand: guess each next MoE layer's experts with its router and "
                             "copy them ahead (speculative; a wrong guess costs link bytes, not results)")


def _load_tokenizer(name: "str | None", gguf_path: "str | None"):
    """The transformers tokenizer ``name`` (a hub name or directory), else the one in the GGUF file's metadata."""
    from offload_kernels.model.gguf_model import load_gguf_tokenizer

    try:
        if name is not None:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(name)
        return load_gguf_tokenizer(gguf_path)
    except Exception as exc:     # transformers supports only some GGUF tokenizers
        source = name if name is not None else f"{gguf_path}'s metadata"
        raise ValueError(f"transformers cannot build a tokenizer from {source} ({type(exc).__name__}: {exc}); "
                         f"--tokenizer names another") from exc


def _check_chat_template(tokenizer, gguf_path: str) -> None:
    """Before the (long) model load: --chat needs a chat template, in the given tokenizer or in the file."""
    import os

    from offload_kernels.formats.gguf_io import GGUFFile

    if tokenizer is not None:
        has_template = bool(getattr(tokenizer, "chat_template", None))
    elif os.path.isfile(gguf_path):
        with GGUFFile(gguf_path) as f:
            has_template = bool(f.metadata.get("tokenizer.chat_template"))
    else:
        return                  # a missing file: load_gguf_model says so
    if not has_template:
        source = "the tokenizer" if tokenizer is not None else f"{gguf_path} (no tokenizer.chat_template)"
        raise ValueError(f"--chat: {source} has no chat template; run without --chat, or pass a --tokenizer "
                         f"that has one")


def _encode_prompt(tokenizer, prompt: str, chat: bool):
    """input_ids and attention_mask of ``prompt``: as text, or (``chat``) as one user message in the chat template."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)   # the template writes any BOS itself


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> int:
    from offload_kernels.model.gguf_model import load_gguf_model
    from offload_kernels.model.offload import check_device

    if args.max_new_tokens < 1:
        raise SystemExit("--max-new-tokens must be at least 1")
    device = check_device(args.device)
    # A tokenizer given by name is loaded before the (long) model load, so a wrong name fails at once; the
    # file's own is read after the loader has checked the file.
    tokenizer = _load_tokenizer(args.tokenizer, None) if args.tokenizer is not None else None
    if args.chat:
        _check_chat_template(tokenizer, args.model)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32           # CPU matmuls in half precision are slow and not what a user wants
    t0 = time.perf_counter()
    model, report = load_gguf_model(args.model, gpu_budget=args.gpu_budget, dtype=dtype, device=device,
                                    num_slots=args.slots, return_report=True, experts=args.experts,
                                    expert_cache_slots=args.expert_cache_slots, expert_prefetch=args.expert_prefetch)
    if tokenizer is None:
        tokenizer = _load_tokenizer(None, args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    print(report)
    enc = _encode_prompt(tokenizer, args.prompt, args.chat).to(device)
    n_prompt = enc["input_ids"].shape[1]
    with torch.no_grad():
        model(**enc)                                         # warm-up: learns the streaming order
        _sync(device)
        t0 = time.perf_counter()
        model(**enc)
        _sync(device)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             pad_token_id=tokenizer.eos_token_id)
        _sync(device)
        total = time.perf_counter() - t0
    new = out.shape[1] - n_prompt
    shown = out[0, n_prompt:] if args.chat else out[0]
    print("\n" + tokenizer.decode(shown, skip_special_tokens=True) + "\n")
    decode = max(total - prefill, 1e-9)
    print(f"prompt: {n_prompt} tokens, {n_prompt / prefill:.1f} tokens/s; generation: {new} tokens, "
          f"{max(new - 1, 1) / decode:.2f} tokens/s on {device}")
    return 0
