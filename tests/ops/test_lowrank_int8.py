"""pgsvd::lowrank_matmul_int8: int8 factors served without dequantising (CPU: torch's int8
weight-only GEMM), against the fp64 definition; odd shapes; bad inputs; opcheck; compile."""

from __future__ import annotations

import pytest
import torch

from pgsvd_rt import ops
from pgsvd_rt.nn import LowRankLinearInt8
from pgsvd_rt.ops import reference


def _factors(N, R, K, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(-127, 128, (N, R), dtype=torch.int8, generator=g)
    vt = torch.randint(-127, 128, (R, K), dtype=torch.int8, generator=g)
    us = (torch.rand(N, generator=g) / 127).to(dtype)
    vs = (torch.rand(R, generator=g) / 127).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return u, us, vt, vs, b


def _fp64(x, u, us, vt, vs, b):
    t = (x.double() @ vt.double().t()) * vs.double()
    y = (t @ u.double().t()) * us.double()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2),
                                        (torch.float16, 3e-3)])
@pytest.mark.parametrize("M, N, R, K", [(1, 37, 9, 51), (7, 64, 16, 64), (3, 33, 48, 80),
                                        (1, 96, 32, 576)])
def test_matches_fp64(dtype, tol, M, N, R, K):
    u, us, vt, vs, b = _factors(N, R, K, dtype)
    x = torch.randn(2, M, K).to(dtype)
    y = ops.lowrank_matmul_int8(x, u, us, vt, vs, b)
    want = _fp64(x, u, us, vt, vs, b)
    assert y.shape == (2, M, N) and y.dtype == dtype
    err = float((y.double() - want).norm() / want.norm())
    assert err < tol, err
    ref = reference.lowrank_matmul_int8(x, u, us, vt, vs, b)  # the default kernel
    assert float((ref.double() - want).norm() / want.norm()) < tol


def test_opcheck_and_compile():
    u, us, vt, vs, b = _factors(40, 16, 48, torch.float32)
    x = torch.randn(5, 48)
    torch.library.opcheck(torch.ops.pgsvd.lowrank_matmul_int8.default, (x, u, us, vt, vs, b))
    torch.library.opcheck(torch.ops.pgsvd.lowrank_matmul_int8.default, (x, u, us, vt, vs, None))
    f = torch.compile(lambda x: ops.lowrank_matmul_int8(x, u, us, vt, vs, b), fullgraph=True)
    torch.testing.assert_close(f(x), ops.lowrank_matmul_int8(x, u, us, vt, vs, b))


@pytest.mark.parametrize("change, exc, match", [
    (lambda a: {**a, "u": a["u"].float()}, TypeError, "u must be a 2-D int8"),
    (lambda a: {**a, "vt": a["vt"][:, :-1]}, ValueError, r"vt must be \(R, K\) = \(16, 48\)"),
    (lambda a: {**a, "u_scale": a["u_scale"][:-1]}, ValueError, r"u_scale must have shape \(40,\)"),
    (lambda a: {**a, "vt_scale": a["vt_scale"].double()}, TypeError, "vt_scale dtype"),
    (lambda a: {**a, "bias": a["bias"][:3]}, ValueError, r"bias must have shape \(40,\)"),
    (lambda a: {**a, "x": a["x"].long()}, TypeError, "x must be a floating"),
])
def test_bad_inputs_are_named(change, exc, match):
    u, us, vt, vs, b = _factors(40, 16, 48, torch.float32)
    a = change({"x": torch.randn(2, 48), "u": u, "u_scale": us, "vt": vt, "vt_scale": vs,
                "bias": b})
    with pytest.raises(exc, match=match):
        ops.lowrank_matmul_int8(a["x"], a["u"], a["u_scale"], a["vt"], a["vt_scale"], a["bias"])


def test_module_pads_the_rank_exactly():
    u, us, vt, vs, b = _factors(40, 9, 48, torch.float32)
    mod = LowRankLinearInt8.from_quantized(u, us, vt, vs, b, torch.float32)
    assert mod.rank == 16 and mod.u.dtype == torch.int8
    x = torch.randn(3, 48)
    torch.testing.assert_close(mod(x), _fp64(x, u, us, vt, vs, b).float(), rtol=1e-5, atol=1e-4)
    bf = mod.to(torch.bfloat16)  # scales follow the model's dtype, factors stay int8
    assert bf.u.dtype == torch.int8 and bf.u_scale.dtype == torch.bfloat16
    want = _fp64(x, u, us, vt, vs, b)
    assert float((bf(x.bfloat16()).double() - want).norm() / want.norm()) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_cuda_int8_triton_matches_fp64_and_graphs(dtype, tol):
    """On CUDA the op is the Triton kernel (int8 loads); eager, compiled and graph-replayed."""
    u, us, vt, vs, b = (t.cuda() for t in _factors(4096, 1232, 4096, dtype))
    for M in (1, 16, 300):
        x = torch.randn(M, 4096, device="cuda").to(dtype)
        y = ops.lowrank_matmul_int8(x, u, us, vt, vs, b)
        want = _fp64(x, u, us, vt, vs, b)
        assert float((y.double() - want).norm() / want.norm()) < tol
    f = torch.compile(lambda x: ops.lowrank_matmul_int8(x, u, us, vt, vs, b), fullgraph=True)
    torch.testing.assert_close(f(x), y)
    x1 = torch.randn(1, 4096, device="cuda").to(dtype)
    eager = ops.lowrank_matmul_int8(x1, u, us, vt, vs, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.lowrank_matmul_int8(x1, u, us, vt, vs, b)
    graph.replay()
    torch.testing.assert_close(out, eager)
