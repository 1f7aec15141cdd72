"""qmatmul's Triton kernels against float64 math on the dequantized weight.

Every test here uses the ``triton_only`` fixture (the torch path patched to fail, launch counters checked)
and, where a kernel writes the output directly, the ``poisoned`` fixture (outputs start as NaN, so an
element a kernel failed to write fails the finiteness check in helpers.relative_error).
"""

from __future__ import annotations

import pytest
import torch

from offload_kernels import kernels
from offload_kernels.formats import QTYPES, QuantizedTensor, get_spec

from .conftest import X_DTYPES
from .helpers import DISTRIBUTIONS, activations, assert_close, quantized_from_weights, random_qtensor, seed_of

# K per qtype: one block, several blocks, and a longer non-power-of-two multiple (q4_0/q8_0: 25 blocks,
# i.e. three full 8-block GEMV steps and a partial one, and a partial last GEMM tile).
K_ONE = {q: get_spec(q).block_size for q in QTYPES}
#: K with several blocks / with an odd number of steps: super-block formats (256 weights) and 32-weight ones.
K_SEVERAL = {q: 768 if get_spec(q).block_size == 256 else 224 for q in QTYPES}
K_ODD = {q: 1280 if get_spec(q).block_size == 256 else 800 for q in QTYPES}

FAMILY_VARIANTS = {"gemv": ("gemv", "gemv_splitk"), "gemm": ("gemm", "gemm_splitk"), "dequant": ("dequant",)}


def _expect_family(check, family: str) -> None:
    """Exactly one launch, of either variant (split or not) of ``family``."""
    ran = {k: v for k, v in kernels.launch_counts().items() if v}
    assert sum(ran.values()) == 1 and next(iter(ran)) in FAMILY_VARIANTS[family], \
        f"expected one {family} launch, got {ran}"
    check.expect(**ran)


@pytest.mark.parametrize("m", [1, 3, 17, 64, 1100])
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_auto_dispatch(qtype, dtype, m, device, triton_only, poisoned):
    """kernel='auto' runs the family of the crossover table, and its result is right."""
    g = torch.Generator().manual_seed(seed_of(qtype, dtype, m))
    k = K_SEVERAL[qtype]
    qt = random_qtensor(qtype, 40, k, g, device=device)
    x = activations((m, k), g).to(dtype).to(device)
    y = kernels.qmatmul(x, qt, backend="triton")
    assert_close(y, x, qt, None)
    _expect_family(triton_only, kernels.select_kernel(m))


# (kernel, split_k, expected variant, x leading dims)
FORCED = [
    ("gemv", 1, "gemv", (2, 3)),
    ("gemv", 2, "gemv_splitk", (2, 3)),
    ("gemm", 1, "gemm", (3, 11)),
    ("gemm", 3, "gemm_splitk", (3, 11)),
    ("dequant", None, "dequant", (3, 11)),
]


@pytest.mark.parametrize("kernel,split_k,variant,lead", FORCED, ids=[f"{c[0]}-split{c[1]}" for c in FORCED])
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_each_kernel_family(qtype, dtype, kernel, split_k, variant, lead, device, triton_only, poisoned):
    """Every family forced explicitly, with a bias and leading batch dims, on an N that is not a multiple
    of any tile (40) and a K that is not a power-of-two number of blocks."""
    g = torch.Generator().manual_seed(seed_of(qtype, dtype, kernel, split_k))
    k = K_ODD[qtype]
    qt = random_qtensor(qtype, 40, k, g, device=device)
    x = activations((*lead, k), g).to(dtype).to(device)
    bias = activations((40,), g).to(dtype).to(device)
    y = kernels.qmatmul(x, qt, bias, backend="triton", kernel=kernel, split_k=split_k)
    assert_close(y, x, qt, bias)
    triton_only.expect(**{variant: 1})


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
@pytest.mark.parametrize("k_kind", ["one_block", "several_blocks", "odd_blocks"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_k_shapes(qtype, k_kind, kernel, device, triton_only, poisoned):
    """One block, a few blocks, a long non-power-of-two row; N smaller than any tile."""
    k = {"one_block": K_ONE, "several_blocks": K_SEVERAL, "odd_blocks": K_ODD}[k_kind][qtype]
    g = torch.Generator().manual_seed(seed_of(qtype, k_kind, kernel))
    qt = random_qtensor(qtype, 7, k, g, device=device)
    x = activations((3, k), g).to(device)
    y = kernels.qmatmul(x, qt, backend="triton", kernel=kernel)
    assert_close(y, x, qt, None)
    _expect_family(triton_only, kernel)


def _layout_that_runs(layout: int, qtype: str, m: int, aligned: bool) -> int:
    """The layout the GEMV heuristic runs when asked for ``layout`` (configs.gemv_heuristic_config): layout
    3 needs word-aligned bytes (any, for mxfp4) and at most 4 tokens, else q4_k/q5_k run layout 2 and the others
    layout 1; layout 2 needs at most 4 tokens (its accumulator would spill), else layout 1."""
    from offload_kernels.kernels import configs

    if layout == 3 and not ((aligned or configs.GEMV3_ALIGNMENT[qtype] == 1) and m <= 4):
        layout = 2 if qtype in ("q4_k", "q5_k") else 1
    if layout == 2 and m > 4:
        layout = 1
    return layout


@pytest.mark.parametrize("layout", [1, 2, 3])
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_gemv_layouts(qtype, dtype, layout, device, triton_only, poisoned, gemv_layouts_ran, monkeypatch):
    """Every GEMV loop layout (the tuner picks between them on a GPU) with 1..8 tokens, bias, split and
    unsplit K, odd N and K, and weight bytes at an odd address; the config that ran is checked to be the
    layout under test where it can run, else the heuristic's fallback (heuristic configs: no tuning here)."""
    from offload_kernels.kernels import configs

    ran = gemv_layouts_ran
    if layout == 3:     # the default wherever it runs; elsewhere the formats' defaults
        monkeypatch.setattr(configs, "GEMV3_DEFAULT_MAX_BLOCK_M", configs.GEMV3_MAX_BLOCK_M)
    else:
        monkeypatch.setattr(configs, "GEMV3_DEFAULT_MAX_BLOCK_M", 0)
        monkeypatch.setattr(configs, "GEMV_DEFAULT_LAYOUT", dict.fromkeys(QTYPES, layout))
    g = torch.Generator().manual_seed(seed_of("layouts", qtype, dtype, layout))
    k = K_ODD[qtype]
    src = random_qtensor(qtype, 37, k, g)
    slot = torch.zeros(src.nbytes + 1, dtype=torch.uint8)
    slot[1:] = src.data.flatten()
    odd = QuantizedTensor(slot.to(device)[1:].view(37, -1), qtype, (37, k))
    for qt, aligned in ((src.to(device), True), (odd, False)):
        # K splits that do not divide the steps (5 or 6 steps, 4 for the 32-weight formats' K of 800: 3
        # slices of 2 leave the last one empty, which must not add the partial step again)
        for m, split in ((1, 1), (2, 5) if get_spec(qtype).block_size == 256 else (2, 3), (4, 1), (5, 1)):
            x = activations((m, k), g).to(dtype).to(device)
            bias = activations((37,), g).to(dtype).to(device)
            ran.clear()
            y = kernels.qmatmul(x, qt, bias, backend="triton", kernel="gemv", split_k=split)
            assert_close(y, x, qt, bias)
            assert ran == [_layout_that_runs(layout, qtype, m, aligned)], ran
            triton_only.expect(**{"gemv" if split == 1 else "gemv_splitk": 1})


def test_gemv_rejects_unknown_layout(triton_only):
    from offload_kernels.kernels.gemv import gemv

    qt = random_qtensor("q4_k", 8, 256, torch.Generator().manual_seed(2))
    out = torch.full((1, 8), float("nan"))
    with pytest.raises(ValueError, match="unknown GEMV layout 4"):
        gemv(torch.ones(1, 256), qt, None, out, layout=4)
    assert torch.isnan(out).all()         # raised before anything ran
    triton_only.expect()


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("qtype", ["q4_0", "q5_1", "q8_0", "iq4_nl", "q4_k", "q3_k"])
def test_distributions(qtype, distribution, device, triton_only, poisoned):
    """Activations of several distributions; 32-weight block formats quantized from weights of the same
    distribution by the package's quantizer, k-quants from random blocks."""
    g = torch.Generator().manual_seed(seed_of(qtype, distribution))
    k = K_SEVERAL[qtype]
    if get_spec(qtype).block_size == 32:
        qt = quantized_from_weights(qtype, 24, k, g, distribution).to(device)
    else:
        qt = random_qtensor(qtype, 24, k, g, device=device)
    for m, kernel in ((2, "gemv"), (20, "gemm")):
        for dtype in (torch.float32, torch.float16):
            x = activations((m, k), g, distribution).to(dtype).to(device)
            assert_close(kernels.qmatmul(x, qt, backend="triton", kernel=kernel), x, qt, None)
            _expect_family(triton_only, kernel)


@pytest.mark.parametrize("kernel", ["gemv", "gemm", "dequant"])
def test_noncontiguous_and_batched_x(kernel, device, triton_only, poisoned):
    g = torch.Generator().manual_seed(seed_of("layout", kernel))
    qt = random_qtensor("q4_k", 33, 512, g, device=device)
    wide = activations((4, 3, 1024), g).to(device)
    x = wide[..., ::2]                                   # K stride 2
    assert_close(kernels.qmatmul(x, qt, backend="triton", kernel=kernel), x, qt, None)
    x = activations((5, 2, 512), g).to(device).transpose(0, 1)   # leading dims not contiguous
    assert_close(kernels.qmatmul(x, qt, backend="triton", kernel=kernel), x, qt, None)
    x = activations((512,), g).to(device)                # a single token without a batch dim
    y = kernels.qmatmul(x, qt, backend="triton", kernel=kernel)
    assert y.shape == (33,)
    assert_close(y, x, qt, None)


def test_empty_batch(device, triton_only):
    qt = random_qtensor("q4_0", 8, 64, torch.Generator().manual_seed(0), device=device)
    y = kernels.qmatmul(torch.empty(0, 3, 64, device=device), qt, backend="triton")
    assert y.shape == (0, 3, 8)
    triton_only.expect()


@pytest.mark.parametrize("qtype", QTYPES)
def test_weight_bytes_at_odd_offset(qtype, device, triton_only, poisoned):
    """The weight as a view into a 1-D byte buffer at an odd offset (a transfer-engine slot): no kernel
    may assume more than contiguity (e.g. 2-byte-aligned fp16 fields)."""
    g = torch.Generator().manual_seed(seed_of("offset", qtype))
    k = K_SEVERAL[qtype]
    src = random_qtensor(qtype, 19, k, g)
    slot = torch.zeros(src.nbytes + 7, dtype=torch.uint8)
    slot[3:3 + src.nbytes] = src.data.flatten()
    slot = slot.to(device)
    qt = QuantizedTensor(slot[3:3 + src.nbytes].view(19, -1), qtype, (19, k))
    assert qt.data.data_ptr() % 2 == 1
    for m, kernel in ((1, "gemv"), (5, "gemm"), (5, "dequant")):
        x = activations((m, k), g).to(torch.float16).to(device)
        assert_close(kernels.qmatmul(x, qt, backend="triton", kernel=kernel), x, qt, None)
        _expect_family(triton_only, kernel)


def test_poison_catches_unwritten_rows(device):
    """The poisoning is what makes the tests above sensitive to unwritten outputs: a launch that covers
    only some rows leaves NaN behind, which the checks reject."""
    from offload_kernels.kernels.dequant import dequantize_into
    from offload_kernels.kernels.runtime import new_output

    from .helpers import relative_error

    qt = random_qtensor("q4_k", 16, 256, torch.Generator().manual_seed(1), device=device)
    first_rows = QuantizedTensor(qt.data[:12], "q4_k", (12, 256))
    with kernels.poison_outputs():
        out = new_output((16, 256), torch.float32, qt.device)
    assert torch.isnan(out).all()
    dequantize_into(first_rows, out[:12])
    assert torch.isfinite(out[:12]).all() and torch.isnan(out[12:]).all()
    with pytest.raises(AssertionError, match="non-finite"):
        relative_error(out, torch.ones(16, 256, dtype=torch.float64))


@pytest.mark.parametrize("swap", [False, True], ids=["x_first", "w_first"])
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_gemm_operand_orders(qtype, dtype, swap, device, triton_only, poisoned, monkeypatch):
    """The fused GEMM with either operand first (SWAP_AB, a tuned option: y.T = W @ x.T), a few and many
    tokens, bias, split and unsplit K, N = 37; the config that ran is checked to be of the order under
    test (heuristic configs, forced here: no tuning)."""
    from offload_kernels.kernels import configs

    ran = []
    heuristic = configs.gemm_heuristic_config

    def forced_order(*args, **kwargs):
        config = heuristic(*args, **kwargs)
        config.kwargs["SWAP_AB"] = swap
        ran.append(swap)
        return config

    monkeypatch.setattr(configs, "gemm_heuristic_config", forced_order)
    g = torch.Generator().manual_seed(seed_of("operand order", qtype, dtype, swap))
    k = K_ODD[qtype]
    qt = random_qtensor(qtype, 37, k, g, device=device)
    for m, split in ((3, 1), (20, 2), (70, 1)):
        x = activations((m, k), g).to(dtype).to(device)
        bias = activations((37,), g).to(dtype).to(device)
        ran.clear()
        y = kernels.qmatmul(x, qt, bias, backend="triton", kernel="gemm", split_k=split)
        assert_close(y, x, qt, bias)
        assert ran == [swap]
        triton_only.expect(**{"gemm" if split == 1 else "gemm_splitk": 1})
