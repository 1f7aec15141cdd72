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
        "blk.0.attn_k.weight": random_blocks("q4_1", 3, 96, g),
        "blk.0.attn_output.weight": random_blocks("q5_0", 5, 32, g),
        "blk.1.attn_q.weight": random_blocks("q5_1", 2, 160, g),
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
    for name, ggml_type, shape in (("blk.0.attn_k.weight", GGMLQuantizationType.Q4_1, [96, 3]),
                                   ("blk.0.attn_output.weight", GGMLQuantizationType.Q5_0, [32, 5]),
                                   ("blk.1.attn_q.weight", GGMLQuantizationType.Q5_1, [160, 2])):
        t = by_name[name]
        assert t.tensor_type == ggml_type and t.shape.tolist() == shape, name
        assert np.array_equal(t.data.reshape(-1), mixed_tensors[name].data.numpy().reshape(-1)), name


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

    path = tmp_path / "iq2xxs.gguf"
    w = GGUFWriter(path, "llama")
    w.add_tensor("t", np.zeros((1, 66), dtype=np.uint8), raw_dtype=GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    f = GGUFFile(path)
    assert not f.info("t").is_supported
    with pytest.raises(GGUFError, match="type IQ2_XXS, which is not supported"):
        f.tensor("t")


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="expected QuantizedTensor or torch.Tensor"):
        write_gguf(tmp_path / "a.gguf", {"x": np.zeros(3)})
    with pytest.raises(TypeError, match="cannot be stored"):
        write_gguf(tmp_path / "b.gguf", {"x": torch.zeros(3, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="cannot store metadata value"):
        write_gguf(tmp_path / "c.gguf", {"x": torch.zeros(3)}, {"k": object()})
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "c.gguf").exists()


# ---------------------------------------------------------------------------------------------------------
# metadata validation before any file exists, atomic writes, closed files

BAD_METADATA = [  # (value, exception, message)
    ((300, GGUFValueType.UINT8), ValueError, r"300 is out of range for UINT8 \[0, 255\]"),
    ((-1, GGUFValueType.UINT32), ValueError, "out of range for UINT32"),
    ((2**63, GGUFValueType.INT64), ValueError, "out of range for INT64"),
    (2**64, ValueError, "out of range for UINT64"),
    (-(2**63) - 1, ValueError, "out of range for INT64"),
    (1e39, ValueError, r"out of range for FLOAT32 \(pass \(value, GGUFValueType.FLOAT64\)\)"),
    ([1.0, 1e39], ValueError, r"'k\[1\]'.*out of range for FLOAT32"),
    ([1, 2**64], ValueError, "do not fit any GGUF integer type"),
    (("x", GGUFValueType.UINT32), TypeError, "UINT32 needs an integer, got str"),
    ((1.5, GGUFValueType.BOOL), TypeError, "BOOL needs a bool"),
    ((True, GGUFValueType.INT32), TypeError, "INT32 needs an integer, got bool"),
    ((7, GGUFValueType.STRING), TypeError, "STRING needs a str"),
    ("\ud800", ValueError, "not encodable as UTF-8"),
    ([[1, 2], [3]], TypeError, "nested arrays are not supported"),
    (np.zeros((2, 2)), TypeError, "nested arrays are not supported"),
    (([1, 2], GGUFValueType.ARRAY), None, None),             # fine: element type inferred
    ([1, "a"], TypeError, "array elements must all be bool, all str or all numbers"),
    ([True, 1], TypeError, "array elements must all be bool, all str or all numbers"),
    ([], ValueError, "empty arrays cannot be written"),
    ({"a": 1}, TypeError, "cannot store metadata value of type dict"),
    (None, TypeError, "cannot store metadata value of type NoneType"),
    (([300], GGUFValueType.UINT8), ValueError, r"'k\[0\]': 300 is out of range for UINT8"),
]


@pytest.mark.parametrize("value, exc, match", BAD_METADATA)
def test_metadata_is_validated_before_the_file_is_created(tmp_path, value, exc, match):
    """A bad value is a ValueError/TypeError naming the key (never struct.error or OverflowError from inside
    the writer), raised before anything exists at the path or beside it."""
    path = tmp_path / "m.gguf"
    md = {"general.name": "ok", "k": value}
    if exc is None:
        write_gguf(path, {"x": torch.zeros(4)}, md)
        return
    with pytest.raises(exc, match=r"metadata 'k(\[\d+\])?'") as info:
        write_gguf(path, {"x": torch.zeros(4)}, md)
    assert info.match(match)
    assert not list(tmp_path.iterdir())


def test_metadata_types_are_written_as_chosen(tmp_path):
    md = {"a.i64": (5, GGUFValueType.INT64), "a.f64": (1e300, GGUFValueType.FLOAT64),
          "a.u8s": ([1, 2, 255], GGUFValueType.UINT8), "a.bytes": b"\x00\xff", "a.mixed": [0, -1.5],
          "a.np": np.arange(3, dtype=np.int16), "a.big": [0, 2**63], "a.u32": [0, 2**31], "a.neg_big": [-1, 2**40],
          "a.bools": [True, False], "a.strs": ("x", "y")}
    path = write_gguf(tmp_path / "t.gguf", {"x": torch.zeros(4)}, md)
    fields = GGUFReader(path).fields
    expected = {"a.i64": [GGUFValueType.INT64], "a.f64": [GGUFValueType.FLOAT64],
                "a.u8s": [GGUFValueType.ARRAY, GGUFValueType.UINT8],
                "a.bytes": [GGUFValueType.ARRAY, GGUFValueType.UINT8],
                "a.mixed": [GGUFValueType.ARRAY, GGUFValueType.FLOAT32],
                "a.np": [GGUFValueType.ARRAY, GGUFValueType.INT32],
                "a.big": [GGUFValueType.ARRAY, GGUFValueType.UINT64],
                "a.u32": [GGUFValueType.ARRAY, GGUFValueType.UINT32],
                "a.neg_big": [GGUFValueType.ARRAY, GGUFValueType.INT64],
                "a.bools": [GGUFValueType.ARRAY, GGUFValueType.BOOL],
                "a.strs": [GGUFValueType.ARRAY, GGUFValueType.STRING]}
    for key, types in expected.items():
        assert fields[key].types == types, key
    read = GGUFFile(path).metadata
    assert read["a.f64"] == 1e300 and read["a.mixed"] == [0.0, -1.5] and read["a.neg_big"] == [-1, 2**40]
    assert read["a.bytes"] == [0, 255] and read["a.strs"] == ["x", "y"]


def test_architecture_argument_and_metadata_key(tmp_path):
    t = {"x": torch.zeros(4)}
    with pytest.raises(ValueError, match="metadata 'general.architecture' is 'qwen2' but architecture='llama'"):
        write_gguf(tmp_path / "a.gguf", t, {"general.architecture": "qwen2"}, architecture="llama")
    with pytest.raises(TypeError, match="'general.architecture' must be a string"):
        write_gguf(tmp_path / "a.gguf", t, {"general.architecture": 3})
    with pytest.raises(TypeError, match="metadata keys must be non-empty strings"):
        write_gguf(tmp_path / "a.gguf", t, {"": 3})
    with pytest.raises(ValueError, match="architecture must be a non-empty string"):
        write_gguf(tmp_path / "a.gguf", t, {"general.architecture": ""})     # not silently "llama"
    assert not list(tmp_path.iterdir())
    assert GGUFFile(write_gguf(tmp_path / "b.gguf", t, {"general.architecture": "qwen2"})).architecture == "qwen2"
    assert GGUFFile(write_gguf(tmp_path / "c.gguf", t, {"general.architecture": "qwen2"},
                               architecture="qwen2")).architecture == "qwen2"
    assert GGUFFile(write_gguf(tmp_path / "d.gguf", t)).architecture == "llama"


def test_custom_alignment_moves_the_data(tmp_path, mixed_tensors):
    """general.alignment is where readers look for tensor data: writing the key must also align the data."""
    path = write_gguf(tmp_path / "m.gguf", mixed_tensors, {"general.alignment": 256})
    f = GGUFFile(path)
    assert f.metadata["general.alignment"] == 256
    assert all(info.offset % 256 == 0 for info in f.tensor_infos.values())
    assert f.tensor("blk.0.attn_q.weight").equal(mixed_tensors["blk.0.attn_q.weight"])
    assert torch.equal(f.tensor("positions"), mixed_tensors["positions"])
    with pytest.raises(ValueError, match="general.alignment' must be a power of two"):
        write_gguf(tmp_path / "n.gguf", mixed_tensors, {"general.alignment": 48})


def test_bad_tensors_are_named(tmp_path):
    with pytest.raises(ValueError, match="tensor 'x': GGUF tensors have 1 to 4 dimensions"):
        write_gguf(tmp_path / "a.gguf", {"x": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="tensor 'x': GGUF tensors have 1 to 4 dimensions"):
        write_gguf(tmp_path / "a.gguf", {"x": torch.zeros(1, 1, 1, 1, 2)})
    with pytest.raises(ValueError, match="longer than 63 bytes"):
        write_gguf(tmp_path / "a.gguf", {"x" * 64: torch.zeros(2)})
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, mixed_tensors):
    """The file is written under a temporary name beside the target and renamed in only when complete."""
    import gguf

    path = tmp_path / "m.gguf"
    original = gguf.GGUFWriter.write_tensors_to_file

    def fail_halfway(self, *args, **kwargs):
        for fout in self.fout:
            fout.write(b"\0" * 1000)          # some bytes reach the disk, then the disk is full
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail_halfway)
    with pytest.raises(OSError, match="No space left"):
        write_gguf(path, mixed_tensors, METADATA)
    assert not list(tmp_path.iterdir())                     # nothing at the path, no temporary left

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", original)
    write_gguf(path, mixed_tensors, METADATA)
    before = path.read_bytes()
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail_halfway)
    with pytest.raises(OSError):
        write_gguf(path, {"x": torch.zeros(4)})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_closed_file_raises_a_clear_error(tmp_path, mixed_tensors):
    path = write_gguf(tmp_path / "m.gguf", mixed_tensors)
    f = GGUFFile(path)
    view = f.tensor("token_embd.weight")
    _ = f.metadata
    f.close()
    assert f.closed and "closed" in repr(f)
    for use in (lambda: f.tensor("token_embd.weight"), lambda: f.raw_bytes("output.weight"), f.tensors,
                lambda: f.metadata, lambda: f.architecture):
        with pytest.raises(ValueError, match="m.gguf: GGUFFile is closed"):
            use()
    assert f.info("output.weight").type_name == "q8_0" and len(f) == len(mixed_tensors)   # the header stays
    assert torch.equal(view, mixed_tensors["token_embd.weight"])        # views handed out stay valid
    f.close()                                                           # closing twice is fine
    with GGUFFile(path) as g:
        assert g.architecture == "llama"
    with pytest.raises(ValueError, match="closed"):
        g.tensor("positions")


def test_quantized_tensors_with_leading_dimensions(tmp_path):
    """An expert stack: the (E * rows, K) QuantizedTensor written as (E, rows, K), read back as its rows; gguf's
    own reader sees the 3-D shape (ggml order K, rows, E)."""
    g = torch.Generator().manual_seed(3)
    stack = random_blocks("q4_k", 4 * 6, 512, g)
    path = write_gguf(tmp_path / "e.gguf", {"blk.0.ffn_up_exps.weight": stack}, shapes={"blk.0.ffn_up_exps.weight":
                                                                                          (4, 6, 512)})
    f = GGUFFile(path)
    assert f.info("blk.0.ffn_up_exps.weight").shape == (4, 6, 512)
    assert torch.equal(f.tensor("blk.0.ffn_up_exps.weight").data.reshape(-1), stack.data.reshape(-1))
    t = GGUFReader(path).tensors[0]
    assert [int(d) for d in t.shape] == [512, 6, 4]


@pytest.mark.parametrize("tensors, shapes, match", [
    ({"a": "q4_k"}, {"a": (5, 6, 512)}, r"does not split the q4_k tensor of shape \(24, 512\)"),
    ({"a": "q4_k"}, {"a": (4, 6, 256)}, "does not split"),
    ({"a": "q4_k"}, {"a": (1, 1, 1, 1, 24, 512)}, "2 to 4 dimensions"),
    ({"a": "float"}, {"a": (2, 2)}, "shapes are only given for QuantizedTensors"),
    ({"a": "q4_k"}, {"b": (4, 6, 512)}, "shapes given for tensors that are not written: 'b'"),
])
def test_bad_shapes_are_named_before_the_file_is_created(tmp_path, tensors, shapes, match):
    g = torch.Generator().manual_seed(4)
    made = {n: random_blocks("q4_k", 24, 512, g) if kind == "q4_k" else torch.zeros(4) for n, kind in tensors.items()}
    with pytest.raises(ValueError, match=match):
        write_gguf(tmp_path / "bad.gguf", made, shapes=shapes)
    assert not list(tmp_path.iterdir())


def _split(tmp_path, tensors, per_part=4, name="model.gguf"):
    return write_gguf(tmp_path / name, tensors, METADATA, architecture="llama", split_max_tensors=per_part)


def test_split_model_opens_from_its_first_part(tmp_path, mixed_tensors):
    """gguf-split's layout (the metadata in part 1, tensors spread over all, split.* keys in each): one GGUFFile
    over every part, tensors read from the part holding them, the split keys kept out of the model's metadata."""
    first = _split(tmp_path, mixed_tensors)
    assert first.name == "model-00001-of-00004.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model-0000{i}-of-00004.gguf" for i in range(1, 5)]
    raw = [GGUFReader(p) for p in sorted(tmp_path.iterdir())]
    assert [int(r.fields["split.no"].contents()) for r in raw] == [0, 1, 2, 3]
    assert all(int(r.fields["split.tensors.count"].contents()) == len(mixed_tensors) for r in raw)
    assert "general.name" in raw[0].fields and "general.name" not in raw[1].fields
    f = GGUFFile(first)
    assert f.parts == sorted(tmp_path.iterdir()) and len(f) == len(mixed_tensors)
    assert {f.info(n).part for n in f} == {0, 1, 2, 3}
    assert not any(k.startswith("split.") for k in f.metadata) and f.metadata["general.name"] == "round-trip test"
    for name, original in mixed_tensors.items():
        loaded = f.tensor(name)
        assert loaded.equal(original) if isinstance(original, QuantizedTensor) else torch.equal(loaded, original)
    # a model that fits in one part is written as one file, under the name given
    assert write_gguf(tmp_path / "small.gguf", {"x": torch.zeros(4)}, split_max_tensors=4).name == "small.gguf"


def test_broken_splits_are_named(tmp_path, mixed_tensors):
    first = _split(tmp_path, mixed_tensors)
    second = first.with_name("model-00002-of-00004.gguf")
    with pytest.raises(GGUFError, match=r"part 2 of a model split in 4; open the first part \(model-00001-of-00004"):
        GGUFFile(second)
    renamed = first.rename(tmp_path / "renamed.gguf")
    with pytest.raises(GGUFError, match="must be named <prefix>-00001-of-00004.gguf"):
        GGUFFile(renamed)
    renamed.rename(first)
    second.rename(tmp_path / "elsewhere.gguf")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00004.gguf"):
        GGUFFile(first)
    # a part from another split in its place
    (tmp_path / "other").mkdir()
    other = _split(tmp_path / "other", {f"t{i}": torch.zeros(2) for i in range(6)}, per_part=2)
    other.with_name("model-00002-of-00003.gguf").rename(second)
    with pytest.raises(GGUFError, match="expected split part 2 of 4, but its metadata says split.no=1, split.count=3"):
        GGUFFile(first)


def test_split_max_tensors_is_checked_and_a_failed_split_write_leaves_nothing(tmp_path, monkeypatch, mixed_tensors):
    import gguf

    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="split_max_tensors must be a non-negative int"):
            write_gguf(tmp_path / "m.gguf", mixed_tensors, split_max_tensors=bad)

    def fail(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="No space left"):
        _split(tmp_path, mixed_tensors)
    assert not list(tmp_path.iterdir())
