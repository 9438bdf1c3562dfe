"""Native CPU kernels of pgsvd::lowrank_matmul(_grouped, _merged) (csrc/lowrank_matmul_cpu.cpp).

Every case goes through the dispatcher (``ops.lowrank_matmul`` on CPU tensors) and checks that the
C++ kernel served it (its call counter), then holds the result to the 2x-PyTorch rule of
tests/accuracy.py against fp64, in fp32 and bf16 (whose torch error is bf16 rounding of both
matmuls). The decode cases run twice (``decode_isa``): with the kernels this CPU picks and with the
AVX2 set forced (on an AVX-512 CPU the only way to test it; AVX2 CPUs run it either way: both dtypes
at M <= 8, then fp32 GEMMs for bf16). Paths on an AVX512-BF16 CPU: the decode kernels of
csrc/lowrank_decode_cpu.cpp for bf16 at M <= 4 and fp32 at M <= 16 (M = 1, 3, 5, 8, 11, 16: band
widths, one or two chains; R = 1, 7, 37, 64 strips and odd-R pairs; odd K the unpaired last row; K =
1000 the K split across threads and several 64-row chunks), the AVX512-BF16 GEMMs of
csrc/lowrank_bf16_cpu.cpp for bf16 at M >= 5 (M = 5, 13, 17, 130 cross its 12-row and 6-row blocks,
N = 41, 64, 130 its 64-row blocks), library GEMMs for fp32 above 16. On AVX-512 without AVX512-BF16
the one-pass kernel serves bf16 at M <= 4 (fp64/fp32 accumulation, one rounding).
"""

import os
import subprocess
import sys

import pytest
import torch

from pgsvd_rt import ops
from pgsvd_rt.device import cpu_flags
from pgsvd_rt.ops import _native
from tests.accuracy import check_lowrank, lowrank_factors

pytestmark = pytest.mark.skipif(not ops.native_available(),
                                reason="pgsvd_rt._C is not built (PGSVD_NO_NATIVE=1?)")
DTYPES = [torch.float32, torch.bfloat16]
LAYOUTS = ("contig", "sliced", "transposed")


@pytest.fixture(params=["auto", "avx2"])
def decode_isa(request):
    """The decode kernels this CPU picks, or the AVX2 set forced (csrc/decode_avx2.h)."""
    _native.module.decode_force_avx2(request.param == "avx2")
    yield request.param
    _native.module.decode_force_avx2(False)


def _served_natively(fn, *args):
    """fn(*args), checking it made exactly one call into the C++ kernels."""
    before = _native.module.lowrank_calls()
    out = fn(*args)
    assert _native.module.lowrank_calls() == before + 1, "the CPU call did not reach the C++ kernel"
    return out


CASES = [(M, K, N, R, i % 2 == 0, LAYOUTS[i % 3])
         for i, (M, R) in enumerate([(m, r) for m in (1, 3, 5, 17) for r in (1, 7, 37)])
         for K, N in ((37, 41), (1000, 130))]
CASES += [(13, 129, 64, 64, True, "sliced"), (130, 1000, 41, 37, False, "transposed"),
          (130, 257, 130, 7, True, "contig")]
# fp32 decode kernel rows 5-16 (band widths 3, 2, 1 strips; one accumulator chain per row).
CASES += [(8, 1000, 130, 37, True, "contig"), (16, 37, 41, 64, False, "sliced"),
          (11, 257, 64, 7, True, "transposed")]
# AVX2 set: 2 and 4 rows (4 and 2 rows of u per pass of phase 2, N not a multiple of them;
# 4 is the last fp32 row count whose phase 1 streams whole rows of v).
CASES += [(2, 1000, 130, 37, True, "sliced"), (4, 257, 41, 7, False, "transposed"),
          (4, 1000, 43, 64, True, "contig")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,R,bias,layout", CASES)
def test_native_matches_fp64(M, K, N, R, bias, layout, dtype, decode_isa):
    x, u, v, b = lowrank_factors(M, K, N, R, dtype, "cpu", bias, layout, seed=M * 100 + R + K)
    y = _served_natively(ops.lowrank_matmul, x, u, v, b)
    check_lowrank(y, x, u, v, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_batched_leading_dims_and_strided_factors(dtype):
    """x (2, 3, K) -> (2, 3, N); u and v column slices of wider tensors (copied, still exact)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 96, generator=g).to(dtype)
    u = (torch.randn(41, 20, generator=g) / 4).to(dtype)[:, 3:10]
    v = (torch.randn(96, 20, generator=g) / 10).to(dtype)[:, 3:10]
    b = torch.randn(41, generator=g).to(dtype)
    y = _served_natively(ops.lowrank_matmul, x, u, v, b)
    assert y.shape == (2, 1, 41)
    check_lowrank(y.reshape(2, 41), x.reshape(2, 96), u, v, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_empty(dtype):
    x, u, v, b = lowrank_factors(1, 37, 41, 7, dtype, "cpu", True, "contig", seed=0)
    assert ops.lowrank_matmul(x[:0], u, v, b).shape == (0, 41)
    y = ops.lowrank_matmul(x[:, :0], u, v[:0], b)  # K = 0: the bias alone, as the reference
    torch.testing.assert_close(y, b.expand(1, 41), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 5, 40])
def test_native_grouped_matches_fp64(M, dtype, decode_isa):
    """q/k/v-like groups (different N and R, one without bias) from one v_cat."""
    g = torch.Generator().manual_seed(M)
    K, shapes = 300, [(41, 7), (16, 1), (24, 37)]
    x = torch.randn(M, K, generator=g).to(dtype)
    us = [(torch.randn(N, R, generator=g) / R**0.5).to(dtype) for N, R in shapes]
    vs = [(torch.randn(K, R, generator=g) / K**0.5).to(dtype) for _, R in shapes]
    bs = [torch.randn(41, generator=g).to(dtype), None, torch.randn(24, generator=g).to(dtype)]
    bias_cat = torch.cat([b if b is not None else torch.zeros(16, dtype=dtype) for b in bs])
    ys = _served_natively(ops.lowrank_matmul_grouped, x, us, torch.cat(vs, 1), bias_cat)
    for y, u, v, b in zip(ys, us, vs, bs, strict=True):
        check_lowrank(y, x, u, v, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 5, 40])
def test_native_merged_is_grouped_side_by_side(M, dtype, decode_isa):
    """One (..., sum N) output: the decode kernels write each group's columns in place (M <= 4
    in bf16, <= 16 in fp32), the other paths concatenate; bit for bit the grouped outputs."""
    g = torch.Generator().manual_seed(M)
    K, shapes = 300, [(41, 7), (16, 1), (24, 37)]
    x = torch.randn(M, K, generator=g).to(dtype)
    x = x.view(M, 1, K) if M == 3 else x  # leading dims: (3, 1, K) -> (3, 1, 81)
    us = [(torch.randn(N, R, generator=g) / R**0.5).to(dtype) for N, R in shapes]
    v_cat = (torch.randn(K, 45, generator=g) / K**0.5).to(dtype)
    bias_cat = torch.randn(81, generator=g).to(dtype)
    for b in (bias_cat, None):
        y = _served_natively(ops.lowrank_matmul_merged, x, us, v_cat, b)
        assert y.shape == (*x.shape[:-1], 81)
        want = torch.cat(ops.lowrank_matmul_grouped(x, us, v_cat, b), -1)
        torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 11, 40])
def test_native_v_transposed_matches_fp64(M, dtype, decode_isa):
    """v given as v.T (strides (1, K), what ``ops.decode_layout`` makes where the decode kernels
    read it so): their phase 1 runs as dot products on the rows of v.T (the AVX-512 set: bf16 at
    M <= 4 on pairs in memory order, fp32 at M <= 16, fp64 sums every 1024 to 4096 columns; the
    AVX2 set: fp32 at M <= 8, every 512 to 4096), K not a multiple of 8 nor of 32; every other
    path copies v or hands it to a library GEMM. Single and merged (a group of rank 1 among
    them: alone, a (K, 1) v has no transposed layout), with bias."""
    for K, N, R in ((1000, 130, 37), (37, 41, 7), (300, 5, 3), (2100, 20, 9)):
        x, u, v, b = lowrank_factors(M, K, N, R, dtype, "cpu", True, "contig", seed=M + K)
        vt = v.t().contiguous().t()
        assert vt.stride() == (1, K)
        check_lowrank(_served_natively(ops.lowrank_matmul, x, u, vt, b), x, u, v, b)
    g = torch.Generator().manual_seed(M)
    K, shapes = 300, [(41, 7), (16, 1), (24, 37)]
    x = torch.randn(M, K, generator=g).to(dtype)
    us = [(torch.randn(N, R, generator=g) / R**0.5).to(dtype) for N, R in shapes]
    v_cat = (torch.randn(K, 45, generator=g) / K**0.5).to(dtype)
    bias_cat = torch.randn(81, generator=g).to(dtype)
    y = _served_natively(ops.lowrank_matmul_merged, x, us, v_cat.t().contiguous().t(), bias_cat)
    r0 = n0 = 0
    for (N, R), u in zip(shapes, us, strict=True):
        check_lowrank(y[:, n0:n0 + N].contiguous(), x, u, v_cat[:, r0:r0 + R],
                      bias_cat[n0:n0 + N])
        r0, n0 = r0 + R, n0 + N


def test_decode_layout_is_what_the_kernels_take(decode_isa):
    """v.T laid out (a (K, R) view, same values) for the dtypes whose decode kernels take it: both
    on the AVX-512 set (bf16 where the CPU has AVX512-BF16), fp32 on the AVX2 set; else v itself."""
    flags = cpu_flags()
    avx512 = decode_isa != "avx2" and {"avx512f", "avx512bw", "avx512vl"} <= flags
    avx2 = {"avx2", "fma"} <= flags
    want = {torch.float32: avx512 or avx2,
            torch.bfloat16: avx512 and "avx512_bf16" in flags}
    for dtype, transposed in want.items():
        v = torch.randn(37, 7).to(dtype)
        assert _native.module.decode_v_transposed(dtype == torch.bfloat16) == transposed, dtype
        out = ops.decode_layout(v)
        assert out.stride() == ((1, 37) if transposed else (7, 1)), dtype
        torch.testing.assert_close(out, v, rtol=0, atol=0)
    assert ops.decode_layout(torch.randn(37, 7).half()).stride() == (7, 1)


def test_decode_kernels_serve_where_the_cpu_can():
    """A CPU with AVX2 + FMA gets decode kernels for both dtypes (no slow portable path), and
    forcing the AVX2 set keeps them on such a CPU."""
    flags = cpu_flags()
    if not {"avx2", "fma"} <= flags:
        pytest.skip("no AVX2 + FMA (or no /proc/cpuinfo)")
    rows = _native.module.build_info()["decode_max_rows"]  # (bf16, fp32)
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        # bf16 without AVX512-BF16: the one-pass AVX-512 kernel of lowrank_matmul_cpu.cpp
        assert rows == ((4, 16) if "avx512_bf16" in flags else (0, 16))
    else:
        assert rows == (8, 8)
    _native.module.decode_force_avx2(True)
    try:
        assert _native.module.build_info()["decode_max_rows"] == (8, 8)
    finally:
        _native.module.decode_force_avx2(False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 4])
def test_opcheck_native(M, dtype):
    x, u, v, b = lowrank_factors(M, 37, 41, 7, dtype, "cpu", True, "contig", seed=2)
    for grad in (False, True):
        args = tuple(t.clone().requires_grad_(grad) for t in (x, u, v, b))
        torch.library.opcheck(torch.ops.pgsvd.lowrank_matmul.default, args)
    us = [u, u[:5, :3].contiguous()]
    v_cat = torch.cat([v, v[:, :3]], 1)
    torch.library.opcheck(torch.ops.pgsvd.lowrank_matmul_grouped.default, (x, us, v_cat, None))
    torch.library.opcheck(torch.ops.pgsvd.lowrank_matmul_merged.default, (x, us, v_cat, None))


def test_compile_native_cpu():
    """torch.compile(fullgraph) keeps the op one call; the compiled graph runs the C++ kernel."""
    x, u, v, b = lowrank_factors(1, 64, 48, 9, torch.float32, "cpu", True, "contig", seed=3)
    fn = torch.compile(lambda t: ops.lowrank_matmul(t, u, v, b).relu(), fullgraph=True)
    before = _native.module.lowrank_calls()
    torch.testing.assert_close(fn(x), ops.lowrank_matmul(x, u, v, b).relu())
    assert _native.module.lowrank_calls() >= before + 2


BAD = [
    ("bias shape", lambda x, u, v, b: (x, u, v, b[:4]), ValueError,
     r"bias must have shape \(41,\)"),
    ("v rows", lambda x, u, v, b: (x, u, v[:5], b), ValueError, "v has 5 rows but x has K=37"),
    ("rank", lambda x, u, v, b: (x, u[:, :3], v, b), ValueError, "u R=3 vs v R=7"),
    ("dtype", lambda x, u, v, b: (x, u.to(torch.float16), v, b), TypeError,
     r"u dtype torch.float16 != x dtype torch.(float32|bfloat16)"),
    ("int", lambda x, u, v, b: (x.long(), u.long(), v.long(), None), TypeError, "floating point"),
    ("u 3-D", lambda x, u, v, b: (x, u[None], v, b), ValueError,
     r"must be 2-D, got u \(1, 41, 7\)"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mutate,exc,msg", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_native_bad_inputs_name_the_value(mutate, exc, msg, dtype):
    x, u, v, b = lowrank_factors(1, 37, 41, 7, dtype, "cpu", True, "contig", seed=4)
    with pytest.raises(exc, match=msg):
        torch.ops.pgsvd.lowrank_matmul.default(*mutate(x, u, v, b))


def test_native_grouped_bad_input_names_the_group():
    x, u, v, b = lowrank_factors(1, 37, 41, 7, torch.float32, "cpu", False, "contig", seed=5)
    with pytest.raises(TypeError, match=r"group 1\): lowrank_matmul: u dtype torch.float64"):
        torch.ops.pgsvd.lowrank_matmul_grouped.default(x, [u, u.double()], torch.cat([v, v], 1))
    with pytest.raises(TypeError, match=r"merged \(group 1\): lowrank_matmul: u dtype"):
        torch.ops.pgsvd.lowrank_matmul_merged.default(x, [u, u.double()], torch.cat([v, v], 1))


def test_package_works_without_native():
    """PGSVD_DISABLE_NATIVE=1 (as a PGSVD_NO_NATIVE=1 build): the reference serves the op."""
    code = ("import torch; from pgsvd_rt import ops; assert not ops.native_available(); "
            "x, u, v = torch.randn(2, 8), torch.randn(5, 3), torch.randn(8, 3); "
            "torch.testing.assert_close(ops.lowrank_matmul(x, u, v), (x @ v) @ u.T); print('ok')")
    env = dict(os.environ, PGSVD_DISABLE_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
