"""pytest-benchmark hooks for the suites in benchmarks/: device name and ceilings in the JSON."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info):
    """Adds ``machine_info["pgsvd"]``: device name, versions and this run's measured ceilings."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine_info["pgsvd"] = {"device": benchlib.device_name(device), "device_type": device,
                             "date": benchlib.today(), **benchlib.versions(),
                             "ceilings": benchlib.ceilings(device),
                             "scope": os.environ.get("PGSVD_BENCH_SCOPE", "")}
