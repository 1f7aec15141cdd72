"""What the launchers hand the GEMV/GEMM kernels: the split-K workspace only when K is split (the output
written directly, and poisoned until then, otherwise), near-fp32 (tf32x3) dot products for fp32 activations, and
the custom op rewrapping an already validated weight without validating it again."""

from __future__ import annotations

import importlib

import pytest
import torch

from offload_kernels import kernels
from offload_kernels.formats import QuantizedTensor

from .helpers import TOLERANCE, activations, assert_close, random_qtensor, reference, relative_error, seed_of

gemv_module = importlib.import_module("offload_kernels.kernels.gemv")
gemm_module = importlib.import_module("offload_kernels.kernels.gemm")
TUNERS = {"gemv": (gemv_module, "_gemv_tuned"), "gemm": (gemm_module, "_gemm_tuned")}


class KernelSpy:
    """Stands in for an autotuner's ``fn``: records each launch's arguments as the kernel receives them
    (after the config's pre-hook), then runs the real kernel."""

    def __init__(self, real) -> None:
        self.real = real
        self.calls: list[dict] = []

    def __getitem__(self, grid):
        run = self.real[grid]

        def spy(**kw):
            out, ws = kw["out_ptr"], kw["ws_ptr"]
            self.calls.append(dict(kw, out_was_nan=bool(torch.isnan(out).all()),
                                   ws_was_zero=bool((ws == 0).all()) if ws.numel() > 1 else None))
            return run(**kw)

        return spy


@pytest.fixture
def spy(monkeypatch):
    def install(family: str) -> KernelSpy:
        module, name = TUNERS[family]
        tuner = getattr(module, name)
        s = KernelSpy(tuner.fn)
        monkeypatch.setattr(tuner, "fn", s)
        return s

    return install


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("family,lead,split", [("gemv", (3,), 2), ("gemm", (2, 9), 3)])
@pytest.mark.parametrize("qtype", ["q4_0", "q4_k", "q6_k"])
def test_split_k_workspace_only_when_split(qtype, family, lead, split, dtype, device, spy, triton_only, poisoned):
    """split_k=1 stores straight into the (NaN-poisoned) output, with no (M, N) fp32 buffer allocated;
    split_k>1 accumulates into a zeroed fp32 workspace (the output itself when fp32). Both agree with the
    float64 reference and with each other."""
    g = torch.Generator().manual_seed(seed_of("split-ws", qtype, family, dtype))
    k = 1280 if qtype.endswith("_k") else 800
    qt = random_qtensor(qtype, 40, k, g, device=device)
    x = activations((*lead, k), g).to(dtype).to(device)
    bias = activations((40,), g).to(dtype).to(device)
    calls = spy(family)
    m = x.numel() // k

    y1 = kernels.qmatmul(x, qt, bias, backend="triton", kernel=family, split_k=1)
    (c,) = calls.calls
    assert c["split_k"] == 1 and c["out_was_nan"], "the kernel must write the poisoned output itself"
    if dtype == torch.float32:
        assert c["ws_ptr"] is c["out_ptr"]
    else:
        assert c["ws_ptr"].dtype == torch.float32 and c["ws_ptr"].numel() == 1, \
            f"split_k=1 allocated a {tuple(c['ws_ptr'].shape)} workspace it never uses"
    triton_only.expect(**{family: 1})

    ys = kernels.qmatmul(x, qt, bias, backend="triton", kernel=family, split_k=split)
    c = calls.calls[1]
    assert c["split_k"] == split and c["ws_ptr"].dtype == torch.float32
    assert tuple(c["ws_ptr"].shape) == (m, 40) and c["ws_was_zero"]
    if dtype == torch.float32:
        assert c["ws_ptr"] is c["out_ptr"]
    else:
        assert c["ws_ptr"] is not c["out_ptr"] and c["out_was_nan"]
    triton_only.expect(**{f"{family}_splitk": 1})

    assert_close(y1, x, qt, bias)
    assert_close(ys, x, qt, bias)
    assert relative_error(ys, y1.double()) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "tf32x3"), (torch.float16, "tf32")], ids=str)
def test_gemm_dot_precision_by_activation_dtype(dtype, precision, device, spy, triton_only, poisoned):
    """fp32 activations get tf32x3 products in tl.dot (Triton's fp32 default, plain TF32, loses ~3e-4); fp16/bf16 keep
    the binaries they had (the option is ignored for them)."""
    g = torch.Generator().manual_seed(seed_of("dot-precision", dtype))
    qt = random_qtensor("q4_k", 24, 512, g, device=device)
    x = activations((20, 512), g).to(dtype).to(device)
    calls = spy("gemm")
    assert_close(kernels.qmatmul(x, qt, backend="triton", kernel="gemm"), x, qt, None)
    assert [c["DOT_PRECISION"] for c in calls.calls] == [precision]
    assert gemm_module.dot_precision(torch.bfloat16) == "tf32"


@pytest.mark.parametrize("kernel,split_k,m", [("gemv", 1, 3), ("gemv", 4, 3), ("gemm", 1, 40), ("gemm", 2, 40),
                                              ("dequant", None, 40)])
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k"])
def test_fp32_activations_at_fp32_accuracy(qtype, kernel, split_k, m, device, triton_only, poisoned):
    """fp32 in, fp32 accuracy out: 100x tighter than the general fp32 tolerance (TF32 products, ~1e-3
    relative each, would fail this on a GPU; the interpreter computes in fp32 whatever the precision)."""
    g = torch.Generator().manual_seed(seed_of("fp32-accuracy", qtype, kernel, split_k))
    qt = random_qtensor(qtype, 72, 1024, g, device=device)
    x = activations((m, 1024), g).to(device)
    bias = activations((72,), g).to(device)
    y = kernels.qmatmul(x, qt, bias, backend="triton", kernel=kernel, split_k=split_k)
    err = relative_error(y, reference(x, qt, bias))
    assert err <= 1e-5, f"fp32 relative error {err:.2e}"


def test_op_rewraps_validated_weight_without_revalidating(device, monkeypatch):
    """qmatmul's op gets the pieces of a QuantizedTensor validated at its construction: it rewraps them
    through the fast path; pieces that do not fit together still get the full validation's error."""
    qt = random_qtensor("q5_k", 16, 512, torch.Generator().manual_seed(8), device=device)
    x = torch.randn(2, 512, device=device)
    want = kernels.qmatmul(x, qt, backend="torch")

    def no_revalidation(self, *args, **kwargs):
        raise AssertionError("QuantizedTensor validated again inside the op")

    monkeypatch.setattr(QuantizedTensor, "__init__", no_revalidation)
    assert torch.equal(kernels.qmatmul(x, qt, backend="torch"), want)
    monkeypatch.undo()
    op = torch.ops.offload_kernels.qmatmul
    with pytest.raises(ValueError, match="needs data of shape"):
        op(x, qt.data[:, :-1].contiguous(), "q5_k", 16, 512, None, "torch", "auto", 0)
    with pytest.raises(ValueError, match="needs data of shape"):
        op(x, qt.data, "q5_k", 15, 512, None, "torch", "auto", 0)
    with pytest.raises(ValueError, match="unknown qtype"):
        op(x, qt.data, "q5_x", 16, 512, None, "torch", "auto", 0)
    with pytest.raises(ValueError, match="contiguous"):
        op(x, torch.cat([qt.data, qt.data], 1)[:, :qt.row_bytes], "q5_k", 16, 512, None, "torch", "auto", 0)


def test_launch_late_args_follow_the_config(monkeypatch):
    """runtime.launch asks late_args for config-dependent arguments: with None before autotuning (any
    config may be benchmarked), with the config itself when it is known (tuned before, or heuristic)."""
    import triton

    runtime = importlib.import_module("offload_kernels.kernels.runtime")
    monkeypatch.setattr(runtime, "INTERPRETER", False)
    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    monkeypatch.setattr(runtime, "capturing", lambda device: False)
    runtime.forget_tuned_configs()
    best, heuristic = triton.Config({"split_k": 4}), triton.Config({"split_k": 1})
    seen, tuned_args, direct_args = [], [], []

    class Direct:                  # the autotuner's .fn: a launch of one given config
        def __getitem__(self, grid):
            return lambda **kw: direct_args.append(kw)

    class Tuner:                   # tuner[grid](...): benchmark every config, then run the best
        best_config = best
        fn = Direct()

        def __getitem__(self, grid):
            return lambda **kw: tuned_args.append(kw)

    def late(config):
        seen.append(config)
        return {"ws": "all" if config is None else config.kwargs["split_k"]}

    dev = torch.device("meta")
    for _ in range(2):
        runtime.launch(Tuner(), None, {"a": 1}, ("late", 1), lambda: heuristic, tune=True, device=dev, late_args=late)
    runtime.launch(Tuner(), None, {"a": 1}, ("late", 2), lambda: heuristic, tune=False, device=dev, late_args=late)
    assert seen == [None, best, heuristic]
    assert tuned_args == [{"a": 1, "ws": "all"}]
    assert [kw["ws"] for kw in direct_args] == [4, 1]
    runtime.forget_tuned_configs()


def test_forget_tuned_configs_also_clears_the_autotuners_cache(monkeypatch):
    """Triton's Autotuner answers a key it has seen from its own ``cache`` without benchmarking again:
    forgetting our configs must clear that too, or the next call would not really tune."""
    import triton

    runtime = importlib.import_module("offload_kernels.kernels.runtime")
    monkeypatch.setattr(runtime, "INTERPRETER", False)
    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    monkeypatch.setattr(runtime, "capturing", lambda device: False)
    runtime.forget_tuned_configs()

    class Tuner:                   # like triton's Autotuner: remembers the best config per key in .cache
        best_config = triton.Config({"split_k": 2})

        def __init__(self):
            self.cache = {}

        def __getitem__(self, grid):
            def run(**kw):
                self.cache.setdefault(("key",), self.best_config)
            return run

    tuner = Tuner()
    runtime.launch(tuner, None, {"a": 1}, ("forget", 1), lambda: None, tune=True, device=torch.device("meta"))
    assert tuner.cache and runtime.is_tuned(("forget", 1))
    runtime.forget_tuned_configs()
    assert tuner.cache == {} and not runtime.is_tuned(("forget", 1))


def test_split_k_workspace_placeholder_is_cached(device):
    from offload_kernels.kernels.runtime import split_k_workspace

    out16 = torch.empty(3, 5, dtype=torch.float16, device=device)
    a, b = split_k_workspace(out16, 1), split_k_workspace(out16, 1)
    assert a is b and a.numel() == 1 and a.dtype == torch.float32
    for split in (None, 2):
        ws = split_k_workspace(out16, split)
        assert ws.shape == (3, 5) and ws.dtype == torch.float32
    out32 = torch.empty(3, 5, device=device)
    assert all(split_k_workspace(out32, s) is out32 for s in (None, 1, 2))


def test_split_k_workspace_comes_zeroed_for_a_known_split(device):
    """Direct launches skip the configs' zeroing pre-hook, so a workspace for a known split > 1 must
    start at zero (an fp32 output, its own workspace, zeroed in place); an unsplit fp32 output is left as is
    (the kernel overwrites it)."""
    from offload_kernels.kernels.runtime import split_k_workspace

    ws = split_k_workspace(torch.full((3, 5), float("nan"), dtype=torch.float16, device=device), 4)
    assert torch.equal(ws, torch.zeros(3, 5, device=device))
    out32 = torch.full((3, 5), float("nan"), device=device)
    split_k_workspace(out32, 1)
    assert out32.isnan().all()
    assert split_k_workspace(out32, 2) is out32 and torch.equal(out32, torch.zeros(3, 5, device=device))
