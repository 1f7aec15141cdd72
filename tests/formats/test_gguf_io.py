"""GGUF I/O through the gguf package: round trips, memory-mapped reads, clear errors on bad files."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from offload_kernels.formats import GGUFError, GGUFFile, QuantizedTensor, get_spec, read_gguf, write_gguf

from .helpers import random_blocks


@pytest.fixture
def mixed_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "blk.0.attn_q.weight": random_blocks("q4_k", 8, 512, g),
        "blk.0.attn_v.weight": random_blocks("q6_k", 4, 256, g),
        "blk.0.ffn_down.weight": random_blocks("q3_k", 3, 768, g),
        "blk.0.ffn_up.weight": random_blocks("q5_k", 2, 256, g),
        "blk.0.ffn_gate.weight": random_blocks("q4_0", 5, 96, g),
        "output.weight": random_blocks("q8_0", 7, 64, g),
        "blk.0.attn_norm.weight": torch.randn(512, generator=g),
        "token_embd.weight": torch.randn(11, 64, generator=g).half(),
        "rope_freqs.weight": torch.randn(3, 5, generator=g).bfloat16(),
        "positions": torch.arange(6, dtype=torch.int32),
    }


METADATA = {
    "llama.block_count": 1,
    "llama.rope.freq_base": 10000.0,
    "general.name": "round-trip test",
    "tokenizer.ggml.tokens": ["<s>", "</s>", "hello"],
    "tokenizer.ggml.scores": [0.0, -1.5, 2.25],
    "tokenizer.ggml.token_type": [3, 3, 1],
    "x.flag": True,
    "x.negative": -7,
    "x.big": 2**40,
    "x.explicit_u8": (200, GGUFValueType.UINT8),
}


def test_round_trip_mixed_types(tmp_path, mixed_tensors):
    path = write_gguf(tmp_path / "mixed.gguf", mixed_tensors, METADATA, architecture="llama")
    md, tensors = read_gguf(path)
    assert md["general.architecture"] == "llama"
    for key, value in METADATA.items():
        expected = value[0] if isinstance(value, tuple) else value
        assert md[key] == pytest.approx(expected) if isinstance(expected, float) else md[key] == expected, key
    assert set(tensors) == set(mixed_tensors)
    for name, original in mixed_tensors.items():
        loaded = tensors[name]
        if isinstance(original, QuantizedTensor):
            assert isinstance(loaded, QuantizedTensor) and loaded.equal(original), name
        else:
            assert loaded.dtype == original.dtype and torch.equal(loaded, original), name


def test_llama_cpp_view_of_the_file(tmp_path, mixed_tensors):
    """The file as gguf's own reader sees it: ggml types and ggml-order shapes (ne0 = K first)."""
    path = write_gguf(tmp_path / "m.gguf", mixed_tensors)
    by_name = {t.name: t for t in GGUFReader(path).tensors}
    q = by_name["blk.0.attn_q.weight"]
    assert q.tensor_type == GGMLQuantizationType.Q4_K and q.shape.tolist() == [512, 8]
    assert np.array_equal(q.data.reshape(-1), mixed_tensors["blk.0.attn_q.weight"].data.numpy().reshape(-1))
    assert by_name["rope_freqs.weight"].tensor_type == GGMLQuantizationType.BF16


def test_reads_are_memory_mapped_views(tmp_path, mixed_tensors):
    path = write_gguf(tmp_path / "m.gguf", mixed_tensors)
    f = GGUFFile(path)
    info = f.info("blk.0.attn_q.weight")
    qt = f.tensor("blk.0.attn_q.weight")
    base = f._reader.data.ctypes.data
    assert qt.data.data_ptr() == base + info.offset            # no copy: points into the mapping
    assert f.tensor("token_embd.weight").data_ptr() == base + f.info("token_embd.weight").offset
    qt.data[0, 0] ^= 0xFF                                        # copy-on-write: the file is untouched
    assert GGUFFile(path).tensor("blk.0.attn_q.weight").equal(mixed_tensors["blk.0.attn_q.weight"])


def test_tensor_infos(tmp_path, mixed_tensors):
    f = GGUFFile(write_gguf(tmp_path / "m.gguf", mixed_tensors))
    info = f.info("blk.0.ffn_down.weight")
    assert info.shape == (3, 768) and info.type_name == "q3_k" and info.is_quantized and info.is_supported
    assert info.nbytes == 3 * get_spec("q3_k").row_bytes(768)
    assert len(f) == len(mixed_tensors) and "output.weight" in f and "nope" not in f
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        f.tensor("nope")


def test_truncated_file_is_rejected(tmp_path, mixed_tensors):
    path = write_gguf(tmp_path / "m.gguf", mixed_tensors)
    data = path.read_bytes()
    data_end = max(i.offset + i.nbytes for i in GGUFFile(path).tensor_infos.values())  # padding may follow
    for cut in (data_end - 1, len(data) // 2, 100, 10):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="truncated|not a readable GGUF"):
            GGUFFile(short)


def test_corrupt_files_are_rejected(tmp_path, mixed_tensors):
    data = bytearray(write_gguf(tmp_path / "m.gguf", mixed_tensors).read_bytes())
    bad_magic = tmp_path / "magic.gguf"
    bad_magic.write_bytes(b"GGUX" + bytes(data[4:]))
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        GGUFFile(bad_magic)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(GGUFError):
        GGUFFile(garbage)
    with pytest.raises(FileNotFoundError):
        GGUFFile(tmp_path / "missing.gguf")


def test_unsupported_quantized_type_is_named(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "q2k.gguf"
    w = GGUFWriter(path, "llama")
    w.add_tensor("t", np.zeros((1, 84), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q2_K)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    f = GGUFFile(path)
    assert not f.info("t").is_supported
    with pytest.raises(GGUFError, match="type Q2_K, which is not supported"):
        f.tensor("t")


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="expected QuantizedTensor or torch.Tensor"):
        write_gguf(tmp_path / "a.gguf", {"x": np.zeros(3)})
    with pytest.raises(TypeError, match="cannot be stored"):
        write_gguf(tmp_path / "b.gguf", {"x": torch.zeros(3, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="cannot store metadata value"):
        write_gguf(tmp_path / "c.gguf", {"x": torch.zeros(3)}, {"k": object()})
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "c.gguf").exists()
