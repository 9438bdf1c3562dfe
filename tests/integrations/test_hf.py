"""``AutoModelForCausalLM.from_pretrained`` on a factored checkpoint (after ``import pgsvd_rt``)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import pgsvd_rt  # noqa: F401  (registers quant_method "pgsvd" with transformers)
from pgsvd_rt.cli import main
from pgsvd_rt.io import load_factored
from pgsvd_rt.nn import LowRankLinear
from tests.conftest import random_ids


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_from_pretrained_equals_load_factored(tiny_ckpts, family):
    ckpt = tiny_ckpts[family]
    ours, _, manifest = load_factored(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    names = {n for n, m in theirs.named_modules() if isinstance(m, LowRankLinear)}
    assert names == set(manifest["modules"])
    ids = random_ids(2, 12, seed=7)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
        a = ours.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = theirs.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_from_pretrained_refuses_ranks_that_disagree(tiny_ckpts, tmp_path):
    bad = shutil.copytree(tiny_ckpts["llama"], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    name = sorted(cfg["quantization_config"]["ranks"])[0]
    cfg["quantization_config"]["ranks"][name] += 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{name}.*quantization_config says rank"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_older_checkpoints_are_stamped_in_place(tiny_ckpts, tmp_path):
    """A directory written before the quantization_config existed: load_factored reads it as
    before; stamp_checkpoint (``pgsvd upgrade``) adds the entry, then from_pretrained loads it."""
    old = shutil.copytree(tiny_ckpts["qwen2"], tmp_path / "old")
    cfg = json.loads((old / "config.json").read_text())
    entry = cfg.pop("quantization_config")
    (old / "config.json").write_text(json.dumps(cfg))
    ours, _, _ = load_factored(old)
    assert main(["upgrade", str(old)]) == 0
    assert json.loads((old / "config.json").read_text())["quantization_config"] == entry
    theirs = AutoModelForCausalLM.from_pretrained(old, dtype=torch.float32)
    ids = random_ids(1, 9, seed=2)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_from_pretrained_refuses_non_finite_factors(tiny_ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(tiny_ckpts["llama"], tmp_path / "bad")
    state = load_file(str(bad / "model.safetensors"))
    name = sorted(k for k in state if k.endswith(".v"))[0]
    state[name][0, 0] = float("inf")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name[:-2]}.*non-finite"):
        AutoModelForCausalLM.from_pretrained(bad)
