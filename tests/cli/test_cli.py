"""The offload-kernels command line: each verb runs on CPU and bad input gives a clean error."""

import json
import os

import pytest
import torch

from offload_kernels.cli.main import main

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_info_json(capsys):
    assert main(["info", "--json", "--no-measure"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["extension"] in ("built with CUDA", "built host-only") and "devices" in data


def test_info_measures_ceilings(capsys):
    assert main(["info"]) == 0
    assert "measured on" in capsys.readouterr().out


def test_plan_preset_table(capsys):
    assert main(["plan", "llama-3-70b", "--hardware", "rtx4090", "--tokens", "1,2048"]) == 0
    out = capsys.readouterr().out
    assert "100% resident" in out and "50% resident" in out and "20% resident" in out and "at 24.00 GiB" in out
    assert "spec sheet (not measured)" in out


def test_plan_gguf_file_with_given_ceilings(tmp_path, capsys):
    from offload_kernels.model.gguf_export import save_gguf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2)
    path = save_gguf(transformers.LlamaForCausalLM(cfg), tmp_path / "m.gguf", "q4_k", mix="q4_k_m")
    assert main(["plan", str(path), "--link-gbps", "25", "--hbm-gbps", "1000", "--tflops", "100",
                 "--vram", "1MiB"]) == 0
    out = capsys.readouterr().out
    assert "m.gguf" in out and "tokens/forward" in out


def test_plan_without_ceilings_says_what_is_missing(capsys):
    with pytest.raises(SystemExit, match="plan needs ceilings"):
        main(["plan", "llama-3-8b"])


def test_run_generates_from_a_gguf_file(tmp_path, capsys):
    from offload_kernels.model.gguf_export import save_gguf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    path = save_gguf(transformers.LlamaForCausalLM(cfg), tmp_path / "m.gguf", "q8_0")
    assert main(["run", str(path), "--prompt", "ab cd", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "generation: 4 tokens" in out


@pytest.mark.parametrize("arch", ["glm4moe", "gpt-oss", "deepseek2"])
def test_run_a_moe_file_with_its_own_or_a_given_tokenizer(tmp_path, capsys, arch):
    """glm4moe, gpt-oss and deepseek2 files, whose config transformers' GGUF reader cannot build, run with the
    tokenizer their metadata describes; --tokenizer names another (a wrong name fails before the model is loaded)."""
    from offload_kernels.model.gguf_export import save_gguf
    from offload_kernels.model.gguf_model import load_gguf_tokenizer

    if arch == "glm4moe":
        from ..model.test_gguf_glm4moe import tiny_glm4_moe as tiny
    elif arch == "gpt-oss":
        from ..model.test_gguf_gpt_oss import tiny_gpt_oss as tiny
    else:
        from ..model.test_gguf_deepseek2 import tiny_deepseek_v3 as tiny

    path = save_gguf(tiny(), tmp_path / "moe.gguf", "q8_0")
    assert main(["run", str(path), "--device", "cpu", "--max-new-tokens", "2", "--prompt", "ab cd"]) == 0
    assert "generation: 2 tokens" in capsys.readouterr().out
    assert main(["run", str(path), "--device", "cpu", "--tokenizer", str(tmp_path / "no_such_tokenizer")]) == 2
    assert "cannot build a tokenizer from" in capsys.readouterr().err      # before the model is loaded
    load_gguf_tokenizer(path).save_pretrained(tmp_path / "tok")
    assert main(["run", str(path), "--device", "cpu", "--max-new-tokens", "3", "--prompt", "ab cd",
                 "--tokenizer", str(tmp_path / "tok")]) == 0
    assert "generation: 3 tokens" in capsys.readouterr().out


def test_run_chat_uses_the_files_chat_template(tmp_path, capsys):
    """--chat sends the prompt through the file's chat template and prints only the reply; a file without one is
    refused before the model is loaded."""
    from offload_kernels.model.gguf_export import save_gguf
    from offload_kernels.model.gguf_vocab import byte_level_vocab

    from ..model.test_gguf_gpt_oss import tiny_gpt_oss
    from ..model.test_gguf_tokenizer import CHAT_TEMPLATE, trained_bpe

    vocab = {**byte_level_vocab(trained_bpe(), "gpt-4o", eos="<|return|>"), "chat_template": CHAT_TEMPLATE}
    model = tiny_gpt_oss(vocab_size=len(vocab["tokens"]), num_hidden_layers=2)
    path = save_gguf(model, tmp_path / "chat.gguf", "q8_0", vocab=vocab)
    assert main(["run", str(path), "--device", "cpu", "--max-new-tokens", "2", "--chat", "--prompt", "hi"]) == 0
    out = capsys.readouterr().out
    assert "generation: 2 tokens" in out and "user: hi" not in out           # the reply alone
    bare = save_gguf(model, tmp_path / "bare.gguf", "q8_0", vocab={k: v for k, v in vocab.items()
                                                                   if k != "chat_template"})
    assert main(["run", str(bare), "--device", "cpu", "--chat"]) == 2
    assert "bare.gguf (no tokenizer.chat_template) has no chat template" in capsys.readouterr().err


def test_run_reports_bad_input_without_traceback(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.gguf"), "--device", "cpu"]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [(["--device", "tpu"], "device must be cuda or cpu, got 'tpu'"),
                                           (["--device", "meta"], "device must be cuda or cpu, got meta"),
                                           (["--device", "cpu", "--slots", "0"], "num_slots must be a positive int")])
def test_run_refuses_a_bad_device_or_slot_count_before_reading_the_file(tmp_path, capsys, args, message):
    assert main(["run", str(tmp_path / "missing.gguf"), *args]) == 2      # not "file not found": checked first
    assert message in capsys.readouterr().err


def test_demo_small(capsys):
    assert main(["demo", "--skip-formats", "--skip-moe", "--layers", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CPU path" in out and "offloaded" in out and "offloaded == fully resident: True" in out
    assert "Part 3" not in out


def test_demo_mixture_of_experts_part(capsys):
    assert main(["demo", "--skip-formats", "--layers", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    part3 = out[out.index("Part 3"):]
    assert "experts on demand through a cache of" in part3
    rows = {}
    for line in part3.splitlines():
        cells = line.split()
        if cells and cells[0] in ("with_block", "on_demand") and cells[1] == "1":
            rows[cells[0]] = line
    assert set(rows) == {"with_block", "on_demand"}      # both modes timed at 1 token per forward


def test_demo_formats_table(capsys):
    assert main(["demo", "--format-rows", "64", "--format-cols", "512", "--layers", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for qtype in ("q4_0", "q8_0", "q3_k", "q4_k", "q5_k", "q6_k"):
        assert f"\n{qtype}" in out
    with pytest.raises(SystemExit, match="multiple of 256"):
        main(["demo", "--format-cols", "100"])


def test_cli_shares_one_timer_one_default_device_and_one_budget_rule():
    """demo/run/plan use the package's helpers, not private copies of them."""
    import inspect

    from offload_kernels.benchmarks import offload as bench_offload
    from offload_kernels.cli import demo, plan, run
    from offload_kernels.model import bandwidth

    assert demo.median_seconds is bandwidth.median_seconds and not hasattr(demo, "_median_time")
    for module in (demo, run):
        assert "is_available() else" not in inspect.getsource(module)
    for module in (demo, plan, bench_offload):
        assert "budget_for_resident_fraction" in inspect.getsource(module)
