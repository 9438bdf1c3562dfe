"""Heal (pgsvd_rt/compress/heal.py): distillation of a factored model toward its dense source.

Tiny models built in the test (the real-model measurements are benchmarks/bench_heal.py): the
KL falls, only factors and biases move, an interrupted run resumed from its state ends where an
uninterrupted one ends, and ``pgsvd heal`` writes a factored checkpoint every loader reads, with
its provenance.
"""

from __future__ import annotations

import json

import pytest
import torch

from pgsvd_rt.compress import compress_
from pgsvd_rt.compress import heal as heal_mod
from pgsvd_rt.compress.heal import heal_, trainable
from pgsvd_rt.config import CompressConfig, HealConfig
from pgsvd_rt.io import load_factored, save_factored
from pgsvd_rt.nn import LowRankLinear
from tests.conftest import random_ids, tiny_model, tiny_tokenizer

CFG = dict(steps=6, batch_size=2, seq_len=16, lr=3e-3, warmup=1, bf16="off", save_every=3)


def _pair(seed=0):
    """(student, teacher): a tiny qwen2 (bias, GQA) compressed at 40%, and its dense source."""
    from pgsvd_rt.compress import collect_stats
    from pgsvd_rt.models import linear_specs

    teacher = tiny_model("qwen2", seed=seed)
    student = tiny_model("qwen2", seed=seed)
    stats = collect_stats(teacher, linear_specs(teacher), random_ids(4, 32), progress=False)
    compress_(student, CompressConfig(method="pgsvd", ratio=0.4), stats=stats, progress=False)
    return student, teacher


def _frozen(model):
    names = set(trainable(model))
    return {k: v.detach().clone() for k, v in model.named_parameters() if k not in names}


def test_heal_lowers_the_kl_and_trains_only_factors_and_biases():
    student, teacher = _pair()
    frozen = _frozen(student)
    before = {k: p.detach().clone() for k, p in trainable(student).items()}
    assert any(k.endswith(".bias") for k in before)  # qwen2's q/k/v biases train too
    report = heal_(student, teacher, tiny_tokenizer(), HealConfig(**(CFG | {"steps": 12})),
                   progress=False)
    assert report.steps == 12 and report.tokens == 12 * 2 * 16
    assert report.kl_last < 0.8 * report.kl_first, report.kl
    for k, v in _frozen(student).items():
        assert torch.equal(v, frozen[k]), f"{k} is not trained but changed"
    moved = [k for k, p in trainable(student).items() if not torch.equal(p, before[k])]
    assert len(moved) == len(before)
    assert all(not p.requires_grad for p in student.parameters())


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    tok, config = tiny_tokenizer(), HealConfig(**CFG)
    whole, teacher = _pair()
    heal_(whole, teacher, tok, config, progress=False)

    cut, teacher = _pair()
    state = tmp_path / "state.pt"
    calls = {"n": 0}
    real = heal_mod.kl_loss

    def stop_at_4(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # after the state written at step 3
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(heal_mod, "kl_loss", stop_at_4)
    with pytest.raises(KeyboardInterrupt):
        heal_(cut, teacher, tok, config, state_path=state, source_id="s", progress=False)
    monkeypatch.setattr(heal_mod, "kl_loss", real)
    resumed, teacher = _pair()  # a fresh process: the checkpoint's factors, then the state
    report = heal_(resumed, teacher, tok, config, state_path=state, source_id="s",
                   progress=False)
    assert report.steps == 6
    for k, p in trainable(resumed).items():
        torch.testing.assert_close(p, trainable(whole)[k], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="another run"):
        heal_(_pair()[0], teacher, tok, HealConfig(**(CFG | {"lr": 1e-3})), state_path=state,
              source_id="s", progress=False)


def test_heal_refuses_a_model_without_factors():
    with pytest.raises(ValueError, match="no LowRankLinear"):
        heal_(tiny_model("qwen2"), tiny_model("qwen2"), tiny_tokenizer(), HealConfig(**CFG),
              progress=False)


def test_config_is_validated():
    with pytest.raises(ValueError, match="steps"):
        HealConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        HealConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="bf16"):
        HealConfig(bf16="yes")


def test_cli_heal_writes_a_factored_checkpoint_with_provenance(tmp_path):
    from transformers import AutoModelForCausalLM

    from pgsvd_rt import cli

    student, teacher = _pair(seed=4)
    dense_dir = tmp_path / "dense"
    teacher.save_pretrained(dense_dir)
    tiny_tokenizer().save_pretrained(dense_dir)
    ckpt = save_factored(student, tmp_path / "ckpt", tokenizer=tiny_tokenizer(),
                         info={"method": "pgsvd"})
    out = tmp_path / "healed"
    rc = cli.main(["heal", str(ckpt), "--out", str(out), "--teacher", str(dense_dir),
                   "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--bf16", "off",
                   "--json"])
    assert rc == 0
    model, _, manifest = load_factored(out)
    heal = manifest["heal"]
    assert heal["steps"] == 4 and heal["tokens"] == 4 * 2 * 16 and heal["config"]["lr"] == 1e-4
    assert heal["from"].endswith("ckpt") and "corpus" in heal and manifest["method"] == "pgsvd"
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks == {n: m.rank for n, m in student.named_modules()
                     if isinstance(m, LowRankLinear)}  # same ranks, same bytes
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = random_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert not list(tmp_path.glob(".healed.heal-state.pt"))  # the state goes with success
    assert cli.main(["heal", str(ckpt), "--out", str(out), "--teacher", str(dense_dir),
                     "--steps", "1", "--json"]) == 2  # exists: refused without --overwrite
    assert json.loads((out / "pgsvd_manifest.json").read_text())["heal"]["steps"] == 4
