"""What the launchers hand the GEMV/GEMM kernels: the output always written by the kernel itself (poisoned
until then), the split-K workspace and tile counters only when K is split, zero on entry and left zero,
kept from call to call; near-fp32 (tf32x3) dot products for fp32 activations; and the custom op rewrapping an
already validated weight without validating it again."""

from __future__ import annotations

import importlib

import pytest
import torch

from offload_kernels import kernels
from offload_kernels.formats import QuantizedTensor, get_spec

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
            out, ws, cnt = kw["out_ptr"], kw["ws_ptr"], kw["cnt_ptr"]
            call = dict(kw, out_was_nan=bool(torch.isnan(out).all()),
                        ws_was_zero=bool((ws == 0).all()) if ws.numel() > 1 else None,
                        cnt_was_zero=bool((cnt == 0).all()) if cnt.numel() > 1 else None)
            result = run(**kw)
            call["out_after_kernel"] = out.clone()
            self.calls.append(call)
            return result

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
def test_split_k_finishes_inside_the_kernel(qtype, family, lead, split, dtype, device, spy, triton_only, poisoned):
    """split_k=1 stores straight into the (NaN-poisoned) output, with no (M, N) fp32 buffer allocated;
    split_k>1 sums the K slices into a zeroed fp32 workspace, counted per tile in zeroed int32 counters,
    and the kernel itself writes the whole output (nothing runs after it: the output right after the kernel
    is what the call returns) and leaves both buffers zero. Both agree with the float64 reference and with
    each other."""
    g = torch.Generator().manual_seed(seed_of("split-ws", qtype, family, dtype))
    k = 1280 if get_spec(qtype).block_size == 256 else 800
    qt = random_qtensor(qtype, 40, k, g, device=device)
    x = activations((*lead, k), g).to(dtype).to(device)
    bias = activations((40,), g).to(dtype).to(device)
    calls = spy(family)
    m = x.numel() // k

    y1 = kernels.qmatmul(x, qt, bias, backend="triton", kernel=family, split_k=1)
    (c,) = calls.calls
    assert c["split_k"] == 1 and c["out_was_nan"], "the kernel must write the poisoned output itself"
    for name, dt in (("ws_ptr", torch.float32), ("cnt_ptr", torch.int32)):
        assert c[name].dtype == dt and c[name].numel() == 1, \
            f"split_k=1 allocated a {tuple(c[name].shape)} {name} it never uses"
    triton_only.expect(**{family: 1})

    ys = kernels.qmatmul(x, qt, bias, backend="triton", kernel=family, split_k=split)
    c = calls.calls[1]
    assert c["split_k"] == split and c["out_was_nan"]
    assert c["ws_ptr"].dtype == torch.float32 and tuple(c["ws_ptr"].shape) == (m, 40) and c["ws_was_zero"]
    assert c["cnt_ptr"].dtype == torch.int32 and c["cnt_was_zero"]
    assert c["ws_ptr"].data_ptr() != c["out_ptr"].data_ptr()
    assert torch.equal(c["out_after_kernel"].view(ys.shape), ys), "something wrote the output after the kernel"
    assert not c["ws_ptr"].any() and not c["cnt_ptr"].any(), "the launch must leave its buffers zero"
    triton_only.expect(**{f"{family}_splitk": 1})

    assert_close(y1, x, qt, bias)
    assert_close(ys, x, qt, bias)
    assert relative_error(ys, y1.double()) <= TOLERANCE[dtype]


def test_split_k_buffers_stay_zero_across_calls_of_any_shape(device, triton_only, poisoned):
    """The kept workspace is shared by every split-K call on a stream, of any shape, split and family, each
    using a prefix of it: after a sequence of them (growing and shrinking) it is still all zero, and every
    result is right."""
    from offload_kernels.kernels import runtime

    runtime.release_workspaces()
    g = torch.Generator().manual_seed(seed_of("split-ws-sequence"))
    shapes = [("gemv", 2, 24, 512, 2), ("gemm", 20, 56, 768, 3), ("gemv", 1, 8, 256, 2), ("gemm", 5, 40, 512, 2),
              ("gemv", 4, 72, 768, 3)]
    for family, m, n, k, split in shapes:
        qt = random_qtensor("q4_k", n, k, g, device=device)
        x = activations((m, k), g).to(device)
        y = kernels.qmatmul(x, qt, backend="triton", kernel=family, split_k=split)
        assert_close(y, x, qt, None)
    assert len(runtime._workspaces) == 1
    ((ws, cnt, _),) = runtime._workspaces.values()
    assert ws.numel() == 20 * 56 and not ws.any() and not cnt.any()
    triton_only.expect(gemv_splitk=3, gemm_splitk=2)


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


def test_split_k_buffers_are_kept_per_stream_and_placeholders_cached(device):
    """No K split: cached one-element placeholders. A split: zeroed buffers kept per device and stream,
    handed out again (no allocation, no memset) and grown when a call needs more; beyond
    PERSISTENT_WORKSPACE_BYTES, fresh zeroed buffers per call."""
    from offload_kernels.kernels import runtime

    runtime.release_workspaces()
    out16 = torch.empty(3, 5, dtype=torch.float16, device=device)
    a, b = runtime.split_k_buffers(out16, 1, 4), runtime.split_k_buffers(out16, 1, 4)
    assert a[0] is b[0] and a[1] is b[1] and a[0].numel() == 1 and a[1].numel() == 1
    assert a[0].dtype == torch.float32 and a[1].dtype == torch.int32

    for split in (None, 2):
        ws, cnt = runtime.split_k_buffers(out16, split, 4)
        assert ws.shape == (3, 5) and ws.dtype == torch.float32 and not ws.any()
        assert cnt.numel() >= 4 and cnt.dtype == torch.int32 and not cnt.any()
    ws2, cnt2 = runtime.split_k_buffers(torch.empty(3, 5, device=device), 3, 2)   # fp32 out: same kept buffers
    assert ws2.data_ptr() == ws.data_ptr() and cnt2.data_ptr() == cnt.data_ptr()
    big, cnt3 = runtime.split_k_buffers(torch.empty(4, 9, dtype=torch.float16, device=device), 2, 9)
    assert big.shape == (4, 9) and cnt3.numel() >= 9 and not big.any() and not cnt3.any()
    (kept,) = runtime._workspaces.values()
    assert kept[0].numel() == 36 and kept[1].numel() == 9
    small, _ = runtime.split_k_buffers(out16, 2, 1)
    assert small.data_ptr() == kept[0].data_ptr(), "a smaller call reuses a prefix of the kept workspace"

    old = runtime.PERSISTENT_WORKSPACE_BYTES
    try:
        runtime.PERSISTENT_WORKSPACE_BYTES = 4 * 10
        x, _ = runtime.split_k_buffers(torch.empty(4, 9, device=device), 2, 9)
        y, _ = runtime.split_k_buffers(torch.empty(4, 9, device=device), 2, 9)
        assert x.data_ptr() != kept[0].data_ptr() and not x.any() and x.shape == (4, 9)
        assert x.data_ptr() != y.data_ptr() and len(runtime._workspaces) == 1, "too big to keep: fresh per call"
    finally:
        runtime.PERSISTENT_WORKSPACE_BYTES = old
    runtime.release_workspaces()
    assert not runtime._workspaces


def test_split_k_buffers_in_a_capture_and_across_many_streams(device, monkeypatch):
    """During CUDA graph capture the buffers come fresh and zeroed per call (the graph owns them) and
    nothing is kept; across more streams than PERSISTENT_WORKSPACE_STREAMS, the longest-kept are dropped."""
    from offload_kernels.kernels import runtime

    runtime.release_workspaces()
    out = torch.empty(2, 7, dtype=torch.float16, device=device)
    monkeypatch.setattr(runtime, "capturing", lambda dev: True)
    (a, ca), (b, cb) = runtime.split_k_buffers(out, 2, 3), runtime.split_k_buffers(out, 2, 3)
    assert a.data_ptr() != b.data_ptr() and ca.data_ptr() != cb.data_ptr()
    assert not a.any() and not ca.any() and ca.numel() == 3 and not runtime._workspaces
    assert runtime.split_k_buffers(out, 1, 3)[0].numel() == 1 and not runtime._placeholders
    monkeypatch.undo()

    streams = iter([100, 101, 100] + list(range(102, 200)))
    monkeypatch.setattr(runtime, "_current_stream_key", lambda dev: next(streams))
    first = runtime.split_k_buffers(out, 2, 3)[0].data_ptr()
    runtime.split_k_buffers(out, 2, 3)
    assert runtime.split_k_buffers(out, 2, 3)[0].data_ptr() == first      # stream 100 again: its buffers
    for _ in range(runtime.PERSISTENT_WORKSPACE_STREAMS - 1):
        runtime.split_k_buffers(out, 2, 3)
    # Stream 101 was used least recently (100 came back after it): dropped first.
    kept = [s for _, s in runtime._workspaces]
    assert kept == [100] + list(range(102, 102 + runtime.PERSISTENT_WORKSPACE_STREAMS - 1))
    runtime.release_workspaces()


def test_autotuning_sizes_the_counters_for_every_config_it_may_run(monkeypatch):
    """Before autotuning, the counters must have room for the most tiles of any config the tuner may run:
    those of its space and the heuristic one its pruner falls back to when it keeps none (which may have
    more tiles than any in the space)."""
    import triton

    from offload_kernels.kernels import runtime

    monkeypatch.setattr(runtime, "INTERPRETER", False)
    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    monkeypatch.setattr(runtime, "capturing", lambda device: False)
    runtime.forget_tuned_configs()
    runtime.release_workspaces()
    seen = []

    class Tuner:
        configs = [triton.Config({"BLOCK_N": 8, "split_k": 2}), triton.Config({"BLOCK_N": 16, "split_k": 4})]
        best_config = configs[0]

        def __getitem__(self, grid):
            return lambda **kw: seen.append(kw)

    out = torch.empty(1, 256, dtype=torch.float16)
    heuristic = triton.Config({"BLOCK_N": 4, "split_k": 8})

    def grid(meta):
        return (-(-256 // meta["BLOCK_N"]), meta["split_k"])      # 256 / BLOCK_N output tiles

    runtime.launch_split_k(Tuner(), grid, {}, ("sizing", 1), lambda: heuristic, tune=True, out=out)
    (kw,) = seen
    assert kw["cnt_ptr"].numel() >= 64 and kw["ws_ptr"].shape == (1, 256)
    runtime.forget_tuned_configs()
    runtime.release_workspaces()
