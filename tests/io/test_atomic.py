"""Crash-safe replacement, stale temporaries, modes, early writability check (pgsvd_rt.io.atomic).

The crash test kills a real writer process (SIGKILL, no cleanup runs) at each step of replacing
a checkpoint and checks that the path then holds the old or the new checkpoint, whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pgsvd_rt.io import atomic, load_factored, read_manifest, save_factored
from tests.conftest import random_ids, tiny_model

REPO = Path(__file__).resolve().parents[2]

# The child re-saves the checkpoint at SRC over DST with method "new" and SIGKILLs itself at STEP
# (wrapping the function that performs that step; "none": it finishes).
CHILD = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch
    from pgsvd_rt.io import atomic, checkpoint
    src, dst, step, fallback = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    model, tok, _ = checkpoint.load_factored(src)
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    def wrap(obj, name, when, pred=lambda *a: True):
        real = getattr(obj, name)
        def f(*a, **k):
            if when == "before" and pred(*a):
                die()
            out = real(*a, **k)
            if when == "after" and pred(*a):
                die()
            return out
        setattr(obj, name, f)
    if fallback:
        atomic.exchange = lambda a, b: False
    if step == "fill":  # the tensor file half written
        real_save = safetensors.torch.save_file
        def half(state, path, **k):
            real_save(state, path, **k)
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
            die()
        safetensors.torch.save_file = half
    elif step == "filled":
        wrap(atomic, "fsync_tree", "before")
    elif step == "exchange":
        wrap(atomic, "exchange", "before")
    elif step == "exchanged":
        wrap(atomic, "exchange", "after")
    elif step == "renamed-old":  # fallback: between the two renames
        wrap(os, "rename", "after", lambda a, b: ".old-" in str(b))
    elif step == "removing-old":
        wrap(atomic.shutil, "rmtree", "before")
    checkpoint.save_factored(model, dst, tokenizer=tok, info={"method": "new"}, overwrite=True)
""")

STEPS = ["fill", "filled", "exchange", "exchanged", "removing-old", "none"]


@pytest.fixture(scope="module")
def old_ckpt(tmp_path_factory):
    from pgsvd_rt.compress import collect_stats, compress_
    from pgsvd_rt.config import CompressConfig
    from pgsvd_rt.models import linear_specs

    model = tiny_model("qwen2", seed=4)
    stats = collect_stats(model, linear_specs(model), random_ids(4, 32), progress=False)
    compress_(model, CompressConfig(method="pgsvd", ratio=0.3), stats=stats, progress=False)
    return save_factored(model, tmp_path_factory.mktemp("old") / "src", info={"method": "old"})


def _run_child(src: Path, dst: Path, step: str, fallback: bool = False) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), step,
                        "1" if fallback else "0"], env=env, capture_output=True, text=True,
                       timeout=300)
    if p.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(p.stderr[-2000:])
    return p.returncode


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_step_of_overwrite_keeps_a_whole_checkpoint(old_ckpt, tmp_path, step):
    dst = _copy(old_ckpt, tmp_path / "ckpt")
    rc = _run_child(old_ckpt, dst, step)
    assert rc == (0 if step == "none" else -signal.SIGKILL)
    load_factored(dst)  # whole: every checksum verified
    method = read_manifest(dst)["method"]
    assert method == ("old" if step in ("fill", "filled", "exchange") else "new"), method
    # The next save cleans the dead writer's temporaries and replaces the checkpoint again.
    model, _, _ = load_factored(dst)
    save_factored(model, dst, info={"method": "again"}, overwrite=True)
    assert read_manifest(dst)["method"] == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_fallback_replacement_killed_between_renames_is_named(old_ckpt, tmp_path):
    """Without RENAME_EXCHANGE a kill between the two renames leaves the old checkpoint aside;
    the next save refuses and says where it is instead of deleting it."""
    dst = _copy(old_ckpt, tmp_path / "ckpt")
    assert _run_child(old_ckpt, dst, "renamed-old", fallback=True) == -signal.SIGKILL
    assert not dst.exists()
    aside = [p for p in tmp_path.iterdir() if ".old-" in p.name]
    assert len(aside) == 1 and (aside[0] / "d" / "pgsvd_manifest.json").is_file()
    model, _, _ = load_factored(aside[0] / "d")
    with pytest.raises(ValueError, match="interrupted.*" + aside[0].name):
        save_factored(model, dst, info={"method": "x"})
    assert (aside[0] / "d").is_dir()  # nothing lost
    b = _copy(old_ckpt, tmp_path / "b")
    assert _run_child(old_ckpt, b, "none", fallback=True) == 0  # the fallback itself works
    assert read_manifest(tmp_path / "b")["method"] == "new"


def test_exchange_is_available_here(tmp_path):
    """The crash-safe path is the one these machines take (Linux renameat2)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    assert atomic.exchange(a, b)
    assert (b / "x").read_text() == "a" and not (a / "x").exists()


def test_stale_temporaries_of_dead_writers_are_removed(old_ckpt, tmp_path):
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                       capture_output=True, text=True)
    dead = int(p.stdout)
    host = atomic._host()
    names = {f".ckpt.tmp-{host}-{dead}-abc": False,  # dead writer: removed
             f".ckpt.tmp-{host}-{os.getpid()}-abc": True,  # a live writer (us): kept
             f".ckpt.tmp-otherhost-{dead}-abc": True,  # another machine's writer: kept
             ".other.tmp-x-1-abc": True}  # another checkpoint's: kept
    for n in names:
        (tmp_path / n).mkdir()
        (tmp_path / n / "model.safetensors").write_bytes(b"0" * 100)
    model, _, _ = load_factored(old_ckpt)
    save_factored(model, tmp_path / "ckpt")
    for n, kept in names.items():
        assert (tmp_path / n).exists() == kept, n


@pytest.mark.parametrize("mask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_modes_follow_the_umask(old_ckpt, tmp_path, mask, dir_mode, file_mode):
    model, _, _ = load_factored(old_ckpt)
    old = os.umask(mask)
    try:
        out = save_factored(model, tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == dir_mode
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == file_mode, f.name


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(old_ckpt, tmp_path):
    model, _, _ = load_factored(old_ckpt)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a checkpoint"):
        save_factored(model, mine, overwrite=True)
    assert (mine / "precious.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    save_factored(model, tmp_path / "empty", overwrite=True)  # an empty directory is fine
    assert json.loads((tmp_path / "empty" / "pgsvd_manifest.json").read_text())


@pytest.mark.skipif(os.geteuid() == 0,
                    reason="root may write anywhere (the next test needs no permissions)")
def test_unwritable_parent_is_found_first(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(ValueError, match="cannot write"):
        atomic.check_writable(ro / "ckpt")


def test_unwritable_output_is_found_first(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory is needed")
    with pytest.raises(ValueError, match="cannot write the output"):
        atomic.check_writable(blocker / "sub" / "ckpt")
    if Path("/proc/self").is_dir():
        with pytest.raises(ValueError, match="cannot write the output"):
            atomic.check_writable(Path("/proc/self/ckpt"))
