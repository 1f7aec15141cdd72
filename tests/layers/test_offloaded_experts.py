"""OffloadedExperts: transformers' MoE experts modules over GGUF bytes, against the originals' own forward."""

import copy

import pytest
import torch
from torch import nn

from offload_kernels import OffloadedExperts, OffloadedLinear, quantize
from offload_kernels import kernels
from offload_kernels.layers import offloaded_experts
from offload_kernels.layers.offloaded_experts import expert_weight, is_experts_module, projection_names

transformers = pytest.importorskip("transformers")
if not hasattr(pytest.importorskip("transformers.integrations.moe"), "use_experts_implementation"):
    pytest.skip("this transformers has no 3-D expert modules (use_experts_implementation: transformers 5)",
                allow_module_level=True)
from transformers.integrations.moe import batched_mm_experts_forward  # noqa: E402

# Relative Frobenius error vs float64 math on the dequantized weights, by activation dtype.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
HIDDEN = 256


def _experts(kind: str, seed: int = 0) -> nn.Module:
    """A transformers experts module of each layout, with random weights (biases where the class has them)."""
    torch.manual_seed(seed)
    if kind == "mixtral":           # concatenated [gate; up] rows, SwiGLU
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
        module = MixtralExperts(transformers.MixtralConfig(hidden_size=HIDDEN, intermediate_size=512,
                                                           num_local_experts=5))
    elif kind == "gpt_oss":         # (E, in, out) storage, biases, interleaved gate/up, its own clamped gate
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
        module = GptOssExperts(transformers.GptOssConfig(hidden_size=HIDDEN, intermediate_size=256,
                                                         num_local_experts=4))
    elif kind == "nemotron_h":      # no gate: up_proj and an activation
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
        module = NemotronHExperts(transformers.NemotronHConfig(hidden_size=HIDDEN, moe_intermediate_size=512,
                                                               n_routed_experts=4))
    elif kind == "muse_spark":      # a norm after each expert
        from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts
        module = MuseSparkExperts(transformers.MuseSparkTextConfig(hidden_size=HIDDEN, moe_hidden_size=HIDDEN,
                                                                   moe_intermediate_size=256, num_local_experts=4))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.05)
    module.config._experts_implementation = "eager"
    return module


KINDS = ["mixtral", "gpt_oss", "nemotron_h", "muse_spark"]


def _dequantized(original: nn.Module, oe: OffloadedExperts) -> nn.Module:
    """``original`` with its expert stacks set to ``oe``'s dequantized weights, in its own storage order."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for name in projection_names(original):
            w = torch.stack([oe.expert_weights(name, e) for e in range(oe.num_experts)])
            getattr(ref, name).copy_(w.transpose(1, 2) if original.is_transposed else w)
    return ref


def _routing(tokens: int, experts: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=g), -1)
    return index, weights


def _rel(y, ref):
    return float((y.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k", "q4_0"])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_matches_the_original_forward_on_dequantized_weights(kind, qtype, tokens):
    original = _experts(kind)
    oe = OffloadedExperts.from_experts(original, qtype)
    ref = _dequantized(original, oe)
    x = torch.randn(tokens, HIDDEN)
    index, weights = _routing(tokens, original.num_experts, 2, seed=tokens)
    y = oe(x, index, weights)
    assert y.shape == x.shape and y.dtype == x.dtype
    # float64 reference: transformers' generic expert implementation on the dequantized weights
    expected = batched_mm_experts_forward(copy.deepcopy(ref).double(), x.double(), index, weights.double())
    assert _rel(y, expected) < TOL[torch.float32]
    # and the class's own eager forward, in fp32
    torch.testing.assert_close(y, ref(x, index, weights), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [2, 13])         # the grouped path, and grouped by expert
def test_half_precision_inputs(kind, dtype, tokens):
    original = _experts(kind)
    oe = OffloadedExperts.from_experts(original, "q4_k")
    ref = _dequantized(original, oe).double()
    x = torch.randn(tokens, HIDDEN)
    index, weights = _routing(tokens, original.num_experts, 2)
    y = oe(x.to(dtype), index, weights.to(dtype))
    assert y.dtype == dtype
    assert _rel(y, batched_mm_experts_forward(ref, x.double(), index, weights.double())) < TOL[dtype]


@pytest.mark.parametrize("kind", KINDS)
def test_stacked_bytes_are_each_experts_own_quantization(kind):
    original = _experts(kind)
    oe = OffloadedExperts.from_experts(original, {projection_names(original)[0]: "q4_k",
                                                  "down_proj": "q6_k"})
    for name in projection_names(original):
        layer = getattr(oe, name)
        assert isinstance(layer, OffloadedLinear)
        rows = layer.out_features // original.num_experts
        for e in range(original.num_experts):
            expected = quantize(expert_weight(original, name, e), layer.qtype)
            assert torch.equal(layer.weight[e * rows:(e + 1) * rows], expected.data)
    assert oe.qtypes == {projection_names(original)[0]: "q4_k", "down_proj": "q6_k"}
    text = repr(oe)
    assert type(original).__name__ in text and "q6_k" in text and f"num_experts={original.num_experts}" in text


def test_leading_dims_unrouted_experts_and_one_expert_for_all():
    original = _experts("mixtral")
    oe = OffloadedExperts.from_experts(original, "q8_0")
    ref = _dequantized(original, oe)
    x = torch.randn(2, 3, HIDDEN)
    index = torch.zeros(2, 3, 1, dtype=torch.long)          # every token to expert 0; experts 1..4 idle
    weights = torch.ones(2, 3, 1)
    y = oe(x, index, weights)
    expected = ref(x.reshape(6, HIDDEN), index.reshape(6, 1), weights.reshape(6, 1)).reshape(2, 3, HIDDEN)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(params=["grouped", "by_expert"])
def path(request, monkeypatch):
    """Runs a test through both forward paths: a few tokens take the grouped one (one launch per
    projection over every (token, expert) pair); GROUPED_MAX_PAIRS_PER_EXPERT = 0 sends them by expert."""
    if request.param == "by_expert":
        monkeypatch.setattr(offloaded_experts, "GROUPED_MAX_PAIRS_PER_EXPERT", 0)
    return request.param


def test_expert_parallel_sentinels_are_skipped_only_in_expert_parallel_mode(path):
    original = _experts("mixtral")
    oe = OffloadedExperts.from_experts(original, "q8_0")
    x = torch.randn(4, HIDDEN)
    index = torch.tensor([[0, 5], [5, 5], [1, 2], [3, 5]])   # 5 == num_experts: another rank's expert
    weights = torch.full((4, 2), 0.5)
    with pytest.raises(ValueError, match="3 expert ids >= num_experts=5|4 expert ids >= num_experts=5"):
        oe(x, index, weights)
    oe._is_expert_parallel = True
    y = oe(x, index, weights)
    keep = (index < 5).float()
    expected = oe(x, index.clamp(max=4), weights * keep)        # the same with the sentinels' weights zeroed
    torch.testing.assert_close(y, expected)
    assert torch.all(y[1] == 0)


@pytest.mark.parametrize("args, exc, match", [
    (lambda x, i, w: (x[:, :128], i, w), ValueError, "hidden size 256"),
    (lambda x, i, w: (x.long(), i, w), TypeError, "hidden_states dtype"),
    (lambda x, i, w: (x, i.float(), w), TypeError, "integer expert ids"),
    (lambda x, i, w: (x, i, w.long()), TypeError, "top_k_weights must be a float"),
    (lambda x, i, w: (x, i[:2], w[:2]), ValueError, r"top_k_index must be \(tokens, top_k\)"),
    (lambda x, i, w: (x, i, w[:, :1]), ValueError, "must have the same shape"),
    (lambda x, i, w: (x, -i - 1, w), ValueError, "negative expert ids"),
    (lambda x, i, w: (x, i + 5, w), ValueError, r"expert ids >= num_experts=5"),
    (lambda x, i, w: (x.numpy(), i, w), TypeError, "hidden_states must be a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(args, exc, match, path):
    oe = OffloadedExperts.from_experts(_experts("mixtral"), "q8_0")
    x = torch.randn(4, HIDDEN)
    index, weights = _routing(4, 5, 2)
    with pytest.raises(exc, match=match):
        oe(*args(x, index, weights))


def test_construction_errors_name_the_problem():
    original = _experts("mixtral")
    with pytest.raises(TypeError, match="transformers experts module"):
        OffloadedExperts.from_experts(nn.Linear(256, 256), "q8_0")
    with pytest.raises(ValueError, match="must name exactly"):
        OffloadedExperts.from_experts(original, {"gate_up_proj": "q8_0"})
    with pytest.raises(ValueError, match="unknown qtype|Unknown qtype|not a known"):
        OffloadedExperts.from_experts(original, "q9_9")
    with torch.no_grad():
        original.down_proj[3, 7, 11] = float("nan")
    with pytest.raises(ValueError, match="down_proj, expert 3: weight contains NaN"):
        OffloadedExperts.from_experts(original, "q8_0")
    odd = _experts("gpt_oss")          # in_features 256 for both: q4_k fits; a 96-wide stack does not
    odd.down_proj = nn.Parameter(torch.randn(4, 96, HIDDEN))
    with pytest.raises(ValueError, match="K=96 .* not a multiple of the q4_k block size 256"):
        OffloadedExperts.from_experts(odd, "q4_k")


def test_constructor_checks_the_projections_against_the_module():
    original = _experts("gpt_oss")          # biases on both projections
    good = {name: OffloadedLinear.from_quantized(
        quantize(torch.cat([expert_weight(original, name, e) for e in range(4)]), "q8_0"),
        getattr(original, f"{name}_bias").detach().reshape(-1)) for name in projection_names(original)}
    OffloadedExperts(original, good)
    with pytest.raises(ValueError, match=r"projections must be exactly \('gate_up_proj', 'down_proj'\)"):
        OffloadedExperts(original, {"gate_up_proj": good["gate_up_proj"]})
    with pytest.raises(TypeError, match="down_proj must be an OffloadedLinear, got Linear"):
        OffloadedExperts(original, {**good, "down_proj": nn.Linear(256, 1024)})
    with pytest.raises(ValueError, match=r"down_proj: an OffloadedLinear of \(1024, 256\) is needed for 4 experts"):
        OffloadedExperts(original, {**good, "down_proj": good["gate_up_proj"]})
    no_bias = OffloadedLinear.from_quantized(good["down_proj"].quantized_weight())
    with pytest.raises(ValueError, match="the experts have biases but the OffloadedLinear has none"):
        OffloadedExperts(original, {**good, "down_proj": no_bias})
    with pytest.raises(TypeError, match="is not a transformers experts module"):
        OffloadedExperts(nn.Linear(4, 4), good)


def test_is_experts_module():
    assert all(is_experts_module(_experts(kind)) for kind in KINDS)
    assert not is_experts_module(nn.Linear(4, 4))
    assert not is_experts_module(OffloadedExperts.from_experts(_experts("mixtral"), "q8_0"))
    broken = _experts("mixtral")
    broken.gate_up_proj = nn.Parameter(torch.randn(5, 4))       # not a 3-D stack
    assert not is_experts_module(broken)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss", "muse_spark"])
def test_state_dict_round_trip_into_a_fresh_module(kind):
    oe = OffloadedExperts.from_experts(_experts(kind, seed=1), "q4_k")
    fresh = OffloadedExperts.from_experts(_experts(kind, seed=2), "q4_k")
    state = oe.state_dict()
    assert all(v.dtype == torch.uint8 for k, v in state.items() if k.endswith("proj.weight"))
    fresh.load_state_dict(state)
    x = torch.randn(5, HIDDEN)
    index, weights = _routing(5, oe.num_experts, 2)
    assert torch.equal(fresh(x, index, weights), oe(x, index, weights))


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_the_original_float_checkpoint_loads_and_is_quantized(kind):
    original = _experts(kind, seed=3)
    target = OffloadedExperts.from_experts(_experts(kind, seed=4), "q4_k")
    target.load_state_dict(original.state_dict())
    expected = OffloadedExperts.from_experts(original, "q4_k")
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), expected.state_dict().values()))
    bad = {k: v[:, :8] if k.endswith("down_proj") else v for k, v in original.state_dict().items()}
    with pytest.raises(RuntimeError, match="expert weights of shape"):
        target.load_state_dict(bad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tokens", [1, 3, 5])
def test_a_few_tokens_run_one_grouped_launch_per_projection(kind, tokens, monkeypatch):
    """Few pairs per expert: the Triton grouped expert GEMV (interpreted here) computes both
    projections, one launch each and no per-expert qmatmul, within fp32 tolerance of float64 math."""
    original = _experts(kind)
    oe = OffloadedExperts.from_experts(original, {projection_names(original)[0]: "q4_k", "down_proj": "q6_k"})
    monkeypatch.setattr(oe, "kernel_backend", "triton")
    ref = _dequantized(original, oe).double()
    x = torch.randn(tokens, HIDDEN)
    index, weights = _routing(tokens, original.num_experts, 3, seed=tokens)
    kernels.reset_launch_counts()
    with kernels.poison_outputs():
        y = oe(x, index, weights)
    ran = {k: v for k, v in kernels.launch_counts().items() if v}
    assert sum(ran.values()) == 2 and set(ran) <= {"expert_gemv", "expert_gemv_splitk"}, ran
    assert _rel(y, batched_mm_experts_forward(ref, x.double(), index, weights.double())) < 1e-4


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_many_tokens_run_one_grouped_gemm_launch_per_projection(kind, monkeypatch):
    """More than 4 pairs per expert (9 tokens x 3 of 5 experts): the grouped tensor-core GEMM (interpreted
    here) over the pairs sorted by expert, one launch per projection, within fp32 tolerance of float64 math;
    above GROUPED_MAX_PAIRS_PER_EXPERT the tokens go by expert instead."""
    original = _experts(kind)
    oe = OffloadedExperts.from_experts(original, {projection_names(original)[0]: "q4_k", "down_proj": "q6_k"})
    monkeypatch.setattr(oe, "kernel_backend", "triton")
    ref = _dequantized(original, oe).double()
    x = torch.randn(9, HIDDEN)
    index, weights = _routing(9, original.num_experts, 3, seed=9)
    expected = batched_mm_experts_forward(ref, x.double(), index, weights.double())
    kernels.reset_launch_counts()
    with kernels.poison_outputs():
        y = oe(x, index, weights)
    ran = {k: v for k, v in kernels.launch_counts().items() if v}
    assert ran == {"expert_gemm": 2}, ran
    assert _rel(y, expected) < 1e-4
    monkeypatch.setattr(offloaded_experts, "GROUPED_MAX_PAIRS_PER_EXPERT", 5)        # 27 pairs > 5 per expert
    kernels.reset_launch_counts()
    y = oe(x, index, weights)
    assert not any(v for k, v in kernels.launch_counts().items() if k.startswith("expert_"))
    assert _rel(y, expected) < 1e-4


def test_grouped_and_by_expert_paths_agree(monkeypatch):
    original = _experts("gpt_oss")
    oe = OffloadedExperts.from_experts(original, "q4_0")
    x = torch.randn(2, 3, HIDDEN)
    index, weights = _routing(6, original.num_experts, 2, seed=3)
    index, weights = index.view(2, 3, 2), weights.view(2, 3, 2)
    grouped = oe(x[:1, :3], index[:1], weights[:1])           # 3 tokens: grouped
    monkeypatch.setattr(offloaded_experts, "GROUPED_MAX_PAIRS_PER_EXPERT", 0)
    torch.testing.assert_close(grouped, oe(x[:1, :3], index[:1], weights[:1]), rtol=1e-6, atol=1e-7)


def test_the_grouped_path_compiles_without_graph_breaks(monkeypatch):
    """No host read of the routing: torch.compile(fullgraph=True) traces a few tokens' forward whole (what
    CUDA graph capture of a decode step needs too), the grouped kernel inside the graph."""
    torch._dynamo.reset()
    original = _experts("mixtral")
    oe = OffloadedExperts.from_experts(original, "q8_0")
    monkeypatch.setattr(oe, "kernel_backend", "triton")
    x = torch.randn(2, HIDDEN)
    index, weights = _routing(2, original.num_experts, 2)
    compiled = torch.compile(oe, fullgraph=True, backend="aot_eager")
    kernels.reset_launch_counts()
    torch.testing.assert_close(compiled(x, index, weights), oe(x, index, weights), rtol=0, atol=0)
    assert kernels.launch_counts()["expert_gemv"] + kernels.launch_counts()["expert_gemv_splitk"] == 4


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_cuda_triton_kernels_match_float64(kind, dtype, tokens):
    """On CUDA each expert's slice of the stacked bytes goes through the Triton kernels (GEMV for the few
    tokens of an expert, GEMM for many), experts' slices at every byte offset of the stack."""
    original = _experts(kind)
    oe = OffloadedExperts.from_experts(original, {projection_names(original)[0]: "q4_k", "down_proj": "q6_k"},
                                       device="cuda")
    ref = _dequantized(original.cuda(), oe).double()
    x = torch.randn(tokens, HIDDEN, device="cuda")
    index, weights = _routing(tokens, original.num_experts, 2, seed=tokens)
    index, weights = index.cuda(), weights.cuda()
    y = oe(x.to(dtype), index, weights.to(dtype))
    assert y.dtype == dtype and y.device.type == "cuda"
    expected = batched_mm_experts_forward(ref, x.double(), index, weights.double())
    assert _rel(y, expected) < max(TOL[dtype], 1e-4)


@pytest.mark.gpu
def test_cuda_graph_captures_a_grouped_decode_step():
    """A few tokens' MoE forward has no host read of the routing, so a CUDA graph captures it; replays with
    new hidden states and routing written into the captured tensors match eager calls."""
    original = _experts("mixtral")
    oe = OffloadedExperts.from_experts(original, "q4_k", device="cuda")
    x = torch.randn(2, HIDDEN, device="cuda", dtype=torch.float16)
    index, weights = (t.cuda() for t in _routing(2, original.num_experts, 2))
    weights = weights.half()
    oe(x, index, weights)                                   # compile (and tune) outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        oe(x, index, weights)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = oe(x, index, weights)
    for seed in (1, 2, 3):
        new_index, new_weights = _routing(2, original.num_experts, 2, seed=seed)
        index.copy_(new_index)
        weights.copy_(new_weights)
        x.copy_(torch.randn(2, HIDDEN))
        graph.replay()
        torch.testing.assert_close(y, oe(x, index, weights), rtol=2e-3, atol=2e-3)

