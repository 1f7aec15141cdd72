"""load_gguf_model: llama.cpp GGUF files -> transformers models with offloaded linears over the file bytes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from offload_kernels import OffloadedLinear
from offload_kernels.formats import GGUFError, GGUFFile, dequantize, quantize, write_gguf
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
    "q2_k+q3_k": ("q2_k", "q2_k"),
    "q4_0": ("q4_0", None),
    "q8_0": ("q8_0", None),
    "q4_1": ("q4_1", None),
    "q5_0": ("q5_0", None),
    "q5_1": ("q5_1", None),
    "iq4_nl": ("iq4_nl", None),
    "iq4_xs": ("iq4_xs", None),
}
#: Files of a model whose hidden size (224) is not a multiple of 256, as llama-quantize writes them: the
#: k-quants fall back (LLAMA_QUANTIZE_FALLBACKS) to q5_0 / q8_0 (q4_k_m), iq4_nl / q5_1 / q8_0 (q3_k_m), iq4_nl
#: (q2_k; q6_k output to q8_0), and iq4_xs to iq4_nl; the down projections (512 inputs) keep their format.
FALLBACK_MIXES = {"fallback_q4_k_m": ("q4_k", "q4_k_m"), "fallback_q3_k_m": ("q3_k", "q3_k_m"),
                  "fallback_q2_k": ("q2_k", "q2_k"), "fallback_iq4_xs": ("iq4_xs", None)}
FALLBACK_TYPES = {"fallback_q4_k_m": {"q5_0", "q8_0", "q6_k"}, "fallback_q3_k_m": {"iq4_nl", "q5_1", "q5_k", "q8_0"},
                  "fallback_q2_k": {"iq4_nl", "q3_k", "q8_0"}, "fallback_iq4_xs": {"iq4_nl", "iq4_xs"}}


def tiny_model(arch="llama", layers=2, seed=0, **config):
    """A small random model whose attention is sharp enough that a wrong q/k row order changes the logits
    (qwen3 keeps its config's default head_dim, 128, which is not hidden_size / heads, as in Qwen3-0.6B).

    ``config`` overrides the config (attention_bias, head_dim, tie_word_embeddings, rope_scaling...);
    every attention bias the model has is random, so a wrongly ordered bias changes the logits too.
    """
    torch.manual_seed(seed)
    kw = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "phi3":
        kw["pad_token_id"] = 0          # Phi3Config's default (32000) is outside this vocabulary
    kw.update(config)
    cfg = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "phi3": transformers.Phi3Config}[arch](**kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "qkv_proj"):                # phi3: rows q, k, v of one matrix
                attn.qkv_proj.weight[:attn.qkv_proj.out_features - cfg.num_key_value_heads * attn.head_dim].mul_(6)
            else:
                attn.q_proj.weight.mul_(6)
                attn.k_proj.weight.mul_(6)
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                bias = getattr(getattr(layer.self_attn, proj, None), "bias", None)
                if bias is not None:
                    bias.normal_(0, 0.5)
            for norm in ("q_norm", "k_norm"):           # qwen3: distinct per-channel gains, so a swap shows
                if hasattr(layer.self_attn, norm):
                    getattr(layer.self_attn, norm).weight.uniform_(0.5, 1.5)
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
    narrow = tiny_model(hidden_size=224)
    for name, (qtype, mix) in FALLBACK_MIXES.items():
        d = root / name
        d.mkdir()
        out[name] = save_gguf(narrow, d / "model.gguf", qtype, mix=mix)
    return out


def hf_reference_logits(path: Path, ids: torch.Tensor, config=None) -> torch.Tensor:
    """Logits of transformers' own GGUF loader on ``path`` (``config``: instead of the one it reads)."""
    kw = {"config": config} if config is not None else {}
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return ref(ids).logits


IDS = torch.tensor([[1, 17, 200, 45, 3, 99, 260, 12, 7, 5]])


@pytest.mark.parametrize("mix", [*MIXES, *FALLBACK_MIXES])
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
    if mix == "q2_k+q3_k":
        assert types == {"q2_k", "q3_k", "q6_k"}
        assert layers["model.layers.0.self_attn.v_proj"].qtype == "q3_k"
        assert layers["model.layers.0.mlp.down_proj"].qtype == "q3_k"
    if mix in FALLBACK_TYPES:
        assert types == FALLBACK_TYPES[mix]
        assert {t.type_name for t in GGUFFile(path).tensor_infos.values()} >= FALLBACK_TYPES[mix]
    if mix in ("q4_1", "q5_0", "q5_1", "iq4_nl", "iq4_xs"):
        assert types == {mix}
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


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "phi3"])
def test_other_architectures(tmp_path, arch):
    model = tiny_model(arch)
    path = save_gguf(model, tmp_path / "m.gguf", "q8_0")
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert type(loaded).__name__ == type(model).__name__
    if arch == "qwen2":
        assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    if arch == "qwen3":
        assert loaded.config.head_dim == 128 and GGUFFile(path).metadata["qwen3.attention.key_length"] == 128
        for i, layer in enumerate(loaded.model.layers):
            for norm in ("q_norm", "k_norm"):
                assert torch.equal(getattr(layer.self_attn, norm).weight,
                                   getattr(model.model.layers[i].self_attn, norm).weight)
    with torch.no_grad():
        ours = loaded(IDS).logits
    if arch == "mistral":
        # transformers' own GGUF tensor loader fails on mistral-named files; the same tensors under a
        # llama name load as LlamaForCausalLM, which computes the same function at this context length.
        (tmp_path / "as_llama").mkdir()
        path = save_gguf(model, tmp_path / "as_llama" / "m.gguf", "q8_0", name="llama")
    if arch == "phi3":
        assert isinstance(loaded.model.layers[1].self_attn.qkv_proj, OffloadedLinear)
        assert isinstance(loaded.model.layers[1].mlp.gate_up_proj, OffloadedLinear)
    # transformers' reader keeps Phi3Config's pad token (32000), outside this vocabulary: give it ours
    config = loaded.config if arch == "phi3" else None
    torch.testing.assert_close(ours, hf_reference_logits(path, IDS, config), rtol=LOGITS_RTOL,
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
    w = GGUFWriter(tmp_path / "iq2xxs.gguf", "llama")
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            w.add_key_value(name, field.contents(), field.types[0],
                            sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":   # replace one linear by a type we do not support
            w.add_tensor(t.name, np.zeros((512, 66), dtype=np.uint8), raw_dtype=GGMLQuantizationType.IQ2_XXS)
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFError, match="blk.0.ffn_up.weight.*IQ2_XXS, which is not supported"):
        load_gguf_model(tmp_path / "iq2xxs.gguf", device="cpu")


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


@pytest.mark.parametrize("kwargs, match", [
    ({"device": "meta"}, "device must be cuda or cpu, got meta"),
    ({"device": "tpu"}, "device must be cuda or cpu, got 'tpu'"),
    ({"num_slots": 0}, "num_slots must be a positive int, got 0"),
    ({"num_slots": 1.5}, "num_slots must be a positive int, got 1.5"),
    ({"num_slots": "2"}, "num_slots must be a positive int, got '2'"),
])
def test_bad_device_and_slots_are_refused_before_the_file_is_read(kwargs, match):
    """Checked before the file is opened: the path does not exist, and that is not the error."""
    with pytest.raises(ValueError, match=match):
        load_gguf_model("/nonexistent/x.gguf", **{"device": "cpu", **kwargs})


def test_load_gguf_model_is_importable_from_the_package():
    import offload_kernels

    assert offload_kernels.load_gguf_model is load_gguf_model


def test_save_gguf_checks_the_model_and_vocab_before_writing(tmp_path):
    with pytest.raises(TypeError, match="save_gguf expects a transformers causal LM .*got Linear"):
        save_gguf(torch.nn.Linear(4, 4), tmp_path / "m.gguf", "q8_0")
    with pytest.raises(ValueError, match="vocab has 3 tokens but the model's vocab_size is 320"):
        save_gguf(tiny_model(layers=1), tmp_path / "m.gguf", "q8_0",
                  vocab={"tokens": ["a", "b", "c"], "scores": [0.0] * 3, "token_type": [1] * 3, "bos": 0, "eos": 0,
                         "unk": 0})
    with pytest.raises(TypeError, match="fuse_gate_up_exps must be a bool, got 'yes'"):
        save_gguf(tiny_model(layers=1), tmp_path / "m.gguf", "q8_0", fuse_gate_up_exps="yes")
    with pytest.raises(ValueError, match="split_max_tensors must be a non-negative int, got -2"):
        save_gguf(tiny_model(layers=1), tmp_path / "m.gguf", "q8_0", split_max_tensors=-2)
    assert not list(tmp_path.iterdir())


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


def parity_quantized_and_dequantized(path: Path, tmp_path: Path, label: str) -> tuple[float, ...]:
    """(max |logit diff|, logit range, top-1 agreement) between llama.cpp and load_gguf_model on ``path``
    with every quantized tensor dequantized to f32 by our dequantizer, then (max diff, top-1) on ``path``
    itself."""
    model = load_gguf_model(path, dtype=torch.float32, device="cpu")
    f = GGUFFile(path)
    dense = {n: dequantize(f.tensor(n), torch.float32).reshape(f.info(n).shape) for n in f if f.info(n).is_quantized}
    f32_diff, span, f32_top1 = _parity(_rewrite(tmp_path, path, "dequantized.gguf", tensors=dense), model)
    max_diff, _, top1 = _parity(path, model)
    print(f"llama.cpp parity {label}: max |logit diff| {f32_diff:.2e} on the dequantized file, {max_diff:.4f} on "
          f"the quantized one (logit range {span:.2f}), top-1 {f32_top1:.0%} / {top1:.0%}")
    return f32_diff, span, f32_top1, max_diff, top1


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
@pytest.mark.parametrize("arch, config", [("llama", {}), ("llama", {"attention_bias": True}),
                                          ("llama", {"head_dim": 32}), ("llama", {"tie_word_embeddings": True}),
                                          ("qwen2", {}), ("qwen3", {}), ("phi3", {}), ("phi3", {"sliding_window": 4})],
                         ids=["plain", "attention_bias", "head_dim", "tied", "qwen2", "qwen3", "phi3", "phi3_window"])
def test_parity_with_llama_cpp_unquantized(tmp_path, arch, config):
    """An f32 file isolates everything but the matmul arithmetic (names, q/k rows and biases, rope, norms,
    head sizes, tied output, config): llama.cpp (with an f32 KV cache) and we must then agree to float
    rounding. llama.cpp is the independent reference for what our exporter and loader both assume."""
    model = tiny_model(arch, **config)
    path = save_gguf(model, tmp_path / "f32.gguf", "f32")
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert not any(isinstance(m, OffloadedLinear) for m in loaded.modules())
    max_diff, span, top1 = _parity(path, loaded)
    print(f"llama.cpp parity f32 {arch} {config}: max |logit diff| {max_diff:.2e} (logit range {span:.2f}), "
          f"top-1 {top1:.0%}")
    assert max_diff <= 1e-4 * span and top1 == 1.0


@needs_llama_cpp
@pytest.mark.parametrize("mix", [*MIXES, *FALLBACK_MIXES])
def test_parity_with_llama_cpp(files, mix, tmp_path):
    """llama.cpp's CPU matmuls quantize the activations to 8 bits (q8_0/q8_K) before the dot products, so
    on quantized files logits differ by a few percent of their range (random models have near-tied logits,
    so top-1 agreement is the looser measure: 70% for q2_k's file, 90-100% for the others). So the file is
    also run with every quantized tensor dequantized to f32 by our dequantizer: there llama.cpp and we must
    agree as on f32 models, which pins the difference on the quantized file to llama.cpp's activation rounding."""
    f32_diff, span, f32_top1, max_diff, top1 = parity_quantized_and_dequantized(files[mix], tmp_path, mix)
    assert f32_diff <= 5e-4 * span and f32_top1 == 1.0
    agreeing = round(top1 * IDS.shape[1])                     # of the 10 positions
    assert max_diff <= 0.05 * span and agreeing >= (7 if mix == "q2_k+q3_k" else 8)


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


# ---------------------------------------------------------------------------------------------------------
# q/k biases, head sizes, rope, tied embeddings, argument and metadata checks

@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_llama_attention_bias_is_permuted_like_the_rows(tmp_path, qtype):
    """llama.cpp's converter permutes a q/k bias along its length exactly like the q/k rows (entry r goes
    with row r); save_gguf must write it so and load_gguf_model undo it, on float and quantized layers."""
    model = tiny_model(attention_bias=True)
    path = save_gguf(model, tmp_path / "m.gguf", qtype)
    f = GGUFFile(path)
    attn = model.model.layers[1].self_attn
    for side, proj, heads in (("q", attn.q_proj, 4), ("k", attn.k_proj, 2)):
        rows = permute_rows(proj.out_features, heads)
        assert torch.equal(f.tensor(f"blk.1.attn_{side}.bias"), proj.bias.detach()[rows])
        if qtype == "f32":
            assert torch.equal(f.tensor(f"blk.1.attn_{side}.weight"), proj.weight.detach()[rows])
    assert torch.equal(f.tensor("blk.1.attn_v.bias"), attn.v_proj.bias.detach())     # not permuted

    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert loaded.config.attention_bias
    for ours, theirs in zip(loaded.model.layers, model.model.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(ours.self_attn, proj).bias, getattr(theirs.self_attn, proj).bias), proj
    with torch.no_grad():
        ours = loaded(IDS).logits
        if qtype == "f32":
            torch.testing.assert_close(ours, model(IDS).logits, rtol=1e-5, atol=1e-5)
    # transformers' own GGUF loader un-permutes attn_q/attn_k biases too; it is given the config because
    # its GGUF config reader never sets attention_bias (it would build the model without biases).
    expected = hf_reference_logits(path, IDS, config=model.config)
    torch.testing.assert_close(ours, expected, rtol=LOGITS_RTOL, atol=LOGITS_RTOL * expected.abs().max())


@pytest.mark.parametrize("rope", [
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
])
def test_save_gguf_rejects_rope_scaling_it_cannot_write(tmp_path, rope):
    model = tiny_model(layers=1, rope_scaling=rope)
    with pytest.raises(ValueError, match=f"rope scaling .*rope_type '{rope['rope_type']}'.* would be lost"):
        save_gguf(model, tmp_path / "m.gguf", "q8_0")
    assert not list(tmp_path.iterdir())
    save_gguf(tiny_model(layers=1, rope_theta=5e5), tmp_path / "plain.gguf", "q8_0")   # a plain base is fine


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_explicit_head_dim_is_written_and_honoured(tmp_path, arch):
    model = tiny_model(arch, head_dim=32)                     # hidden_size / heads would be 64
    assert model.model.layers[0].self_attn.q_proj.out_features == 4 * 32
    path = save_gguf(model, tmp_path / "m.gguf", "f32")
    f = GGUFFile(path)
    assert f.metadata[f"{arch}.attention.key_length"] == f.metadata[f"{arch}.attention.value_length"] == 32
    loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert loaded.config.head_dim == 32
    with torch.no_grad():
        ours = loaded(IDS).logits
        torch.testing.assert_close(ours, model(IDS).logits, rtol=1e-5, atol=1e-5)
    if arch == "llama":   # transformers takes llama's head_dim from rope.dimension_count; qwen2/3's it never reads
        expected = hf_reference_logits(path, IDS)
        torch.testing.assert_close(ours, expected, rtol=LOGITS_RTOL, atol=LOGITS_RTOL * expected.abs().max())

    # key_length alone decides the head size, as in llama.cpp (rope.dimension_count defaults to it)
    md = {k: v for k, v in f.metadata.items() if k != f"{arch}.rope.dimension_count"}
    (tmp_path / "norope").mkdir()
    p = write_gguf(tmp_path / "norope" / "m.gguf", f.tensors(), md)
    with torch.no_grad():
        torch.testing.assert_close(load_gguf_model(p, dtype=torch.float32, device="cpu")(IDS).logits, ours)
    # the default head size is not written
    default = tiny_model(arch, layers=1, head_dim=64)
    assert f"{arch}.attention.key_length" not in GGUFFile(save_gguf(default, tmp_path / "d.gguf", "q8_0")).metadata


def _rewrite(tmp_path, path, name, metadata=None, tensors=None, drop=(), shapes=None):
    """``path``'s tensors and metadata with changes, as ``tmp_path / name``: ``drop`` names tensors or
    metadata keys to leave out; quantized tensors of more than two dimensions keep their shape (``shapes``
    gives the shape of new ones)."""
    f = GGUFFile(path)
    t = {n: f.tensor(n) for n in f if n not in drop}
    t.update(tensors or {})
    kept = {n: f.info(n).shape for n in t if n in f and n not in (tensors or {}) and f.info(n).is_quantized
            and len(f.info(n).shape) > 2}
    md = {k: v for k, v in f.metadata.items() if k not in drop}
    md.update(metadata or {})
    return write_gguf(tmp_path / name, t, md, shapes={**kept, **(shapes or {})})


def test_head_sizes_transformers_cannot_build_are_rejected(tmp_path):
    path = save_gguf(tiny_model(layers=1), tmp_path / "m.gguf", "q8_0")
    for i, (md, match) in enumerate((
            ({"llama.attention.key_length": 64, "llama.attention.value_length": 32},
             "key_length 64 != attention.value_length 32"),
            ({"llama.rope.dimension_count": 32}, "rope.dimension_count 32 != head size 64: partial rotary"),
            ({"llama.attention.key_length": "64"}, "key_length must be a positive integer"))):
        with pytest.raises(GGUFError, match=match):
            load_gguf_model(_rewrite(tmp_path, path, f"bad{i}.gguf", md), device="cpu")


def test_save_gguf_checks_type_and_mix_names_first(tmp_path):
    """Names are checked before the model is even looked at (None here), each error listing the valid ones."""
    for kwargs, match in (
            ({"mix": "q5_k_m"}, "unknown mix 'q5_k_m'; valid mixes: q4_k_m, q3_k_m, q2_k"),
            ({"mix": "f16"}, "unknown mix 'f16'; valid mixes: q4_k_m, q3_k_m, q2_k \\(plain types go in qtype: "),
            ({"qtype": "iq2_xxs"}, "unknown qtype 'iq2_xxs'; valid: q4_0, .*q6_k, iq4_xs, mxfp4, f32, f16"),
            ({"qtype_overrides": {"*.attn_v.weight": "q7"}}, r"qtype_overrides\['\*.attn_v.weight'\]: unknown")):
        with pytest.raises(ValueError, match=match):
            save_gguf(None, tmp_path / "m.gguf", **kwargs)
    assert not list(tmp_path.iterdir())


def test_tensor_for_a_module_the_model_lacks(tmp_path):
    path = save_gguf(tiny_model(layers=2), tmp_path / "m.gguf", "q8_0")
    fewer = _rewrite(tmp_path, path, "fewer.gguf", {"llama.block_count": 1})
    with pytest.raises(GGUFError, match=r"fewer\.gguf: tensor 'blk\.1\.[a-z_]+\.weight' is for model\.layers\.1\."
                                        r".*\(1 layers\) does not have"):
        load_gguf_model(fewer, device="cpu")
    more = _rewrite(tmp_path, path, "more.gguf", {"llama.block_count": 10**9})   # would take ages to build
    with pytest.raises(GGUFError, match="block_count is 1000000000 but the file has tensors for 2 blocks"):
        load_gguf_model(more, device="cpu")


def test_metadata_transformers_cannot_use_is_a_gguf_error(tmp_path):
    path = save_gguf(tiny_model(layers=1), tmp_path / "m.gguf", "q8_0")
    with pytest.raises(GGUFError, match=r"heads\.gguf: cannot build a transformers config .*num_attention_heads"):
        load_gguf_model(_rewrite(tmp_path, path, "heads.gguf", {"llama.attention.head_count": "four"}), device="cpu")
    with pytest.raises(GGUFError, match=r"base\.gguf: cannot build the transformers model"):
        load_gguf_model(_rewrite(tmp_path, path, "base.gguf", {"llama.rope.freq_base": "x"}), device="cpu")


class _MustNotBuild:
    @staticmethod
    def from_quantized(*args, **kwargs):
        raise AssertionError("a layer was built before the file was validated")


@pytest.mark.parametrize("freqs, match", [
    (torch.ones(5), r"'rope_freqs\.weight' has shape \(5,\), expected \(32,\)"),
    (torch.ones(32, dtype=torch.int32), "type I32; rope frequency factors must be f32, f16 or bf16"),
    (torch.full((32,), -1.0), "non-positive or non-finite rope frequency factors"),
    (torch.full((32,), float("inf")), "non-positive or non-finite rope frequency factors"),
])
def test_rope_freqs_are_checked_before_the_model_is_built(tmp_path, monkeypatch, freqs, match):
    from offload_kernels.model import gguf_model

    path = save_gguf(tiny_model(layers=1), tmp_path / "m.gguf", "q8_0")
    bad = _rewrite(tmp_path, path, "bad.gguf", tensors={"rope_freqs.weight": freqs})
    monkeypatch.setattr(gguf_model, "OffloadedLinear", _MustNotBuild)
    with pytest.raises(GGUFError, match=match):
        load_gguf_model(bad, device="cpu")


def test_rope_freqs_divide_the_rotary_frequencies(tmp_path):
    path = save_gguf(tiny_model(layers=1), tmp_path / "m.gguf", "q8_0")
    plain = load_gguf_model(path, dtype=torch.float32, device="cpu")
    factors = torch.linspace(1, 4, 32)
    scaled = load_gguf_model(_rewrite(tmp_path, path, "f.gguf", tensors={"rope_freqs.weight": factors}),
                             dtype=torch.float32, device="cpu")
    torch.testing.assert_close(scaled.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq / factors)


@pytest.mark.parametrize("qtype", ["q8_0", "f32"])
def test_tied_embeddings_without_output_weight(tmp_path, qtype):
    """No output.weight: lm_head computes the logits with token_embd (its quantized bytes, or a float copy)."""
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = save_gguf(model, tmp_path / "m.gguf", qtype)
    f = GGUFFile(path)
    assert "output.weight" not in f and "token_embd.weight" in f
    loaded, report = load_gguf_model(path, dtype=torch.float32, device="cpu", return_report=True)
    head = loaded.lm_head
    if qtype == "q8_0":
        assert isinstance(head, OffloadedLinear) and head.qtype == "q8_0"
        assert head.quantized_weight().equal(f.tensor("token_embd.weight"))
        assert report.placement.linear_bytes["lm_head"] == f.info("token_embd.weight").nbytes
        torch.testing.assert_close(head.dequantized_weight(), loaded.model.embed_tokens.weight, rtol=0, atol=0)
    else:
        assert type(head) is torch.nn.Linear and "lm_head" not in report.placement.linear_bytes
        assert torch.equal(head.weight, model.lm_head.weight)
        assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        ours = loaded(IDS).logits
        if qtype == "f32":
            torch.testing.assert_close(ours, model(IDS).logits, rtol=1e-5, atol=1e-5)
    expected = hf_reference_logits(path, IDS)         # transformers ties lm_head when output.weight is absent
    torch.testing.assert_close(ours, expected, rtol=LOGITS_RTOL, atol=LOGITS_RTOL * expected.abs().max())


@pytest.mark.parametrize("case", ["q4_k_m", "tied_q8_0", "f16_ffn_up", "f32"])
def test_inventory_is_what_the_loader_places(tmp_path, case):
    """gguf_inventory (the planner CLI's view of a file) and load_gguf_model share one spec function."""
    from offload_kernels.model.shapes import gguf_inventory

    qtype, kwargs = {"q4_k_m": ("q4_k", {"mix": "q4_k_m"}), "tied_q8_0": ("q8_0", {}),
                     "f16_ffn_up": ("q8_0", {"qtype_overrides": {"*.ffn_up.weight": "f16"}}),
                     "f32": ("f32", {})}[case]
    path = save_gguf(tiny_model(layers=1, tie_word_embeddings=case.startswith("tied")), tmp_path / "m.gguf", qtype,
                     **kwargs)
    inventory = gguf_inventory(path)
    _, report = load_gguf_model(path, dtype=torch.float16, device="cpu", return_report=True)
    assert {lin.name: lin.nbytes for lin in inventory.linears} == report.placement.linear_bytes
    assert inventory.fixed_bytes == report.placement.fixed_bytes
    names = {lin.name for lin in inventory.linears}
    assert ("lm_head" in names) == (case != "f32")
    assert all(lin.group == ("" if lin.name == "lm_head" else ".".join(lin.name.split(".")[:3]))
               for lin in inventory.linears)
    if case == "f16_ffn_up":
        assert not any(n.endswith("mlp.up_proj") for n in names)     # float linears stay resident: fixed bytes


def test_phi3_sliding_window_is_written_but_not_applied(tmp_path, caplog):
    """llama.cpp's converter writes phi3's window and llama.cpp does not apply it (the optional llama.cpp
    parity test checks that on a window of 4): neither do we, and we say so."""
    model = tiny_model("phi3", sliding_window=4)
    path = save_gguf(model, tmp_path / "m.gguf", "f32")
    assert GGUFFile(path).metadata["phi3.attention.sliding_window"] == 4
    with caplog.at_level("INFO", logger="offload_kernels"):
        loaded = load_gguf_model(path, dtype=torch.float32, device="cpu")
    assert loaded.config.sliding_window is None and "sliding_window=4 is not applied" in caplog.text
    full = tiny_model("phi3")                       # the same weights without a window
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, full(IDS).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(IDS).logits, full(IDS).logits, atol=1e-3)     # the window matters here


def test_partial_rotary_is_refused_when_saving(tmp_path):
    model = tiny_model("phi3", layers=1, partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5 cannot be written"):
        save_gguf(model, tmp_path / "m.gguf", "q8_0")
    assert not list(tmp_path.iterdir())


def test_longrope_files_are_refused_by_name(tmp_path):
    path = save_gguf(tiny_model("phi3", layers=1), tmp_path / "m.gguf", "q8_0")
    f = GGUFFile(path)
    half = f.metadata["phi3.rope.dimension_count"] // 2
    p = _rewrite(tmp_path, path, "longrope.gguf",
                 tensors={"rope_factors_long.weight": torch.ones(half), "rope_factors_short.weight": torch.ones(half)})
    with pytest.raises(GGUFError, match=r"rope_factors_long.weight, rope_factors_short.weight: LongRoPE"):
        load_gguf_model(p, device="cpu")
