"""The fused GEMM's two weight decodes, read back exactly: multiplying by an fp16 identity makes every
output element one weight times 1.0 (exact in the fp32 accumulator), so y = x @ W.T with x = I returns the
(K, N) decoded weight tile as the kernel fed it to tl.dot.

* exact decode: equal to the torch dequantizer's fp32 weight rounded to fp16, bit for bit;
* fp16-arithmetic decode: within decode_tile_f16's stated bound of that fp32 weight.
"""

from __future__ import annotations

import pytest
import torch

from offload_kernels.formats import QTYPES, QuantizedTensor, dequantize, get_spec
from offload_kernels.kernels import poison_outputs
from offload_kernels.kernels.gemm import f16_decode_default, gemm

from .helpers import random_qtensor, seed_of

#: The quant bytes of q2_k / q4_k / q5_k blocks (zeroing them leaves w = -min, the min term alone).
QUANT_BYTES = {"q2_k": slice(16, 80), "q4_k": slice(16, 144), "q5_k": slice(16, 176)}
U16 = 2.0 ** -11          # fp16 unit roundoff


def _decoded_by_gemm(qt: QuantizedTensor, f16_decode: bool, device) -> torch.Tensor:
    n, k = qt.shape
    eye = torch.eye(k, dtype=torch.float16, device=device)
    with poison_outputs():
        out = torch.full((k, n), float("nan"), dtype=torch.float16, device=device)
    variant = gemm(eye, qt, None, out, split_k=1, f16_decode=f16_decode)
    assert variant == "gemm"
    return out.T.float()


def _min_term(qt: QuantizedTensor) -> torch.Tensor:
    """dmin * m of each weight's sub-block (q2_k/q4_k/q5_k; 0 for the other formats), exactly."""
    if qt.qtype not in QUANT_BYTES:
        return torch.zeros(qt.shape)
    raw = qt.data.cpu().clone()
    raw.view(-1, get_spec(qt.qtype).block_bytes)[:, QUANT_BYTES[qt.qtype]] = 0
    return -dequantize(QuantizedTensor(raw, qt.qtype, qt.shape), torch.float32)


def _at_offset(qt: QuantizedTensor, offset: int) -> QuantizedTensor:
    """The same bytes starting ``offset`` bytes past an allocation's (aligned) start."""
    flat = torch.empty(qt.data.numel() + offset, dtype=torch.uint8, device=qt.data.device)
    flat[offset:] = qt.data.reshape(-1)
    moved = QuantizedTensor(flat[offset:].view(qt.data.shape), qt.qtype, qt.shape)
    assert moved.data.data_ptr() % 16 == offset
    return moved


@pytest.mark.parametrize("offset", [0, 2], ids=["aligned", "2-byte-aligned"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_exact_decode_is_the_dequantized_weight_rounded(qtype, offset, device):
    """Bit-exact through both ways of reading q4_k/q5_k block heads (int32 words when 4-byte aligned,
    bytes otherwise) and every format's byte reader at an address that is only 2-byte aligned."""
    g = torch.Generator().manual_seed(seed_of("exact", qtype))
    k = 2 * get_spec(qtype).block_size
    qt = _at_offset(random_qtensor(qtype, 40, k, g, device=device), offset)
    got = _decoded_by_gemm(qt, False, device)
    want = dequantize(qt, torch.float32).cpu().to(torch.float16).float()
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("offset", [0, 2], ids=["aligned", "2-byte-aligned"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_f16_decode_within_its_error_bound(qtype, offset, device):
    g = torch.Generator().manual_seed(seed_of("f16", qtype))
    k = 2 * get_spec(qtype).block_size
    qt = _at_offset(random_qtensor(qtype, 40, k, g, device=device), offset)
    got = _decoded_by_gemm(qt, True, device).cpu().double()
    w = dequantize(qt, torch.float32).cpu().double()
    mn = _min_term(qt).double()
    bound = U16 * ((w + mn).abs() + mn.abs() + w.abs()) + 2.0 ** -24     # + half the fp16 subnormal step
    excess = (got - w).abs() - bound
    assert excess.max() <= 0, f"{int((excess > 0).sum())} weights beyond the bound, worst by {excess.max():.3g}"
    # And it is an approximation, not secretly the exact path: some weight differs from exact rounding
    # for the formats with a min term (the rounded min shifts whole sub-blocks).
    if qtype in QUANT_BYTES:
        assert not torch.equal(got.float(), w.float().half().float())


def test_f16_decode_default_and_misuse(device):
    assert [q for q in QTYPES if f16_decode_default(torch.float16, q)] == ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0",
                                                                          "q2_k", "q4_k", "q5_k"]
    assert not any(f16_decode_default(dt, q) for dt in (torch.float32, torch.bfloat16) for q in QTYPES)
    qt = random_qtensor("q4_k", 8, 256, torch.Generator().manual_seed(0), device=device)
    x = torch.randn(3, 256, device=device)
    out = torch.empty(3, 8, device=device)
    with pytest.raises(ValueError, match="f16_decode=True needs float16 activations"):
        gemm(x, qt, None, out, split_k=1, f16_decode=True)
