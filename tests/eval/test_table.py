"""The accuracy table (`pgsvd reproduce`) end to end on a tiny Qwen2 directory."""

import json

import pytest

from pgsvd_rt import cli
from pgsvd_rt.config import CalibConfig
from pgsvd_rt.eval.table import render_markdown, reproduce


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return path


def test_reproduce_rows_files_and_closed_form_comparison(tiny_model_dir, text_file, tmp_path):
    res = reproduce(tmp_path / "out", model=str(tiny_model_dir),
                    methods=("svd-llm", "svd-als", "pgsvd"), ratios=(0.3,), tasks=("piqa",),
                    task_limit=3, text_file=str(text_file), windows=2, seq_len=32,
                    calib=CalibConfig(samples=4, seq_len=32), progress=False, heldout=True,
                    name="t")
    rows = res["rows"]
    assert [r["method"] for r in rows] == ["dense", "svd-llm", "svd-als", "pgsvd"]
    for r in rows:
        assert set(r["ppl"]) == {"wikitext2", "wiki-heldout"}
        assert r["zeroshot"]["tasks"]["piqa"]["n"] == 3
    for r in rows[1:]:
        assert r["achieved_ratio"] == pytest.approx(0.3, abs=0.05), r
    # ALS objective / SVD-LLM's optimum at the same rank: never below 1, and close to it.
    for r in rows[2:]:
        als = r["als_vs_closed_form"]
        assert als["layers"] == 14 - r["dense_layers"] >= 7, (als, r["dense_layers"])
        assert 1 - 1e-9 <= als["median"] <= als["max"] < 1.1, als
    json_path, md_path = map(str, res["files"])
    assert json.loads(open(json_path).read())["rows"][0]["method"] == "dense"
    md = open(md_path).read()
    assert "| pgsvd | 0.30 |" in md and "piqa acc" in md and "avg acc" in md


def test_render_markdown_without_tasks():
    result = {"rows": [
        {"method": "dense", "ppl": {"wt": 10.0}},
        {"method": "pgsvd", "ppl": {"wt": 12.5}, "target_ratio": 0.2, "achieved_ratio": 0.2003,
         "eps": 0.31, "distinct_ranks": 9, "dense_layers": 0, "compress_s_incl_calibration": 3.0,
         "als_vs_closed_form": {"max": 1.004, "within_1pct": 14, "layers": 14}},
    ]}
    md = render_markdown(result)
    assert "| pgsvd | 0.20 | 0.2003 | 12.50 | 0.3100 | 9 | 0 | 1.0040 (14/14 ≤1.01) | 3 |" in md
    assert "acc" not in md


def test_cli_reproduce_perplexity_only(tiny_model_dir, text_file, tmp_path, capsys):
    code = cli.main(["reproduce", "--model", str(tiny_model_dir), "--methods", "svd-llm",
                     "--ratios", "0.4", "--tasks", "", "--text-file", str(text_file),
                     "--windows", "2", "--seq-len", "32", "--calib-samples", "4",
                     "--out", str(tmp_path / "out"), "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, out
    assert [r["method"] for r in out["rows"]] == ["dense", "svd-llm"]
    assert all(r["avg_acc"] is None for r in out["rows"])
    assert out["rows"][1]["ppl"]["wikitext2"] > 1


def test_blocks_per_pass_gives_the_table_of_one_shared_calibration(tiny_model_dir, text_file,
                                                                   tmp_path):
    """`reproduce --blocks-per-pass`: each compression gathers its Grams a block at a time from
    the same data, so every row equals the one a single shared calibration gives."""
    kw = dict(model=str(tiny_model_dir), methods=("svd-llm", "pgsvd"), ratios=(0.3,), tasks=(),
              text_file=str(text_file), windows=2, seq_len=32, progress=False)
    shared = reproduce(tmp_path / "a", calib=CalibConfig(samples=4, seq_len=32), name="a", **kw)
    passes = reproduce(tmp_path / "b", calib=CalibConfig(samples=4, seq_len=32,
                                                         blocks_per_pass=1), name="b", **kw)
    assert passes["calibration"]["blocks_per_pass"] == 1
    assert passes["calibration"]["tokens"] == shared["calibration"]["tokens"] == 4 * 32
    for a, b in zip(shared["rows"], passes["rows"], strict=True):
        assert a["method"] == b["method"]
        assert b["ppl"]["wikitext2"] == pytest.approx(a["ppl"]["wikitext2"], rel=1e-5)
        assert b.get("eps") == pytest.approx(a.get("eps"))


def test_work_dir_resumes_a_table_and_refuses_other_settings(tiny_model_dir, text_file, tmp_path,
                                                             monkeypatch):
    """`reproduce --work-dir`: the calibration and each finished row are kept; the same command
    again reuses them (no compression runs), other settings are refused, naming the difference."""
    import pgsvd_rt.eval.table as table

    kw = dict(model=str(tiny_model_dir), methods=("svd-llm", "pgsvd"), ratios=(0.3,), tasks=(),
              text_file=str(text_file), windows=2, seq_len=32, progress=False,
              work_dir=tmp_path / "work")
    first = reproduce(tmp_path / "a", calib=CalibConfig(samples=4, seq_len=32,
                                                        blocks_per_pass=1), name="a", **kw)
    assert first["resumed_rows"] == 0 and (tmp_path / "work" / "grams" / "index.json").is_file()

    def no_compression(*a, **k):
        raise AssertionError("a finished row was computed again")
    monkeypatch.setattr(table, "compress_", no_compression)
    again = reproduce(tmp_path / "b", calib=CalibConfig(samples=4, seq_len=32,
                                                        blocks_per_pass=1), name="b", **kw)
    assert again["resumed_rows"] == 3
    assert again["peak_rss_bytes"] >= max(r.get("peak_rss_bytes") or 0 for r in first["rows"])
    assert [r["ppl"] for r in again["rows"]] == [r["ppl"] for r in first["rows"]]
    assert "finished rows were reused" in next((tmp_path / "b").glob("*.md")).read_text()
    # A run of a subset (one method) keeps the rows it did not select in the work directory.
    reproduce(tmp_path / "d", calib=CalibConfig(samples=4, seq_len=32, blocks_per_pass=1),
              name="d", **(kw | {"methods": ("svd-llm",)}))
    saved = json.loads((tmp_path / "work" / "rows.json").read_text())["rows"]
    assert sorted(r["method"] for r in saved) == ["dense", "pgsvd", "svd-llm"]
    with pytest.raises(ValueError, match=r"differs in \['windows'\]"):
        reproduce(tmp_path / "c", calib=CalibConfig(samples=4, seq_len=32, blocks_per_pass=1),
                  name="c", **(kw | {"windows": 3}))


def test_long_windows_add_a_column_per_text(tiny_model_dir, text_file):
    from pgsvd_rt import data, models
    from pgsvd_rt.eval.perplexity import perplexity
    from pgsvd_rt.eval.table import quality_table

    dense, tok, _ = models.load(str(tiny_model_dir))
    ids = data.eval_ids(tok, str(text_file))[0]
    res = quality_table(dense, tok, {"wt": ids}, ["svd-llm"], [0.3],
                        CalibConfig(samples=4, seq_len=32), windows=2, seq_len=32,
                        progress=False, long_windows=2, long_seq_len=64)
    assert all(list(r["ppl"]) == ["wt", "wt@64"] for r in res["rows"])
    want = perplexity(dense, ids, 64, 2, bos_id=data.bos_id(tok))["ppl"]
    assert res["rows"][0]["ppl"]["wt@64"] == pytest.approx(want)
    assert "ppl wt@64" in render_markdown(res)


def test_work_dir_adds_zero_shot_tasks_to_finished_rows(tiny_model_dir, text_file, tmp_path,
                                                        monkeypatch):
    """A resumed table asked for tasks its finished rows lack scores them: the dense row in
    place, a selected compressed row compressed again (same perplexity); an unselected row is
    kept as it was, and a failure while compressing again loses no saved row."""
    import pgsvd_rt.eval.table as table

    kw = dict(model=str(tiny_model_dir), methods=("svd-llm", "pgsvd"), ratios=(0.3,), tasks=(),
              text_file=str(text_file), windows=2, seq_len=32, progress=False,
              calib=CalibConfig(samples=4, seq_len=32, blocks_per_pass=1),
              work_dir=tmp_path / "work")
    first = reproduce(tmp_path / "a", name="a", **kw)
    rows_file = tmp_path / "work" / "rows.json"

    real_compress = table.compress_

    def failing(*a, **k):
        raise RuntimeError("killed")
    monkeypatch.setattr(table, "compress_", failing)
    with pytest.raises(RuntimeError, match="killed"):
        reproduce(tmp_path / "b", name="b", **(kw | {"tasks": ("piqa",), "task_limit": 2}))
    saved = {r["method"]: r for r in json.loads(rows_file.read_text())["rows"]}
    assert set(saved) == {"dense", "svd-llm", "pgsvd"}
    assert saved["dense"]["zeroshot"]["tasks"]["piqa"]["n"] == 2  # scored before the failure

    monkeypatch.setattr(table, "compress_", real_compress)
    again = reproduce(tmp_path / "c", name="c",
                      **(kw | {"methods": ("svd-llm",), "tasks": ("piqa",), "task_limit": 2}))
    assert [r["method"] for r in again["rows"]] == ["dense", "svd-llm"]
    assert all(r["zeroshot"]["tasks"]["piqa"]["n"] == 2 for r in again["rows"])
    assert again["rows"][1]["ppl"] == pytest.approx(first["rows"][1]["ppl"], rel=1e-6)
    saved = {r["method"]: r for r in json.loads(rows_file.read_text())["rows"]}
    assert "zeroshot" in saved["svd-llm"] and "zeroshot" not in saved["pgsvd"]
    # The whole table, no tasks asked: every saved row reused, the scored ones shown as scored.
    monkeypatch.setattr(table, "compress_", failing)
    whole = reproduce(tmp_path / "e", name="e", **kw)
    assert [bool(r.get("zeroshot")) for r in whole["rows"]] == [True, True, False]
    md_file = next((tmp_path / "e").glob("*.md")).read_text()
    assert "zero-shot acc (%) on the first 2 documents of piqa" in md_file
    assert "blank: not scored" in md_file
    # Both kinds of rows in one table: the one without tasks has blank task cells.
    md = render_markdown({"rows": list(saved.values())})
    pgsvd_line = next(line for line in md.splitlines() if line.startswith("| pgsvd |"))
    ppl = f"{saved['pgsvd']['ppl']['wikitext2']:.2f}"
    assert "piqa acc" in md and f"| {ppl} | | | " in pgsvd_line, pgsvd_line


def test_rows_from_an_earlier_result_resume_a_table_on_another_machine(tiny_model_dir, text_file,
                                                                         tmp_path, monkeypatch):
    """`reproduce --rows-from FILE.json`: an earlier run's committed JSON (its work directory
    gone) seeds a fresh one: its rows count as finished, a row lacking the tasks asked is
    computed again, and a result of other settings or of another model is refused."""
    import pgsvd_rt.eval.table as table

    kw = dict(model=str(tiny_model_dir), methods=("svd-llm", "pgsvd"), ratios=(0.3,), tasks=(),
              text_file=str(text_file), windows=2, seq_len=32, progress=False,
              calib=CalibConfig(samples=4, seq_len=32, blocks_per_pass=1))
    first = reproduce(tmp_path / "a", name="a", work_dir=tmp_path / "w1", **kw)
    earlier = first["files"][0]
    assert first["fingerprint"]["parameters"] > 0

    calls = []
    real_compress = table.compress_

    def counting(model, config, **k):
        calls.append(config.method)
        return real_compress(model, config, **k)
    monkeypatch.setattr(table, "compress_", counting)
    # A fresh machine: new work directory; pgsvd scored with a task, svd-llm kept as it was.
    part = reproduce(tmp_path / "b", name="b", work_dir=tmp_path / "w2", rows_from=earlier,
                     **(kw | {"methods": ("pgsvd",), "tasks": ("piqa",), "task_limit": 2}))
    assert calls == ["pgsvd"]
    assert part["rows"][1]["ppl"] == pytest.approx(first["rows"][2]["ppl"], rel=1e-6)
    assert all(r["zeroshot"]["tasks"]["piqa"]["n"] == 2 for r in part["rows"])
    assert part["rows_from"]["file"] == str(earlier)
    assert "another machine" not in next((tmp_path / "b").glob("*.md")).read_text()
    # The whole table from the new work directory: nothing computed, svd-llm still unscored.
    whole = reproduce(tmp_path / "c", name="c", work_dir=tmp_path / "w2", **kw)
    assert calls == ["pgsvd"]
    assert [(r["method"], bool(r.get("zeroshot"))) for r in whole["rows"]] == [
        ("dense", True), ("svd-llm", False), ("pgsvd", True)]
    assert whole["rows"][1]["ppl"] == first["rows"][1]["ppl"]

    with pytest.raises(ValueError, match=r"differs in \['windows'\]"):
        reproduce(tmp_path / "d", name="d", rows_from=earlier, **(kw | {"windows": 3}))
    # Rows made on another machine (an older file's rows name none: the file's device) say so.
    other = json.loads(open(earlier).read())
    other["device"] = "CPU: elsewhere"
    for r in other["rows"]:
        r.pop("device")
    (tmp_path / "other.json").write_text(json.dumps(other))
    reproduce(tmp_path / "g", name="g", rows_from=tmp_path / "other.json",
              **(kw | {"methods": ("pgsvd",)}))
    md = next((tmp_path / "g").glob("*.md")).read_text()
    assert "rows computed on another machine (CPU: elsewhere: dense, pgsvd 0.30)" in md, md
    other["model"] = "another model"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="scored 'another model'"):
        reproduce(tmp_path / "e", name="e", rows_from=tmp_path / "other.json", **kw)
    other["model"] = first["model"]
    other["fingerprint"]["parameters"] += 1
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="made from another model"):
        reproduce(tmp_path / "f", name="f", rows_from=tmp_path / "other.json", **kw)
