"""Device and dtype names: the device a result was measured on (results files are keyed by it),
and the short dtype names the CLI and the benchmarks accept."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (/proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(ln.split(":", 1)[1].split()) for ln in f
                         if ln.startswith("flags")), set())
    except OSError:
        return set()


def _simd_level() -> str | None:
    """The x86 vector level the CPU kernels pick by (AVX512-BF16, AVX-512, AVX2), from
    :func:`cpu_flags`; None elsewhere. Two CPUs of one model name can differ in it (an "AMD
    EPYC" is Zen 3 with AVX2 or Zen 4 with AVX512-BF16), and the kernels that run do too."""
    flags = cpu_flags()
    for level, need in (("AVX512-BF16", {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}),
                        ("AVX-512", {"avx512f", "avx512bw", "avx512vl"}),
                        ("AVX2", {"avx2", "fma"})):
        if need <= flags:
            return level
    return None


def device_name(device: str | None = None) -> str:
    """GPU name, or ``CPU: <model> (<simd level>), <threads> torch threads (<n> logical cpus)``
    (the level since 2026-12-04: earlier CPU results are named by the model alone)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines()
                     if ln.startswith("Model name"))
    except Exception:  # no lscpu, or no model line: keep the platform's word
        pass
    level = _simd_level()
    model = f"{model} ({level})" if level else model
    return f"CPU: {model}, {torch.get_num_threads()} torch threads ({os.cpu_count()} logical cpus)"


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """The device a computation runs on: ``None``/``"auto"`` = CUDA when torch sees one, else the
    CPU. Raises ValueError naming ``spec`` when it is not a device or not present here."""
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {spec!r} is not a device: use auto, cpu, cuda or "
                         f"cuda:N ({exc})") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {spec!r}: pgsvd_rt runs on cpu or cuda, not {dev.type}")
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"device {spec!r}: CUDA is not available here ({why})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev
