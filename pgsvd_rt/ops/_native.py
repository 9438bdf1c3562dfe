"""Loads the compiled extension ``pgsvd_rt._C`` (csrc/), or JIT-builds it in a source checkout.

Importing the extension registers its kernels (``TORCH_LIBRARY_IMPL``) into the ``pgsvd``
namespace, whose schemas :mod:`pgsvd_rt.ops._library` has already defined.

Order of attempts, each logged once at INFO when it fails:

1. ``import pgsvd_rt._C`` (built by ``pip install --no-build-isolation -e .``): the fast path;
   nothing is compiled at import.
2. Only when ``PGSVD_JIT=1`` and csrc/ sits next to the package (a source checkout):
   ``torch.utils.cpp_extension.load`` JIT-builds csrc/*.cpp (+ csrc/*.cu with a CUDA torch) with
   ninja into ``PGSVD_JIT_DIR`` (default: torch's extensions cache). A first build takes about a
   minute, so it is opt-in: a plain ``import pgsvd_rt`` is never slowed by a compiler.

Otherwise the pure-torch reference serves.

``PGSVD_FORCE_AVX2=1`` serves the CPU kernels with their AVX2 sets even on an AVX-512 CPU (what
an AVX2-only CPU such as AMD Zen 3 runs; ``benchmarks/bench_layers.py --isa avx2`` uses it).

``PGSVD_AMX=1`` serves bf16 packed calls of 16 rows or more with the AMX tiles (Intel CPUs with
AMX-BF16; refused, naming why, elsewhere); ``PGSVD_AMX=emulate`` runs the same code with the tile
instructions emulated (slow: for tests). Off by default until measured on an AMX CPU.
"""

from __future__ import annotations

import glob
import logging
import os
from types import ModuleType

log = logging.getLogger("pgsvd_rt")

JIT_NAME = "pgsvd_rt_C_jit"
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "csrc")

#: The module that registered the kernels (``pgsvd_rt._C`` or the JIT build), or None.
module: ModuleType | None = None


def sources(with_cuda: bool) -> list[str]:
    """csrc/*.cpp, plus csrc/*.cu when building against a CUDA torch."""
    srcs = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    if with_cuda:
        srcs += sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    return srcs


def jit_build(name: str = JIT_NAME, build_directory: str | None = None) -> ModuleType:
    """JIT-builds and imports csrc/ with ``torch.utils.cpp_extension.load`` (ninja).

    Mirrors setup.py: CUDA sources and ``PGSVD_WITH_CUDA`` only when ``torch.version.cuda`` is set
    (and ``PGSVD_NO_CUDA`` is not 1); a visible GPU is not needed to build.
    """
    import torch
    from torch.utils.cpp_extension import load

    with_cuda = torch.version.cuda is not None and os.environ.get("PGSVD_NO_CUDA") != "1"
    srcs = sources(with_cuda)
    if not srcs:
        raise FileNotFoundError(f"no C++ sources under {CSRC}")
    flags = ["-O3", "-std=c++17"] + (["-DPGSVD_WITH_CUDA=1"] if with_cuda else [])
    cflags = flags + ["-fopenmp"]  # at::parallel_for is a header template: threads need it
    if build_directory is not None:
        os.makedirs(build_directory, exist_ok=True)
    return load(
        name=name,
        sources=srcs,
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=flags if with_cuda else None,
        with_cuda=with_cuda,
        build_directory=build_directory,
        verbose=False,
    )


def load() -> bool:
    """Imports (or, with ``PGSVD_JIT=1``, JIT-builds) the extension; True if kernels registered."""
    global module
    if module is not None:
        return True
    try:
        import pgsvd_rt._C as ext
    except Exception as exc:  # ImportError, or OSError/undefined symbol from an ABI mismatch
        if os.environ.get("PGSVD_JIT") != "1" or not os.path.isdir(CSRC):
            log.info(
                "pgsvd_rt: pgsvd_rt._C not built (%s); torch reference serves every op "
                "(build with `pip install --no-build-isolation -e .` or set PGSVD_JIT=1)",
                exc,
            )
            return False
        try:
            ext = jit_build(build_directory=os.environ.get("PGSVD_JIT_DIR") or None)
        except Exception as jit_exc:
            log.info("pgsvd_rt: JIT build of csrc/ failed (%s); torch reference serves", jit_exc)
            return False
    force = os.environ.get("PGSVD_FORCE_AVX2", "0")
    if force not in ("0", "1"):
        raise ValueError(f"PGSVD_FORCE_AVX2 must be 0 or 1, got {force!r}")
    if force == "1":
        ext.decode_force_avx2(True)
    amx = os.environ.get("PGSVD_AMX", "0")
    if amx not in ("0", "1", "emulate"):
        raise ValueError(f"PGSVD_AMX must be 0, 1 or emulate, got {amx!r}")
    if amx != "0":
        ext.packed_amx("on" if amx == "1" else "emulate")
    module = ext
    log.debug("pgsvd_rt: native kernels from %s: %s", ext.__name__, ext.build_info())
    return True
