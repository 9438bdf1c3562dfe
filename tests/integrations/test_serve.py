"""``pgsvd serve``: what it checks before starting vLLM and how it sets the engine up (fast; the
server answering the openai client is tests/integrations/test_vllm.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgsvd_rt.integrations import serve
from tests.integrations.conftest import factored_tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return factored_tiny("llama", tmp_path_factory.mktemp("serve") / "llama")


def _edited(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_check_servable_passes_a_factored_checkpoint(ckpt):
    info = serve.check_servable(ckpt)
    assert info["kind"] == "factored" and info["factored_modules"] > 0


def test_broken_checkpoints_are_refused_before_the_engine(ckpt, tmp_path):
    name = "model.layers.1.self_attn.o_proj"

    def bump(cfg):
        cfg["quantization_config"]["ranks"][name] += 1

    with pytest.raises(ValueError, match=f"{name}.*says rank"):
        serve.check_servable(_edited(ckpt, tmp_path / "rank", bump))
    no_manifest = tmp_path / "manifest"
    shutil.copytree(ckpt, no_manifest)
    (no_manifest / "pgsvd_manifest.json").unlink()
    with pytest.raises(ValueError, match="pgsvd_manifest.json"):
        serve.check_servable(no_manifest)
    with pytest.raises(ValueError, match="config.json"):
        serve.check_servable(tmp_path)


def test_cli_refuses_in_seconds_naming_the_module(ckpt, tmp_path):
    """The refusal comes from pgsvd's checks (exit 2, one line), not from an engine start."""
    bad = _edited(ckpt, tmp_path / "bad", lambda c: c["quantization_config"]["ranks"].update(
        {"model.layers.0.self_attn.q_proj": 10**6}))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pgsvd_rt.cli", "serve", str(bad), "--port", "9"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "model.layers.0.self_attn.q_proj" in p.stderr and "rank 1000000" in p.stderr
    assert "vllm.entrypoints" not in p.stderr and time.perf_counter() - t0 < 60


def test_command_and_environment():
    cmd = serve.server_command("/ckpt", port=8123, dtype="bfloat16", max_model_len=512,
                               kv_cache_gib=1.5, served_name="m", extra=["--enforce-eager"])
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for part in ("--model /ckpt", "--host 127.0.0.1", "--port 8123", "--dtype bfloat16",
                 "--max-model-len 512", f"--kv-cache-memory-bytes {int(1.5 * 2**30)}",
                 "--served-model-name m"):
        assert part in joined
    assert cmd[-1] == "--enforce-eager"
    env = serve.server_env({"PATH": "/bin", "TRITON_INTERPRET": "1"})
    assert "TRITON_INTERPRET" not in env
    import torch

    if not torch.cuda.is_available():  # the CPU settings vLLM-CPU needs to use every core
        assert int(env["OMP_NUM_THREADS"]) >= 1 and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
        kept = serve.server_env({"OMP_NUM_THREADS": "1"})
        assert kept["OMP_NUM_THREADS"] == "1"  # the user's setting wins
