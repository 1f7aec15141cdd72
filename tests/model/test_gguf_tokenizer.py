"""Byte-level BPE tokenizers in GGUF files (``tokenizer.ggml.model`` "gpt2"): ``save_gguf`` writes one from a
tokenizers/transformers BPE (``gguf_vocab.byte_level_vocab``), ``load_gguf_tokenizer`` builds it back for every
architecture, glm4moe and gpt-oss included, and splits text with llama.cpp's regex for the file's pre-tokenizer.

The BPE is trained here without any split, on generated text full of the boundaries the pre-tokenizers disagree
on (CamelCase, contractions in any case, digit runs, punctuation before newlines, whitespace runs, marks), so its
merges cross those boundaries and a wrong split gives other ids. With llama.cpp installed its own tokenizer is
the reference, and each other split in the table is shown to disagree with it (the texts discriminate)."""

from __future__ import annotations

import json
import random
import subprocess
import unicodedata
from pathlib import Path

import pytest

from offload_kernels.formats.gguf_io import GGUFError, GGUFFile
from offload_kernels.model.gguf_export import save_gguf
from offload_kernels.model.gguf_model import load_gguf_tokenizer
from offload_kernels.model.gguf_vocab import (PRE_TOKENIZER_SPLITS, byte_level_vocab, pre_tokenizer_name,
                                              set_pre_tokenizer, vocab_from_gguf, vocab_metadata)

from .test_gguf_model import _llama_cpp_python, _rewrite, needs_llama_cpp, tiny_model

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIAL = ("<|endoftext|>", "<|return|>")
USER_DEFINED = "<think>"
SYLLABLES = ("ka", "lo", "re", "the", "in", "ser", "ver", "ht", "tp", "ing", "ed", "ou", "st", "an")
CAMEL = ("Get", "Set", "Value", "Http", "Server", "ID", "Max")
PUNCTUATION = ("):", "...", "=>", "!=", "//", "/*", ",", ";", "'", "(", "$", "-")
OTHER_SCRIPTS = ("naïve", "émigré", "日本語", "Ελληνικά", "Straße", "e\u0301te\u0301", "ÇAĞRI", "ǅemal", "😀👍")


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))


def _piece(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:                                               # CamelCase, acronyms inside
        return "".join(rng.choice(CAMEL) for _ in range(rng.randint(2, 3)))
    if kind == 1:                                               # contractions in any case
        word = rng.choice(("they", "it", "WE", "You", rng.choice(SYLLABLES)))
        suffix = rng.choice(("'s", "'t", "'re", "'ve", "'m", "'ll", "'d"))
        return word + "".join(c.upper() if rng.random() < 0.5 else c for c in suffix)
    if kind == 2:                                               # digit runs of every length
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 9)))
    if kind == 3:                                               # punctuation, then maybe line breaks or a slash
        return rng.choice(PUNCTUATION) + rng.choice(("", "\n", "\r\n", "\n\n", "/"))
    if kind == 4:                                               # whitespace runs
        return rng.choice((" ", "\t", "\n")) * rng.randint(1, 4)
    if kind == 5:
        return rng.choice(OTHER_SCRIPTS)
    if kind == 6:                                               # paths
        return "/".join(_word(rng) for _ in range(rng.randint(2, 3)))
    return _word(rng)


def generated_text(seed: int, lines: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(_piece(rng) + rng.choice(("", " ", " ", "  ")) for _ in range(rng.randint(3, 10)))
            for _ in range(lines)]


def trained_bpe():
    """A byte-level BPE of about 1,200 tokens trained with no split, two special tokens and one user-defined."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(generated_text(seed=0, lines=3000), trainer)
    tok.add_tokens([AddedToken(USER_DEFINED, special=False, normalized=False)])
    return tok


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")

# What each pre-tokenizer is tested on: the architecture whose files carry it (gpt-oss and glm4moe are the ones
# transformers' AutoTokenizer cannot read).
PRE_ARCHITECTURES = {"llama-bpe": "llama", "qwen2": "qwen2", "gpt-4o": "gpt-oss", "glm4": "glm4moe",
                     "deepseek-v3": "deepseek2", "deepseek-llm": "deepseek2", "deepseek-coder": "llama"}


def _tiny(arch: str, vocab_size: int):
    if arch == "gpt-oss":
        from .test_gguf_gpt_oss import tiny_gpt_oss

        return tiny_gpt_oss(vocab_size=vocab_size, num_hidden_layers=2)
    if arch == "glm4moe":
        from .test_gguf_glm4moe import tiny_glm4_moe

        return tiny_glm4_moe(vocab_size=vocab_size)
    if arch == "deepseek2":
        from .test_gguf_deepseek2 import tiny_deepseek_v3

        return tiny_deepseek_v3(vocab_size=vocab_size, num_hidden_layers=2)
    return tiny_model(arch, layers=1, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def bpe():
    return trained_bpe()


@pytest.fixture(scope="module")
def files(bpe, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_tokenizer")
    out = {}
    for pre, arch in PRE_ARCHITECTURES.items():
        vocab = byte_level_vocab(bpe, pre, bos=SPECIAL[0], eos=SPECIAL[1])
        vocab["add_bos"] = pre == "llama-bpe"                   # Llama 3 files add BOS, the others do not
        vocab["chat_template"] = CHAT_TEMPLATE
        out[pre] = save_gguf(_tiny(arch, len(vocab["tokens"])), root / f"{pre}.gguf", "q8_0", vocab=vocab)
    return out


TEXTS = generated_text(seed=1, lines=60) + [
    "", "x", "HTTPServer's CamelCaseWORDS", "THEY'LL it'S we'Re", "1 12 123 1234 12345678901",
    "def f(x):\n    return x\r\n\n\n  ", "a  b   c\t\td", f"{SPECIAL[0]}text{SPECIAL[1]}", f"say {USER_DEFINED} then",
]


def _llama_cpp_ids(path: Path, tmp_path: Path) -> dict:
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(TEXTS), encoding="utf-8")
    script = Path(__file__).with_name("llama_cpp_tokens.py")
    out = subprocess.run([_llama_cpp_python(), str(script), str(path), str(texts)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def _ours(tokenizer, add_special: bool) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in TEXTS]


def _comparable(pre: str) -> list[bool]:
    """The texts on which llama.cpp's split is the model's own. For "gpt-4o" llama.cpp approximates o200k's case
    classes with ASCII ones (a non-ASCII letter counts as both cases) and counts combining marks as no letter; we
    keep the model's regex (what its tokenizer.json and tiktoken apply), so texts with non-ASCII cased letters or
    marks are left out of the comparison there (test_file_tokenizer_round_trips... pins ÇAĞRI's split)."""
    def differs(c: str) -> bool:
        return not c.isascii() and unicodedata.category(c) in ("Lu", "Ll", "Lt", "Mn", "Mc", "Me")

    return [pre != "gpt-4o" or not any(map(differs, t)) for t in TEXTS]


@needs_llama_cpp
@pytest.mark.parametrize("pre", list(PRE_ARCHITECTURES))
def test_ids_match_llama_cpp(files, pre, tmp_path):
    keep = _comparable(pre)
    assert sum(keep) >= 40

    def kept(ids: list) -> list:
        return [x for x, k in zip(ids, keep) if k]

    theirs = _llama_cpp_ids(files[pre], tmp_path)
    tokenizer = load_gguf_tokenizer(files[pre])
    assert kept(_ours(tokenizer, add_special=False)) == kept(theirs["plain"])
    assert kept(_ours(tokenizer, add_special=True)) == kept(theirs["special"])    # BOS as the file says
    assert (theirs["special"][1][0] == 0) == (pre == "llama-bpe")
    # the texts discriminate: every other split in the table gives other ids somewhere
    for other, split in PRE_TOKENIZER_SPLITS.items():
        if split != PRE_TOKENIZER_SPLITS[pre]:
            set_pre_tokenizer(tokenizer, other)
            assert kept(_ours(tokenizer, add_special=False)) != kept(theirs["plain"]), other


@pytest.mark.parametrize("pre", list(PRE_ARCHITECTURES))
def test_file_tokenizer_round_trips_and_keeps_added_tokens_whole(files, bpe, pre):
    import offload_kernels as ok

    tokenizer = ok.load_gguf_tokenizer(files[pre])                            # the public name
    assert len(tokenizer) == bpe.get_vocab_size()
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text                                   # byte-level: lossless
    ids = tokenizer(TEXTS[-2], add_special_tokens=False)["input_ids"]
    assert ids[0] == bpe.token_to_id(SPECIAL[0]) and ids[-1] == bpe.token_to_id(SPECIAL[1])
    assert bpe.token_to_id(USER_DEFINED) in tokenizer(TEXTS[-1], add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token == SPECIAL[1]
    pieces = [p for p, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("12345 CamelCase ÇAĞRI")]
    expected = {"llama-bpe": ["123", "45", "ĠCamelCase", "ĠÃĩAÄŀRI"],
                "qwen2": ["1", "2", "3", "4", "5", "ĠCamelCase", "ĠÃĩAÄŀRI"],
                "gpt-4o": ["123", "45", "ĠCamel", "Case", "ĠÃĩAÄŀRI"],    # o200k's Unicode case classes
                # DeepSeek-V2's punctuation split runs over ':'-'~', ASCII letters included, after its word split
                "deepseek-llm": ["12345", "ĠCamelCase", "ĠÃĩ", "A", "Äŀ", "RI"],
                "deepseek-coder": ["1", "2", "3", "4", "5", "ĠCamelCase", "ĠÃĩAÄŀRI"]}
    assert pieces == expected["llama-bpe" if pre in ("glm4", "deepseek-v3") else pre]


def test_save_gguf_writes_the_byte_level_vocabulary(files, bpe):
    md = GGUFFile(files["gpt-4o"]).metadata
    vocab = byte_level_vocab(bpe, "gpt-4o")
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-4o"
    assert list(md["tokenizer.ggml.tokens"]) == vocab["tokens"]
    assert list(md["tokenizer.ggml.merges"]) == vocab["merges"] and len(vocab["merges"]) > 800
    types = list(md["tokenizer.ggml.token_type"])
    assert types[bpe.token_to_id(SPECIAL[0])] == 3 and types[bpe.token_to_id(USER_DEFINED)] == 4
    assert types.count(1) == len(types) - 3
    assert md["tokenizer.ggml.bos_token_id"] == 0 and md["tokenizer.ggml.eos_token_id"] == 1
    assert md["tokenizer.ggml.add_bos_token"] is False
    assert "tokenizer.ggml.scores" not in md


def test_chat_template_round_trips(files, bpe):
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, chat_template=CHAT_TEMPLATE)
    assert byte_level_vocab(fast, "gpt-4o")["chat_template"] == CHAT_TEMPLATE
    assert "chat_template" not in byte_level_vocab(bpe, "gpt-4o")
    assert GGUFFile(files["gpt-4o"]).metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    tokenizer = load_gguf_tokenizer(files["gpt-4o"])
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "user: hi\nassistant:"
    with pytest.raises(ValueError, match="vocab chat_template must be a Jinja template string, got int"):
        vocab_metadata({**byte_level_vocab(bpe, "gpt-4o"), "chat_template": 3}, bpe.get_vocab_size())


def test_resaving_a_file_with_its_vocabulary_keeps_the_tokenizer(files, tmp_path):
    """load -> save_gguf(vocab=vocab_from_gguf(file)) writes the same tokenizer metadata (here in another format)."""
    from offload_kernels.model.gguf_model import load_gguf_model

    path = files["llama-bpe"]
    again = save_gguf(load_gguf_model(path, device="cpu"), tmp_path / "again.gguf", "q4_0",
                      vocab=vocab_from_gguf(path))
    ours, theirs = GGUFFile(path).metadata, GGUFFile(again).metadata
    keys = sorted(k for k in ours if k.startswith("tokenizer."))
    assert keys == sorted(k for k in theirs if k.startswith("tokenizer.")) and "tokenizer.ggml.merges" in keys
    assert all(list(ours[k]) == list(theirs[k]) if isinstance(ours[k], (list, tuple)) else ours[k] == theirs[k]
               for k in keys)
    assert load_gguf_tokenizer(again)(TEXTS[0])["input_ids"] == load_gguf_tokenizer(path)(TEXTS[0])["input_ids"]
    with pytest.raises(GGUFError, match="tokenizer.ggml.model is None"):
        from offload_kernels.formats import write_gguf

        vocab_from_gguf(write_gguf(tmp_path / "bare.gguf", {"x": __import__("torch").zeros(4)}, {}))


def test_pre_tokenizer_name_is_found_from_the_tokenizers_own_split(bpe):
    """Each split of the table is recognized from a tokenizer that applies it (names sharing one split: the
    preferred one, else the table's first); a split none of them makes is refused, not guessed."""
    from tokenizers import pre_tokenizers

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    for name in PRE_TOKENIZER_SPLITS:
        set_pre_tokenizer(fast, name)
        found = pre_tokenizer_name(fast, prefer=(name,))
        assert found == name
        assert byte_level_vocab(fast, bos=SPECIAL[0])["pre"] == (
            "llama-bpe" if PRE_TOKENIZER_SPLITS[name] == PRE_TOKENIZER_SPLITS["llama-bpe"] else name)
    fast.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)      # GPT-2's own
    with pytest.raises(ValueError, match="splits text as none of llama-bpe, llama3, glm4, qwen2, gpt-4o, deepseek-v3"):
        byte_level_vocab(fast)


def test_save_gguf_takes_the_models_tokenizer(bpe, tmp_path):
    """save_gguf(tokenizer=...) writes the tokenizer with the pre-tokenizer name llama.cpp's converter gives the
    architecture (glm4moe: "glm4", whose split is Llama 3's), and loads back splitting the same way."""
    from .test_gguf_glm4moe import tiny_glm4_moe

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=SPECIAL[1])
    set_pre_tokenizer(fast, "llama-bpe")
    model = tiny_glm4_moe(vocab_size=bpe.get_vocab_size())
    path = save_gguf(model, tmp_path / "glm.gguf", "q8_0", tokenizer=fast)
    md = GGUFFile(path).metadata
    assert md["tokenizer.ggml.pre"] == "glm4" and md["tokenizer.ggml.eos_token_id"] == bpe.token_to_id(SPECIAL[1])
    assert load_gguf_tokenizer(path)(TEXTS[:5])["input_ids"] == fast(TEXTS[:5])["input_ids"]
    with pytest.raises(ValueError, match="save_gguf takes vocab or tokenizer, not both"):
        save_gguf(model, tmp_path / "both.gguf", "q8_0", tokenizer=fast, vocab=byte_level_vocab(bpe, "glm4"))
    assert not (tmp_path / "both.gguf").exists()


def test_byte_level_vocab_refuses_what_a_gguf_cannot_hold(bpe):
    from tokenizers import Tokenizer, models

    with pytest.raises(TypeError, match="expects a transformers fast tokenizer or a tokenizers.Tokenizer, got dict"):
        byte_level_vocab({}, "gpt-4o")
    with pytest.raises(ValueError, match="pre must name llama.cpp's pre-tokenizer"):
        byte_level_vocab(bpe, "")
    with pytest.raises(ValueError, match="needs a BPE tokenizer, got a WordLevel model"):
        byte_level_vocab(Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")), "gpt-4o")
    with pytest.raises(ValueError, match="ids are not 0..n-1 without gaps"):
        byte_level_vocab(Tokenizer(models.BPE({"a": 0, "b": 2}, [])), "gpt-4o")
    with pytest.raises(ValueError, match="bos token '<s>' is not in the tokenizer's vocabulary"):
        byte_level_vocab(bpe, "gpt-4o", bos="<s>")


def test_vocab_metadata_checks_the_dict(bpe):
    vocab = byte_level_vocab(bpe, "gpt-4o")
    n = len(vocab["tokens"])
    with pytest.raises(ValueError, match="vocab model 'bert' is not one of"):
        vocab_metadata({**vocab, "model": "bert"}, n)
    with pytest.raises(ValueError, match="a 'gpt2' vocab needs tokens, token_type, merges, pre; missing merges"):
        vocab_metadata({k: v for k, v in vocab.items() if k != "merges"}, n)
    with pytest.raises(ValueError, match=f"vocab has {n} tokens but the model's vocab_size is {n + 1}"):
        vocab_metadata(vocab, n + 1)
    with pytest.raises(ValueError, match=f"vocab has {n} tokens but {n - 1} token_type"):
        vocab_metadata({**vocab, "token_type": vocab["token_type"][1:]}, n)
    with pytest.raises(ValueError, match=f"vocab eos id {n} is outside the {n} tokens"):
        vocab_metadata({**vocab, "eos": n}, n)


def test_a_file_without_tokenizer_metadata_is_named(tmp_path):
    from offload_kernels.formats import write_gguf

    path = write_gguf(tmp_path / "bare.gguf", {"x": __import__("torch").zeros(4)}, {}, architecture="llama")
    with pytest.raises(GGUFError, match="bare.gguf: no tokenizer metadata"):
        load_gguf_tokenizer(path)


def test_an_unknown_pre_tokenizer_is_warned_about(files, tmp_path, caplog):
    """A byte-level vocabulary whose pre-tokenizer is none of the table's (Falcon's "falcon", say) is split as
    GPT-2 splits it, which llama.cpp does not: said, not silent."""
    other = _rewrite(tmp_path, files["qwen2"], "other.gguf", {"tokenizer.ggml.pre": "falcon"})
    with caplog.at_level("WARNING", logger="offload_kernels"):
        load_gguf_tokenizer(other)
    assert "pre-tokenizer 'falcon' is not one whose split this package knows" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="offload_kernels"):
        load_gguf_tokenizer(files["qwen2"])
    assert "pre-tokenizer" not in caplog.text
