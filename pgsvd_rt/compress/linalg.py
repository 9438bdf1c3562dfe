"""Dense float64 decompositions (SVD, eigh) run single-threaded on the CPU.

Measured on this project's 2-core CI-class machine under load: MKL's multi-threaded ``gesdd``
took 10-30 s for one 1536 x 576 float64 SVD, against 0.8 s with one thread (OpenMP threads
spin-wait on busy cores). One thread is never more than ~2x slower on a quiet machine, so every
per-layer decomposition of the compression pipeline runs inside :func:`single_threaded`.
Matrix products (Grams, ALS) keep all threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded(device: torch.device | str = "cpu") -> Iterator[None]:
    if torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``W = U diag(S) Vh`` of (..., N, M)."""
    with single_threaded(W.device):
        return torch.linalg.svd(W, full_matrices=False)


def svdvals(W: torch.Tensor) -> torch.Tensor:
    with single_threaded(W.device):
        return torch.linalg.svdvals(W)


def eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with single_threaded(G.device):
        return torch.linalg.eigh(G)
