"""``import pgsvd_rt`` and the CLI load nothing a user did not ask for, so they print nothing.

transformers' quantizer registry imports every quantizer it ships, and through its torchao one,
torchao itself where it is installed (benchmarks/bench_int8.py's peer), which logs "Failed to
load ..." for its CUDA libraries and torch's _pytree deprecation warnings. pgsvd_rt registers its
quantizer when transformers loads that registry (pgsvd_rt.integrations.hf.register_on_import),
not at import; these tests pin both halves, each in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("torchao", "Failed to load", "register_constant")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args", [
    ("-c", "import sys, pgsvd_rt, pgsvd_rt.cli\n"
           "loaded = [m for m in sys.modules if m.split('.')[0] == 'torchao'\n"
           "          or m.startswith('transformers.quantizers')]\n"
           "assert not loaded, loaded"),
    ("-m", "pgsvd_rt.cli", "--help"),
    ("-m", "pgsvd_rt.cli", "info", "--help"),
], ids=["import", "help", "info-help"])
def test_import_and_cli_help_are_quiet(args):
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    noisy = [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "stderr lines a user cannot act on:\n" + "\n".join(noisy)


def test_registers_when_transformers_loads_its_quantizers():
    """``import pgsvd_rt`` first, transformers' registry later: "pgsvd" is there, and the
    registry module keeps transformers' own loader."""
    proc = _run("-c", "import pgsvd_rt, sys\n"
                      "assert 'transformers.quantizers' not in sys.modules\n"
                      "import transformers.quantizers as q\n"
                      "from transformers.quantizers import auto\n"
                      "assert 'pgsvd' in auto.AUTO_QUANTIZER_MAPPING\n"
                      "assert 'pgsvd' in auto.AUTO_QUANTIZATION_CONFIG_MAPPING\n"
                      "assert 'pgsvd' not in type(q.__loader__).__module__, q.__loader__\n"
                      "assert q.__spec__.loader is q.__loader__\n"
                      "assert not [f for f in sys.meta_path if 'pgsvd' in type(f).__module__]\n")
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_loading_the_registry_through_pgsvd_is_quiet():
    """The registry's torchao quantizer imports torchao where it is installed (its "Failed to
    load" CUDA libraries, torch's enum notes): quiet while pgsvd's hook runs that import, as in
    ``make demo``'s load_factored; the loggers keep their levels afterwards."""
    proc = _run("-c", "import logging, pgsvd_rt\n"
                      "import transformers.quantizers.auto\n"
                      "for n in ('torchao', 'torch.utils._pytree'):\n"
                      "    assert logging.getLogger(n).level == logging.NOTSET, n\n")
    assert proc.returncode == 0, proc.stderr[-4000:]
    noisy = [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "stderr lines a user cannot act on:\n" + "\n".join(noisy)
