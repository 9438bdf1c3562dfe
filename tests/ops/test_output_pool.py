"""The CPU serving ops' output pool (csrc/output_pool.cpp): outputs of 256 KB and more reuse
resident blocks instead of fresh, page-faulting ones, and never alias a live tensor."""

import os
import subprocess
import sys

import pytest
import torch

from pgsvd_rt import ops
from tests.accuracy import check_lowrank

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="pgsvd_rt._C is not built")


def _setup(M=256, K=96, N=512, R=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    u = torch.randn(N, R, generator=g) / R**0.5
    v = torch.randn(K, R, generator=g) / K**0.5
    p = ops.pack_factors([u], v)
    if p is None:
        pytest.skip("no packed fp32 kernel on this CPU (needs AVX-512F)")
    return x, u, v, p


def _stats():
    from pgsvd_rt.ops import _native

    return _native.module.output_pool_stats()


def test_a_freed_output_block_serves_the_next_call():
    from pgsvd_rt.ops import _native

    x, u, v, p = _setup()  # y: 256 x 512 fp32 = 512 KB
    _native.module.output_pool_clear()  # earlier tests' blocks of the same size
    y1 = ops.lowrank_matmul_packed(x, p)
    ptr = y1.data_ptr()
    del y1
    before = _stats()
    y2 = ops.lowrank_matmul_packed(x, p)
    after = _stats()
    assert y2.data_ptr() == ptr and after["hits"] == before["hits"] + 1, (before, after)
    assert after["cached_bytes"] == before["cached_bytes"] - 512 * 1024
    check_lowrank(y2, x, u, v, None)


def test_live_outputs_never_share_a_block():
    x, u, v, p = _setup()
    y1 = ops.lowrank_matmul_packed(x, p)
    kept = y1.clone()
    y2 = ops.lowrank_matmul_packed(2 * x, p)
    assert y1.data_ptr() != y2.data_ptr()
    assert torch.equal(y1, kept)  # the second call wrote elsewhere
    check_lowrank(y2, 2 * x, u, v, None)


def test_small_outputs_bypass_the_pool():
    x, u, v, p = _setup(M=4)  # 8 KB
    before = _stats()
    ops.lowrank_matmul_packed(x, p)
    after = _stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def _with_cap(cap: str, code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (the cap is read once per process) with the pool's cap."""
    _setup()  # skips where the kernel is missing
    head = ("import torch; from pgsvd_rt import ops; from pgsvd_rt.ops import _native\n"
            "p = ops.pack_factors([torch.randn(512, 24)], torch.randn(96, 24))\n"
            "x = torch.randn(256, 96)\n")
    return subprocess.run([sys.executable, "-c", head + code],
                          env=dict(os.environ, PGSVD_OUTPUT_POOL_MB=cap), capture_output=True,
                          text=True, timeout=300)


def test_cap_zero_turns_the_pool_off():
    r = _with_cap("0", "for _ in range(3): ops.lowrank_matmul_packed(x, p)\n"
                       "s = _native.module.output_pool_stats()\n"
                       "assert (s['cap_bytes'], s['hits'], s['cached_bytes']) == (0, 0, 0), s\n")
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_bad_cap_is_refused_naming_it():
    r = _with_cap("lots", "ops.lowrank_matmul_packed(x, p)\n")
    assert r.returncode != 0 and "PGSVD_OUTPUT_POOL_MB" in r.stderr and "'lots'" in r.stderr, \
        r.stderr[-2000:]
