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
                          "--out", str(out))
    assert code == 0, res
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
