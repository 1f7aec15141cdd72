"""torch.compile and torch.func over OffloadedLinear: a resident layer traces into one graph (fullgraph)
through the qmatmul custom op; a model with streamed layers compiles too (the streaming runs between graphs)
and gives what eager gives, pass after pass, with new inputs each time (no slot contents baked into a
graph); jvp and vmap through resident and streamed layers match the model with dequantized weights."""

import pytest
import torch
from torch import nn

import offload_kernels as ok
from offload_kernels import OffloadedLinear


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("qtype", ["q4_k", "q3_k", "q8_0"])
def test_resident_layer_compiles_into_one_graph(qtype, bias):
    torch.manual_seed(0)
    layer = OffloadedLinear.from_linear(nn.Linear(512, 96, bias=bias), qtype)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for lead in ((3,), (2, 5)):
        x = torch.randn(*lead, 512)
        assert torch.equal(compiled(x), layer(x))


def test_compiled_layer_still_differentiates_in_x():
    torch.manual_seed(1)
    layer = OffloadedLinear.from_linear(nn.Linear(256, 64), "q4_k")
    x = torch.randn(4, 256, requires_grad=True)
    torch.compile(layer, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    want = x.detach().clone().requires_grad_(True)
    layer(want).square().sum().backward()
    torch.testing.assert_close(x.grad, want.grad, rtol=1e-6, atol=1e-6)


# The streamer's calls into the engine (pybind11) are graph breaks, which is how streaming stays out of graphs.
@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace the builtin:UserWarning")
def test_streamed_model_compiles_and_matches_eager():
    torch.manual_seed(2)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.GELU()) for _ in range(6)])
    ok.offload(model, qtype="q4_k", device="cpu", gpu_budget=500_000, progress=False)
    streamed = [m for m in model.modules() if isinstance(m, OffloadedLinear) and m.placement == "streamed"]
    assert len(streamed) >= 4, "the budget should leave most layers streamed"
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(4):
        x = torch.randn(3, 512)
        assert torch.equal(compiled(x), model(x))
    stats = streamed[0]._streamer.stats()
    assert stats["copies"] > 0 and stats["mispredictions"] == 0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's import
def test_jvp_and_vmap_through_resident_and_streamed_layers():
    """Forward-mode derivatives through offloaded layers are those of the model with dequantized weights
    (not zero), resident or streamed; vmap over samples equals the loop."""
    from torch.func import jvp, vmap

    torch.manual_seed(3)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.Tanh()) for _ in range(5)])
    ok.offload(model, qtype="q4_k", device="cpu", gpu_budget=120_000, progress=False, measure=False)
    assert {m.placement for m in model.modules() if isinstance(m, OffloadedLinear)} == {"resident", "streamed"}
    dense = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.Tanh()) for _ in range(5)])
    with torch.no_grad():
        for (d, _), q in zip(dense, (blk[0] for blk in model)):
            d.weight.copy_(q.dequantized_weight(torch.float32))
            d.bias.copy_(q.bias)
    x, t = torch.randn(2, 256), torch.randn(2, 256)
    for _ in range(2):                      # the first pass learns the streaming order, the second prefetches
        y, tangent = jvp(model, (x,), (t,))
        y_ref, tangent_ref = jvp(dense, (x,), (t,))
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tangent, tangent_ref, rtol=1e-5, atol=1e-5)
    batch = torch.randn(3, 2, 256)
    torch.testing.assert_close(vmap(model)(batch), torch.stack([model(b) for b in batch]), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's import
def test_jvp_of_a_compiled_layer():
    """A transform around a compiled function still gets the layer's true tangent."""
    from torch.func import jvp

    torch.manual_seed(4)
    layer = OffloadedLinear.from_linear(nn.Linear(256, 64), "q4_k")
    x, t = torch.randn(3, 256), torch.randn(3, 256)
    _, tangent = jvp(torch.compile(layer, backend="aot_eager"), (x,), (t,))
    torch.testing.assert_close(tangent, t @ layer.dequantized_weight(torch.float32).T, rtol=1e-5, atol=1e-5)
