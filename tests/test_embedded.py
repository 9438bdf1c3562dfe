"""End to end on the embedded real model (SmolLM2-135M, dequantised Q4_1): slow."""

import pytest
import torch
from torch import nn

from pgsvd_rt import models
from pgsvd_rt.compress import compress_
from pgsvd_rt.config import CalibConfig, CompressConfig
from pgsvd_rt.io import load_factored, save_factored
from pgsvd_rt.nn import LowRankLinear, replace_linear

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def compressed():
    model, tok, source = models.load("smollm2-135m")
    config = CompressConfig(method="pgsvd", ratio=0.2, calib=CalibConfig(samples=8, seq_len=256))
    report = compress_(model, config, tokenizer=tok, compare_closed_form=True, progress=False)
    return model, tok, source, config, report


def test_dense_model_is_the_real_pretrained_lm():
    model, tok, source = models.load("smollm2-135m")
    assert source.dequantised and "dequantised 4-bit" in source.describe()
    assert len(models.linear_specs(model)) == 210
    assert models.generate_text(model, tok, PROMPT, 3).strip().startswith("Paris")


def test_pgsvd_hits_the_target_with_heterogeneous_ranks(compressed):
    _, _, _, _, report = compressed
    assert 0.2 <= report.achieved_ratio < 0.205
    assert report.distinct_ranks > 50
    assert report.calibration["tokens"] == 8 * 256


def test_als_against_the_svdllm_closed_form(compressed):
    """The closed form is the optimum; ten ALS iterations get close on a real model.

    Measured at 64 x 512 calibration tokens (benchmarks/results/*quality*): median 0.4% above the
    closed form, 419 of 420 layers within 1%, worst 1.2%. Here (8 x 256 tokens) the median is
    checked against 1% and every layer against the optimum.
    """
    _, _, _, _, report = compressed
    ratios = sorted(x.objective / x.closed_form_objective for x in report.layers if x.rank)
    assert ratios[0] >= 1 - 1e-9, f"ALS below the closed-form optimum: {ratios[0]:.12f}"
    median = ratios[len(ratios) // 2]
    assert median <= 1.01, f"median ALS/closed-form ratio {median:.5f} (worst {ratios[-1]:.5f})"


def test_checkpoint_round_trip_identical_logits_and_tokens(compressed, tmp_path):
    model, tok, source, config, report = compressed
    out = save_factored(model, tmp_path / "ckpt", tokenizer=tok,
                        info=report.manifest_info(source, config))
    loaded, tok2, manifest = load_factored(out)
    assert manifest["base_model"]["dequantised_4bit"] is True
    ids = tok("Paris is the capital and largest city of France.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert models.generate_text(model, tok, PROMPT, 8) == models.generate_text(loaded, tok2,
                                                                               PROMPT, 8)


def test_generation_through_the_op_equals_plain_torch(compressed):
    """The op path (LowRankLinear -> pgsvd::lowrank_matmul) vs two plain nn.Linear."""
    model, tok, *_ = compressed
    via_op = models.generate_text(model, tok, PROMPT, 12)
    plain = {}
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            first = nn.Linear(m.in_features, m.rank, bias=False)
            second = nn.Linear(m.rank, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                first.weight.copy_(m.v.t())
                second.weight.copy_(m.u)
                if m.bias is not None:
                    second.bias.copy_(m.bias)
            plain[name] = nn.Sequential(first, second)
    originals = {name: model.get_submodule(name) for name in plain}
    replace_linear(model, plain)
    try:
        assert models.generate_text(model, tok, PROMPT, 12) == via_op
    finally:
        replace_linear(model, originals)
