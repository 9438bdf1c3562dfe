"""pgsvd::lowrank_matmul_packed: the packed serving layout (pgsvd_rt/ops/packed.py) and the CPU
kernels that read it (csrc/lowrank_packed_cpu.cpp).

Each native case checks that the C++ kernel served it (its call counter) and holds every group's
columns to the rule of tests/accuracy.py against fp64. The shapes cross every edge of the
kernels: M = 1..7 (6-row tiles of two panels; AVX2: 3-row, bf16 2-row), 12-13 and 17 (12-row tiles
where a panel is alone), 128-130 and 257 (128-row blocks); N and R around 32 (a panel, a pair;
AVX2: 8-column vectors, masked tails), odd K (bf16's last pair), K = 1000 (fp32's 128-step
chunks, summed in fp32), several groups sharing x. Every native case runs on the tiles this CPU
picks, on the AVX2 tiles forced (fp32, and bf16 widened to fp32), and for bf16 on the
AMX tiles from one row on: emulated on every CPU with AVX512-BF16 (csrc/packed_amx.h: the code
around the tile instructions; 16-row tiles, 16-step B tiles with zero-padded tails), and on the
hardware where the CPU has AMX (skipped, saying so, elsewhere).
"""

import pytest
import torch

from pgsvd_rt import ops
from pgsvd_rt.device import cpu_flags
from pgsvd_rt.ops import _library, _native, packed, reference
from tests.accuracy import check_lowrank

DTYPES = [torch.float32, torch.bfloat16]
native = pytest.mark.skipif(not ops.native_available(),
                            reason="pgsvd_rt._C is not built (PGSVD_NO_NATIVE=1?)")


def _factors(K, shapes, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    us = [(torch.randn(N, R, generator=g) / R**0.5).to(dtype) for N, R in shapes]
    vs = [(torch.randn(K, R, generator=g) / K**0.5).to(dtype) for _, R in shapes]
    b = torch.randn(sum(N for N, _ in shapes), generator=g).to(dtype) if bias else None
    return us, vs, b


def _check_groups(y, x, us, vs, b):
    n0 = 0
    for u, v in zip(us, vs, strict=True):
        N = u.shape[0]
        check_lowrank(y[..., n0:n0 + N].reshape(-1, N).contiguous(), x.reshape(-1, x.shape[-1]),
                      u, v, None if b is None else b[n0:n0 + N])
        n0 += N


@pytest.fixture(params=["auto", "avx2", "amx-emulated", "amx"])
def isa(request):
    """The packed tiles this CPU picks, the AVX2 ones forced (csrc/packed_avx2.h), or the AMX ones
    (csrc/packed_amx.h) from one row on, emulated or on the hardware."""
    if not ops.native_available():
        pytest.skip("pgsvd_rt._C is not built")
    m = _native.module
    if request.param == "amx" and not m.amx_available():
        pytest.skip("no AMX: this CPU lacks AMX-TILE/AMX-BF16 or the kernel refused them")
    if request.param == "amx-emulated" and not m.build_info()["cpu_avx512_bf16"]:
        pytest.skip("the emulated AMX tiles run on AVX512-BF16, which this CPU lacks")
    m.decode_force_avx2(request.param == "avx2")
    if request.param.startswith("amx"):
        m.packed_amx("on" if request.param == "amx" else "emulate", 1)
    try:
        yield request.param
    finally:
        m.decode_force_avx2(False)
        m.packed_amx("off")


def _packed(us, vs, isa="auto"):
    bf16 = vs[0].dtype == torch.bfloat16
    if isa.startswith("amx") and not bf16:
        pytest.skip("the AMX tiles serve bf16 only (no fp32 TMUL)")
    p = ops.pack_factors(us, torch.cat(vs, 1))
    if p is None:
        pytest.skip(f"no packed CPU kernel for {vs[0].dtype} with the {isa} tiles on this CPU "
                    f"({_native.module.build_info()})")
    if isa != "auto":
        assert _native.module.packed_isa(bf16, 1) == isa
    return p


SHAPES = [
    (37, [(41, 7)]),
    (64, [(32, 32)]),
    (300, [(41, 7), (16, 1), (24, 37)]),
    (1000, [(130, 64), (70, 33)]),
    (33, [(65, 31), (1, 2)]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,shapes", SHAPES)
def test_pack_unpack_round_trip(K, shapes, dtype):
    us, vs, _ = _factors(K, shapes, dtype, seed=K)
    v_cat = torch.cat(vs, 1)
    w = packed.pack(us, v_cat)
    L = packed.layout_of(K, us, dtype)
    assert w.shape == (L.numel(),) and w.dtype == dtype
    us2, v2 = packed.unpack(w, K, list(L.ns), list(L.rs))
    assert torch.equal(v2, v_cat) and all(torch.equal(a, b) for a, b in zip(us, us2, strict=True))
    # Padding is zero: the packed tensor holds exactly the factors' values and zeros.
    assert int((w != 0).sum()) == int((v_cat != 0).sum()) + sum(int((u != 0).sum()) for u in us)


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 12, 13, 17, 64, 130, 257])
@pytest.mark.parametrize("K,shapes", SHAPES)
def test_native_matches_fp64(M, K, shapes, dtype, isa):
    us, vs, b = _factors(K, shapes, dtype, seed=M * 7 + K)
    p = _packed(us, vs, isa)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
    before = _native.module.lowrank_calls()
    y = ops.lowrank_matmul_packed(x, p, b)
    assert _native.module.lowrank_calls() == before + 1, "the call did not reach the C++ kernel"
    assert y.shape == (M, sum(N for N, _ in shapes)) and y.dtype == dtype
    _check_groups(y, x, us, vs, b)


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_strided_x_leading_dims_no_bias(dtype, isa):
    us, vs, _ = _factors(300, [(41, 7), (24, 37)], dtype, seed=3)
    p = _packed(us, vs, isa)
    x = torch.randn(2, 3, 2 * 300 + 1).to(dtype)[..., 1::2]  # (2, 3, 300), strides (1803, 601, 2)
    y = ops.lowrank_matmul_packed(x, p)
    assert y.shape == (2, 3, 65)
    _check_groups(y, x, us, vs, None)


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_same_bits_on_any_thread_count(dtype, isa):
    """Each output is one tile's sum in one order however the threads split the work (V's and U's
    panels at 40 rows, blocks of 128 rows at 300): a batch's result does not depend on the
    machine's core count."""
    us, vs, b = _factors(576, [(576, 173), (96, 40)], dtype, seed=5)
    p = _packed(us, vs, isa)
    threads = torch.get_num_threads()
    for M in (40, 300):
        x = torch.randn(M, 576).to(dtype)
        try:
            ys = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                ys.append(ops.lowrank_matmul_packed(x, p, b))
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2]), M


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_empty_rows(dtype, isa):
    us, vs, b = _factors(37, [(41, 7)], dtype, seed=0)
    p = _packed(us, vs, isa)
    assert ops.lowrank_matmul_packed(torch.randn(0, 37).to(dtype), p, b).shape == (0, 41)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_kernel_is_the_reference(dtype):
    """The pure-torch default (what any other device runs) unpacks and runs the reference."""
    us, vs, b = _factors(300, [(41, 7), (16, 1)], dtype, seed=1)
    v_cat = torch.cat(vs, 1)
    w = packed.pack(us, v_cat)
    x = torch.randn(5, 300).to(dtype)
    y = _library.lowrank_matmul_packed_default(x, w, [41, 16], [7, 1], b)
    want = torch.cat([reference.lowrank_matmul(x, us[0], v_cat[:, :7], b[:41]),
                      reference.lowrank_matmul(x, us[1], v_cat[:, 7:], b[41:])], -1)
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype, isa):
    us, vs, b = _factors(64, [(40, 9), (33, 32)], dtype, seed=2)
    p = _packed(us, vs, isa)
    for bias in (b, None):
        torch.library.opcheck(torch.ops.pgsvd.lowrank_matmul_packed.default,
                              (torch.randn(3, 64).to(dtype), p.w, list(p.ns), list(p.rs), bias))


def test_contract_errors_name_the_value():
    us, vs, b = _factors(37, [(41, 7)], torch.float32, seed=0)
    w = packed.pack(us, torch.cat(vs, 1))
    x = torch.randn(2, 37)
    op = torch.ops.pgsvd.lowrank_matmul_packed
    with pytest.raises(ValueError, match=r"elements for K=38.*1632"):
        op(torch.randn(2, 38), w, [41], [7])  # K disagrees with the packed size
    with pytest.raises(ValueError, match="bias"):
        op(x, w, [41], [7], torch.randn(40))
    with pytest.raises(TypeError, match="float32"):
        op(x.double(), w, [41], [7])
    with pytest.raises(ValueError, match="rank"):
        op(x, w, [41], [7, 1])
    with pytest.raises(TypeError, match="float16"):
        packed.pack([u.half() for u in us], torch.cat(vs, 1).half())


def test_pack_factors_is_none_where_no_kernel_serves():
    us, vs, _ = _factors(37, [(41, 7)], torch.float16, seed=0)
    assert ops.pack_factors(us, torch.cat(vs, 1)) is None  # fp16: no packed kernel
    meta = [u.float().to("meta") for u in us]
    assert ops.pack_factors(meta, torch.cat(vs, 1).float().to("meta")) is None


@native
@pytest.mark.parametrize("value", ["1", "2"])
def test_force_avx2_from_the_environment(value):
    """PGSVD_FORCE_AVX2=1 serves with the AVX2 sets from the first import (what bench_layers and
    bench_vllm --isa avx2 set for their engines); another value is refused, naming it."""
    import os
    import subprocess
    import sys

    code = ("from pgsvd_rt import ops; from pgsvd_rt.ops import _native; "
            "print(_native.module.packed_isa(False))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=os.environ | {"PGSVD_FORCE_AVX2": value}, timeout=300)
    if value == "1":
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[-1] == ("avx2" if {"avx2", "fma"} <= cpu_flags() else "none")
    else:
        assert r.returncode != 0 and "PGSVD_FORCE_AVX2 must be 0 or 1, got '2'" in r.stderr


@native
def test_bf16_avx2_tiles_serve_up_to_255_rows():
    """Without AVX512-BF16 (here forced) bf16 calls of up to 255 rows run on the AVX2 tiles; from
    256 rows the op unpacks to library GEMMs, the measured crossing (kAvx2Bf16MaxRows in
    csrc/lowrank_packed_cpu.cpp), and still answers to the rule."""
    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU has no AVX2/FMA")
    m = _native.module
    m.decode_force_avx2(True)
    try:
        assert [m.packed_isa(True, r) for r in (1, 255, 256, 4096)] == ["avx2"] * 2 + ["none"] * 2
        us, vs, b = _factors(66, [(40, 9), (33, 5)], torch.bfloat16, seed=5)
        p = _packed(us, vs)
        for M in (255, 256):
            x = torch.randn(M, 66, generator=torch.Generator().manual_seed(M)).bfloat16()
            _check_groups(ops.lowrank_matmul_packed(x, p, b), x, us, vs, b)
    finally:
        m.decode_force_avx2(False)


@native
def test_amx_serves_from_min_rows():
    """The AMX tiles take bf16 calls from min_rows rows (AVX-512 below; fp32 never); 'on' is
    refused, naming why, where the CPU or kernel has no AMX; bad settings are refused."""
    m = _native.module
    if not m.build_info()["cpu_avx512_bf16"]:
        pytest.skip(f"no AVX512-BF16 tiles on this CPU, emulated AMX neither ({m.build_info()})")
    try:
        m.packed_amx("emulate", 16)
        assert [m.packed_isa(True, r) for r in (1, 15, 16, 64)] == (
            ["avx512"] * 2 + ["amx-emulated"] * 2)
        assert m.packed_isa(False, 64) in ("avx512", "avx2")
        if not m.amx_available():
            with pytest.raises(ValueError, match="needs AMX-TILE and AMX-BF16"):
                m.packed_amx("on")
        with pytest.raises(ValueError, match="got 'fast'"):
            m.packed_amx("fast")
        with pytest.raises(ValueError, match="min_rows must be >= 1, got 0"):
            m.packed_amx("emulate", 0)
    finally:
        m.packed_amx("off")
    assert m.packed_isa(True, 64) == "avx512"


@native
@pytest.mark.parametrize("value", ["emulate", "1", "yes"])
def test_amx_from_the_environment(value):
    """PGSVD_AMX=1 (or emulate) serves large bf16 calls with the AMX tiles from the first import;
    1 on a CPU without AMX, and any other value, are refused naming the value or the reason."""
    import os
    import subprocess
    import sys

    code = ("from pgsvd_rt import ops; from pgsvd_rt.ops import _native; "
            "print(_native.module.packed_isa(True))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=os.environ | {"PGSVD_AMX": value}, timeout=300)
    if value == "yes":
        assert r.returncode != 0 and "PGSVD_AMX must be 0, 1 or emulate, got 'yes'" in r.stderr
    elif value == "1" and not _native.module.amx_available():
        assert r.returncode != 0 and "needs AMX-TILE and AMX-BF16" in r.stderr
    else:
        assert r.returncode == 0, r.stderr
        want = {"1": "amx", "emulate": "amx-emulated"}[value]
        if not _native.module.build_info()["cpu_avx512_bf16"]:
            want = "none"  # emulation needs AVX512-BF16; a large call unpacks (AVX2 or none)
        assert r.stdout.split()[-1] == want
