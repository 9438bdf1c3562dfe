"""A launch that dies part-way must not hang the next one; the CUDA wrapper's K = 0.

The fused kernel's synchronisation buffer is reset by the last program of a launch. Here a real
launch is interrupted half-way under the interpreter (a SIGALRM handler raises in the middle of
the programs), which leaves the buffer non-zero; the next launch on the same thread must finish
(a second alarm turns a hang into a failure) and be correct.
"""

import signal
import time

import pytest
import torch

from tests.accuracy import check_lowrank, lowrank_factors

CONFIG = dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=16, BLOCK_N=16, SPLIT_K=3)  # 54 programs


class _Alarm(Exception):
    pass


def _raise_alarm(signum, frame):
    raise _Alarm


def _after(seconds: float):
    signal.setitimer(signal.ITIMER_REAL, seconds)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interrupts an interpreted launch")
def test_interrupted_launch_does_not_hang_the_next(lowrank_kernels):
    k = lowrank_kernels
    x, u, v, b = lowrank_factors(33, 96, 130, 37, torch.float32, "cpu", True, "contig", seed=8)
    launch = lambda: k.lowrank_matmul_triton(x, u, v, b, config=CONFIG)  # noqa: E731
    t0 = time.perf_counter()
    check_lowrank(launch(), x, u, v, b)
    full = time.perf_counter() - t0
    previous = signal.signal(signal.SIGALRM, _raise_alarm)
    try:
        poisoned = None
        for frac in (0.5, 0.3, 0.7, 0.15, 0.85):
            _, buf = k._sync_buffer(x.device, 64)  # the buffer the next launch will take
            try:
                _after(full * frac)
                launch()
                _after(0)
            except Exception as exc:  # the interpreter wraps it in an InterpreterError
                if "_Alarm" not in repr(exc):
                    raise
            if bool(buf.any()):  # interrupted part-way: the bug's precondition
                poisoned = buf
                break
        assert poisoned is not None, "could not interrupt a launch part-way"
        assert all(b_ is not poisoned for b_ in k._SYNC_CACHE.values())
        _after(max(60.0, 50 * full))  # a hang becomes _Alarm instead of a stuck CI job
        try:
            y = launch()
        except Exception as exc:
            if "_Alarm" in repr(exc):
                pytest.fail("the launch after an interrupted one hung")
            raise
        finally:
            _after(0)
        check_lowrank(y, x, u, v, b)
    finally:
        _after(0)
        signal.signal(signal.SIGALRM, previous)


def test_cuda_wrapper_with_empty_contraction(lowrank_kernels):
    """K = 0: y = bias (or 0), as the reference gives, through the CUDA op wrapper."""
    pytest.importorskip("triton")
    from pgsvd_rt.ops import _library, _triton, reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 0, generator=g)
    u, v, b = torch.randn(5, 4, generator=g), torch.randn(0, 4, generator=g), torch.randn(5)
    y = _triton._lowrank_matmul_cuda(x, u, v, b)
    assert y.shape == (2, 3, 5)
    torch.testing.assert_close(y, reference.lowrank_matmul(x, u, v, b))
    us = [u, torch.randn(3, 2, generator=g)]
    ys = _triton._lowrank_matmul_grouped_cuda(x, us, torch.randn(0, 6, generator=g), None)
    assert [tuple(t.shape) for t in ys] == [(2, 3, 5), (2, 3, 3)]
    assert all(bool((t == 0).all()) for t in ys)
    assert _library  # the schemas are registered (imported for their side effect)
