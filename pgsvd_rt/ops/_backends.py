"""Loads the optional fast backends into the ``pgsvd`` namespace, each at most once.

- ``pgsvd_rt._C`` (C++/CUDA extension from csrc/): registers CPU (and CUDA) kernels on import.
- Triton (kernels/): registered for CUDA by :mod:`pgsvd_rt.ops._triton`.

Neither is required: a missing one is logged once at INFO and the default kernels serve.
Set ``PGSVD_DISABLE_NATIVE=1`` or ``PGSVD_DISABLE_TRITON=1`` to skip a backend.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("pgsvd_rt")

NATIVE_LOADED = False
TRITON_LOADED = False
_done = False


def _load_native() -> bool:
    if os.environ.get("PGSVD_DISABLE_NATIVE") == "1":
        log.info("pgsvd_rt: native extension disabled by PGSVD_DISABLE_NATIVE=1")
        return False
    try:
        from pgsvd_rt.ops import _native
    except Exception as exc:  # pragma: no cover - depends on the build
        log.info("pgsvd_rt: native extension unavailable (%s); torch reference serves", exc)
        return False
    return _native.load()


def _load_triton() -> bool:
    if os.environ.get("PGSVD_DISABLE_TRITON") == "1":
        log.info("pgsvd_rt: Triton disabled by PGSVD_DISABLE_TRITON=1")
        return False
    try:
        from pgsvd_rt.ops import _triton
    except Exception as exc:
        log.info("pgsvd_rt: Triton backend unavailable (%s); torch reference serves", exc)
        return False
    return _triton.register()


def load_all() -> None:
    global NATIVE_LOADED, TRITON_LOADED, _done
    if _done:
        return
    _done = True
    NATIVE_LOADED = _load_native()
    TRITON_LOADED = _load_triton()
