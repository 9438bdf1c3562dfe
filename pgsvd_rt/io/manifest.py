"""The manifest of a factored checkpoint: its file name, format identity, and validated reader.

The lowest room of the checkpoint format: :mod:`pgsvd_rt.io.checkpoint` writes and loads
checkpoints with it, :mod:`pgsvd_rt.io.quant_config` stamps older ones from it, and
:mod:`pgsvd_rt.models` recognises a checkpoint directory by :data:`MANIFEST_NAME`. It imports
none of them, so the import graph stays one way (models -> io, checkpoint -> manifest).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pgsvd_rt.io import validate

MANIFEST_NAME = "pgsvd_manifest.json"
FORMAT = "pgsvd_rt.factored"
FORMAT_VERSION = 1


def int8_names(modules: dict) -> set[str]:
    """Manifest modules whose factors are int8."""
    return {name for name, m in modules.items() if m.get("factors") == "int8"}


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a checkpoint directory; ValueError when missing or not ours."""
    p = Path(path) / MANIFEST_NAME
    if not p.exists():
        raise ValueError(f"{str(path)!r} is not a pgsvd_rt checkpoint: no {MANIFEST_NAME}")
    if not p.is_file():
        raise ValueError(f"{str(p)!r} is not a regular file")
    try:
        manifest = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupted manifest {str(p)!r}: {exc}") from exc
    except OSError as exc:
        raise ValueError(f"cannot read {str(p)!r}: {exc.strerror or exc}") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"corrupted manifest {str(p)!r}: not a JSON object")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{str(p)!r}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(p)!r}: format_version {manifest.get('format_version')!r} is not "
                         f"supported (this pgsvd_rt reads {FORMAT_VERSION})")
    return validate.check_manifest(manifest, str(p))
