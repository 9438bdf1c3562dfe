"""Int8 factors: the clipping search, the reported error, and int8 checkpoints end to end
(load_factored, from_pretrained; vLLM refuses them by name)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pgsvd_rt.compress import compress_
from pgsvd_rt.compress.quantize import CLIPS, quantize_factors, quantize_rows
from pgsvd_rt.config import CalibConfig, CompressConfig
from pgsvd_rt.io import load_factored, save_factored
from pgsvd_rt.nn import LowRankLinearInt8
from tests.conftest import random_ids, tiny_model, tiny_tokenizer


def _gram_error(A, B, Aq, Bq, G):
    E = A @ B - Aq @ Bq
    return float(((E @ G) * E).sum())


def test_quantize_rows_bounds_and_scale():
    X = torch.randn(5, 33, dtype=torch.float64)
    q, s = quantize_rows(X, 1.0)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert float((q.double() * s[:, None] - X).abs().max()) <= float(s.max()) / 2 + 1e-12
    q9, _ = quantize_rows(X, 0.5)
    assert (q9.abs() == 127).sum() > (q.abs() == 127).sum()  # clipping saturates outliers


def test_clipping_minimises_the_activation_weighted_error():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(48, 12, generator=g, dtype=torch.float64)
    B = torch.randn(12, 40, generator=g, dtype=torch.float64)
    B[:, 3] *= 30  # an outlier input channel, as real activations have
    X = torch.randn(40, 500, generator=g, dtype=torch.float64)
    X[3] *= 0.01  # ...that the activations rarely use: clipping it pays
    G = X @ X.t()
    q = quantize_factors(A, B, G)
    Aq, Bq = q.u.double() * q.u_scale[:, None], q.vt.double() * q.vt_scale[:, None]
    err = _gram_error(A, B, Aq, Bq, G)
    ref = _gram_error(A, B, torch.zeros_like(A), Bq, G)
    assert q.rel_error == pytest.approx(err / ref, rel=1e-6)
    # v's clip is the grid's best with A exact; u's the best given B_q
    best_v = min(CLIPS, key=lambda c: _gram_error(
        A, B, A, quantize_rows(B, c)[0].double() * quantize_rows(B, c)[1][:, None], G))
    assert q.clip_v == best_v and q.clip_v < 1.0
    plain = quantize_factors(A, B, G, clips=(1.0,))
    assert q.rel_error < plain.rel_error


def test_int8_compression_round_trip(tmp_path):
    """compress --int8: layer errors reported, saved as int8, loaded by load_factored and
    from_pretrained with identical logits; vLLM's method refuses int8 by name."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen2", seed=3)
    cfg = CompressConfig(method="pgsvd", ratio=0.3, int8=True,
                         calib=CalibConfig(samples=4, seq_len=32))
    report = compress_(model, cfg, tokenizer=tiny_tokenizer(), progress=False)
    factored = [r for r in report.layers if r.rank is not None]
    assert factored and all(0 <= r.int8_rel_error < 0.05 and r.int8_clip for r in factored)
    n = sum(isinstance(m, LowRankLinearInt8) for m in model.modules())
    assert n == len(factored)
    out = save_factored(model, tmp_path / "ckpt", info={"method": "pgsvd"})
    manifest = json.loads((out / "pgsvd_manifest.json").read_text())
    name = factored[0].name
    assert manifest["modules"][name]["factors"] == "int8"
    assert manifest["tensors"][f"{name}.u"]["dtype"] == "int8"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert name in qc["int8"]
    ids = random_ids(2, 16)
    loaded, _, _ = load_factored(out)
    hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(loaded(ids).logits, want)
        assert torch.equal(hf(ids).logits, want)
    vllm = pytest.importorskip("pgsvd_rt.integrations.vllm", reason="vLLM is not installed")
    with pytest.raises(ValueError, match=rf"int8 factors \(e.g. '{min(qc['int8'])}'\)"):
        vllm.PGSVDvLLMConfig.from_config(qc)


def test_int8_checkpoint_with_a_float_factor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama", seed=1)
    compress_(model, CompressConfig(method="svd", ratio=0.3, int8=True), progress=False)
    out = save_factored(copy.deepcopy(model), tmp_path / "c", info={"method": "svd"})
    state = load_file(str(out / "model.safetensors"))
    name = next(k for k in state if k.endswith(".vt"))
    state[name] = state[name].float()
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{name}"):
        load_factored(out, verify=False)
