"""The tokenizer part of a GGUF file: the vocabulary dicts ``save_gguf`` writes and their metadata keys.

Two kinds, as llama.cpp names them in ``tokenizer.ggml.model``:
- "llama": SentencePiece-style, tokens with scores (``synthetic_spm_vocab`` makes one for tests and tiny models);
- "gpt2": byte-level BPE, tokens spelled in GPT-2's byte alphabet plus merges, and the pre-tokenizer's name
  (``tokenizer.ggml.pre``: "gpt-4o" for gpt-oss, "llama-bpe" for Llama 3, ...), which picks the split regex
  llama.cpp applies before merging (``byte_level_vocab`` builds one from a transformers/tokenizers BPE tokenizer).
Either may carry a chat template; ``vocab_from_gguf`` reads a file's back.
"""

from __future__ import annotations

import json
import os
from typing import Any

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6

VOCAB_MODELS = ("llama", "gpt2")


def synthetic_spm_vocab(vocab_size: int, control_tokens: "tuple[str, ...]" = ()) -> dict:
    """A SentencePiece-style vocabulary of ``vocab_size`` tokens (specials, ``control_tokens``, 256 byte
    tokens, word pieces)."""
    if vocab_size < 260 + len(control_tokens):
        raise ValueError(f"a synthetic llama vocabulary needs at least {260 + len(control_tokens)} tokens, "
                         f"got {vocab_size}")
    tokens = ["<unk>", "<s>", "</s>", *control_tokens] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [CONTROL] * len(control_tokens) + [BYTE] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    n_fixed = len(tokens)
    i = 0
    while len(tokens) < vocab_size:
        word = letters[i % 26] + (letters[(i // 26) % 26] if i >= 26 else "")
        piece = ("\u2581" + word) if i % 2 == 0 else word
        if piece not in tokens:
            tokens.append(piece)
            types.append(NORMAL)
        i += 1
    scores = [0.0] * n_fixed + [-float(j) for j in range(len(tokens) - n_fixed)]
    return {"tokens": tokens, "scores": scores, "token_type": types, "bos": 1, "eos": 2, "unk": 0}


def byte_level_vocab(tokenizer: Any, pre: "str | None" = None, *, bos: "str | None" = None,
                     eos: "str | None" = None, prefer: "tuple[str, ...]" = ()) -> dict:
    """The "gpt2" vocabulary dict of a byte-level BPE ``tokenizer`` (a transformers fast tokenizer or a
    ``tokenizers.Tokenizer``): its tokens in id order, its merges, special added tokens as CONTROL and the other
    added tokens as USER_DEFINED (llama.cpp matches both whole in the text). ``pre`` is llama.cpp's pre-tokenizer
    name for the model's split regex; None finds it from the tokenizer's own split (``pre_tokenizer_name``,
    ``prefer`` breaking ties between names of one split). ``bos``/``eos`` name tokens (default: the transformers
    tokenizer's own, if any); a transformers tokenizer's chat template comes along (``tokenizer.chat_template`` in
    the file)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise TypeError(f"byte_level_vocab expects a transformers fast tokenizer or a tokenizers.Tokenizer, got "
                        f"{type(tokenizer).__name__}")
    if pre is None:
        pre = pre_tokenizer_name(tokenizer, prefer)
    if not isinstance(pre, str) or not pre:
        raise ValueError(f"pre must name llama.cpp's pre-tokenizer (e.g. 'gpt-4o', 'llama-bpe'), got {pre!r}")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"byte_level_vocab needs a BPE tokenizer, got a {model.get('type')} model")
    ids = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    ids.update({content: t["id"] for content, t in added.items()})
    by_id = sorted(ids.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError("the tokenizer's ids are not 0..n-1 without gaps; a GGUF vocabulary lists tokens by position")
    tokens = [t for t, _ in by_id]
    types = [(CONTROL if added[t]["special"] else USER_DEFINED) if t in added else NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab = {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges}
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        vocab["chat_template"] = tokenizer.chat_template
    for key, name in (("bos", bos if bos is not None else getattr(tokenizer, "bos_token", None)),
                      ("eos", eos if eos is not None else getattr(tokenizer, "eos_token", None))):
        if name is not None:
            if name not in ids:
                raise ValueError(f"{key} token {name!r} is not in the tokenizer's vocabulary")
            vocab[key] = ids[name]
    return vocab


#: The GGUF metadata key of each entry of a vocabulary dict ("model" is tokenizer.ggml.model).
GGUF_KEYS = {"tokens": "tokenizer.ggml.tokens", "token_type": "tokenizer.ggml.token_type",
             "scores": "tokenizer.ggml.scores", "merges": "tokenizer.ggml.merges", "pre": "tokenizer.ggml.pre",
             "bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
             "unk": "tokenizer.ggml.unknown_token_id", "add_bos": "tokenizer.ggml.add_bos_token",
             "chat_template": "tokenizer.chat_template"}


def vocab_from_gguf(path: "str | os.PathLike[str]") -> dict:
    """The vocabulary dict of a GGUF file's tokenizer metadata, for ``save_gguf(..., vocab=...)``: re-saving a
    loaded file (in another format, say) keeps its tokenizer."""
    from ..formats.gguf_io import GGUFError, GGUFFile

    with GGUFFile(path) as f:
        md = f.metadata
    kind = md.get("tokenizer.ggml.model")
    if kind not in VOCAB_MODELS:
        raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; save_gguf writes {' or '.join(VOCAB_MODELS)} "
                        f"vocabularies")
    vocab = {"model": kind, **{name: md[key] for name, key in GGUF_KEYS.items() if key in md}}
    for name in ("tokens", "token_type", "scores", "merges"):
        if name in vocab:
            vocab[name] = list(vocab[name])
    return vocab


def vocab_metadata(vocab: dict, vocab_size: int) -> dict:
    """The ``tokenizer.ggml.*`` metadata of a vocabulary dict, checked against the model's ``vocab_size``."""
    kind = vocab.get("model", "llama")
    if kind not in VOCAB_MODELS:
        raise ValueError(f"vocab model {kind!r} is not one of {VOCAB_MODELS}")
    needed = ("tokens", "scores", "token_type") if kind == "llama" else ("tokens", "token_type", "merges", "pre")
    missing = [key for key in needed if key not in vocab]
    if missing:
        raise ValueError(f"a {kind!r} vocab needs {', '.join(needed)}; missing {', '.join(missing)}")
    n = len(vocab["tokens"])
    if n != vocab_size:
        raise ValueError(f"vocab has {n} tokens but the model's vocab_size is {vocab_size}")
    for key in ("scores", "token_type"):
        if key in vocab and len(vocab[key]) != n:
            raise ValueError(f"vocab has {n} tokens but {len(vocab[key])} {key}")
    entries = {"tokens": list(vocab["tokens"]), "token_type": [int(t) for t in vocab["token_type"]]}
    if "scores" in vocab:
        entries["scores"] = [float(s) for s in vocab["scores"]]
    if kind == "gpt2":
        entries.update(pre=str(vocab["pre"]), merges=list(vocab["merges"]))
    for key in ("bos", "eos", "unk"):
        if vocab.get(key) is not None:
            if not 0 <= int(vocab[key]) < n:
                raise ValueError(f"vocab {key} id {vocab[key]} is outside the {n} tokens")
            entries[key] = int(vocab[key])
    entries["add_bos"] = bool(vocab.get("add_bos", kind == "llama"))
    if vocab.get("chat_template") is not None:
        if not isinstance(vocab["chat_template"], str):
            raise ValueError(f"vocab chat_template must be a Jinja template string, got "
                             f"{type(vocab['chat_template']).__name__}")
        entries["chat_template"] = vocab["chat_template"]
    return {"tokenizer.ggml.model": kind, **{GGUF_KEYS[name]: value for name, value in entries.items()}}


# The split each llama.cpp pre-tokenizer name applies before byte-level BPE merges, for the architectures this
# package loads: llama.cpp's regexes, but for gpt-4o o200k's own (tiktoken's, with Unicode case classes and
# marks, which llama.cpp approximates by ASCII ones). A tuple is a sequence of splits, each cutting the pieces of
# the one before (DeepSeek-V3's: digit runs, then CJK runs, then words). Checked against llama.cpp:
# tests/model/test_gguf_tokenizer.py.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_V3 = (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek-V2's (LLM, V2-Lite): line breaks alone, then runs of cased letters (the code point ranges of its class,
# written as numbers) or of ASCII and full-width punctuation, each after an optional whitespace (the punctuation class
# spans ':' to '~', ASCII letters included, so it also cuts non-ASCII words at their ASCII letters), trailing
# whitespace, CJK and Hangul runs, digit runs.
_DEEPSEEK_LLM_LETTERS = (
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF),
    (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377), (0x37B, 0x37D), (0x37F, 0x37F), (0x386, 0x386),
    (0x388, 0x38A), (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F), (0x531, 0x556),
    (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B),
    (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D),
    (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4),
    (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB),
    (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107), (0x210A, 0x2113),
    (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128), (0x212A, 0x212D),
    (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149), (0x214E, 0x214E), (0x2183, 0x2184),
    (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B),
    (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17),
    (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3), (0x104D8, 0x104FB),
    (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF), (0x1E900, 0x1E943))
_DEEPSEEK_LLM = (
    "[\r\n]",
    r"\s?[" + "".join(chr(lo) if lo == hi else f"{chr(lo)}-{chr(hi)}" for lo, hi in _DEEPSEEK_LLM_LETTERS) + "]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}+")
# DeepSeek-Coder's: line breaks alone, letter runs, punctuation runs (each after an optional whitespace), CJK and
# Hangul runs, single digits.
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_LLM[4], r"\p{N}")
PRE_TOKENIZER_SPLITS: "dict[str, str | tuple[str, ...]]" = {
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "glm4": _LLAMA3, "qwen2": _QWEN2, "gpt-4o": _GPT4O,
    "deepseek-v3": _DEEPSEEK_V3, "deepseek-llm": _DEEPSEEK_LLM, "deepseek-coder": _DEEPSEEK_CODER}


def set_pre_tokenizer(tokenizer: Any, pre: str) -> bool:
    """Give a transformers fast tokenizer of a byte-level vocabulary llama.cpp's split for ``pre``; False (and
    the tokenizer unchanged) when ``pre`` is not one of PRE_TOKENIZER_SPLITS."""
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        return False
    tokenizer.backend_tokenizer.pre_tokenizer = _split_then_bytes(split)
    return True


def _split_then_bytes(split: "str | tuple[str, ...]") -> Any:
    """The tokenizers pre-tokenizer that cuts text by the regex ``split`` (or each of a tuple's in turn) and spells
    each piece in GPT-2's byte alphabet (what a byte-level BPE's tokenizer.json says, and what llama.cpp does
    before merging)."""
    from tokenizers import Regex, pre_tokenizers

    regexes = (split,) if isinstance(split, str) else split
    return pre_tokenizers.Sequence([*(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


#: Text on which the splits of PRE_TOKENIZER_SPLITS all differ (CamelCase, contractions in capitals, digit runs,
#: punctuation before a line break and a slash, whitespace runs, a non-ASCII capital word, combining marks).
_PROBE = "HTTPServer's CamelCase THEY'LL go 12345678 x=1;\n\n  ÇAĞRI e\u0301te\u0301 日本語 ):/ end"


def _split_pieces(pre_tokenizer: Any) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(_PROBE)]


def pre_tokenizer_name(tokenizer: Any, prefer: "tuple[str, ...]" = ()) -> str:
    """The PRE_TOKENIZER_SPLITS name whose split cuts a probe text into exactly the pieces ``tokenizer``'s own
    pre-tokenizer does (the first of ``prefer`` where several names share one split, e.g. "glm4" for GLM-4.5);
    ValueError when none does, rather than a guess that would tokenize differently in llama.cpp."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    own = getattr(backend, "pre_tokenizer", None)
    if own is None:
        raise ValueError("the tokenizer has no pre-tokenizer to match against llama.cpp's; pass pre=")
    pieces = _split_pieces(own)
    matches = [name for name, split in PRE_TOKENIZER_SPLITS.items()
               if _split_pieces(_split_then_bytes(split)) == pieces]
    if not matches:
        raise ValueError(f"the tokenizer splits text as none of {', '.join(PRE_TOKENIZER_SPLITS)} does (its pieces of "
                         f"{_PROBE!r}: {pieces}); pass pre= with llama.cpp's name for it")
    return next((name for name in prefer if name in matches), matches[0])
