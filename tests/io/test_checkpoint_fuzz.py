"""Mutations of a real factored checkpoint: each must be refused with a clear error (ValueError)
or load correctly (logits equal to the original's), never crash with another exception, hang,
or load into a model that computes NaN.

The checkpoint: a tiny qwen2-architecture model (q/k/v bias, GQA), compressed with PGSVD and
saved by save_factored. Mutations (``MUTATIONS``): truncations of the tensor file, byte flips in
its header and data, every manifest field set to values of every JSON type, extra / missing /
renamed tensors, non-finite values and wrong dtypes with the checksums updated (so only the value
checks can catch them), a config that disagrees with the tensors, missing or odd files.
``pytest -s`` prints the table of outcomes (the README's reliability section quotes it).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch

from pgsvd_rt.io import checkpoint as ck
from pgsvd_rt.io import load_factored
from tests.conftest import random_ids, tiny_model

MANIFEST = "pgsvd_manifest.json"
ODD_VALUES = [None, True, -1, 0, 2.5, float("nan"), "x", [], [1, "a"], {}, {"a": 1}]
IDS = random_ids(2, 12, seed=9)
OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from pgsvd_rt.compress import collect_stats, compress_
    from pgsvd_rt.config import CompressConfig
    from pgsvd_rt.models import linear_specs

    model = tiny_model("qwen2", seed=3)
    stats = collect_stats(model, linear_specs(model), random_ids(4, 32), progress=False)
    compress_(model, CompressConfig(method="pgsvd", ratio=0.3), stats=stats, progress=False)
    out = ck.save_factored(model, tmp_path_factory.mktemp("fuzz") / "ckpt",
                           info={"method": "pgsvd", "eps": 0.1, "target_ratio": 0.3,
                                 "achieved_ratio": 0.3, "base_model": {"note": "tiny"}})
    with torch.no_grad():
        logits = model(IDS).logits
    return out, logits


# ---- helpers that edit a copy ---------------------------------------------------------------
def _manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


def _write_manifest(d: Path, m) -> None:
    (d / MANIFEST).write_text(json.dumps(m))


def _header_len(d: Path) -> int:
    with open(d / ck.TENSOR_FILE, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _rewrite_tensors(d: Path, edit) -> None:
    """Apply ``edit(state)`` to the tensors and update the manifest to match them exactly (so
    only checks of the values themselves can refuse the result)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / ck.TENSOR_FILE))
    edit(state)
    save_file(state, str(d / ck.TENSOR_FILE))
    m = _manifest(d)
    m["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                        "sha256": ck.tensor_sha256(v)} for k, v in state.items()}
    _write_manifest(d, m)


def _first(state, suffix):
    return next(k for k in sorted(state) if k.endswith(suffix))


def _set_value(suffix, value):
    def edit(state):
        state[_first(state, suffix)].view(-1)[3] = value
    return edit


def _to_dtype(suffix, dtype):
    def edit(state):
        k = _first(state, suffix)
        state[k] = state[k].to(dtype)
    return edit


def _all_to(dtype):
    def edit(state):
        for k in state:
            state[k] = state[k].to(dtype)
    return edit


# ---- the mutations --------------------------------------------------------------------------
def _truncations():
    def cut(where):
        def f(d):
            path = d / ck.TENSOR_FILE
            size, hl = path.stat().st_size, _header_len(d)
            at = {"empty": 0, "in-length": 5, "after-length": 8, "mid-header": 8 + hl // 2,
                  "after-header": 8 + hl, "mid-data": (8 + hl + size) // 2,
                  "last-byte": size - 1}[where]
            with open(path, "r+b") as fh:
                fh.truncate(at)
        return f
    return [(f"truncate {w}", cut(w)) for w in
            ("empty", "in-length", "after-length", "mid-header", "after-header", "mid-data",
             "last-byte")]


def _flips():
    def flip(region, frac, byte):
        def f(d):
            path = d / ck.TENSOR_FILE
            size, hl = path.stat().st_size, _header_len(d)
            lo, hi = {"length": (0, 8), "header": (8, 8 + hl), "data": (8 + hl, size)}[region]
            at = lo + int((hi - lo - 1) * frac)
            with open(path, "r+b") as fh:
                fh.seek(at)
                old = fh.read(1)[0]
                fh.seek(at)
                fh.write(bytes([old ^ byte]))
        return f
    out = []
    for region, fracs in (("length", (0.0, 0.5, 1.0)), ("header", (0.0, 0.1, 0.3, 0.5, 0.7, 0.9,
                                                                   1.0)),
                          ("data", (0.0, 0.25, 0.5, 0.75, 1.0))):
        for frac in fracs:
            for byte in (0x01, 0x80):
                out.append((f"flip {region} @{frac} ^{byte:#x}", flip(region, frac, byte)))
    return out


def _manifest_edits():
    def set_top(key, value):
        def f(d):
            m = _manifest(d)
            m[key] = value
            _write_manifest(d, m)
        return f

    def set_in(section, field, value):
        def f(d):
            m = _manifest(d)
            name = sorted(m[section])[0]
            m[section][name][field] = value
            _write_manifest(d, m)
        return f

    def drop(section):
        def f(d):
            m = _manifest(d)
            del m[section]
            _write_manifest(d, m)
        return f

    out = []
    for key in ("format", "format_version", "method", "eps", "target_ratio", "achieved_ratio",
                "base_model", "modules", "tensors", "dense_layers", "layers"):
        for i, value in enumerate(ODD_VALUES):
            out.append((f"manifest {key}={value!r}"[:60] + f" #{i}", set_top(key, value)))
    for field in ("rank", "in_features", "out_features", "bias"):
        for i, value in enumerate(ODD_VALUES + [10**6]):
            out.append((f"module.{field}={value!r} #{i}", set_in("modules", field, value)))
    for field in ("shape", "dtype", "sha256"):
        for i, value in enumerate(ODD_VALUES + [[3, 3], "int8", "0" * 64]):
            out.append((f"tensor.{field}={value!r} #{i}", set_in("tensors", field, value)))
    for section in ("modules", "tensors", "format"):
        out.append((f"manifest without {section}", drop(section)))
    out.append(("manifest is a list", lambda d: (d / MANIFEST).write_text("[1, 2]")))
    out.append(("manifest is not JSON", lambda d: (d / MANIFEST).write_text("{\"a\": ")))
    out.append(("manifest is binary", lambda d: (d / MANIFEST).write_bytes(b"\xff\xfe\x00")))
    return out


def _tensor_edits():
    def drop_both(suffix):  # from the file and the manifest, consistently
        def edit(state):
            del state[_first(state, suffix)]
        return edit

    def extra(state):
        state["model.layers.0.mlp.extra.weight"] = torch.zeros(3, 3)

    def rename(state):
        k = _first(state, ".u")
        state[k.replace(".u", ".w")] = state.pop(k)

    def reshape(state):  # a factor of the wrong rank, manifest modules unchanged
        k = _first(state, ".u")
        state[k] = torch.cat([state[k], state[k][:, :1]], 1)

    edits = [("nan in u", _set_value(".u", float("nan"))),
             ("inf in v", _set_value(".v", float("inf"))),
             ("-inf in bias", _set_value("q_proj.bias", float("-inf"))),
             ("nan in embeddings", _set_value("embed_tokens.weight", float("nan"))),
             ("nan in a norm", _set_value("norm.weight", float("nan"))),
             ("u as float16", _to_dtype(".u", torch.float16)),
             ("v as bfloat16", _to_dtype(".v", torch.bfloat16)),
             ("v as float64", _to_dtype(".v", torch.float64)),
             ("u as int32", _to_dtype(".u", torch.int32)),
             ("norm as int8", _to_dtype("norm.weight", torch.int8)),
             ("missing u", drop_both(".u")), ("missing bias", drop_both("q_proj.bias")),
             ("missing embeddings", drop_both("embed_tokens.weight")),
             ("missing norm", drop_both("norm.weight")),
             ("extra tensor", extra), ("renamed factor", rename), ("wrong-rank u", reshape)]
    out = [(name, lambda d, e=e: _rewrite_tensors(d, e)) for name, e in edits]
    out.append(("all tensors float16 (consistent)", lambda d: _rewrite_tensors(
        d, _all_to(torch.float16))))
    return out


def _file_edits():
    def config(key, value):
        def f(d):
            c = json.loads((d / "config.json").read_text())
            c[key] = value
            (d / "config.json").write_text(json.dumps(c))
        return f

    def manifest_dir(d):
        (d / MANIFEST).unlink()
        (d / MANIFEST).mkdir()

    return [("no manifest", lambda d: (d / MANIFEST).unlink()),
            ("manifest is a directory", manifest_dir),
            ("no tensor file", lambda d: (d / ck.TENSOR_FILE).unlink()),
            ("no config.json", lambda d: (d / "config.json").unlink()),
            ("config.json not JSON", lambda d: (d / "config.json").write_text("{")),
            ("config hidden_size 96", config("hidden_size", 96)),
            ("config intermediate_size 100", config("intermediate_size", 100)),
            ("config num_hidden_layers 3", config("num_hidden_layers", 3)),
            ("config num_hidden_layers 1", config("num_hidden_layers", 1)),
            ("config model_type gpt2", config("model_type", "gpt2")),
            ("config vocab_size 100", config("vocab_size", 100))]


def _category(name: str) -> str:
    for prefix, cat in (("truncate", "tensor file truncated"), ("flip length", "byte flip: length"),
                        ("flip header", "byte flip: header"), ("flip data", "byte flip: data"),
                        ("module.", "manifest: a module's field"),
                        ("tensor.", "manifest: a tensor's field"), ("manifest", "manifest: field"),
                        ("config", "config.json"), ("no ", "missing file")):
        if name.startswith(prefix):
            return cat
    if any(w in name for w in ("nan", "inf")):
        return "non-finite value (checksum updated)"
    if " as " in name or "float16" in name:
        return "dtype (checksum updated)"
    return "missing / extra / reshaped tensor"


MUTATIONS = _truncations() + _flips() + _manifest_edits() + _tensor_edits() + _file_edits()


@pytest.mark.parametrize("name,mutate", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_mutation_is_refused_or_loads_correctly(base, tmp_path, name, mutate):
    src, logits = base
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    mutate(d)
    try:
        model, _, _ = load_factored(d)
    except ValueError as exc:
        assert str(exc), name  # a message, naming what is wrong
        OUTCOMES[(_category(name), "refused")] += 1
        return
    with torch.no_grad():
        got = model(IDS).logits
    assert torch.isfinite(got).all(), f"{name}: loaded and computes non-finite logits"
    if got.dtype == logits.dtype:
        assert torch.equal(got, logits), f"{name}: loaded but computes different logits"
    else:  # a consistent cast of every tensor: the same model at lower precision
        torch.testing.assert_close(got.float(), logits, atol=5e-2, rtol=5e-2)
    OUTCOMES[(_category(name), "loaded correctly")] += 1


def test_print_mutation_table():
    """Runs last in this module: the outcome table (``pytest -s`` shows it)."""
    if not OUTCOMES:
        pytest.skip("run with the mutation tests")
    kinds = list(dict.fromkeys(_category(n) for n, _ in MUTATIONS))
    lines = ["| mutation kind | refused (ValueError) | loaded correctly |", "|---|---|---|"]
    for k in kinds:
        lines.append(f"| {k} | {OUTCOMES[(k, 'refused')]} | {OUTCOMES[(k, 'loaded correctly')]} |")
    total = sum(OUTCOMES.values())
    lines.append(f"| all {total} (of {len(MUTATIONS)}) | "
                 f"{sum(v for (k, o), v in OUTCOMES.items() if o == 'refused')} | "
                 f"{sum(v for (k, o), v in OUTCOMES.items() if o != 'refused')} |")
    print("\n" + "\n".join(lines))

