"""GPU-only kernel tests: real shapes, bfloat16, the autotuner, torch.compile with inductor, CUDA graphs.

Like every kernel test, these run the heuristic configs (conftest.heuristic_configs_by_default);
test_autotuned_path and the "tuned" CUDA graph test switch autotuning on.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from offload_kernels import kernels
from offload_kernels.formats import QTYPES, dequantize, get_spec

from .helpers import activations, assert_close, random_bytes_qtensor, random_qtensor, seed_of

pytestmark = pytest.mark.gpu
runtime = importlib.import_module("offload_kernels.kernels.runtime")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: The formats added after the issue's six (fallback, legacy, iq4 and q2_k types) run every kernel family here
#: but at fewer token counts than the main formats: one per family, to bound the GPU suite's compile time.
SECONDARY_QTYPES = ("q4_1", "q5_0", "q5_1", "iq4_nl", "iq4_xs", "q2_k")
SECONDARY_M = (1, 4, 64, 4096)
LARGE_AUTO_CASES = [(qtype, m) for qtype in QTYPES for m in (1, 2, 4, 16, 64, 512, 4096)
                    if qtype not in SECONDARY_QTYPES or m in SECONDARY_M]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype,m", LARGE_AUTO_CASES)
def test_large_auto(qtype, dtype, m, triton_only, poisoned):
    g = torch.Generator().manual_seed(seed_of("gpu", qtype, dtype, m))
    qt = random_qtensor(qtype, 4096, 4096, g, device="cuda")
    x = activations((m, 4096), g).to(dtype).cuda()
    bias = activations((4096,), g).to(dtype).cuda()
    assert_close(kernels.qmatmul(x, qt, bias), x, qt, bias)
    ran = {k for k, v in kernels.launch_counts().items() if v}
    assert len(ran) == 1 and next(iter(ran)).startswith(kernels.select_kernel(m))


@pytest.mark.parametrize("kernel,split_k", [("gemv", 1), ("gemv", 4), ("gemm", 1), ("gemm", 4), ("dequant", None)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_large_forced(qtype, dtype, kernel, split_k, triton_only, poisoned):
    """Each family on an odd large shape: N = 14336 + 40 (no tile multiple), K = 4096 + one block."""
    g = torch.Generator().manual_seed(seed_of("gpu-forced", qtype, dtype, kernel, split_k))
    k = 4096 + get_spec(qtype).block_size
    qt = random_qtensor(qtype, 14336 + 40, k, g, device="cuda")
    x = activations((3 if kernel == "gemv" else 300, k), g).to(dtype).cuda()
    assert_close(kernels.qmatmul(x, qt, backend="triton", kernel=kernel, split_k=split_k), x, qt, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_dequant_bit_exact_large(qtype, dtype):
    qt = random_bytes_qtensor(qtype, 4096 + 3, 4096, torch.Generator().manual_seed(seed_of(qtype))).cuda()
    got = kernels.dequantize_triton(qt, dtype, out=torch.full(qt.shape, float("nan"), dtype=dtype, device="cuda"))
    want = dequantize(qt, dtype)
    view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(view), want.view(view))


def test_autotuned_path(triton_only, poisoned, monkeypatch):
    """First call per shape tunes (benchmarks the pruned configs), later calls reuse the winner."""
    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    runtime.forget_tuned_configs()
    g = torch.Generator().manual_seed(11)
    qt = random_qtensor("q4_k", 4096, 4096, g, device="cuda")
    for m in (1, 64, 2048):
        x = activations((m, 4096), g).half().cuda()
        for _ in range(2):
            assert_close(kernels.qmatmul(x, qt), x, qt, None)
    assert len(runtime._tuned) == 3
    runtime.forget_tuned_configs()


@pytest.mark.parametrize("tuned", [True, False], ids=["tuned", "untuned"])
@pytest.mark.parametrize("m", [1, 40, 2000])
def test_cuda_graph_capture_and_replay(m, tuned, monkeypatch):
    """Capture qmatmul in a CUDA graph, replay it on new inputs, and get the right result. "tuned": the
    shape was autotuned before the capture. "untuned": autotuning is on but nothing is cached for the
    shape, so the capture must launch the heuristic config (compiled by a warm-up) without benchmarking."""
    runtime.forget_tuned_configs()
    g = torch.Generator().manual_seed(seed_of("graph", m))
    qt = random_qtensor("q3_k", 4096 + 40, 4096, g, device="cuda")
    bias = activations((4096 + 40,), g).half().cuda()
    static_x = activations((m, 4096), g).half().cuda()
    monkeypatch.setattr(runtime, "AUTOTUNE", tuned)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.qmatmul(static_x, qt, bias)  # warm-up outside the capture: compiles (and tunes when allowed)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    assert len(runtime._tuned) == (1 if tuned else 0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = kernels.qmatmul(static_x, qt, bias)
    assert len(runtime._tuned) == (1 if tuned else 0), "the capture tuned a shape"
    for _ in range(3):
        static_x.copy_(activations((m, 4096), g).half().cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert_close(static_y, static_x, qt, bias)
    runtime.forget_tuned_configs()


@pytest.mark.parametrize("kernel,m", [("gemv", 1), ("gemv", 4), ("gemm", 48)])
def test_split_k_last_arrival_under_load(kernel, m, triton_only, poisoned):
    """The split-K epilogue's last-arrival reduction on real hardware: hundreds of back-to-back calls with
    splits from 2 to 32 (many programs racing for each tile's counter), each result against its own
    float64 reference, then the kept workspace and counters all zero."""
    runtime.release_workspaces()
    g = torch.Generator().manual_seed(seed_of("split-load", kernel, m))
    qt = random_qtensor("q4_k", 4096 + 40, 8192, g, device="cuda")
    xs = [activations((m, 8192), g).half().cuda() for _ in range(4)]
    for i in range(240):
        split = (2, 3, 4, 8, 16, 32)[i % 6]
        x = xs[i % 4]
        y = kernels.qmatmul(x, qt, backend="triton", kernel=kernel, split_k=split)
        if i % 24 < 6:
            assert_close(y, x, qt, None)
    torch.cuda.synchronize()
    for ws, cnt, _ in runtime._workspaces.values():
        assert not ws.any() and not cnt.any()


def test_split_k_on_two_streams_and_in_a_graph(triton_only, poisoned):
    """Split-K calls on two streams at once use separate kept buffers; a graph captured with a split owns
    its own (zeroed inside the graph), so replays interleaved with eager calls never share a counter."""
    runtime.release_workspaces()
    g = torch.Generator().manual_seed(seed_of("split-streams"))
    qt = random_qtensor("q6_k", 8192, 4096, g, device="cuda")
    xa, xb = (activations((2, 4096), g).half().cuda() for _ in range(2))
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    for s in (s1, s2):
        s.wait_stream(torch.cuda.current_stream())
    outs = []
    for _ in range(20):
        with torch.cuda.stream(s1):
            outs.append((xa, kernels.qmatmul(xa, qt, backend="triton", kernel="gemv", split_k=8)))
        with torch.cuda.stream(s2):
            outs.append((xb, kernels.qmatmul(xb, qt, backend="triton", kernel="gemv", split_k=4)))
    torch.cuda.synchronize()
    assert len(runtime._workspaces) == 2
    for x, y in outs[:4] + outs[-4:]:
        assert_close(y, x, qt, None)

    static_x = xa.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = kernels.qmatmul(static_x, qt, backend="triton", kernel="gemv", split_k=8)
    for _ in range(3):
        graph.replay()
        eager = kernels.qmatmul(xb, qt, backend="triton", kernel="gemv", split_k=8)
        torch.cuda.synchronize()
        assert_close(static_y, static_x, qt, None)
        assert_close(eager, xb, qt, None)


@pytest.mark.parametrize("m", [1, 33])
def test_torch_compile_inductor(m):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(seed_of("inductor", m))
    qt = random_qtensor("q4_k", 1024, 2048, g, device="cuda")
    norm = torch.nn.RMSNorm(2048, device="cuda", dtype=torch.bfloat16)

    def f(x):
        return torch.nn.functional.silu(kernels.qmatmul(norm(x), qt))

    compiled = torch.compile(f, fullgraph=True)
    x = activations((m, 2048), g).bfloat16().cuda()
    torch.testing.assert_close(compiled(x), f(x), rtol=2e-2, atol=2e-2)
    cudagraphs = torch.compile(f, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        x = activations((m, 2048), g).bfloat16().cuda()
        torch.testing.assert_close(cudagraphs(x).clone(), f(x), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------ grouped expert GEMV and GEMM
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", ["q4_k", "q3_k", "q6_k", "q8_0"])
# GEMV: one pair per program, pairs per program, sorted blocks of 4; GEMM: blocks of 16 and of 64 (8 and 64 pairs
# per expert)
@pytest.mark.parametrize("tokens,top_k,variant", [(1, 8, "expert_gemv"), (4, 2, "expert_gemv"), (16, 8, "expert_gemv"),
                                                  (64, 8, "expert_gemm"), (512, 8, "expert_gemm")])
def test_grouped_experts_on_model_shapes(qtype, dtype, tokens, top_k, variant, poisoned):
    """qmatmul_experts on a Qwen3-30B-A3B-like stack (64 experts of 768 x 2048 here), shared rows and rows
    per pair, against float64 on each pair's dequantized expert."""
    from offload_kernels.kernels import qmatmul_experts

    experts, n, k = 64, 768, 2048
    g = torch.Generator().manual_seed(seed_of("experts", qtype, dtype, tokens))
    qt = random_qtensor(qtype, experts * n, k, g, device="cuda")
    w = dequantize(qt, torch.float32).double().view(experts, n, k)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).cuda()
    kernels.reset_launch_counts()
    for x in (activations((tokens, k), g).to(dtype).cuda(), activations((tokens, top_k, k), g).to(dtype).cuda()):
        y = qmatmul_experts(x, qt, ids, experts)
        xd = x.double() if x.dim() == 3 else x.double().unsqueeze(1).expand(tokens, top_k, k)
        ref = torch.einsum("tjk,tjnk->tjn", xd, w[ids])
        err = float((y.double() - ref).norm() / ref.norm())
        assert err <= (1e-3 if dtype == torch.float32 else 1e-2), err
    ran = kernels.launch_counts()
    assert ran[variant] + ran[f"{variant}_splitk"] == 2, ran


@pytest.mark.parametrize("tokens,top_k", [(2, 2), (12, 4), (96, 4)])    # GEMV: per pair, sorted; GEMM (24 per expert)
def test_grouped_experts_in_a_cuda_graph_follow_new_routing(tokens, top_k):
    """Captured once, replayed with other routing written into the same id tensor: the kernel (and the
    sort by expert, all device ops) reads the ids on the device, so each replay computes the experts chosen
    now."""
    from offload_kernels.kernels import qmatmul_experts

    g = torch.Generator().manual_seed(7)
    qt = random_qtensor("q4_k", 16 * 256, 1024, g, device="cuda")
    x = activations((tokens, 1024), g).half().cuda()
    ids = torch.randint(0, 16, (tokens, top_k), generator=g).cuda()
    qmatmul_experts(x, qt, ids, 16)                      # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = qmatmul_experts(x, qt, ids, 16, check_ids=False)
    for routing in (torch.randint(0, 16, (tokens, top_k), generator=g), torch.full((tokens, top_k), 3)):
        ids.copy_(routing)
        graph.replay()
        torch.testing.assert_close(y, qmatmul_experts(x, qt, ids, 16), rtol=1e-3, atol=1e-3)


def test_expert_gemm_autotuned(poisoned, monkeypatch):
    """Autotuning on: every config the pruner keeps (other tiles, swapped operands, 8 warps) is timed and so run
    on the real shape; the winner's result is checked, then reused."""
    from offload_kernels.kernels import qmatmul_experts

    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    runtime.forget_tuned_configs()
    experts, n, k = 32, 1024, 2048
    g = torch.Generator().manual_seed(12)
    qt = random_qtensor("q4_k", experts * n, k, g, device="cuda")
    w = dequantize(qt, torch.float32).double().view(experts, n, k)
    for tokens in (128, 1024):
        ids = torch.stack([torch.randperm(experts, generator=g)[:4] for _ in range(tokens)]).cuda()
        x = activations((tokens, k), g).half().cuda()
        for _ in range(2):
            y = qmatmul_experts(x, qt, ids, experts)
            ref = torch.einsum("tk,tjnk->tjn", x.double(), w[ids])
            assert float((y.double() - ref).norm() / ref.norm()) <= 1e-2
    assert len(runtime._tuned) == 2
    runtime.forget_tuned_configs()
