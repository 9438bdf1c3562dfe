"""Calibration statistics on disk: one calibration shared by every method, read a group at a time.

A model whose Grams do not fit in memory (Qwen2.5-Coder-1.5B: ~20 GB in float64, next to its
6 GB of fp32 weights) still wants one calibration for every method and ratio of a table.
:func:`calibrate_to_disk` gathers them pass by pass (``CalibConfig.blocks_per_pass``: the dense
model runs once) and writes each input's statistics to its own safetensors file;
:class:`StatsStore` is the read-only mapping ``compress_`` takes as ``stats``, loading one entry
on access, so only one group of blocks' Grams is in memory at a time.

The directory holds ``index.json`` (the calibration it was made from and its keys), written
last: a directory without it is an interrupted write and is redone. A store made from other
calibration settings is refused, naming the difference.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import quote

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pgsvd_rt.arch import linear_specs
from pgsvd_rt.compress.calibration import InputStats, iter_stats

log = logging.getLogger("pgsvd_rt")

INDEX = "index.json"


def _file(directory: Path, key: str) -> Path:
    return directory / f"{quote(key, safe='')}.safetensors"


def write_json(path: Path, obj) -> None:
    """``path`` replaced whole by ``obj`` as JSON (never half written)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def check_same(found: dict, wanted: dict, what: str) -> None:
    """Refuse to resume from ``what`` when its recorded settings differ, naming the keys."""
    if found != wanted:
        diff = sorted(k for k in found.keys() | wanted.keys() if found.get(k) != wanted.get(k))
        raise ValueError(f"{what} was made with other settings (differs in {diff}): use another "
                         "directory or remove it")


class StatsStore(Mapping):
    """input_key -> :class:`InputStats`, loaded from ``directory`` on each access."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{self.directory} holds no calibration statistics "
                                    f"({INDEX} missing)")
        meta = json.loads(index.read_text())
        self.calibration: dict = meta["calibration"]
        self.wall_s: float = meta["wall_s"]  # how long the calibration took when it ran
        self._keys: list[str] = meta["keys"]

    def __getitem__(self, key: str) -> InputStats:
        if key not in self._keys:
            raise KeyError(key)
        t = load_file(_file(self.directory, key))
        return InputStats(t["gram"], t["abs_sum"], int(t["tokens"]))

    def __contains__(self, key) -> bool:  # from the index: Mapping's default would load it
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def calibrate_to_disk(
    model: nn.Module,
    ids: torch.Tensor,
    calibration: dict,
    directory: str | os.PathLike,
    batch_size: int = 4,
    blocks_per_pass: int | None = None,
    progress: bool = True,
) -> StatsStore:
    """The Grams of every block of ``model`` on ``ids``, written to ``directory``.

    Args:
        model: the dense model.
        ids: (S, L) calibration token ids.
        calibration: their provenance (corpus, samples, seq_len, tokens, ...) plus whatever
            identifies the model; a store already in ``directory`` is reused only when its
            record equals this one.
        blocks_per_pass: decoder blocks whose Grams are in memory at once (None: all).

    Returns:
        The store (also reopened by ``StatsStore(directory)``).

    Raises:
        ValueError: ``directory`` holds statistics of another calibration.
    """
    directory = Path(directory)
    if (directory / INDEX).is_file():
        store = StatsStore(directory)
        check_same(store.calibration, calibration, f"{directory} (calibration statistics)")
        log.info("calibration statistics reused from %s", directory)
        return store
    t0 = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for _, group in iter_stats(model, linear_specs(model), ids, batch_size=batch_size,
                               blocks_per_pass=blocks_per_pass, progress=progress,
                               stat_device="cpu"):
        for key, st in group.items():
            path = _file(directory, key)
            tmp = path.with_suffix(".tmp")
            save_file({"gram": st.gram.contiguous(), "abs_sum": st.abs_sum.contiguous(),
                       "tokens": torch.tensor(st.tokens, dtype=torch.int64)}, str(tmp))
            os.replace(tmp, path)
            keys.append(key)
        del group
    write_json(directory / INDEX, {"calibration": calibration, "keys": keys,
                                    "wall_s": time.perf_counter() - t0})
    return StatsStore(directory)
