# The README's commands. Each creates .venv on first use, from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-triton bench lint clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first (it lies on disk); otherwise pip would pull a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,bench,dev,triton]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vcrd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests -m triton

# each script also runs on its own (docs/benchmarks.md names the commands and their times)
bench: $(STAMP)
	$(BIN)/python -m pytest benches/bench_logits.py --benchmark-only --benchmark-json=benches/results/logits.json
	$(BIN)/python benches/report.py benches/results/logits.json docs/benchmarks.md
	$(BIN)/python benches/compare.py
	$(BIN)/python benches/bench_naturalness.py
	$(BIN)/python benches/bench_sparse.py

lint: $(STAMP)
	$(BIN)/ruff check vcrd kernels tests benches

clean:
	rm -rf $(VENV) build *.egg-info
