"""``pgsvd bench`` / ``make bench``: run the benchmark suite of a source checkout, then report.

The suites live in the repository's ``benchmarks/`` (not in the installed package); each runs
in its own process with a time limit, so one failure or a hang is recorded and the rest go on.
Parts (GPU when ``torch.cuda.is_available()``, else CPU):

- kernels: benchmarks/test_kernels_bench.py (GPU: all 5 models' shapes, fp16 + bf16; CPU:
  SmolLM2 shapes, fp32, M in {1, 16, 256}; ``--smoke``: tiny), and on GPU
  benchmarks/bench_lowrank_matmul.py --full (LLaMA-2-7B, CUDA graphs, ceilings).
- e2e: benchmarks/bench_e2e.py (GPU: LLaMA-2-7B-shaped bf16; CPU: the embedded model, small).
- als: benchmarks/bench_als.py (GPU: 7B shapes; CPU: the embedded model's shapes at 20%),
  with SVD-LLM's closed form timed on a few layers per shape.

Raw files go to ``<out>/<device>-<date>-raw/``; benchmarks/report.py merges them into
``<out>/<device>-<date>.json``, ``.md`` and PNG plots.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("pgsvd_rt")

PARTS = ("kernels", "e2e", "als")


def benchmarks_dir() -> Path:
    """The checkout's benchmarks/ folder; ValueError when the package is not run from one."""
    here = Path(__file__).resolve().parents[1] / "benchmarks"
    if not (here / "benchlib.py").is_file():
        raise ValueError(f"no benchmarks/ folder next to the package ({here}): `pgsvd bench` "
                         "needs a source checkout (pip install -e .)")
    return here


def _steps(bdir: Path, raw: Path, gpu: bool, smoke: bool, parts: tuple[str, ...]):
    """(name, argv, extra env, time limit s) of every step to run."""
    py = sys.executable
    steps = []
    kenv = {"PGSVD_BENCH_SCOPE": "smoke" if smoke else "full"}
    if not gpu and not smoke:
        kenv.update(PGSVD_BENCH_MODELS="smollm2-135m", PGSVD_BENCH_DTYPES="fp32",
                    PGSVD_BENCH_M="1,16,256")
    if "kernels" in parts:
        steps.append(("kernel suite", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                       str(bdir / "test_kernels_bench.py"),
                                       f"--benchmark-json={raw / 'kernels-bench.json'}"],
                      kenv, 1800))
        if gpu:
            steps.append(("microbench", [py, str(bdir / "bench_lowrank_matmul.py"), "--out",
                                         str(raw)] + (["--smoke"] if smoke else ["--full"]),
                          {}, 900))
    if "e2e" in parts:
        e2e = [py, str(bdir / "bench_e2e.py"), "--out", str(raw)]
        if smoke:
            e2e.append("--smoke")
        elif gpu:
            e2e += ["--model", "llama2-7b"]
        else:
            e2e += ["--model", "smollm2-135m", "--threads", "1"]
        steps.append(("e2e", e2e, {}, 1800))
    if "als" in parts:
        als = [py, str(bdir / "bench_als.py"), "--out", str(raw), "--no-build",
               "--device", "cuda" if gpu else "cpu", "--closed-form-layers", "4"]
        if smoke:
            als += ["--smoke", "--threads", "1"]
        elif not gpu:
            als += ["--budgets", "0.2", "--repeats", "1"]
        steps.append(("als", als, {}, 1800))
    return steps


def run_suite(out: str | os.PathLike = "benchmarks/results", smoke: bool = False,
              parts: tuple[str, ...] = PARTS, plots: bool = True) -> dict:
    """Run the suite and the report. Returns {"report": path stem, "steps": [...]}.

    Args:
        out: results folder; raw files go to ``<out>/<device>-<date>-raw``.
        smoke: tiny shapes and models (seconds on a CPU).
        parts: any of "kernels", "e2e", "als".
    """
    import torch

    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown benchmark part(s) {bad}; choose from {list(PARTS)}")
    bdir = benchmarks_dir()
    sys.path.insert(0, str(bdir))
    import benchlib

    gpu = torch.cuda.is_available()
    name = benchlib.device_name("cuda" if gpu else "cpu")
    out = Path(out)
    raw = out / f"{benchlib.device_slug(name)}-{benchlib.today()}-raw"
    raw.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(bdir.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if not gpu:
        env.setdefault("TRITON_INTERPRET", "1")
    steps = []
    for title, argv, extra, limit in _steps(bdir, raw, gpu, smoke, parts):
        log.info("bench: %s ...", title)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(argv, env=env | extra, cwd=bdir.parent, timeout=limit,
                                  capture_output=True, text=True)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired:
            rc, tail = None, f"stopped after {limit} s"
        steps.append({"step": title, "rc": rc, "seconds": time.perf_counter() - t0})
        (raw / f"log-{title.replace(' ', '_')}.txt").write_text(tail)
        if rc != 0:
            log.warning("bench: %s failed (rc %s); see %s", title, rc, raw)
    report = [sys.executable, str(bdir / "report.py"), str(raw), "--out", str(out)]
    if not plots:
        report.append("--no-plots")
    proc = subprocess.run(report, env=env, cwd=bdir.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(f"benchmark report failed: {proc.stderr[-2000:]}")
    stem = out / f"{benchlib.device_slug(name)}-{benchlib.today()}"
    return {"device": name, "report": str(stem) + ".md", "json": str(stem) + ".json",
            "raw": str(raw), "steps": steps}
