"""benchmarks/results/README.md is the index generated from the results files: it is current
(regenerate with `python benchmarks/results_index.py`) and lists every file."""

from __future__ import annotations

from tests.benchmarks import load_bench


def test_results_index_is_current_and_complete():
    index = load_bench("results_index")
    assert index.main(["--check"]) == 0, "run: python benchmarks/results_index.py"
    text = (index.RESULTS / "README.md").read_text()
    for p in index.RESULTS.iterdir():
        if p.name != "README.md":
            assert f"]({p.name}" in text, f"{p.name} is not in the index"
