"""qmatmul's API: argument errors (raised before any launch), backend selection, the torch reference path,
the custom op under torch.compile, and a property test over random shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload_kernels import kernels
from offload_kernels.formats import QTYPES, dequantize, get_spec

from .conftest import HAS_CUDA
from .helpers import TOLERANCE, activations, assert_close, random_qtensor, reference, seed_of


@pytest.fixture
def qt(device):
    return random_qtensor("q4_k", 16, 256, torch.Generator().manual_seed(0), device=device)


def _raises(exc, match, *args, **kwargs):
    kernels.reset_launch_counts()
    with pytest.raises(exc, match=match):
        kernels.qmatmul(*args, **kwargs)
    assert sum(kernels.launch_counts().values()) == 0, "a kernel was launched before the error"


def test_argument_errors(qt, device):
    x = torch.randn(3, 256, device=device)
    _raises(TypeError, "QuantizedTensor", x, qt.data)
    _raises(TypeError, "x must be a torch.Tensor", x.tolist(), qt)
    _raises(ValueError, r"shape \(\.\.\., 256\)", torch.randn(3, 255, device=device), qt, backend="triton")
    _raises(ValueError, r"shape \(\.\.\., 256\)", torch.tensor(1.0, device=device), qt)
    _raises(TypeError, "float64 .*use float32", x.double(), qt)
    _raises(TypeError, "got torch.int32", x.int(), qt)
    _raises(ValueError, r"bias must have shape \(16,\)", x, qt, torch.zeros(15, device=device))
    _raises(TypeError, "bias dtype torch.float16 does not match x dtype torch.float32", x, qt,
            torch.zeros(16, dtype=torch.float16, device=device))
    _raises(TypeError, "bias must be a torch.Tensor", x, qt, [0.0] * 16)
    _raises(ValueError, "unknown backend 'cuda'", x, qt, backend="cuda")
    _raises(ValueError, "unknown kernel 'gemm2'", x, qt, backend="triton", kernel="gemm2")
    _raises(ValueError, "split_k must be a positive int", x, qt, backend="triton", kernel="gemv", split_k=0)
    _raises(ValueError, "need backend='triton'", x, qt, backend="torch", kernel="gemv")
    if device.type == "cpu":
        _raises(ValueError, "interpreter cannot compute in bfloat16", x.bfloat16(), qt, backend="triton")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device next to the CPU")
def test_device_mismatch_errors(qt):
    x = torch.randn(3, 256)
    _raises(ValueError, "x is on cpu but the quantized weight is on cuda", x, qt)
    _raises(ValueError, "bias is on cpu but x is on cuda", x.cuda(), qt, torch.zeros(16))


def test_device_mismatch_errors_cpu_weight():
    qt = random_qtensor("q4_k", 16, 256, torch.Generator().manual_seed(0))
    x = torch.randn(3, 256, device="meta")
    _raises(ValueError, "x is on meta but the quantized weight is on cpu", x, qt)


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    import importlib

    dequant = importlib.import_module("offload_kernels.kernels.dequant")
    monkeypatch.setattr(dequant, "INTERPRETER", False)
    qt = random_qtensor("q4_0", 4, 64, torch.Generator().manual_seed(0))
    _raises(ValueError, "TRITON_INTERPRET=1", torch.randn(2, 64), qt, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.dequantize_triton(qt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_torch_backend(qtype, dtype, device):
    """The reference path (and, on the CPU, what backend='auto' runs: no Triton launch)."""
    g = torch.Generator().manual_seed(seed_of("torch", qtype, dtype))
    k = 2 * get_spec(qtype).block_size
    qt = random_qtensor(qtype, 24, k, g, device=device)
    x = activations((2, 5, k), g).to(dtype).to(device)
    bias = activations((24,), g).to(dtype).to(device)
    kernels.reset_launch_counts()
    assert_close(kernels.qmatmul(x, qt, bias, backend="torch"), x, qt, bias)
    assert sum(kernels.launch_counts().values()) == 0
    if device.type == "cpu":
        assert_close(kernels.qmatmul(x, qt, bias), x, qt, bias)
        assert sum(kernels.launch_counts().values()) == 0


def test_custom_op_is_registered(qt, device):
    x = torch.randn(2, 256, device=device)
    y = torch.ops.offload_kernels.qmatmul(x, qt.data, "q4_k", 16, 256, None, "torch", "auto", 0)
    assert_close(y, x, qt, None)
    torch.library.opcheck(torch.ops.offload_kernels.qmatmul.default,
                          (x, qt.data, "q4_k", 16, 256, None, "torch", "auto", 0),
                          test_utils=("test_schema", "test_faketensor"))


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_dispatcher_only_when_nothing_would_see_the_op(qt, device):
    """qmatmul calls the implementation directly in plain eager inference (the dispatcher round trip costs
    more than a small kernel), and goes through the custom op whenever something could observe it: autograd,
    a dispatch mode, meta tensors (torch.compile: the compile tests). Both give the same bits."""
    from offload_kernels.kernels.qmatmul import _eager_fast_path

    x = torch.randn(3, 256, device=device)
    bias = torch.randn(16, device=device)
    assert _eager_fast_path(x, bias) and _eager_fast_path(x, None)
    needs_grad = x.clone().requires_grad_()
    assert not _eager_fast_path(needs_grad, None) and not _eager_fast_path(x, bias.clone().requires_grad_())
    with torch.no_grad():
        assert _eager_fast_path(needs_grad, None)
    assert not _eager_fast_path(x.to("meta"), None)
    recorder = _OpRecorder()
    with recorder:
        assert not _eager_fast_path(x, bias)
        via_op = kernels.qmatmul(x, qt, bias, backend="torch")
    assert "offload_kernels.qmatmul.default" in recorder.ops
    direct = kernels.qmatmul(x, qt, bias, backend="torch")
    torch.testing.assert_close(direct, via_op, rtol=0, atol=0)
    assert_close(direct, x, qt, bias)          # and both against float64 math on the dequantized weight


def _compile_check(backend: str, device) -> None:
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    qt = random_qtensor("q6_k", 24, 512, g, device=device)
    bias = activations((24,), g).to(device)

    def f(x):
        return torch.relu(kernels.qmatmul(x * 2, qt, bias, backend=backend)) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = activations((3, 512), g).to(device)
    y = compiled(x)
    torch.testing.assert_close(y, f(x), rtol=0, atol=0)
    ref = torch.relu(reference(x * 2, qt, bias)) + 1
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph_triton(device, triton_only):
    """torch.compile(fullgraph=True) traces through qmatmul (QuantizedTensor attribute access, validation,
    the op's fake implementation) without graph breaks; the Triton kernels run inside the compiled graph."""
    _compile_check("triton", device)        # M = 3: the GEMV family, once compiled and once eager
    ran = {k: v for k, v in kernels.launch_counts().items() if v}
    assert sum(ran.values()) == 2 and set(ran) <= {"gemv", "gemv_splitk"}, ran


def test_torch_compile_fullgraph_torch_backend(device):
    _compile_check("torch", device)


SHAPES = st.tuples(st.sampled_from(QTYPES), st.integers(1, 40), st.integers(1, 70), st.integers(1, 5),
                   st.sampled_from(["gemv", "gemm", "dequant"]), st.sampled_from([torch.float32, torch.float16]),
                   st.booleans())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=SHAPES, seed=st.integers(0, 2**31 - 1))
def test_property_random_shapes(case, seed, device, poisoned):
    """Random (qtype, M, N, blocks per row, family, dtype, bias): always within tolerance, always finite."""
    qtype, m, n, blocks, kernel, dtype, with_bias = case
    g = torch.Generator().manual_seed(seed)
    k = blocks * get_spec(qtype).block_size
    qt = random_qtensor(qtype, n, k, g, device=device)
    x = activations((m, k), g).to(dtype).to(device)
    bias = activations((n,), g).to(dtype).to(device) if with_bias else None
    assert_close(kernels.qmatmul(x, qt, bias, backend="triton", kernel=kernel), x, qt, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_gives_input_and_bias_gradients(backend, dtype, device):
    """The weight is frozen; dL/dx = dL/dy @ W and dL/db = sum of dL/dy, through either backend (the
    Triton one dequantizes W with the Triton kernel)."""
    g = torch.Generator().manual_seed(seed_of("backward", backend, dtype))
    qt = random_qtensor("q5_k", 24, 512, g, device=device)
    x = activations((2, 3, 512), g).to(dtype).to(device).requires_grad_()
    bias = activations((24,), g).to(dtype).to(device).requires_grad_()
    kernels.reset_launch_counts()
    y = kernels.qmatmul(x, qt, bias, backend=backend)
    grad_y = activations(tuple(y.shape), g).to(dtype).to(device)
    y.backward(grad_y)
    w = dequantize(qt, torch.float32).double()
    want_x = grad_y.double() @ w
    err = float((x.grad.double() - want_x).norm() / want_x.norm())
    assert x.grad.dtype == dtype and err <= TOLERANCE[dtype], err
    torch.testing.assert_close(bias.grad.double(), grad_y.double().sum((0, 1)), rtol=TOLERANCE[dtype], atol=1e-2)
    assert kernels.launch_counts()["dequant"] == (1 if backend == "triton" else 0)


def test_dequantize_op_schema(device):
    qt = random_qtensor("q3_k", 8, 256, torch.Generator().manual_seed(2), device=device)
    for backend in ("torch", "triton"):
        w = torch.ops.offload_kernels.dequantize(qt.data, "q3_k", 8, 256, torch.float16, backend)
        assert torch.equal(w.view(torch.int16), dequantize(qt, torch.float16).view(torch.int16))
    torch.library.opcheck(torch.ops.offload_kernels.dequantize.default,
                          (qt.data, "q3_k", 8, 256, torch.float32, "torch"),
                          test_utils=("test_schema", "test_faketensor"))


def test_plain_eager_calls_do_not_reach_the_op(qt, device, monkeypatch):
    """The fast path is taken: with the registered op replaced by one that fails, a plain inference call
    still returns the right result, and a call the op must see (x requires grad) reaches it."""
    import offload_kernels.kernels.qmatmul  # noqa: F401 - registers the op

    def refuse(*args, **kwargs):
        raise AssertionError("reached the custom op")

    monkeypatch.setattr(torch.ops.offload_kernels, "qmatmul", refuse)
    x = torch.randn(3, 256, device=device)
    assert_close(kernels.qmatmul(x, qt, backend="torch"), x, qt, None)
    with pytest.raises(AssertionError, match="reached the custom op"):
        kernels.qmatmul(x.clone().requires_grad_(), qt, backend="torch")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's import
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_ad_and_torch_func_transforms(qt, device, backend, request):
    """Forward-mode AD and torch.func transforms get exact derivatives and batching: the tangent of y is
    tangent @ W.T (not zero), vmap equals the loop over samples, grad and jacrev agree with the backward
    pass. None of them takes the eager fast path."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import grad, jacrev, jvp, vmap

    from offload_kernels.kernels.qmatmul import _eager_fast_path

    if backend == "triton":
        request.getfixturevalue("triton_only")
    g = torch.Generator().manual_seed(seed_of("transforms", backend))
    w = dequantize(qt, torch.float32).to(device)
    bias = torch.randn(qt.shape[0], generator=g).to(device)
    x, t = (torch.randn(3, 256, generator=g).to(device) for _ in range(2))

    def f(v):
        return kernels.qmatmul(v, qt, bias, backend=backend)

    from offload_kernels.kernels.qmatmul import _transformed

    with fwAD.dual_level():
        dual = fwAD.make_dual(x, t)
        assert not _eager_fast_path(dual, None) and _transformed(dual, None)
        assert not _transformed(x, bias), "an open dual level alone must not reroute calls without tangents"
        primal, tangent = fwAD.unpack_dual(f(dual))
    torch.testing.assert_close(primal, x @ w.T + bias, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tangent, t @ w.T, rtol=1e-5, atol=1e-4)
    y, tangent = jvp(f, (x,), (t,))
    torch.testing.assert_close(tangent, t @ w.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y, f(x), rtol=1e-5, atol=1e-4)

    batch = torch.randn(4, 3, 256, generator=g).to(device)
    torch.testing.assert_close(vmap(f)(batch), torch.stack([f(b) for b in batch]), rtol=1e-5, atol=1e-4)
    gx = grad(lambda v: f(v).square().sum())(x)
    xr = x.clone().requires_grad_()
    f(xr).square().sum().backward()
    torch.testing.assert_close(gx, xr.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(jacrev(f)(x[0]), w, rtol=1e-5, atol=1e-5)
    assert _eager_fast_path(x, None)
