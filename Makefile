# Two entry points (see README): `make demo` and `make test`. Both create .venv when missing
# and are safe to re-run. Nothing here needs root or a GPU.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On these machines the CPU build of torch 2.13 lies in /opt/wheels; elsewhere pip uses its own config.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: install test test-fast demo lint bench gpu-check clean

$(STAMP): requirements.txt requirements-data.txt requirements-plot.txt setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(FIND_LINKS) -r requirements.txt -r requirements-plot.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-data.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collected no test: that is a failure of the run.
test: install
	@$(BIN)/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

# Everything but the subprocess-heavy tests (marked slow): well under a minute.
test-fast: install
	@$(BIN)/python -m pytest -q -m "not slow" tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: no tests were collected" >&2; exit 1; fi; exit $$rc

demo: install
	$(BIN)/python scripts/demo.py

bench: install
	$(BIN)/python benchmarks/run.py

# The prepared check for a lent GPU (under 8 minutes on one H100): pytest -m cuda plus training and
# sampling numbers, into $(GPU_CHECK_OUT)/gpu_check.{json,md}. Without a GPU: one line, exit 0.
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),gpu_check_out)
gpu-check: install
	PYTHON=$(BIN)/python benchmarks/gpu_check.sh $(GPU_CHECK_OUT)

lint: install
	$(BIN)/python -m pip install -q ruff==0.17.5
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

clean:
	rm -rf $(VENV) demo_out gpu_check_out .pytest_cache
