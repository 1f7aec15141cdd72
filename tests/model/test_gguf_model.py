"""load_gguf_model: llama.cpp GGUF files -> transformers models with offloaded linears over the file bytes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from offload_kernels import OffloadedLinear
from offload_kernels.formats import GGUFError, GGUFFile, quantize, write_gguf
from offload_kernels.model import streamer_of
from offload_kernels.model.gguf_export import save_gguf
from offload_kernels.model.gguf_model import load_gguf_model, load_gguf_tokenizer, permute_rows, unpermute_rows

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Our logits vs transformers' own GGUF loader (gguf's numpy dequantizers + its q/k un-permutation) on the
# same file: identical weights, so only fp32 summation order differs.
LOGITS_RTOL = 1e-4

MIXES = {  # name -> (default qtype, mix)
    "q4_k+q6_k": ("q4_k", "q4_k_m"),
    "q3_k+q5_k": ("q3_k", "q3_k_m"),
    "q4_0": ("q4_0", None),
    "q8_0": ("q8_0", None),
}


def tiny_model(arch="llama", layers=2, seed=0):
    """A small random model whose attention is sharp enough that a wrong q/k row order changes the logits."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[arch](**kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
            if layer.self_attn.q_proj.bias is not None:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_model()
    out = {}
    for name, (qtype, mix) in MIXES.items():
        d = root / name.replace("+", "_")
        d.mkdir()
        out[name] = save_gguf(model, d / "model.gguf", qtype, mix=mix)
    return out


def hf_reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids).logits


IDS = torch.tensor([[1, 17, 200, 45, 3, 99, 260, 12, 7, 5]])


@pytest.mark.parametrize("mix", list(MIXES))
def test_logits_match_transformers_gguf_loader(files, mix):
    path = files[mix]
    model = load_gguf_model(path, dtype=torch.float32, device="cpu")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, OffloadedLinear)}
    assert len(layers) == 2 * 7 + 1                          # every linear, lm_head (tied: over token_embd) too
    types = {m.qtype for m in layers.values()}
    if mix == "q4_k+q6_k":
        assert types == {"q4_k", "q6_k"}
        assert layers["model.layers.0.self_attn.v_proj"].qtype == "q6_k"
    if mix == "q3_k+q5_k":
        assert types >= {"q3_k", "q5_k"}
    with torch.no_grad():
        ours = model(IDS).logits
    expected = hf_reference_logits(path, IDS)
    torch.testing.assert_close(ours, expected, rtol=LOGITS_RTOL, atol=LOGITS_RTOL * expected.abs().max())


def test_linears_hold_the_files_bytes(files):
    """No requantization: each layer's bytes are the file tensor's rows (q/k rows un-permuted)."""
    path = files["q4_k+q6_k"]
    f = GGUFFile(path)
    model = load_gguf_model(path, dtype=torch.float32, device="cpu")
    v = model.model.layers[1].self_attn.v_proj.quantized_weight()
    assert v.equal(f.tensor("blk.1.attn_v.weight"))
    q = model.model.layers[1].self_attn.q_proj.quantized_weight()
    file_q = f.tensor("blk.1.attn_q.weight")
    assert torch.equal(q.data, file_q.data[unpermute_rows(256, 4)])
    k = model.model.layers[0].self_attn.k_proj.quantized_weight()
    assert torch.equal(k.data, f.tensor("blk.0.attn_k.weight").data[unpermute_rows(128, 2)])


def test_unpermute_matches_transformers_reference():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 2})
    for rows, heads in ((64, 8), (32, 2), (12, 3)):
        rows_np = np.arange(rows)[:, None].repeat(2, 1)
        expected = proc._reverse_permute_weights(rows_np, heads, heads)[:, 0]
        assert torch.equal(unpermute_rows(rows, heads), torch.from_numpy(expected))
        assert torch.equal(unpermute_rows(rows, heads)[permute_rows(rows, heads)], torch.arange(rows))


def test_streamed_layers_give_the_same_logits(tmp_path):
    path = save_gguf(tiny_model(layers=5), tmp_path / "m.gguf", "q4_k", mix="q4_k_m")
    resident, full = load_gguf_model(path, dtype=torch.float32, device="cpu", return_report=True)
    block = full.placement.linear_bytes["model.layers.0.self_attn.q_proj"] and sum(
        b for n, b in full.placement.linear_bytes.items() if n.startswith("model.layers.0."))
    budget = full.placement.fixed_bytes + full.placement.linear_bytes["lm_head"] + 3 * block + 1000
    streamed, report = load_gguf_model(path, gpu_budget=budget, dtype=torch.float32, device="cpu",
                                       return_report=True)
    assert report.bytes_streamed_per_forward > 0 and streamer_of(streamed) is not None
    with torch.no_grad():
        a = resident(IDS).logits
        for _ in range(2):
            assert torch.equal(streamed(IDS).logits, a)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures(tmp_path, arch):
    model = tiny_model(arch)
    path = save_gguf(model, tmp_path / "m.gguf", "q8_0")
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert type(loaded).__name__ == type(model).__name__
    if arch == "qwen2":
        assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        ours = loaded(IDS).logits
    if arch == "mistral":
        # transformers' own GGUF tensor loader fails on mistral-named files; the same tensors under a
        # llama name load as LlamaForCausalLM, which computes the same function at this context length.
        (tmp_path / "as_llama").mkdir()
        path = save_gguf(model, tmp_path / "as_llama" / "m.gguf", "q8_0", name="llama")
    torch.testing.assert_close(ours, hf_reference_logits(path, IDS), rtol=LOGITS_RTOL,
                               atol=LOGITS_RTOL * ours.abs().max())


def test_tokenizer_and_generate_on_text(files):
    path = files["q8_0"]
    tok = load_gguf_tokenizer(path)
    model = load_gguf_model(path, dtype=torch.float32, device="cpu")
    enc = tok("ab cd", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5
    assert isinstance(tok.decode(out[0]), str)


def test_truncated_and_corrupt_files_fail_cleanly(files, tmp_path):
    data = Path(files["q4_0"]).read_bytes()
    end = max(i.offset + i.nbytes for i in GGUFFile(files["q4_0"]).tensor_infos.values())
    for cut in (end - 1, len(data) // 3, 64):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(GGUFError):
            load_gguf_model(p, device="cpu")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + data[4:])
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        load_gguf_model(bad, device="cpu")


def test_unsupported_architecture_and_types(tmp_path):
    p = write_gguf(tmp_path / "gpt2.gguf", {"x": torch.zeros(4)}, {}, architecture="gpt2")
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        load_gguf_model(p, device="cpu")

    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

    model = tiny_model(layers=1)
    good = save_gguf(model, tmp_path / "good.gguf", "q8_0")
    reader = GGUFReader(good)
    w = GGUFWriter(tmp_path / "q2k.gguf", "llama")
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            w.add_key_value(name, field.contents(), field.types[0],
                            sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":   # replace one linear by a type we do not support
            w.add_tensor(t.name, np.zeros((512, 84), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q2_K)
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFError, match="blk.0.ffn_up.weight.*Q2_K, which is not supported"):
        load_gguf_model(tmp_path / "q2k.gguf", device="cpu")


def test_missing_tensor_is_named(tmp_path):
    model = tiny_model(layers=1)
    f = GGUFFile(save_gguf(model, tmp_path / "full.gguf", "q8_0"))
    tensors = {n: f.tensor(n) for n in f if n != "blk.0.ffn_down.weight"}
    md = {k: v for k, v in f.metadata.items() if k != "general.architecture"}
    p = write_gguf(tmp_path / "missing.gguf", tensors, md)
    with pytest.raises(GGUFError, match="missing weights for model.layers.0.mlp.down_proj"):
        load_gguf_model(p, device="cpu")


def test_bad_arguments():
    with pytest.raises(TypeError, match="dtype must be fp16, bf16 or fp32"):
        load_gguf_model("x.gguf", dtype=torch.int8)
    with pytest.raises(ValueError, match="non-negative"):
        load_gguf_model("x.gguf", gpu_budget=-1)
    with pytest.raises(FileNotFoundError):
        load_gguf_model("/nonexistent/x.gguf", device="cpu")


def _llama_cpp_python() -> "str | None":
    """A Python that can import llama_cpp: this one, or $OFFLOAD_KERNELS_LLAMA_CPP_PYTHON."""
    try:
        import llama_cpp  # noqa: F401

        return sys.executable
    except ImportError:
        return os.environ.get("OFFLOAD_KERNELS_LLAMA_CPP_PYTHON")


needs_llama_cpp = pytest.mark.skipif(
    _llama_cpp_python() is None,
    reason="llama_cpp not installed (set OFFLOAD_KERNELS_LLAMA_CPP_PYTHON to a Python that has llama-cpp-python)")


def _parity(path: Path, model) -> tuple[float, float, float]:
    """(max |logit difference|, logit range, top-1 agreement) between llama.cpp and ``model`` on IDS."""
    script = Path(__file__).with_name("llama_cpp_logits.py")
    out = subprocess.run([_llama_cpp_python(), str(script), str(path), ",".join(map(str, IDS[0].tolist()))],
                         capture_output=True, text=True, check=True)
    theirs = torch.tensor(json.loads(out.stdout)["logits"])
    with torch.no_grad():
        ours = model(IDS).logits[0]
    return (float((ours - theirs).abs().max()), float(theirs.max() - theirs.min()),
            float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()))


@needs_llama_cpp
def test_parity_with_llama_cpp_unquantized(tmp_path):
    """An f32 file isolates everything but the matmul arithmetic (names, q/k rows, rope, norms, config):
    llama.cpp (with an f32 KV cache) and we must then agree to float rounding."""
    model = tiny_model()
    path = save_gguf(model, tmp_path / "f32.gguf", "f32")
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert not any(isinstance(m, OffloadedLinear) for m in loaded.modules())
    max_diff, span, top1 = _parity(path, loaded)
    print(f"llama.cpp parity f32: max |logit diff| {max_diff:.2e} (logit range {span:.2f}), top-1 {top1:.0%}")
    assert max_diff <= 1e-4 * span and top1 == 1.0


@needs_llama_cpp
@pytest.mark.parametrize("mix", list(MIXES))
def test_parity_with_llama_cpp(files, mix):
    """llama.cpp's CPU matmuls quantize the activations to 8 bits (q8_0/q8_K) before the dot products, so
    on quantized files logits differ by a few percent of their range (random models have near-tied logits,
    so top-1 agreement is the looser measure)."""
    max_diff, span, top1 = _parity(files[mix], load_gguf_model(files[mix], dtype=torch.float32, device="cpu"))
    print(f"llama.cpp parity {mix}: max |logit diff| {max_diff:.4f} (logit range {span:.2f}), top-1 {top1:.0%}")
    assert max_diff <= 0.05 * span and top1 >= 0.8


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status RssAnon on this system")


def test_host_memory_stays_near_one_copy_of_the_file(tmp_path):
    """Streaming from a GGUF file: the file is mapped, its streamed bytes copied once into the engine's
    host storage; no second copy of the model (anonymous memory grows by about the streamed bytes)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=1024, intermediate_size=2048, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    path = save_gguf(transformers.LlamaForCausalLM(cfg), tmp_path / "m.gguf", "q8_0")
    file_bytes = path.stat().st_size
    probe, full = load_gguf_model(path, dtype=torch.float32, device="cpu", return_report=True)
    block = sum(b for n, b in full.placement.linear_bytes.items() if n.startswith("model.layers.0."))
    budget = full.placement.fixed_bytes + full.placement.linear_bytes["lm_head"] + 3 * block
    del probe
    import gc

    gc.collect()
    before = _rss_anon()
    model, report = load_gguf_model(path, gpu_budget=budget, dtype=torch.float32, device="cpu", return_report=True)
    grew = _rss_anon() - before
    streamed = report.bytes_streamed_per_forward
    assert streamed > 0.4 * file_bytes
    # streamed bytes (host storage) + 2 slots + fp32 embeddings/norms + q/k pages copied on write: well
    # under a second copy of the file on top of the one in host storage.
    assert grew < streamed + 2 * report.placement.slot_bytes + report.placement.fixed_bytes + 0.1 * file_bytes, \
        f"anonymous memory grew by {grew / 2**20:.1f} MiB for a {file_bytes / 2**20:.1f} MiB file"
    with torch.no_grad():
        model(IDS)
