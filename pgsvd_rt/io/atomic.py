"""A directory written whole or not at all, and replaced so that the old or the new one is
always at the path.

:func:`publish` fills a temporary sibling ``.NAME.tmp-<host>-<pid>-<random>``, fsyncs it, then

* when nothing is at the path: renames it into place (one atomic step);
* when a checkpoint is there (``overwrite``): swaps the two with ``renameat2(RENAME_EXCHANGE)``
  (Linux; one atomic step: the path holds the old directory before it and the new one after
  it, never nothing), then deletes the old one, now at the temporary name.

A kill at any point leaves the old or the new directory at the path, plus at most one temporary.
Temporaries are named after their writer, so the next :func:`publish` next to them removes those
whose writer (same host) is no longer running. Where the exchange is unsupported (another OS, a
filesystem without it) the old directory is first renamed to ``.NAME.old-<host>-<pid>-...``: a
kill between the two renames leaves it there, and the error of the next save names it.

The directory and its files get the modes a plain ``mkdir`` / ``open`` would (0777 / 0666 minus
the umask), not ``mkdtemp``'s 0700 or a writer's 0600, so other accounts (a serving user) can read
what the umask lets them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

#: Temporaries without a writer's pid (older versions) are removed once this old.
STALE_UNNAMED_S = 24 * 3600
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{_host()}-{os.getpid()}-"


def umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def check_writable(out: str | os.PathLike) -> Path:
    """Fail now, not after hours of work, when ``out``'s parent cannot take a new directory."""
    out = Path(out)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise ValueError(f"cannot write the output {str(out)!r}: {exc.strerror or exc} "
                         f"(in {str(parent)!r})") from exc
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temporaries(out: Path) -> list[Path]:
    """Temporaries of ``out`` whose writer died (same host), or, for nameless ones of older
    versions, that are older than STALE_UNNAMED_S."""
    found = []
    if not out.parent.is_dir():
        return found
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(.+)")
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m is None:
            continue
        w = re.fullmatch(r"([A-Za-z0-9]+)-(\d+)-.+", m.group(1))
        try:
            if w is not None:
                if w.group(1) == _host() and not _pid_alive(int(w.group(2))):
                    found.append(p)
            elif time.time() - p.lstat().st_mtime > STALE_UNNAMED_S:
                found.append(p)
        except OSError:
            continue
    return found


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap paths a and b (renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _apply_umask(directory: Path, mask: int) -> None:
    """The modes a plain mkdir / open would give: mkdtemp makes 0700, some writers 0600."""
    os.chmod(directory, 0o777 & ~mask)
    for p in directory.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def fsync_tree(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(out: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool,
            replaceable: Callable[[Path], bool]) -> Path:
    """Create directory ``out`` by ``fill(tmp)``: whole or not at all (module doc).

    Args:
        out: the target path.
        fill: writes every file into the temporary directory it is given.
        overwrite: replace what is at ``out``; only when ``replaceable(out)`` (an empty directory
            is always replaceable): never a directory this writer did not make.
        replaceable: whether an existing ``out`` is one of ours.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"output directory {str(out)!r} exists; pass overwrite=True "
                                  "(CLI: --overwrite) to replace it")
        empty = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
        if not (empty or (out.is_dir() and not out.is_symlink() and replaceable(out))):
            raise ValueError(f"refusing to replace {str(out)!r}: it is not a checkpoint of this "
                             "tool (nor an empty directory); remove it yourself or choose "
                             "another path")
    check_writable(out)
    for p in stale_temporaries(out):
        if ".old-" in p.name and not out.exists() and (p / "d").exists():
            raise ValueError(f"an earlier replacement of {str(out)!r} was interrupted: the "
                             f"previous directory is at {str(p / 'd')!r}; move it back or "
                             "remove it, then save again")
        _remove(p)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(out, "tmp"), dir=out.parent))
    try:
        fill(tmp)
        _apply_umask(tmp, umask())
        fsync_tree(tmp)
        if not out.exists():
            os.rename(tmp, out)
        elif exchange(tmp, out):  # out: the new directory; tmp: the old one
            fsync_dir(out.parent)  # the swap durable before the old one's data goes
            _remove(tmp)
        else:
            old = Path(tempfile.mkdtemp(prefix=_prefix(out, "old"), dir=out.parent)) / "d"
            os.rename(out, old)
            os.rename(tmp, out)
            _remove(old.parent)
        fsync_dir(out.parent)
    except BaseException:
        _remove(tmp)
        raise
    return out
