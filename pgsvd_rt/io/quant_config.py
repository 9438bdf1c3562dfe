"""The ``quantization_config`` of a factored checkpoint: how engines learn the per-module ranks.

:func:`pgsvd_rt.io.save_factored` writes, beside its manifest, this entry into ``config.json``::

    "quantization_config": {
      "quant_method": "pgsvd",          # selects our HfQuantizer / vLLM method
      "format_version": 1,              # of this entry (QUANT_FORMAT_VERSION)
      "ranks": {"model.layers.0.self_attn.q_proj": 123, ...}
    }

A module named in ``ranks`` is stored as ``<name>.u`` (N, R) and ``<name>.v`` (K, R) (plus
``<name>.bias``); one also listed in ``"int8": [...]`` as int8 ``<name>.u`` (N, R) and
``<name>.vt`` (R, K) with ``<name>.u_scale`` (N,) and ``<name>.vt_scale`` (R,); every other
linear stays dense (``<name>.weight``). Module names are the
Hugging Face ones. Both loaders (transformers' ``from_pretrained`` after ``import pgsvd_rt``, and
vLLM through the ``vllm.general_plugins`` entry point) read the entry with :func:`parse_ranks`
and check it against the tensor file's header with :func:`check_tensors` before any weight
loads, so a checkpoint whose config disagrees with its tensors is refused naming the module.

Directories written before this entry existed still load with ``load_factored``;
:func:`stamp_checkpoint` (CLI: ``pgsvd upgrade DIR``) adds it in place (atomic rewrite of
config.json).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from pgsvd_rt.io.manifest import int8_names, read_manifest

QUANT_METHOD = "pgsvd"
QUANT_FORMAT_VERSION = 1
TENSOR_FILE = "model.safetensors"


def make(ranks: dict[str, int], int8: set[str] | frozenset = frozenset()) -> dict:
    """The ``quantization_config`` dict for modules factored at ``ranks`` ({name: R}); those
    in ``int8`` hold int8 factors (``u``, ``vt`` and their scales)."""
    entry = {"quant_method": QUANT_METHOD, "format_version": QUANT_FORMAT_VERSION,
             "ranks": {name: int(r) for name, r in sorted(ranks.items())}}
    if int8:
        entry["int8"] = sorted(int8)
    return entry


def int8_modules(cfg: dict, ranks: dict[str, int], where: str) -> set[str]:
    """The modules whose factors are int8 (``quantization_config.int8``), each one in ranks."""
    names = cfg.get("int8", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: quantization_config.int8 must be a list of module names, "
                         f"got {names!r}")
    stray = sorted(set(names) - set(ranks))
    if stray:
        raise ValueError(f"{where}: quantization_config.int8 names {stray[0]!r}, which is not in "
                         "quantization_config.ranks")
    return set(names)


def parse_ranks(cfg: dict, where: str) -> dict[str, int]:
    """Validated ``{module name: rank}`` from a ``quantization_config`` dict.

    Args:
        cfg: the dict from config.json.
        where: the checkpoint path (or another label) named in errors.

    Raises:
        ValueError: not a pgsvd entry, an unsupported format_version, or a malformed rank.
    """
    if not isinstance(cfg, dict) or cfg.get("quant_method") != QUANT_METHOD:
        got = cfg.get("quant_method") if isinstance(cfg, dict) else cfg
        raise ValueError(f"{where}: quantization_config.quant_method is {got!r}, "
                         f"expected {QUANT_METHOD!r}")
    if cfg.get("format_version") != QUANT_FORMAT_VERSION:
        raise ValueError(f"{where}: quantization_config.format_version "
                         f"{cfg.get('format_version')!r} is not supported (this pgsvd_rt reads "
                         f"{QUANT_FORMAT_VERSION})")
    ranks = cfg.get("ranks")
    if not isinstance(ranks, dict):
        raise ValueError(f"{where}: quantization_config.ranks must be an object "
                         f"{{module: rank}}, got {type(ranks).__name__}")
    for name, r in ranks.items():
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"{where}: quantization_config.ranks[{name!r}] must be a positive "
                             f"int, got {r!r}")
    return dict(ranks)


def read_header(directory: str | os.PathLike) -> dict[str, tuple[list[int], str]]:
    """``{tensor name: (shape, safetensors dtype)}`` from the tensor file's header (no data read).

    Raises:
        ValueError: the file is missing or its header is not valid safetensors.
    """
    path = Path(directory) / TENSOR_FILE
    if not path.is_file():
        raise ValueError(f"checkpoint {str(directory)!r} has no {TENSOR_FILE}")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > path.stat().st_size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        return {k: (list(v["shape"]), v["dtype"]) for k, v in header.items()
                if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ValueError(f"corrupted tensor file {str(path)!r}: {exc}") from exc


def check_tensors(ranks: dict[str, int], header: dict[str, tuple[list[int], str]],
                  where: str, int8: set[str] | frozenset = frozenset()) -> None:
    """Refuse a config whose ranks disagree with the tensors, naming the first bad module.

    Every module in ``ranks`` needs ``.u`` (N, R) and ``.v`` (K, R) at that R (int8 ones:
    ``.u`` (N, R) and ``.vt`` (R, K), int8) and no ``.weight``; every factor in the file must
    belong to a module in ``ranks``.
    """
    for name, r in sorted(ranks.items()):
        for key in (("u", "vt") if name in int8 else ("u", "v")):
            if f"{name}.{key}" not in header:
                raise ValueError(f"{where}: module {name!r} has rank {r} in quantization_config "
                                 f"but the checkpoint has no tensor {name}.{key}")
            shape, dtype = header[f"{name}.{key}"]
            if name in int8 and dtype != "I8":
                raise ValueError(f"{where}: module {name!r} is int8 in quantization_config but "
                                 f"tensor {name}.{key} is {dtype}")
            if len(shape) != 2 or shape[0 if key == "vt" else 1] != r:
                raise ValueError(f"{where}: module {name!r}: quantization_config says rank {r}, "
                                 f"tensor {name}.{key} has shape {shape}")
        if f"{name}.weight" in header:
            raise ValueError(f"{where}: module {name!r} is factored in quantization_config but "
                             f"the checkpoint also has a dense {name}.weight")
    for key in sorted(header):
        base, _, leaf = key.rpartition(".")
        if leaf in ("u", "v", "vt") and base not in ranks:
            raise ValueError(f"{where}: tensor {key!r} is a factor but module {base!r} is not in "
                             f"quantization_config.ranks")


def stamp_checkpoint(directory: str | os.PathLike) -> dict:
    """Add the ``quantization_config`` entry to an older checkpoint's config.json, in place.

    The ranks come from the manifest (``modules``), checked against the tensor header; the new
    config.json is written to a temporary file and renamed over the old one. Returns the entry.
    """
    d = Path(directory)
    manifest = read_manifest(d)
    ranks = {name: m["rank"] for name, m in manifest["modules"].items()}
    int8 = int8_names(manifest["modules"])
    entry = make(ranks, int8)
    check_tensors(ranks, read_header(d), str(d), int8)
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = entry
    tmp = cfg_path.with_name(f".{cfg_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cfg_path)
    return entry
