"""Every command the user-facing docs cite still exists, with the flags they give it.

README.md, docs/guide.md and benchmarks/README.md cite `pgsvd ...`, `python benchmarks/X.py
...`, `make X` and `bash benchmarks/X.sh`. The cheap check, run on every CI: full commands in
code blocks parse with the CLI's own parser; for every cited command (inline too, where values
are placeholders) the subcommand or script exists and each `--flag` is one it defines. Running
them is the benchmarks' and the tests' job.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pgsvd_rt.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/guide.md", "benchmarks/README.md"]
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _commands(text: str) -> list[tuple[str, bool]]:
    """(command, from a code block) for each cited command line, continuations joined."""
    out = []
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if re.match(r"(pgsvd |python benchmarks/|make |bash benchmarks/)", line):
                out.append((line, True))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", prose.replace("\n", " ")):
        if re.match(r"(pgsvd [a-z]|python benchmarks/|make [a-z]|bash benchmarks/)", span):
            out.append((span.strip(), False))
    return out


def _subparsers() -> dict:
    p = build_parser()
    action = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


CITED = [(doc, cmd, block) for doc in DOCS for cmd, block in _commands((ROOT / doc).read_text())]


def test_docs_cite_commands():
    assert sum(c.startswith("pgsvd ") for _, c, _ in CITED) >= 10
    assert any(c.startswith("python benchmarks/") for _, c, _ in CITED)


@pytest.mark.parametrize("doc,cmd,block", CITED, ids=[f"{d}:{c[:60]}" for d, c, _ in CITED])
def test_cited_command_exists(doc, cmd, block):
    head = cmd.split()
    if head[0] == "pgsvd":
        subs = _subparsers()
        assert head[1] in subs, f"{doc} cites `pgsvd {head[1]}`, which the CLI does not have"
        known = {s for a in subs[head[1]]._actions for s in a.option_strings}
        own = cmd.split(" -- ")[0]  # after `--`, the flags are vLLM's (pgsvd serve)
        unknown = sorted(set(FLAG.findall(own)) - known)
        assert not unknown, f"{doc}: `{cmd}` cites flags `pgsvd {head[1]}` lacks: {unknown}"
        if block and not re.search(r"\b[A-Z]{1,4}\b|\.\.\.|\[", own):  # no placeholders
            build_parser().parse_args(shlex.split(own)[1:])
    elif head[0] == "python":
        script = ROOT / head[1]
        assert script.is_file(), f"{doc} cites {head[1]}, which does not exist"
        src = script.read_text()
        unknown = sorted(f for f in set(FLAG.findall(cmd)) if f'"{f}"' not in src)
        assert not unknown, f"{doc}: `{cmd}` cites flags {head[1]} does not define: {unknown}"
    elif head[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        assert re.search(rf"^{re.escape(head[1])}:", makefile, flags=re.M), \
            f"{doc} cites `make {head[1]}`, which the Makefile lacks"
    else:
        assert (ROOT / head[1]).is_file(), f"{doc} cites {head[1]}, which does not exist"
