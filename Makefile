# Two commands on a fresh machine: `make demo` and `make test`. Both install first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: install demo test clean

install: $(STAMP)

# torch first so pip takes the local CPU wheel; torchrec and fbgemm-gpu-cpu without their
# dependency metadata (it asks for CUDA fbgemm); then the project, pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt --no-deps torchrec fbgemm-gpu-cpu
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# MovieLens-100K: prepare and print its statistics, then train and evaluate two-tower retrieval.
demo: install
	$(BIN)/recstack data prepare --dataset ml-100k --out $(OUT)/ml-100k --overwrite
	rm -rf $(OUT)/two-tower
	$(BIN)/recstack train retrieval --data $(OUT)/ml-100k --out $(OUT)/two-tower \
		--config configs/ml100k_retrieval.yaml --accelerator cpu

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT)
