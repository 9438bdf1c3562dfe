import json
import subprocess
import sys

import pytest

from pgsvd_rt import cli


def _run_json(capsys, *argv):
    code = cli.main([*argv, "--json"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"--json must print one JSON line, got {out!r}"
    return code, json.loads(lines[0])


@pytest.fixture
def compressed(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    code, res = _run_json(capsys, "compress", "--model", str(tiny_model_dir), "--method", "pgsvd",
                          "--ratio", "0.3", "--calib-samples", "4", "--seq-len", "32",
                          "--device", "cpu", "--out", str(out))
    assert code == 0, res
    assert res["timings"]["device"] == "cpu"
    return out, res


def test_compress_info_eval_generate(compressed, tmp_path, capsys):
    out, res = compressed
    assert res["method"] == "pgsvd" and res["achieved_ratio"] >= 0.3
    assert res["calibration"]["tokens"] == 4 * 32
    code, info = _run_json(capsys, "info", str(out))
    assert code == 0 and len(info["layers"]) == 14
    assert info["achieved_ratio"] == res["achieved_ratio"]
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    code, ev = _run_json(capsys, "eval", "--model", str(out), "--text-file", str(text),
                         "--windows", "3", "--seq-len", "32")
    assert code == 0 and ev["tokens_scored"] == 3 * 31 and ev["ppl"] > 1
    code, gen = _run_json(capsys, "generate", "--model", str(out), "--prompt", "the quick",
                          "--max-new-tokens", "4")
    assert code == 0 and isinstance(gen["completion"], str) and gen["device"] == "cpu"
    code, padded = _run_json(capsys, "generate", "--model", str(out), "--prompt", "the quick",
                             "--max-new-tokens", "4", "--pad-rank", "16")
    assert code == 0 and padded["completion"] == gen["completion"]  # zero padding is exact
    assert gen["decode"] == "static"  # the default: static cache, no autograd
    code, hf = _run_json(capsys, "generate", "--model", str(out), "--prompt", "the quick",
                         "--max-new-tokens", "4", "--decode", "hf")
    assert code == 0 and hf["completion"] == gen["completion"]
    code, err = _run_json(capsys, "generate", "--model", str(out), "--prompt", "x",
                          "--device", "tpu")
    assert code == 2 and "'tpu'" in err["error"]


def test_info_table(compressed, capsys):
    out, _ = compressed
    assert cli.main(["info", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in table and "achieved_ratio" in table


def test_existing_output_is_refused(compressed, tiny_model_dir, capsys):
    out, _ = compressed
    code, res = _run_json(capsys, "compress", "--model", str(tiny_model_dir), "--out", str(out))
    assert code == 2 and "exists" in res["error"] and "--overwrite" in res["error"]


@pytest.mark.parametrize("argv, match", [
    (["eval", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["compress", "--ratio", "1.5", "--out", "/tmp/pgsvd-never-written"], "ratio must be in"),
    (["compress", "--method", "pgsvd", "--eps", "2", "--out", "/tmp/pgsvd-never-written"],
     "eps must be in"),
    (["info", "/nonexistent/dir"], "not a pgsvd_rt checkpoint"),
])
def test_bad_input_gives_clear_error(argv, match, capsys):
    code, res = _run_json(capsys, *argv)
    assert code == 2 and match in res["error"]


def test_console_script_prints_one_json_object(compressed):
    out, _ = compressed
    proc = subprocess.run([sys.executable, "-m", "pgsvd_rt.cli", "info", str(out), "--json"],
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["method"] == "pgsvd"


# ---- the --json contract on every failure: one JSON object, exit 2, the user's value named ----
@pytest.mark.parametrize("argv, match", [
    (["compress", "--batch-size", "-1", "--out", "/tmp/pgsvd-never-written"],
     "--batch-size: must be >= 1, got -1"),
    (["eval", "--windows", "0"], "--windows: must be >= 1, got 0"),
    (["eval", "--seq-len", "abc"], "--seq-len: must be an integer, got 'abc'"),
    (["eval", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["info", "x", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["compress"], "--out"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["compress", "--out", "/proc/self/pgsvd-ckpt"], "cannot write the output"),
    (["compress", "--device", "tpu", "--out", "/tmp/pgsvd-never-written"],
     "device 'tpu' is not a device"),
    pytest.param(["compress", "--device", "cuda", "--out", "/tmp/pgsvd-never-written"],
                 "device 'cuda': CUDA is not available here",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(),
                                          reason="a GPU is here")),
])
def test_usage_and_environment_errors_are_json(argv, match, capsys):
    code, res = _run_json(capsys, *argv)
    assert code == 2 and match in res["error"], res


def test_hf_directory_with_missing_weights_is_refused(tiny_model_dir, capsys):
    from safetensors.torch import load_file, save_file

    f = next(tiny_model_dir.glob("*.safetensors"))
    state = load_file(str(f))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(f), metadata={"format": "pt"})
    code, res = _run_json(capsys, "eval", "--model", str(tiny_model_dir))
    assert code == 2 and "model.layers.1.mlp.up_proj.weight" in res["error"], res


def test_hf_directory_with_non_finite_weight_is_refused(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    f = next(tiny_model_dir.glob("*.safetensors"))
    state = load_file(str(f))
    state["model.embed_tokens.weight"][5, 3] = float("nan")
    save_file(state, str(f), metadata={"format": "pt"})
    for argv in (["eval", "--model", str(tiny_model_dir)],
                 ["compress", "--model", str(tiny_model_dir), "--out", str(tmp_path / "c")]):
        code, res = _run_json(capsys, *argv)
        assert code == 2 and "model.embed_tokens.weight" in res["error"], res
        assert "non-finite" in res["error"]
    assert not (tmp_path / "c").exists()


def test_pickle_only_directory_is_refused(tiny_model_dir, capsys):
    for f in tiny_model_dir.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    code, res = _run_json(capsys, "eval", "--model", str(tiny_model_dir))
    assert code == 2 and "no .safetensors" in res["error"] and "never loaded" in res["error"]


def test_factored_checkpoint_without_manifest_is_refused(compressed, capsys):
    out, _ = compressed
    (out / "pgsvd_manifest.json").unlink()
    code, res = _run_json(capsys, "eval", "--model", str(out))
    assert code == 2 and "pgsvd_manifest.json is missing" in res["error"], res
    (out / "pgsvd_manifest.json").mkdir()  # not a regular file
    code, res = _run_json(capsys, "eval", "--model", str(out))
    assert code == 2 and "not a regular file" in res["error"], res


def test_text_shorter_than_a_window_names_the_lengths(compressed, tmp_path, capsys):
    out, _ = compressed
    text = tmp_path / "short.txt"
    text.write_text("too short")
    code, res = _run_json(capsys, "eval", "--model", str(out), "--text-file", str(text),
                          "--seq-len", "64")
    assert code == 2 and "fewer than one window of seq_len 64" in res["error"], res


def test_non_finite_results_stay_valid_json(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "info", lambda args: {"ppl": float("nan"), "x": [1e999]})
    code, res = _run_json(capsys, "info", "anything")
    assert code == 0 and res == {"ppl": None, "x": [None]}


def test_internal_errors_are_json_too(monkeypatch, capsys):
    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(cli.COMMANDS, "info", boom)
    code, res = _run_json(capsys, "info", "anything")
    assert code == 2 and res["type"] == "ZeroDivisionError" and "internal error" in res["error"]
