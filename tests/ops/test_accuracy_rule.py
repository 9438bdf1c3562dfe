"""The accuracy rule of tests/accuracy.py fails real errors and passes correct results.

Its floor (two ulps of the largest output) exists so that a correct kernel does not fail where
PyTorch's own error happened to land below an ulp; these tests show the floor does not let a
wrong result through: each mistake a kernel can make (a term of the reduction dropped, the
intermediate rounded to a narrower type, the bias forgotten, an output computed from the wrong
row of u) fails, on the shapes where the floor is what binds.
"""

import pytest
import torch

from tests.accuracy import check_lowrank, lowrank_bound, lowrank_factors

# (M, K, N, R): the Intel Xeon case whose torch fp32 error was half an ulp (the floor binds),
# a prefill-sized one, a tiny one.
SHAPES = [(1, 1000, 130, 37), (64, 576, 96, 48), (3, 37, 41, 7)]


def _mistakes(x, u, v, b):
    """name -> the fp64 result of a kernel making that mistake."""
    xd, ud, vd, bd = x.double(), u.double(), v.double(), b.double()
    k = x.shape[1] - 1
    t = xd @ vd
    wrong_row = ud.clone()
    wrong_row[0] = ud[1]
    return {
        "last term of K dropped": (t - xd[:, k:] @ vd[k:]) @ ud.t() + bd,
        "t rounded to bf16": t.bfloat16().double() @ ud.t() + bd,
        "bias forgotten": t @ ud.t(),
        "output 0 from row 1 of u": t @ wrong_row.t() + bd,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,K,N,R", SHAPES)
def test_rule_passes_the_correctly_rounded_result(M, K, N, R, dtype):
    x, u, v, b = lowrank_factors(M, K, N, R, dtype, "cpu", True, "contig", seed=K + R)
    ref, _, _ = lowrank_bound(x, u, v, b)
    check_lowrank(ref.to(dtype), x, u, v, b)  # at most half an ulp from the fp64 result


@pytest.mark.parametrize("M,K,N,R", SHAPES)
def test_rule_fails_real_errors_fp32(M, K, N, R):
    x, u, v, b = lowrank_factors(M, K, N, R, torch.float32, "cpu", True, "contig", seed=K + R)
    for name, wrong in _mistakes(x, u, v, b).items():
        with pytest.raises(AssertionError, match="max abs error"):
            check_lowrank(wrong.float(), x, u, v, b)
            pytest.fail(f"the rule let '{name}' through")


@pytest.mark.parametrize("M,K,N,R", SHAPES)
def test_rule_fails_real_errors_bf16(M, K, N, R):
    """bf16 carries 8 bits: a dropped term of a 1000-long sum or t rounded to bf16 (what torch
    does) is within its own rounding; a forgotten bias or a wrong row is not."""
    x, u, v, b = lowrank_factors(M, K, N, R, torch.bfloat16, "cpu", True, "contig", seed=K + R)
    mistakes = _mistakes(x, u, v, b)
    for name in ("bias forgotten", "output 0 from row 1 of u"):
        with pytest.raises(AssertionError, match="max abs error"):
            check_lowrank(mistakes[name].bfloat16(), x, u, v, b)
            pytest.fail(f"the rule let '{name}' through")
