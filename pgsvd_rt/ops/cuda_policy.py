"""Which CUDA path serves ``lowrank_matmul`` and its grouped / merged forms at a given shape:
the fused Triton kernel (kernels/lowrank_matmul.py, one launch) or two cuBLAS GEMMs
(``t = x @ v``, then ``y = addmm(bias, t, u.T)``; grouped: one ``x @ v_cat``, one GEMM a group).

Why choose: the fused kernel reads each factor once and saves a launch, which pays at decode
sizes; at large M x R two tuned library GEMMs can win (FlashSVD v1.5's notes show a hand-fused
low-rank Triton MLP losing to two cuBLAS GEMMs under CUDA graphs at large ranks). What wins
depends on the GPU, the dtype, the tokens per step M and the rank, so it is measured:
``benchmarks/gpu_check.sh``'s policy step (``bench_lowrank_matmul.py --policy``) times both on
LLaMA-2-7B layer shapes and writes this device's entry; ``benchmarks/collect_gpu.sh`` merges it
into ``cuda_policy.json`` beside this module, which is committed. Whatever the table does not
name runs the fused kernel (the behaviour before the table existed). The int8 op is always fused.

Table (``cuda_policy.json``, version 1)::

    {"version": 1,
     "devices": {
      "NVIDIA H100 80GB HBM3": {                  # torch.cuda.get_device_name()
       "capability": "sm_90",                     # serves other devices of this class too
       "bfloat16": [                              # rank classes, r_max ascending, null last
        {"r_max": 1024, "m": {"1": "fused", "256": "cublas"}},
        {"r_max": null, "m": {"1": "fused", "64": "cublas"}}]}}}

Lookup (:func:`choose`, a pure function): the device's entry by name, else the first entry of
its compute capability; the dtype's first rank class with ``R <= r_max`` (null: any R; for the
grouped ops R = R_1 + ... + R_G); in its ``"m"``, the choice of the largest key <= the M bucket
(next power of two of M): keys are thresholds, so an unmeasured bucket takes the choice of the
measured one below it. Any other key (the measurement's notes, ratios) is ignored.

Serving: the ops' CUDA kernels (:mod:`pgsvd_rt.ops._triton`) call :func:`path`, which caches
its answer per (device, dtype, M bucket, R): one dict lookup a call. The answer depends on shapes
only, and shapes are static within a torch.compile graph or a CUDA graph, so a capture records
one path and every replay runs it. ``PGSVD_CUDA_POLICY``, read at the first CUDA call, replaces
the committed table: ``fused`` or ``cublas`` force that path everywhere, anything else is the
path of a table file (gpu_check.sh runs its later steps on the table it has just measured).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

FUSED, CUBLAS = "fused", "cublas"
CHOICES = (FUSED, CUBLAS)
VERSION = 1
ENV = "PGSVD_CUDA_POLICY"
TABLE_PATH = Path(__file__).with_name("cuda_policy.json")
log = logging.getLogger("pgsvd_rt")


def m_bucket(M: int) -> int:
    """Next power of two of M, 1 for M <= 1 (the bucket the Triton autotuner keys on too)."""
    return 1 << (max(M, 1) - 1).bit_length()


def dtype_name(dtype: torch.dtype) -> str:
    """The table's key of a dtype: ``"bfloat16"`` for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def device_keys(device: torch.device) -> tuple[str, str]:
    """(name, capability class) a table knows a device by: ``("NVIDIA H100 80GB HBM3",
    "sm_90")``; for a device that is not CUDA its type twice (``("cpu", "cpu")``: the CPU tests
    run the CUDA kernels' Python with the Triton interpreter)."""
    if device.type != "cuda":
        return device.type, device.type
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"sm_{major}{minor}"


# ------------------------------------------------------------------------------ the table
def empty_table() -> dict:
    return {"version": VERSION, "devices": {}}


def _is_dtype(name: str) -> bool:
    return isinstance(getattr(torch, name, None), torch.dtype)


def validate(table: dict, source: str = "table") -> dict:
    """``table`` itself if it is a well-formed version-1 table; ValueError naming the problem."""
    def bad(msg: str):
        raise ValueError(f"{source}: {msg}")

    if not isinstance(table, dict) or table.get("version") != VERSION:
        bad(f"expected a dict with \"version\": {VERSION}, got "
            f"{table.get('version') if isinstance(table, dict) else type(table).__name__!r}")
    devices = table.get("devices")
    if not isinstance(devices, dict):
        bad("\"devices\" must be a dict of device name -> entry")
    for name, entry in devices.items():
        if not isinstance(entry, dict):
            bad(f"device {name!r}: entry must be a dict")
        if not isinstance(entry.get("capability", ""), str):
            bad(f"device {name!r}: capability must be a string like \"sm_90\"")
        for key, classes in entry.items():
            if not isinstance(classes, list):
                continue  # notes
            where = f"device {name!r}, {key}"
            if not _is_dtype(key):
                bad(f"{where}: not a torch dtype name (e.g. \"bfloat16\")")
            last = 0
            for i, cls in enumerate(classes):
                r_max = cls.get("r_max", "missing") if isinstance(cls, dict) else "missing"
                if r_max is None:
                    if i != len(classes) - 1:
                        bad(f"{where}: only the last rank class may have r_max null")
                elif not isinstance(r_max, int) or isinstance(r_max, bool) or r_max <= last:
                    bad(f"{where}: rank class {i} needs an integer r_max above {last} (r_max "
                        f"ascending, null last), got {r_max!r}")
                else:
                    last = r_max
                m = cls.get("m")
                if not isinstance(m, dict):
                    bad(f"{where}: rank class {i} needs \"m\": {{M bucket: choice}}")
                for k, choice in m.items():
                    if not (isinstance(k, str) and k.isdigit() and str(int(k)) == k
                            and int(k) >= 1):
                        bad(f"{where}: M key {k!r} is not a positive integer")
                    if choice not in CHOICES:
                        bad(f"{where}: M {k}: choice {choice!r} is not one of {CHOICES}")
    return table


def load(path: str | os.PathLike) -> dict:
    """The validated table in the JSON file ``path`` (ValueError names the file)."""
    with open(path) as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
    return validate(table, str(path))


def choose(table: dict, name: str, capability: str, dtype: torch.dtype, M: int, R: int) -> str:
    """``"fused"`` or ``"cublas"`` for M rows at rank R on the device (name, capability) in
    ``dtype``, by the lookup in the module docstring; ``"fused"`` where the table says nothing."""
    devices = table["devices"]
    entry = devices.get(name)
    if entry is None:
        entry = next((e for e in devices.values() if e.get("capability") == capability), None)
    classes = entry.get(dtype_name(dtype)) if entry is not None else None
    if not isinstance(classes, list):
        return FUSED
    cls = next((c for c in classes if c["r_max"] is None or R <= c["r_max"]), None)
    if cls is None:
        return FUSED
    b = m_bucket(M)
    keys = [int(k) for k in cls["m"] if int(k) <= b]
    return cls["m"][str(max(keys))] if keys else FUSED


# ------------------------------------------------------------------------------ serving
class Policy:
    """A table, or one path forced everywhere, with answers cached per shape class.

    Args:
        table: a version-1 table (validated here); None: the empty table (always fused).
        force: ``"fused"`` or ``"cublas"`` for every call, the table unread.
    """

    def __init__(self, table: dict | None = None, force: str | None = None):
        if force is not None and force not in CHOICES:
            raise ValueError(f"force must be one of {CHOICES}, got {force!r}")
        self.table = validate(table) if table is not None else empty_table()
        self.force = force
        self._cache: dict[tuple, str] = {}

    def __call__(self, device: torch.device, dtype: torch.dtype, M: int, R: int) -> str:
        key = (device, dtype, (M - 1).bit_length() if M else 0, R)  # ~0.1 us; M's bucket
        choice = self._cache.get(key)
        if choice is None:
            if self.force is not None:
                choice = self.force
            else:
                choice = choose(self.table, *device_keys(device), dtype, M, R)
            self._cache[key] = choice
        return choice


def from_env(value: str | None) -> Policy:
    """The policy a value of ``PGSVD_CUDA_POLICY`` selects: unset or empty, the committed table
    (unreadable: logged once, always fused); ``fused`` / ``cublas``, that path forced; else the
    table file at that path (its errors raise: the user named it)."""
    if value in CHOICES:
        return Policy(force=value)
    if value:
        return Policy(load(value))
    try:
        return Policy(load(TABLE_PATH))
    except (OSError, ValueError) as exc:
        log.warning("pgsvd_rt: CUDA path table unreadable (%s); the fused kernel serves", exc)
        return Policy()


_active: Policy | None = None


def path(device: torch.device, dtype: torch.dtype, M: int, R: int) -> str:
    """The path the CUDA kernels take for M rows at rank R: ``"fused"`` or ``"cublas"``."""
    global _active
    if _active is None:
        _active = from_env(os.environ.get(ENV))
    return _active(device, dtype, M, R)


@contextlib.contextmanager
def override(policy: Policy | dict | str) -> Iterator[Policy]:
    """Serve with another table (a dict), a forced path (``"fused"`` / ``"cublas"``) or a
    :class:`Policy` inside the block; for tests and benchmarks (not thread-safe)."""
    global _active
    previous = _active
    if isinstance(policy, str):
        policy = Policy(force=policy)
    elif not isinstance(policy, Policy):
        policy = Policy(policy)
    _active = policy
    try:
        yield policy
    finally:
        _active = previous


# ------------------------------------------------------------------------------ writing
def entry_from_timings(rows: Iterable[dict], capability: str, margin: float = 0.03,
                       **notes) -> dict:
    """A device's table entry from measured times of both paths.

    Args:
        rows: one per (shape, M, path): ``dtype`` (``"bfloat16"``), ``N``, ``K``, ``R``, ``M``,
            ``path`` (``"fused"`` / ``"cublas"``), ``ms``, optional ``weight`` (how many layers
            of a block have the shape; default 1).
        capability: the device's class, ``"sm_90"``.
        margin: cuBLAS must be this much faster (a fraction) to be chosen: the fused kernel is
            the default and a near-tie is noise.
        notes: stored under ``"notes"`` (the lookup ignores them).

    Returns:
        ``{"capability": ..., "notes": ..., dtype: [rank classes]}``. At each M the path whose
        weighted sum of times over the shapes of a rank class (R's next power of two) is the
        smaller wins, i.e. the faster decoder block; adjacent classes that choose alike at every
        M are merged (their sums too), and the last class has r_max null.
    """
    times: dict[tuple, dict[str, tuple[float, float]]] = {}
    for r in rows:
        key = (r["dtype"], m_bucket(r["R"]), r["M"], r["N"], r["K"], r["R"])
        times.setdefault(key, {})[r["path"]] = (r["ms"], r.get("weight", 1.0))
    sums: dict[str, dict[int, dict[int, list[float]]]] = {}  # dtype -> class -> M -> [f, c]
    for (dtype, rclass, M, *_), t in times.items():
        if FUSED in t and CUBLAS in t:
            acc = sums.setdefault(dtype, {}).setdefault(rclass, {}).setdefault(M, [0.0, 0.0])
            acc[0] += t[FUSED][0] * t[FUSED][1]
            acc[1] += t[CUBLAS][0] * t[CUBLAS][1]

    def decide(ms: dict[int, list[float]]) -> dict[str, str]:
        return {str(M): CUBLAS if c < (1.0 - margin) * f else FUSED
                for M, (f, c) in sorted(ms.items())}

    entry: dict = {"capability": capability, "notes": {"margin": margin, **notes}}
    for dtype, classes in sorted(sums.items()):
        merged: list[tuple[int, dict[int, list[float]]]] = []
        for rclass, ms in sorted(classes.items()):
            if merged and decide(merged[-1][1]) == decide(ms):
                union = dict(merged[-1][1])
                for M, (f, c) in ms.items():
                    f0, c0 = union.get(M, (0.0, 0.0))
                    union[M] = [f0 + f, c0 + c]
                merged[-1] = (rclass, union)
            else:
                merged.append((rclass, ms))
        entry[dtype] = [
            {"r_max": rclass if i < len(merged) - 1 else None, "m": decide(ms),
             "cublas_over_fused": {str(M): round(c / f, 3) for M, (f, c) in sorted(ms.items())}}
            for i, (rclass, ms) in enumerate(merged)
        ]
    return entry


def merge(base: dict, new: dict) -> dict:
    """``base`` with every device entry of ``new`` added or replacing its namesake."""
    validate(base, "base table")
    validate(new, "new table")
    return {**base, "devices": {**base["devices"], **new["devices"]}}


def dump(table: dict, path: str | os.PathLike) -> None:
    """Write ``table`` (validated) to ``path`` atomically, as the committed file is laid out."""
    validate(table, str(path))
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def merge_file(src: str | os.PathLike, dest: str | os.PathLike = TABLE_PATH) -> list[str]:
    """Merge the table in ``src`` (a table, or a measurement file holding one under
    ``"table"``) into the table file ``dest``; returns the device names merged."""
    with open(src) as f:
        doc = json.load(f)
    new = validate(doc.get("table", doc) if isinstance(doc, dict) else doc, str(src))
    base = load(dest) if os.path.exists(dest) else empty_table()
    dump(merge(base, new), dest)
    return list(new["devices"])
