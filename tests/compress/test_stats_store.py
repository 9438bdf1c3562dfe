"""Calibration statistics on disk (`pgsvd_rt.compress.stats_store`): the same numbers as in
memory, the same factors from ``compress_``, reused only for the same calibration."""

import copy

import pytest
import torch

from pgsvd_rt.compress import collect_stats, compress_
from pgsvd_rt.compress.stats_store import INDEX, StatsStore, calibrate_to_disk
from pgsvd_rt.config import CalibConfig, CompressConfig
from pgsvd_rt.models import linear_specs
from tests.conftest import random_ids

RECORD = {"corpus": "random ids", "samples": 3, "seq_len": 16}


def test_store_holds_the_grams_of_one_calibration(llama, tmp_path):
    ids = random_ids(3, 16)
    ref = collect_stats(llama, linear_specs(llama), ids, batch_size=2, progress=False)
    store = calibrate_to_disk(llama, ids, RECORD, tmp_path, batch_size=2, blocks_per_pass=1,
                              progress=False)
    assert sorted(store) == sorted(ref) and len(store) == len(ref)
    for key, st in ref.items():
        got = store[key]
        assert torch.equal(got.gram, st.gram) and torch.equal(got.abs_sum, st.abs_sum)
        assert got.tokens == st.tokens == 3 * 16
    assert StatsStore(tmp_path).calibration == RECORD
    assert all(key in store for key in ref) and "no.such.input" not in store
    with pytest.raises(KeyError):
        store["no.such.input"]


def test_compress_from_the_store_equals_compress_from_memory(llama, tmp_path):
    ids = random_ids(3, 16)
    config = CompressConfig(method="pgsvd", ratio=0.3, calib=CalibConfig(blocks_per_pass=1))
    mem, disk = copy.deepcopy(llama), copy.deepcopy(llama)
    stats = collect_stats(llama, linear_specs(llama), ids, progress=False)
    store = calibrate_to_disk(llama, ids, RECORD, tmp_path, blocks_per_pass=1, progress=False)
    a = compress_(mem, config, stats=stats, progress=False)
    b = compress_(disk, config, stats=store, progress=False)
    assert [x.objective for x in a.layers] == [x.objective for x in b.layers]
    x = random_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(mem(x).logits, disk(x).logits)


def test_store_is_reused_only_for_the_same_calibration(llama, tmp_path, monkeypatch):
    ids = random_ids(3, 16)
    calibrate_to_disk(llama, ids, RECORD, tmp_path, progress=False)
    import pgsvd_rt.compress.stats_store as mod

    def no_forward(*a, **k):
        raise AssertionError("recalibrated instead of reusing the store")
    monkeypatch.setattr(mod, "iter_stats", no_forward)
    assert calibrate_to_disk(llama, ids, RECORD, tmp_path, progress=False).calibration == RECORD
    with pytest.raises(ValueError, match=r"differs in \['samples'\]"):
        calibrate_to_disk(llama, ids, RECORD | {"samples": 4}, tmp_path, progress=False)


def test_interrupted_write_is_redone_not_read(llama, tmp_path):
    ids = random_ids(3, 16)
    calibrate_to_disk(llama, ids, RECORD, tmp_path, progress=False)
    (tmp_path / INDEX).unlink()  # as if killed before the index, written last
    with pytest.raises(FileNotFoundError, match="index.json"):
        StatsStore(tmp_path)
    store = calibrate_to_disk(llama, ids, RECORD, tmp_path, progress=False)
    assert len(store) == len(collect_stats(llama, linear_specs(llama), ids, progress=False))
