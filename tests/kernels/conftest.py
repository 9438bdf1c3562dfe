"""Kernel tests run the Triton kernels under the interpreter when no GPU is visible.

TRITON_INTERPRET must be set before a kernel module is imported (``@triton.jit`` reads it then);
``interpreted_kernels`` reloads the kernel module if something imported it earlier without it.
"""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def lowrank_kernels():
    """The kernels/lowrank_matmul module, interpreted on CPU-only machines; skips without Triton."""
    pytest.importorskip("triton", reason="Triton is not installed")
    mod = importlib.import_module("pgsvd_rt.kernels.lowrank_matmul")
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: kernels cannot run")
        if not mod._INTERPRET:  # imported before the env var was set
            mod = importlib.reload(mod)
    return mod


@pytest.fixture(scope="session")
def kernel_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
