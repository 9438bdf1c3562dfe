"""Shared by every benchmark here: model shape tables, ranks from κ, ideal bytes/FLOPs, timers,
measured ceilings, device naming. Scripts import it as ``benchlib`` (each puts its own folder on
``sys.path``); nothing in it is written twice elsewhere.

Shape letters: M tokens per step, K in_features, N out_features, R rank. Keep ratio
``κ = R (N + K) / (N K)``: the best speedup a factored layer can show over the dense one is 1/κ.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time

import torch

from pgsvd_rt.device import device_name  # noqa: F401  (re-exported for the scripts)

#: Public configs (config.json of each checkpoint): hidden, intermediate, heads, kv heads, blocks,
#: vocabulary, rope theta. Only these fields change latency; weights are random in benchmarks.
MODELS: dict[str, dict] = {
    "llama2-7b": dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32,
                      vocab=32000, rope_theta=10000.0, hf="meta-llama/Llama-2-7b-hf"),
    "llama2-13b": dict(hidden=5120, intermediate=13824, heads=40, kv_heads=40, layers=40,
                       vocab=32000, rope_theta=10000.0, hf="meta-llama/Llama-2-13b-hf"),
    "mistral-7b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32,
                       vocab=32000, rope_theta=10000.0, hf="mistralai/Mistral-7B-v0.1"),
    "llama3-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32,
                      vocab=128256, rope_theta=500000.0, hf="meta-llama/Meta-Llama-3-8B"),
    "smollm2-135m": dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, layers=30,
                         vocab=49152, rope_theta=100000.0, hf="HuggingFaceTB/SmolLM2-135M"),
}
PROJS = ("q", "k", "v", "o", "gate", "up", "down")
KAPPAS = (0.8, 0.6, 0.4)
M_FIRST = (1, 16, 4096)
M_FULL = (1, 4, 16, 64, 256, 1024, 4096)
#: Tiny stand-in for CPU smoke runs (CI): one shape, one κ, two M.
SMOKE_SHAPES = [("tiny", 64, 48)]


def block_linears(model: str) -> list[tuple[str, int, int]]:
    """(proj, N, K) of the 7 linears of one decoder block of ``model``."""
    c = MODELS[model]
    H, inter = c["hidden"], c["intermediate"]
    kv = c["kv_heads"] * H // c["heads"]
    return [("q", H, H), ("k", kv, H), ("v", kv, H), ("o", H, H),
            ("gate", inter, H), ("up", inter, H), ("down", H, inter)]


def shape_groups(model: str) -> list[tuple[str, int, int]]:
    """The distinct (N, K) of one block, named by their projections: ("q/k/v/o", 4096, 4096)."""
    groups: dict[tuple[int, int], list[str]] = {}
    for proj, N, K in block_linears(model):
        groups.setdefault((N, K), []).append(proj)
    return [("/".join(p), N, K) for (N, K), p in groups.items()]


def kernel_shapes(models: list[str]) -> list[tuple[str, int, int]]:
    """Distinct (N, K) over ``models``, each labelled ``model:projs`` by its first model
    (Llama-3-8B's linears equal Mistral-7B's; both names are kept in the label)."""
    seen: dict[tuple[int, int], list[str]] = {}
    for m in models:
        for projs, N, K in shape_groups(m):
            seen.setdefault((N, K), []).append(f"{m}:{projs}")
    return [("+".join(labels), N, K) for (N, K), labels in seen.items()]


def rank_for(kappa: float, N: int, K: int) -> int:
    """R with keep ratio κ: ``int(κ N K / (N + K))``, at least 1."""
    return max(1, int(kappa * N * K / (N + K)))


def ideal(provider: str, M: int, K: int, N: int, R: int, elem: int, groups: int = 1):
    """(bytes, flops) a provider must move / do at minimum; groups > 1: a q/k/v-style total."""
    if provider == "dense":
        return (M * K + N * K + M * N) * elem, 2 * M * N * K
    if provider in ("grouped", "separate"):  # x once (grouped) or G times (separate)
        x_reads = 1 if provider == "grouped" else groups
        nbytes = (x_reads * M * K + groups * (K * R + N * R + M * N)) * elem
        return nbytes, groups * 2 * M * R * (K + N)
    return (M * K + K * R + N * R + M * N) * elem, 2 * M * R * (K + N)


# ------------------------------------------------------------------------------------------ timing
def sync_timer() -> float:
    """pytest-benchmark ``timer=``: waits for queued GPU work before reading the clock."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def time_cuda(fn, graph: bool = False) -> tuple[float, float, float]:
    """(median, q20, q80) ms by triton.testing.do_bench; ``graph``: under a CUDA graph."""
    import triton.testing as tt

    if graph:
        fn()  # autotune outside the capture
        torch.cuda.synchronize()
        return tuple(tt.do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8]))
    return tuple(tt.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))


def time_cpu(fn, reps: int = 5) -> tuple[float, float, float]:
    """(median, q20, q80) ms of ``reps`` calls after one warm-up."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return statistics.median(ts), ts[max(0, len(ts) // 5)], ts[min(len(ts) - 1, 4 * len(ts) // 5)]


def ceilings(device: str) -> dict:
    """Bandwidth (GB/s) of a 1 GiB copy_ and compute (TFLOP/s) of an 8192^3 bf16 matmul."""
    if device != "cuda":
        return {"bandwidth_GBps": None, "bf16_TFLOPs": None}
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src))[0]
    bw = 2 * src.numel() / (ms * 1e-3) / 1e9
    src = dst = None  # free 2 GiB before the matmul
    return {"bandwidth_GBps": bw, "bf16_TFLOPs": matmul_tflops("cuda", torch.bfloat16, 8192)}


def matmul_tflops(device: str, dtype: torch.dtype, n: int) -> float:
    """Measured TFLOP/s of an n^3 matmul: the compute ceiling of ``dtype`` on ``device``."""
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_cuda(lambda: x @ y)[0] if device == "cuda" else time_cpu(lambda: x @ y, reps=3)[0]
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------------------ naming
#: The environment of ``--isa avx2`` (bench_layers, bench_vllm): an AVX2-only CPU (AMD Zen 2/3)
#: on an AVX-512 one. Our kernels' AVX2 sets forced; oneDNN and MKL capped at AVX2 (read when
#: they load: set before torch is imported, so in a fresh process).
AVX2_ENV = {"PGSVD_FORCE_AVX2": "1", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
#: ``--isa`` of bench_vllm: the environment each choice sets for the engines, the suffix of the
#: results files and the label of the README's rows. amx: our bf16 packed calls of 16 rows or
#: more on the AMX tiles (``PGSVD_AMX=1``; Intel CPUs with AMX-BF16).
ISAS = {"auto": ({}, "", ""),
        "avx2": (AVX2_ENV, "-as-avx2", " as AVX2"),
        "amx": ({"PGSVD_AMX": "1"}, "-amx", " AMX tiles")}


def device_slug(name: str) -> str:
    """File-name key of a device name: ``nvidia-h100-80gb-hbm3``, ``cpu-intel-r-xeon-r``."""
    name = name.split(",")[0]  # drop the thread count from CPU names
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def today() -> str:
    return _dt.date.today().isoformat()


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line of this run for its results file, as a user types it from the repository
    root: ``python benchmarks/<script> ARGS`` (``argv``: the arguments a caller passed to
    ``main``; None: the process's own)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.abspath(script)
    shown = os.path.relpath(path, root) if path.startswith(root + os.sep) else script
    return shlex.join(["python", shown, *(sys.argv[1:] if argv is None else argv)])


def versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "triton": tv, "python": platform.python_version(),
            "cuda": torch.version.cuda}


def bytes_per_token(directory: str, dtype: str) -> int:
    """Bytes of weights one decode step of a model directory reads, from its tensor header: every
    tensor but the input embedding, plus the head (the tied embedding when tied)."""
    from pgsvd_rt.io.quant_config import read_header

    header = read_header(directory)
    tied = json.load(open(os.path.join(directory, "config.json"))).get("tie_word_embeddings")
    numel = {k: 1 for k in header}
    for k, (shape, _) in header.items():
        for s in shape:
            numel[k] *= s
    emb = next(k for k in header if k.endswith("embed_tokens.weight"))
    total = sum(numel.values()) - (0 if tied else numel[emb])
    return total * {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def linear_elems(directory: str) -> int:
    """Elements of the decoder's linear weights (dense 2-D weights, factors u and v)."""
    from pgsvd_rt.io.quant_config import read_header

    total = 0
    for k, (shape, _) in read_header(directory).items():
        if ".layers." in k and (k.endswith((".u", ".v", ".vt"))
                                or (k.endswith(".weight") and len(shape) == 2)):
            total += shape[0] * shape[1]
    return total
