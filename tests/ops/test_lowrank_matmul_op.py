"""pgsvd::lowrank_matmul, pgsvd::lowrank_matmul_grouped and pgsvd::lowrank_matmul_merged:
contract, opcheck, compile, autograd, and grouped projections in a tiny LLaMA (CPU: the default
kernels; GPU tests marked ``gpu``)."""

import pytest
import torch

from pgsvd_rt import ops
from pgsvd_rt.nn import (
    GroupedLowRankLinear,
    GroupMember,
    LowRankLinear,
    group_projections_,
    pad_ranks_,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _factors(M=3, K=8, N=5, R=2, dtype=torch.float32, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, u, v = (torch.randn(*s, generator=g) for s in ((M, K), (N, R), (K, R)))
    b = torch.randn(N, generator=g) if bias else None
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return to(x), to(u), to(v), to(b)


# ------------------------------------------------------------------------------ contract
x0, u0, v0, b0 = _factors()
BAD = [
    ("x scalar", (torch.tensor(1.0), u0, v0, b0), ValueError, "at least 1 dim"),
    ("u 1-D", (x0, u0[:, 0], v0, b0), ValueError, "must be 2-D"),
    ("v rows != K", (x0, u0, v0[:7], b0), ValueError, "K=8"),
    ("rank mismatch", (x0, u0, torch.randn(8, 3), b0), ValueError, "R=2 vs v R=3"),
    ("bias shape", (x0, u0, v0, b0[:4]), ValueError, "bias must have shape (5,)"),
    ("dtype mismatch", (x0, u0.double(), v0, b0), TypeError, "u dtype torch.float64"),
    ("bias dtype", (x0, u0, v0, b0.half()), TypeError, "bias dtype torch.float16"),
    ("integer x", (x0.long(), u0.long(), v0.long(), None), TypeError, "floating point"),
]


@pytest.mark.parametrize("args,exc,msg", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_contract_errors(args, exc, msg):
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        ops.lowrank_matmul(*args)


@needs_cuda
def test_contract_device_mismatch():
    with pytest.raises(ValueError, match="on cuda"):
        ops.lowrank_matmul(x0, u0.cuda(), v0, b0)


def test_grouped_contract_errors():
    x, u, v, b = _factors()
    with pytest.raises(ValueError, match=r"sum to 4 but v_cat has R=2"):
        ops.lowrank_matmul_grouped(x, [u, u], v, None)
    with pytest.raises(ValueError, match=r"bias_cat must have shape \(10,\)"):
        ops.lowrank_matmul_grouped(x, [u, u], torch.cat([v, v], 1), b)
    with pytest.raises(TypeError, match=r"group 1.*u dtype torch.float64"):
        ops.lowrank_matmul_grouped(x, [u, u.double()], torch.cat([v, v], 1))
    with pytest.raises(ValueError, match="at least one u"):
        ops.lowrank_matmul_grouped(x, [], v)


def test_merged_contract_errors_name_the_op():
    x, u, v, b = _factors()
    with pytest.raises(ValueError, match=r"lowrank_matmul_merged: ranks of us \[2, 2\] sum to 4"):
        ops.lowrank_matmul_merged(x, [u, u], v, None)
    with pytest.raises(TypeError, match=r"lowrank_matmul_merged \(group 1\).*torch.float64"):
        ops.lowrank_matmul_merged(x, [u, u.double()], torch.cat([v, v], 1))


# ------------------------------------------------------------------------------ opcheck
@pytest.mark.parametrize(
    "xshape,bias", [((3, 8), True), ((2, 3, 8), False), ((8,), True), ((1, 8), False)]
)
def test_opcheck_lowrank_matmul(xshape, bias):
    _, u, v, b = _factors(bias=bias, dtype=torch.float64)
    x = torch.randn(*xshape, dtype=torch.float64)
    for grad in (False, True):
        args = [t.clone().requires_grad_(grad) if t is not None else None for t in (x, u, v, b)]
        torch.library.opcheck(torch.ops.pgsvd.lowrank_matmul.default, tuple(args))


def test_opcheck_lowrank_matmul_grouped():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    us = [torch.randn(5, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)]
    v_cat = torch.randn(8, 5, dtype=torch.float64)
    for bias_cat in (torch.randn(9, dtype=torch.float64), None):
        torch.library.opcheck(torch.ops.pgsvd.lowrank_matmul_grouped.default,
                              (x, us, v_cat, bias_cat))
        req = [t.clone().requires_grad_(True) if t is not None else None
               for t in (x, *us, v_cat, bias_cat)]
        torch.library.opcheck(torch.ops.pgsvd.lowrank_matmul_grouped.default,
                              (req[0], req[1:3], req[3], req[4]))


def test_opcheck_lowrank_matmul_merged():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    us = [torch.randn(5, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)]
    v_cat = torch.randn(8, 5, dtype=torch.float64)
    for bias_cat in (torch.randn(9, dtype=torch.float64), None):
        for grad in (False, True):
            req = [t.clone().requires_grad_(grad) if t is not None else None
                   for t in (x, *us, v_cat, bias_cat)]
            torch.library.opcheck(torch.ops.pgsvd.lowrank_matmul_merged.default,
                                  (req[0], req[1:3], req[3], req[4]))


def test_merged_equals_grouped_side_by_side():
    x = torch.randn(2, 4, 8)
    us, v_cat, b = [torch.randn(5, 2), torch.randn(3, 1)], torch.randn(8, 3), torch.randn(8)
    y = ops.lowrank_matmul_merged(x, us, v_cat, b)
    assert y.shape == (2, 4, 8)
    torch.testing.assert_close(y, torch.cat(ops.lowrank_matmul_grouped(x, us, v_cat, b), -1),
                               rtol=0, atol=0)


def test_grouped_default_equals_separate():
    x = torch.randn(4, 8)
    us, vs = [torch.randn(5, 2), torch.randn(3, 1)], [torch.randn(8, 2), torch.randn(8, 1)]
    bs = [torch.randn(5), torch.zeros(3)]
    ys = ops.lowrank_matmul_grouped(x, us, torch.cat(vs, 1), torch.cat(bs))
    for y, u, v, b in zip(ys, us, vs, bs, strict=True):
        torch.testing.assert_close(y, ops.lowrank_matmul(x, u, v, b), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ autograd
def test_gradcheck_fp64():
    x, u, v, b = (t.requires_grad_() for t in _factors(M=3, K=4, N=3, R=2, dtype=torch.float64))
    assert torch.autograd.gradcheck(ops.lowrank_matmul, (x, u, v, b))
    x3 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    u2 = torch.randn(2, 1, dtype=torch.float64, requires_grad=True)
    v_cat = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: tuple(ops.lowrank_matmul_grouped(a[0], [a[1], a[2]], a[3], a[4]))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x3, u, u2, v_cat, b2))
    merged = lambda *a: ops.lowrank_matmul_merged(a[0], [a[1], a[2]], a[3], a[4])  # noqa: E731
    assert torch.autograd.gradcheck(merged, (x3, u, u2, v_cat, b2))


# ------------------------------------------------------------------------------ torch.compile
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, u, v, b = _factors(M=6, K=16, N=12, R=4)
    us, v_cat = [u, u[:7]], torch.cat([v, v], 1)

    def fn(x):
        y = torch.relu(ops.lowrank_matmul(x, u, v, b))
        q, k = ops.lowrank_matmul_grouped(x, us, v_cat, torch.cat([b, b[:7]]))
        qk = ops.lowrank_matmul_merged(x, us, v_cat, None)
        return y * 2 + q, k, qk.relu()

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(x), fn(x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ grouped modules
def _tiny_llama(seed=0, rank=16):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=128, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and n.split(".")[-1].endswith("_proj")]
    for name in names:
        parent, _, child = name.rpartition(".")
        lin = model.get_submodule(name)
        U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        r = min(rank, S.numel())
        A, B = U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]
        setattr(model.get_submodule(parent), child, LowRankLinear.from_factors(A, B, lin.bias))
    return model


@torch.no_grad()
def _logits_and_greedy(model, ids):
    return model(ids).logits, model.generate(ids[:1], max_new_tokens=8, do_sample=False)


def _assert_same_outputs(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], want[1]), f"greedy tokens differ: {got[1]} vs {want[1]}"


def test_group_projections_llama_logits_and_generate():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = _logits_and_greedy(model, ids)
    group_projections_(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.q_proj, GroupMember) and isinstance(attn.qkv_group, GroupedLowRankLinear)
    assert isinstance(mlp.up_proj, GroupMember) and isinstance(attn.o_proj, LowRankLinear)
    assert attn.qkv_group.ranks == [16, 16, 16]
    _assert_same_outputs(_logits_and_greedy(model, ids), ref)
    assert attn.qkv_group._cache_out is None  # every member served: nothing kept


def test_pad_ranks_is_exact_and_groups():
    model = _tiny_llama(rank=13)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    ref = _logits_and_greedy(model, ids)
    attn = model.model.layers[0].self_attn
    w_before = attn.q_proj.dense_weight().detach().clone()
    pad_ranks_(model, 16)
    assert attn.q_proj.rank == 16 and tuple(attn.q_proj.u.shape) == (64, 16)
    assert tuple(attn.q_proj.v.shape) == (64, 16) and not attn.q_proj.u[:, 13:].any()
    assert torch.equal(attn.q_proj.dense_weight(), w_before)  # zero columns add exact zeros
    pad_ranks_(model, 16)  # already a multiple: unchanged
    assert attn.q_proj.rank == 16
    group_projections_(model)
    assert attn.qkv_group.ranks == [16, 16, 16]
    with pytest.raises(ValueError, match="before group_projections_"):
        pad_ranks_(model, 32)
    _assert_same_outputs(_logits_and_greedy(model, ids), ref)
    with pytest.raises(ValueError, match="multiple must be a positive int, got 0"):
        LowRankLinear(4, 4, 2).pad_rank_(0)


def test_group_member_cache_tracks_input():
    layers = [LowRankLinear.from_factors(torch.randn(n, 3), torch.randn(3, 8)) for n in (5, 4)]
    group = GroupedLowRankLinear(layers)
    q, k = group.members()
    x = torch.randn(2, 8)
    torch.testing.assert_close(q(x), layers[0](x))
    x.mul_(2)  # in-place change after q was served: k must not return the stale output
    torch.testing.assert_close(k(x), layers[1](x))
    y1, y2 = q(x), q(x)  # the same member twice recomputes
    torch.testing.assert_close(y1, y2)
    with pytest.raises(ValueError, match="in_features"):
        GroupedLowRankLinear([layers[0], LowRankLinear(9, 4, 2)])


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_op_half_vs_reference(dtype):
    from pgsvd_rt.ops import _backends, reference

    assert _backends.TRITON_LOADED, "Triton backend did not register for CUDA"
    for shape in [(1, 4096), (2, 8, 4096), (300, 4096)]:
        x = torch.randn(*shape, device="cuda", dtype=dtype)
        u = torch.randn(1024, 200, device="cuda", dtype=dtype) / 200**0.5
        v = torch.randn(4096, 200, device="cuda", dtype=dtype) / 64
        b = torch.randn(1024, device="cuda", dtype=dtype)
        ref = reference.lowrank_matmul(x.double(), u.double(), v.double(), b.double())
        err = (ops.lowrank_matmul(x, u, v, b).double() - ref).abs().max().item()
        torch_err = (reference.lowrank_matmul(x, u, v, b).double() - ref).abs().max().item()
        assert err <= 2 * torch_err, f"{shape}: error {err:.3e} > 2 x torch {torch_err:.3e}"


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_capture_and_compile():
    x, u, v, b = _factors(M=4, K=256, N=128, R=32, dtype=torch.float16, device="cuda")
    want = ops.lowrank_matmul(x, u, v, b)  # also autotunes before capture
    us, v_cat = [u, u[:64]], torch.cat([v, v], 1)
    ops.lowrank_matmul_grouped(x, us, v_cat)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = ops.lowrank_matmul(static_x, u, v, b)
        static_q, static_k = ops.lowrank_matmul_grouped(static_x, us, v_cat)
    for scale in (1.0, -0.5):
        static_x.copy_(x * scale)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_y, ops.lowrank_matmul(x * scale, u, v, b))
        torch.testing.assert_close(static_k, ops.lowrank_matmul(x * scale, u[:64], v, None))
    compiled = torch.compile(lambda t: ops.lowrank_matmul(t, u, v, b).relu(), fullgraph=True)
    torch.testing.assert_close(compiled(x), want.relu())


@pytest.mark.gpu
@needs_cuda
def test_cuda_grouped_llama_generate_same_tokens():
    model = _tiny_llama().cuda().half()
    ids = torch.randint(0, 128, (1, 7), device="cuda")
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False)
        group_projections_(model)
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, ref)
