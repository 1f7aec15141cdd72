"""qmatmul_experts (the grouped expert GEMV and GEMM) against float64 math on each chosen expert's dequantized
matrix.

The Triton tests patch the op's torch reference to fail and count launches, so they pass only if the
grouped kernel computed the result in one launch; outputs start as NaN (``poisoned``).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from offload_kernels import kernels
from offload_kernels.formats import QTYPES, get_spec
from offload_kernels.kernels import qmatmul_experts
from offload_kernels.kernels.qmatmul_experts import qmatmul_expert_buffer

from .conftest import X_DTYPES
from .helpers import TOLERANCE, activations, random_qtensor, relative_error, seed_of

EXPERTS, ROWS = 5, 40          # 40 output rows per expert: not a multiple of any tile
K_ODD = {q: 1280 if get_spec(q).block_size == 256 else 800 for q in QTYPES}
VARIANTS = ("expert_gemv", "expert_gemv_splitk", "expert_gemm", "expert_gemm_splitk")


@pytest.fixture
def grouped_only(monkeypatch):
    """The op's torch reference patched to fail; launch counters reset."""
    module = importlib.import_module("offload_kernels.kernels.qmatmul_experts")

    def refuse(*args, **kwargs):
        raise AssertionError("the torch reference ran instead of the grouped Triton kernel")

    monkeypatch.setattr(module, "_torch_experts", refuse)
    kernels.reset_launch_counts()


@pytest.fixture
def sorted_runs(monkeypatch) -> list:
    """The block size of every sorted launch (sort_pairs_by_expert calls) while the test runs."""
    module = importlib.import_module("offload_kernels.kernels.qmatmul_experts")
    calls = []
    original = module.sort_pairs_by_expert

    def spy(ids, num_experts, block_m):
        calls.append(block_m)
        return original(ids, num_experts, block_m)

    monkeypatch.setattr(module, "sort_pairs_by_expert", spy)
    return calls


def _one_launch() -> str:
    ran = {k: v for k, v in kernels.launch_counts().items() if v}
    assert sum(ran.values()) == 1 and next(iter(ran)) in VARIANTS, f"expected one grouped launch, got {ran}"
    kernels.reset_launch_counts()
    return next(iter(ran))


def _reference(x, qt, ids, bias, num_experts=EXPERTS):
    """float64 (differentiable in x and bias): each pair's row of x (shared by a token's experts, or its own)
    times its expert."""
    n = qt.shape[0] // num_experts
    w = qt.dequantize(torch.float32).double().view(num_experts, n, -1)
    xd = x.double()
    if x.dim() == ids.dim():                 # one row per token, shared by its k experts
        xd = xd.unsqueeze(-2).expand(*ids.shape, x.shape[-1])
    y = torch.einsum("...k,...nk->...n", xd, w[ids.long()])
    if bias is not None:
        y = y + bias.double().view(num_experts, n)[ids.long()]
    return y


def _case(qtype, dtype, tokens, top_k, g, device, *, per_pair=False, with_bias=True):
    k = K_ODD[qtype]
    qt = random_qtensor(qtype, EXPERTS * ROWS, k, g, device=device)
    ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:top_k] for _ in range(tokens)]).to(device)
    x = activations((tokens, top_k, k) if per_pair else (tokens, k), g).to(dtype).to(device)
    bias = activations((EXPERTS * ROWS,), g).to(dtype).to(device) if with_bias else None
    return x, qt, ids, bias


@pytest.mark.parametrize("per_pair", [False, True], ids=["shared_rows", "row_per_pair"])
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_matches_float64(qtype, dtype, per_pair, device, grouped_only, poisoned, sorted_runs):
    """3 tokens x 2 of 5 experts: more than half a pair per expert, so sorted into blocks of 4."""
    g = torch.Generator().manual_seed(seed_of(qtype, dtype, per_pair))
    x, qt, ids, bias = _case(qtype, dtype, 3, 2, g, device, per_pair=per_pair)
    y = qmatmul_experts(x, qt, ids, EXPERTS, bias, backend="triton")
    assert y.shape == (3, 2, ROWS) and y.dtype == dtype
    assert relative_error(y, _reference(x, qt, ids, bias)) <= TOLERANCE[dtype]
    _one_launch()
    assert sorted_runs == [4]


@pytest.mark.parametrize("per_pair", [False, True], ids=["shared_rows", "row_per_pair"])
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", ["q4_k", "q3_k", "q6_k", "q8_0", "q4_0", "iq4_xs"])
def test_one_pair_per_program_matches_float64(qtype, dtype, per_pair, device, grouped_only, poisoned, sorted_runs):
    """1 token x 2 of 5 experts: few pairs per expert, one program row per pair, nothing sorted."""
    g = torch.Generator().manual_seed(seed_of("unsorted", qtype, dtype, per_pair))
    x, qt, ids, bias = _case(qtype, dtype, 1, 2, g, device, per_pair=per_pair)
    y = qmatmul_experts(x, qt, ids, EXPERTS, bias, backend="triton")
    assert relative_error(y, _reference(x, qt, ids, bias)) <= TOLERANCE[dtype]
    _one_launch()
    assert sorted_runs == []


@pytest.mark.parametrize("per_pair", [False, True], ids=["shared_rows", "row_per_pair"])
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_grouped_gemm_matches_float64(qtype, dtype, per_pair, device, grouped_only, poisoned, sorted_runs):
    """13 tokens x 2 of 5 experts: more than 4 pairs per expert, so the tensor-core GEMM over blocks of 16
    pairs sorted by expert (partial blocks everywhere, spare blocks of padding)."""
    g = torch.Generator().manual_seed(seed_of("gemm", qtype, dtype, per_pair))
    x, qt, ids, bias = _case(qtype, dtype, 13, 2, g, device, per_pair=per_pair)
    y = qmatmul_experts(x, qt, ids, EXPERTS, bias, backend="triton")
    assert y.shape == (13, 2, ROWS) and y.dtype == dtype
    assert relative_error(y, _reference(x, qt, ids, bias)) <= TOLERANCE[dtype]
    assert _one_launch() == "expert_gemm"
    assert sorted_runs == [16]


@pytest.mark.parametrize("tokens,block_m,split_k", [(40, 32, 1), (100, 64, 1), (40, 32, 3)])
def test_grouped_gemm_block_sizes_and_k_split(tokens, block_m, split_k, device, grouped_only, poisoned, sorted_runs):
    """Many tokens on 3 experts: blocks of 32 and 64 pairs (mean 27 and 67 pairs per expert), uneven
    counts, and K cut in 3 uneven slices (3, 3 and 2 of 8 K tiles) finished by the tile's last program."""
    g = torch.Generator().manual_seed(seed_of("gemm_blocks", tokens, split_k))
    qt = random_qtensor("q4_k", 3 * ROWS, 512, g, device=device)
    ids = torch.randint(0, 3, (tokens, 2), generator=g).to(device)
    x = activations((tokens, 512), g).to(device)
    bias = activations((3 * ROWS,), g).to(device)
    y = qmatmul_experts(x, qt, ids, 3, bias, backend="triton", split_k=split_k)
    assert relative_error(y, _reference(x, qt, ids, bias, num_experts=3)) <= TOLERANCE[torch.float32]
    assert _one_launch() == ("expert_gemm_splitk" if split_k > 1 else "expert_gemm")
    assert sorted_runs == [block_m]


@pytest.mark.parametrize("kernel,tokens", [("gemm", 1), ("gemv", 13)])
def test_forcing_the_other_kernel(kernel, tokens, device, grouped_only, poisoned):
    """kernel= overrides the choice by pairs per expert: the GEMM for one token (one block of 16 per chosen
    expert, mostly padding), the GEMV for 13 tokens; both still right."""
    g = torch.Generator().manual_seed(seed_of("forced", kernel))
    x, qt, ids, bias = _case("q3_k", torch.float16, tokens, 2, g, device)
    y = qmatmul_experts(x, qt, ids, EXPERTS, bias, backend="triton", kernel=kernel)
    assert relative_error(y, _reference(x, qt, ids, bias)) <= TOLERANCE[torch.float16]
    assert _one_launch().startswith(f"expert_{kernel}")


TILE_OPTIONS = [dict(BLOCK_N=32, BLOCK_K=32), dict(BLOCK_N=128, BLOCK_K=128), dict(SWAP_AB=True),
                dict(BLOCK_K=128, SWAP_AB=True)]


@pytest.mark.parametrize("option", TILE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("qtype", ["q4_k", "q6_k", "q8_0", "q4_0"])
def test_grouped_gemm_tuned_tile_options(qtype, option, device, grouped_only, poisoned, monkeypatch):
    """Tile options only the GPU autotuner picks (other N/K tile sizes, swapped operands: the weight tile
    as the MMA's first operand), forced through the heuristic config, fp16 and fp32 (tf32x3)."""
    from offload_kernels.kernels import configs

    heuristic = configs.expert_gemm_heuristic_config

    def forced(*args, **kwargs):
        c = heuristic(*args, **kwargs)
        return configs._expert_gemm_config(option.get("BLOCK_N", c.kwargs["BLOCK_N"]),
                                           option.get("BLOCK_K", c.kwargs["BLOCK_K"]), c.kwargs["split_k"],
                                           c.num_warps, c.num_stages, option.get("SWAP_AB", False))

    monkeypatch.setattr(configs, "expert_gemm_heuristic_config", forced)
    for dtype in X_DTYPES:
        g = torch.Generator().manual_seed(seed_of("tiles", qtype, dtype, *option))
        x, qt, ids, bias = _case(qtype, dtype, 11, 2, g, device, per_pair=True)
        y = qmatmul_experts(x, qt, ids, EXPERTS, bias, backend="triton")
        assert relative_error(y, _reference(x, qt, ids, bias)) <= TOLERANCE[dtype]
        assert _one_launch() == "expert_gemm"


@pytest.mark.parametrize("qtype", ["q4_k", "q5_k", "q6_k", "q4_0"])
def test_grouped_gemm_weight_decodes(qtype, device, poisoned):
    """Both weight decodes of the GEMM for fp16 activations (exact fp32 then rounded; fp16 arithmetic), and
    q4_k/q5_k block heads read as words or byte by byte (an expert stride that breaks 4-byte alignment)."""
    from offload_kernels.kernels.expert_gemm import expert_gemm
    from offload_kernels.kernels.qmatmul_experts import sort_pairs_by_expert

    g = torch.Generator().manual_seed(seed_of("decodes", qtype))
    spec = get_spec(qtype)
    x, qt, ids, _ = _case(qtype, torch.float16, 9, 2, g, device, with_bias=False)
    size = ROWS * spec.row_bytes(x.shape[-1])
    for stride in (size, size + 2):
        buf = torch.zeros(EXPERTS * stride, dtype=torch.uint8, device=device)
        for e in range(EXPERTS):
            buf[e * stride:e * stride + size] = qt.data[e * ROWS:(e + 1) * ROWS].reshape(-1)
        block_experts, block_rows = sort_pairs_by_expert(ids, EXPERTS, 16)
        for f16_decode in (False, True):
            out = torch.full((ids.numel(), ROWS), float("nan"), dtype=torch.float16, device=device)
            expert_gemm(x, buf, qtype, ROWS, x.shape[-1], spec.row_bytes(x.shape[-1]), stride, EXPERTS,
                        block_experts, block_rows, 2, None, out, f16_decode=f16_decode)
            assert relative_error(out.view(9, 2, ROWS), _reference(x, qt, ids, None)) <= TOLERANCE[torch.float16]


@pytest.mark.parametrize("experts,tokens,top_k,block_m", [(5, 9, 2, 4), (16, 5, 2, 2), (3, 40, 2, 4), (7, 1, 7, 2)])
def test_sorting_pairs_by_expert(experts, tokens, top_k, block_m):
    """Every pair in exactly one block, every block's pairs routed to its expert, at most block_m pairs per
    block, the grid's spare blocks pure padding."""
    from offload_kernels.kernels.qmatmul_experts import sort_pairs_by_expert

    g = torch.Generator().manual_seed(seed_of(experts, tokens, top_k))
    ids = torch.randint(0, experts, (tokens, top_k), generator=g)
    block_experts, rows = sort_pairs_by_expert(ids, experts, block_m)
    pairs = ids.numel()
    assert rows.shape == (-(-pairs // block_m) + min(experts, pairs), block_m) and rows.dtype == torch.int32
    live = rows[rows < pairs]
    assert sorted(live.tolist()) == list(range(pairs))
    flat = ids.reshape(-1)
    for b in range(rows.shape[0]):
        members = rows[b][rows[b] < pairs].long()
        assert torch.all(flat[members] == int(block_experts[b]))
    used = sum(-(-int((flat == e).sum()) // block_m) for e in range(experts))
    assert torch.all(rows[used:] == pairs)


def test_sorted_blocks_with_repeats_and_padding(device, grouped_only, poisoned, sorted_runs):
    """The GEMV (forced) with many tokens on few experts (40 x 2 of 3: blocks of 4, most experts several
    blocks, partial last blocks, spare padding blocks), rows per pair, split along K."""
    g = torch.Generator().manual_seed(8)
    qt = random_qtensor("q4_k", 3 * ROWS, 512, g, device=device)
    ids = torch.randint(0, 3, (40, 2), generator=g).to(device)
    x = activations((40, 2, 512), g).to(device)
    bias = activations((3 * ROWS,), g).to(device)
    y = qmatmul_experts(x, qt, ids, 3, bias, backend="triton", kernel="gemv", split_k=2)
    assert relative_error(y, _reference(x, qt, ids, bias, num_experts=3)) <= TOLERANCE[torch.float32]
    assert _one_launch() == "expert_gemv_splitk" and sorted_runs == [4]


@pytest.mark.parametrize("tokens", [1, 2], ids=["per_pair", "sorted"])
@pytest.mark.parametrize("layout", [1, 2, 3])
@pytest.mark.parametrize("split_k", [1, 5])
@pytest.mark.parametrize("qtype", ["q4_k", "q3_k", "q6_k", "q4_0", "q8_0"])
def test_every_layout_and_k_split(qtype, split_k, layout, tokens, device, grouped_only, poisoned):
    """Each GEMV loop layout, whole and split five ways along K (the tile's last program finishes it), one
    pair per program (1 token x 2 experts) and sorted (2 tokens x 3 experts: blocks of 4)."""
    g = torch.Generator().manual_seed(seed_of(qtype, split_k, layout, tokens))
    x, qt, ids, bias = _case(qtype, torch.float32, tokens, 2 if tokens == 1 else 3, g, device)
    y = qmatmul_experts(x, qt, ids, EXPERTS, bias, backend="triton", split_k=split_k, layout=layout)
    assert relative_error(y, _reference(x, qt, ids, bias)) <= TOLERANCE[torch.float32]
    assert _one_launch() == ("expert_gemv_splitk" if split_k > 1 else "expert_gemv")


@pytest.mark.parametrize("routing", ["all_one_expert", "repeats", "last_expert_only"])
def test_routing_patterns_and_leading_dims(routing, device, grouped_only, poisoned):
    """ids of shape (2, 3, k): every pair on one expert, repeated experts within a token, the last expert
    (the end of the stack's bytes)."""
    g = torch.Generator().manual_seed(seed_of(routing))
    qt = random_qtensor("q4_k", EXPERTS * ROWS, 512, g, device=device)
    if routing == "all_one_expert":
        ids = torch.full((2, 3, 4), 2)
    elif routing == "repeats":
        ids = torch.randint(0, 2, (2, 3, 4), generator=g)
    else:
        ids = torch.full((2, 3, 4), EXPERTS - 1)
    ids = ids.to(device)
    x = activations((2, 3, 512), g).to(device)
    y = qmatmul_experts(x, qt, ids, EXPERTS, backend="triton")
    assert y.shape == (2, 3, 4, ROWS)
    assert relative_error(y, _reference(x, qt, ids, None)) <= TOLERANCE[torch.float32]
    _one_launch()


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64, torch.int16])
def test_torch_backend_and_id_dtypes_agree(ids_dtype, device):
    g = torch.Generator().manual_seed(seed_of("torch", ids_dtype))
    x, qt, ids, bias = _case("q5_k", torch.float32, 4, 2, g, device)
    ids = ids.to(ids_dtype)
    ref = _reference(x, qt, ids, bias)
    y_torch = qmatmul_experts(x, qt, ids, EXPERTS, bias, backend="torch")
    y_triton = qmatmul_experts(x, qt, ids, EXPERTS, bias, backend="triton")
    assert relative_error(y_torch, ref) <= 1e-6
    assert relative_error(y_triton, ref) <= TOLERANCE[torch.float32]


def test_no_tokens(device):
    qt = random_qtensor("q4_0", EXPERTS * ROWS, 64, torch.Generator().manual_seed(0), device=device)
    y = qmatmul_experts(torch.zeros(0, 64, device=device), qt, torch.zeros(0, 2, dtype=torch.long, device=device),
                        EXPERTS, backend="triton")
    assert y.shape == (0, 2, ROWS)


@pytest.mark.parametrize("bad,match", [(-1, "negative expert ids"), (EXPERTS, "ids >= num_experts=5")])
def test_out_of_range_ids_raise_before_launch(bad, match, device):
    g = torch.Generator().manual_seed(1)
    x, qt, ids, _ = _case("q4_k", torch.float32, 2, 2, g, device)
    ids[1, 0] = bad
    kernels.reset_launch_counts()
    with pytest.raises(ValueError, match=match):
        qmatmul_experts(x, qt, ids, EXPERTS, backend="triton")
    assert not any(kernels.launch_counts().values())


def test_unchecked_ids_are_clamped_inside_the_weight(device, poisoned):
    """check_ids=False (what CUDA graph capture gets): an id out of range reads the nearest expert, never
    bytes outside the stack."""
    g = torch.Generator().manual_seed(2)
    x, qt, ids, bias = _case("q4_k", torch.float32, 2, 2, g, device)
    bad = ids.clone()
    bad[0, 0], bad[1, 1] = -7, EXPERTS + 100
    y = qmatmul_experts(x, qt, bad, EXPERTS, bias, backend="triton", check_ids=False)
    clamped = bad.clamp(0, EXPERTS - 1)
    assert relative_error(y, _reference(x, qt, clamped, bias)) <= TOLERANCE[torch.float32]


def test_experts_spaced_apart_in_a_buffer(device, poisoned):
    """qmatmul_expert_buffer: experts at a stride larger than their bytes (an expert cache's slots), the
    padding filled with bytes that would decode to garbage if read."""
    g = torch.Generator().manual_seed(3)
    spec = get_spec("q6_k")
    qt = random_qtensor("q6_k", 3 * ROWS, 512, g, device=device)
    size = ROWS * spec.row_bytes(512)
    stride = size + 512
    buf = torch.full((3 * stride,), 0xFF, dtype=torch.uint8, device=device)
    for e in range(3):
        buf[e * stride:e * stride + size] = qt.data[e * ROWS:(e + 1) * ROWS].reshape(-1)
    ids = torch.tensor([[2, 0], [1, 2]], device=device)
    x = activations((2, 2, 512), g).to(device)
    for backend in ("triton", "torch"):
        y = qmatmul_expert_buffer(x, buf, "q6_k", ROWS, 512, stride, 3, ids, backend)
        assert relative_error(y, _reference(x, qt, ids, None, num_experts=3)) <= TOLERANCE[torch.float32]


def test_backward_for_x_and_bias(device):
    """Gradients of the input (summed over a token's experts for shared rows) and of each expert's bias,
    against autograd through the float64 reference."""
    g = torch.Generator().manual_seed(4)
    for per_pair in (False, True):
        x, qt, ids, bias = _case("q8_0", torch.float32, 3, 2, g, device, per_pair=per_pair)
        x.requires_grad_(True)
        bias.requires_grad_(True)
        grad_out = torch.randn(3, 2, ROWS, generator=g).to(device)
        (qmatmul_experts(x, qt, ids, EXPERTS, bias, backend="torch") * grad_out).sum().backward()
        x64 = x.detach().double().requires_grad_(True)
        b64 = bias.detach().double().requires_grad_(True)
        (_reference(x64, qt, ids, b64) * grad_out.double()).sum().backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bias.grad.double(), b64.grad, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph(device, grouped_only):
    """The op traces into a graph without breaks (check_ids=False: no host read), kernel inside it."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    x, qt, ids, bias = _case("q4_k", torch.float32, 2, 2, g, device)

    def f(x, ids):
        return torch.relu(qmatmul_experts(x * 2, qt, ids, EXPERTS, bias, backend="triton", check_ids=False)) + 1

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, ids)
    torch.testing.assert_close(y, f(x, ids), rtol=0, atol=0)
    assert kernels.launch_counts()["expert_gemv"] + kernels.launch_counts()["expert_gemv_splitk"] == 2


BAD_ARGS = [
    (dict(x=torch.zeros(2, 100)), ValueError, r"x must have shape \(\.\.\., 512\)"),
    (dict(x=torch.zeros(3, 512)), ValueError, r"one row per token of expert_ids"),
    (dict(x=torch.zeros(2, 512, dtype=torch.float64)), TypeError, "float32, float16 or bfloat16"),
    (dict(ids=torch.zeros(2, 2)), TypeError, "integer expert ids"),
    (dict(ids=torch.tensor(1)), ValueError, r"\(\.\.\., k\)"),
    (dict(num_experts=3), ValueError, "not a stack of 3 experts"),
    (dict(num_experts=0), ValueError, "positive int"),
    (dict(bias=torch.zeros(ROWS)), ValueError, r"bias must have shape \(200,\)"),
    (dict(bias=torch.zeros(EXPERTS * ROWS, dtype=torch.float16)), TypeError, "does not match x dtype"),
    (dict(backend="cuda"), ValueError, "unknown backend"),
    (dict(backend="torch", split_k=2), ValueError, "need backend='triton'"),
    (dict(backend="torch", kernel="gemm"), ValueError, "need backend='triton'"),
    (dict(backend="triton", kernel="gemm", layout=2), ValueError, "kernel='gemm' has none"),
    (dict(kernel="dequant"), ValueError, "unknown kernel 'dequant'"),
    (dict(qt="q4_k"), TypeError, "QuantizedTensor"),
]


@pytest.mark.parametrize("override,exc,match", BAD_ARGS)
def test_bad_arguments_name_the_problem(override, exc, match):
    g = torch.Generator().manual_seed(6)
    args = dict(x=torch.zeros(2, 512), qt=random_qtensor("q4_k", EXPERTS * ROWS, 512, g),
                ids=torch.zeros(2, 2, dtype=torch.long), num_experts=EXPERTS, bias=None, backend="torch")
    args.update(override)
    options = {key: args.pop(key) for key in ("split_k", "layout", "kernel") if key in args}
    kernels.reset_launch_counts()
    with pytest.raises(exc, match=match):
        qmatmul_experts(args["x"], args["qt"], args["ids"], args["num_experts"], args["bias"], args["backend"],
                        **options)
    assert not any(kernels.launch_counts().values())


def test_a_buffer_too_small_for_its_experts_is_refused():
    with pytest.raises(ValueError, match="cannot hold 3 experts"):
        qmatmul_expert_buffer(torch.zeros(1, 1, 256), torch.zeros(1000, dtype=torch.uint8), "q4_k", 4, 256, 576, 3,
                              torch.zeros(1, 1, dtype=torch.long))
