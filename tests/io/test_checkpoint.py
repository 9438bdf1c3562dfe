import json
import os

import pytest
import torch

from pgsvd_rt.compress import collect_stats, compress_
from pgsvd_rt.config import CompressConfig
from pgsvd_rt.io import checkpoint as ck
from pgsvd_rt.io import load_factored, read_manifest, save_factored
from pgsvd_rt.models import linear_specs
from pgsvd_rt.nn import LowRankLinear
from tests.conftest import random_ids, tiny_model


@pytest.fixture
def factored():
    model = tiny_model("qwen2", seed=5)  # GQA + q/k/v bias
    stats = collect_stats(model, linear_specs(model), random_ids(4, 32), progress=False)
    report = compress_(model, CompressConfig(method="pgsvd", ratio=0.3), stats=stats,
                       progress=False)
    return model, report


def _save(model, report, path, **kw):
    info = {"method": report.method, "target_ratio": report.target_ratio, "eps": report.eps,
            "achieved_ratio": report.achieved_ratio}
    return save_factored(model, path, info=info, **kw)


def test_round_trip_gives_identical_logits(factored, tmp_path):
    model, report = factored
    out = _save(model, report, tmp_path / "ckpt")
    loaded, tok, manifest = load_factored(out)
    assert tok is None and manifest["method"] == "pgsvd"
    ids = random_ids(2, 16, seed=4)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    n_lowrank = sum(isinstance(m, LowRankLinear) for m in loaded.modules())
    assert n_lowrank == len(manifest["modules"]) == 14 - report.dense_layers
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tie restored
    assert not any(p.is_meta for p in loaded.parameters())
    assert not list(tmp_path.glob(".ckpt*"))  # no temporary leftovers


def test_manifest_contents(factored, tmp_path):
    model, report = factored
    manifest = read_manifest(_save(model, report, tmp_path / "c"))
    assert manifest["format_version"] == ck.FORMAT_VERSION
    name = "model.layers.0.self_attn.k_proj"
    if name in manifest["modules"]:
        assert manifest["modules"][name]["bias"] is True
    for meta in manifest["tensors"].values():
        assert len(meta["sha256"]) == 64


def test_existing_directory_is_refused_unless_overwrite(factored, tmp_path):
    model, report = factored
    out = _save(model, report, tmp_path / "c")
    with pytest.raises(FileExistsError, match="overwrite"):
        _save(model, report, out)
    _save(model, report, out, overwrite=True)
    load_factored(out)
    mine = tmp_path / "mine"  # not a checkpoint: never replaced, even with overwrite
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a checkpoint"):
        _save(model, report, mine, overwrite=True)
    assert (mine / "precious.txt").read_text() == "keep me"


def test_interrupted_save_leaves_nothing(factored, tmp_path, monkeypatch):
    model, report = factored
    import safetensors.torch

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        _save(model, report, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_old_checkpoint(factored, tmp_path, monkeypatch):
    model, report = factored
    out = _save(model, report, tmp_path / "c")
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _save(model, report, out, overwrite=True)
    load_factored(out)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_truncated_tensor_file(factored, tmp_path):
    out = _save(*factored, tmp_path / "c")
    f = out / ck.TENSOR_FILE
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_factored(out)


def test_flipped_bytes_fail_the_checksum(factored, tmp_path):
    out = _save(*factored, tmp_path / "c")
    f = out / ck.TENSOR_FILE
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) - 16)
        fh.write(b"\x7f" * 8)
    with pytest.raises(ValueError, match="checksum"):
        load_factored(out)


def test_manifest_that_disagrees_with_tensors(factored, tmp_path):
    out = _save(*factored, tmp_path / "c")
    path = out / "pgsvd_manifest.json"
    manifest = json.loads(path.read_text())
    name = next(k for k in manifest["tensors"] if k.endswith(".u"))
    manifest["tensors"][name]["shape"][1] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest says"):
        load_factored(out)
    del manifest["tensors"][name]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest disagrees"):
        load_factored(out)


def test_corrupted_manifest(factored, tmp_path):
    out = _save(*factored, tmp_path / "c")
    (out / "pgsvd_manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted manifest"):
        load_factored(out)


def test_wrong_rank_in_manifest_modules(factored, tmp_path):
    out = _save(*factored, tmp_path / "c")
    path = out / "pgsvd_manifest.json"
    manifest = json.loads(path.read_text())
    name = next(iter(manifest["modules"]))
    manifest["modules"][name]["rank"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="do not fit"):
        load_factored(out)


def test_dtype_cast_on_load(factored, tmp_path):
    out = _save(*factored, tmp_path / "c")
    loaded, _, _ = load_factored(out, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in loaded.parameters())
