"""Data flows one way: no import circle in pgsvd_rt, and no module depends on import order.

1. :func:`test_no_import_cycle` reads every module of the package with ``ast`` (no import), takes
   each ``import`` / ``from ... import`` of a pgsvd_rt module, at module level and inside
   functions alike (a lazy import is still an edge; only ``if TYPE_CHECKING:`` blocks, which
   never run, are left out), and fails printing the circle with the file and line of each edge.
2. :func:`test_each_module_imports_alone` imports each module first thing in a fresh
   interpreter state: one subprocess imports torch (and Triton) once, then forks one child per
   module, so a module that only works once another has been imported fails, naming itself. A
   module whose optional engine (vLLM) or compiler (Triton) is missing is skipped, as the
   package does.

Run: ``.venv/bin/python -m pytest -q tests/test_import_graph.py``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Import name -> source directory (setup.py's package_dir: kernels/ installs as pgsvd_rt.kernels).
PACKAGES = {"pgsvd_rt": ROOT / "pgsvd_rt", "pgsvd_rt.kernels": ROOT / "kernels"}
#: Third-party packages a pgsvd_rt module may need that the package treats as optional.
OPTIONAL = ("vllm", "triton")


def package_modules(packages: dict[str, Path] = PACKAGES) -> dict[str, Path]:
    """``{module name: file}`` for every .py module of the package, packages as their __init__."""
    modules = {}
    for prefix, directory in packages.items():
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_edges(modules: dict[str, Path], root: Path = ROOT) -> dict[str, dict[str, str]]:
    """``{importer: {imported: "file:line"}}`` over pgsvd_rt modules.

    ``from A import b`` is an edge to ``A.b`` when that is a module, else to ``A``. Parent
    packages a dotted import runs first are not edges (every module would then depend on
    ``pgsvd_rt/__init__``). Names that are not source modules (``pgsvd_rt._C``) are leaves.
    """
    edges: dict[str, dict[str, str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = edges.setdefault(name, {})
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(root)}:{node.lineno}"
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for target in targets:
                if (target == "pgsvd_rt" or target.startswith("pgsvd_rt.")) and target != name:
                    out.setdefault(target, where)
    return edges


def find_cycle(edges: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle as ``[m0, m1, ..., m0]``, or None (iterative DFS, three colours)."""
    colour: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(edges):
        if colour.get(start):
            continue
        path, iters = [start], [iter(sorted(edges.get(start, {})))]
        colour[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                iters.pop()
            elif colour.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not colour.get(nxt):
                colour[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(edges.get(nxt, {}))))
    return None


def test_graph_sees_lazy_relative_and_submodule_imports(tmp_path):
    """The walker itself: function-level, relative and ``from pkg import submodule`` edges count;
    TYPE_CHECKING imports do not; and a circle is found."""
    pkg = tmp_path / "pgsvd_rt"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from pgsvd_rt.sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pgsvd_rt import c\n"
        "from .. import c\n")
    (pkg / "c.py").write_text("import pgsvd_rt.sub.a\n")
    edges = import_edges(package_modules({"pgsvd_rt": pkg}), tmp_path)
    assert edges["pgsvd_rt.sub"] == {"pgsvd_rt.sub.a": "pgsvd_rt/sub/__init__.py:1"}
    assert edges["pgsvd_rt.sub.a"] == {"pgsvd_rt.sub.b": "pgsvd_rt/sub/a.py:2"}
    assert edges["pgsvd_rt.sub.b"] == {"pgsvd_rt.c": "pgsvd_rt/sub/b.py:4"}
    assert find_cycle(edges) == ["pgsvd_rt.c", "pgsvd_rt.sub.a", "pgsvd_rt.sub.b", "pgsvd_rt.c"]
    del edges["pgsvd_rt.c"]
    assert find_cycle(edges) is None


def test_no_import_cycle():
    modules = package_modules()
    assert "pgsvd_rt.io.checkpoint" in modules and "pgsvd_rt.kernels.lowrank_matmul" in modules
    edges = import_edges(modules)
    cycle = find_cycle(edges)
    if cycle:
        steps = "\n".join(f"  {a} -> {b}   ({edges[a][b]})"
                          for a, b in zip(cycle, cycle[1:], strict=False))
        pytest.fail(f"import circle in pgsvd_rt ({len(cycle) - 1} modules):\n{steps}")


# One child per module, forked from a parent that has imported torch and Triton (the slow part
# of each import, 0.6 s of 0.7, and not ours), so each child starts with no pgsvd_rt module
# loaded. Prints one JSON line {module: "ok" | "skip: ..." | "fail: traceback"}.
_FORK_EACH = r"""
import importlib, json, os, sys, traceback
import torch  # noqa: F401
try:
    import triton  # noqa: F401
except ImportError:
    pass
names, optional = json.loads(sys.argv[1]), tuple(json.loads(sys.argv[2]))
assert not [m for m in sys.modules if m.split(".")[0] == "pgsvd_rt"]
result = {}
for name in names:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            msg = "ok"
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            msg = (f"skip: needs {missing}" if missing in optional
                   else "fail: " + traceback.format_exc())
        except BaseException:
            msg = "fail: " + traceback.format_exc()
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    result[name] = b"".join(chunks).decode() or f"fail: child exited with status {status}"
print(json.dumps(result))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_each_module_imports_alone():
    names = sorted(package_modules())
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_EACH, json.dumps(names), json.dumps(OPTIONAL)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {n: msg for n, msg in result.items() if msg.startswith("fail")}
    assert not failed, "modules that do not import on their own:\n" + "\n".join(
        f"--- {n}\n{msg}" for n, msg in failed.items())
    skipped = {n: msg for n, msg in result.items() if msg.startswith("skip")}
    assert set(result) == set(names)
    if skipped:  # shown by -ra; the rest passed
        print("skipped:", skipped)
