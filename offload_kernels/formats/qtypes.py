"""The GGUF block formats this package supports: one spec per format, looked up by name.

Layouts are llama.cpp's (ggml-common.h). Each row of K weights is K/block_size blocks of block_bytes
bytes laid end to end, so a tensor (N, K) is N * K/block_size * block_bytes bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType


@dataclass(frozen=True)
class QTypeSpec:
    """Static facts about one block format."""

    name: str                      # our canonical name, lower case: "q4_k"
    ggml_type: GGMLQuantizationType
    block_size: int                # weights per block (QK)
    block_bytes: int               # bytes per block
    fp16_offsets: tuple[int, ...]  # byte offsets of the fp16 scale fields (d, dmin / m) in a block (mxfp4: none)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_size

    def row_bytes(self, k: int) -> int:
        """Bytes of one row of k weights (k must be a multiple of block_size)."""
        return (k // self.block_size) * self.block_bytes


_SPECS = (
    QTypeSpec("q4_0", GGMLQuantizationType.Q4_0, 32, 18, (0,)),
    QTypeSpec("q4_1", GGMLQuantizationType.Q4_1, 32, 20, (0, 2)),
    QTypeSpec("q5_0", GGMLQuantizationType.Q5_0, 32, 22, (0,)),
    QTypeSpec("q5_1", GGMLQuantizationType.Q5_1, 32, 24, (0, 2)),
    QTypeSpec("iq4_nl", GGMLQuantizationType.IQ4_NL, 32, 18, (0,)),
    QTypeSpec("q8_0", GGMLQuantizationType.Q8_0, 32, 34, (0,)),
    QTypeSpec("q2_k", GGMLQuantizationType.Q2_K, 256, 84, (80, 82)),
    QTypeSpec("q3_k", GGMLQuantizationType.Q3_K, 256, 110, (108,)),
    QTypeSpec("q4_k", GGMLQuantizationType.Q4_K, 256, 144, (0, 2)),
    QTypeSpec("q5_k", GGMLQuantizationType.Q5_K, 256, 176, (0, 2)),
    QTypeSpec("q6_k", GGMLQuantizationType.Q6_K, 256, 210, (208,)),
    QTypeSpec("iq4_xs", GGMLQuantizationType.IQ4_XS, 256, 136, (0,)),
    # OCP MXFP4 (gpt-oss's experts): an E8M0 exponent byte, no fp16 field
    QTypeSpec("mxfp4", GGMLQuantizationType.MXFP4, 32, 17, ()),
)

#: Names of the supported block formats.
QTYPES: tuple[str, ...] = tuple(s.name for s in _SPECS)

#: llama-quantize's fallback for a tensor whose rows are not a whole number of 256-weight super-blocks (its
#: ``llama_tensor_get_type``): q2_k/q3_k/iq4_xs files then hold iq4_nl tensors, q4_k q5_0, q5_k q5_1, q6_k q8_0.
LLAMA_QUANTIZE_FALLBACKS: dict[str, str] = {"q2_k": "iq4_nl", "q3_k": "iq4_nl", "iq4_xs": "iq4_nl", "q4_k": "q5_0",
                                            "q5_k": "q5_1", "q6_k": "q8_0"}

_BY_NAME = {s.name: s for s in _SPECS}
_BY_GGML = {s.ggml_type: s for s in _SPECS}


def get_spec(qtype: "str | QTypeSpec | GGMLQuantizationType") -> QTypeSpec:
    """The spec of a format given as "q4_k"/"Q4_K", a QTypeSpec, or a gguf GGMLQuantizationType."""
    if isinstance(qtype, QTypeSpec):
        return qtype
    if isinstance(qtype, GGMLQuantizationType):
        try:
            return _BY_GGML[qtype]
        except KeyError:
            raise ValueError(f"unsupported GGML tensor type {qtype.name}; supported: {', '.join(QTYPES)}") from None
    if not isinstance(qtype, str):
        raise TypeError(f"qtype must be a string such as 'q4_k', got {type(qtype).__name__}")
    spec = _BY_NAME.get(qtype.strip().lower())
    if spec is None:
        raise ValueError(f"unknown qtype {qtype!r}; supported: {', '.join(QTYPES)}")
    return spec


def is_supported_ggml_type(ggml_type: GGMLQuantizationType) -> bool:
    return ggml_type in _BY_GGML
