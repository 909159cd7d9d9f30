# Two commands on a fresh machine: `make demo` and `make test`. Both install first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: install redis demo test clean

install: $(STAMP) redis

# The store's tests start their own Redis; Debian's redis-server is installed when missing
# (as root through apt-get, otherwise through sudo). See README.md, "Redis".
redis:
	@command -v redis-server >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; } || { \
		echo "redis-server is missing and could not be installed: run 'sudo apt-get install redis-server'" >&2; \
		exit 1; }

# torch first so pip takes the local CPU wheel; torchrec and fbgemm-gpu-cpu without their
# dependency metadata (it asks for CUDA fbgemm); then the project, pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt --no-deps torchrec fbgemm-gpu-cpu
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# MovieLens-100K end to end: prepare it (implicit feedback for retrieval, rating >= 4 under a
# temporal split for the rankers), train two-tower retrieval and the three rankers, then build and
# publish an artefact version (TorchScript models, Triton repository, item embeddings, FAISS
# index, candidate lists, store snapshot) and list it; how the rankers' inputs drifted from the
# training period to the test period; one recommendation.
demo: install
	$(BIN)/recstack data prepare --dataset ml-100k --out $(OUT)/ml-100k --overwrite
	$(BIN)/recstack data prepare --dataset ml-100k --split temporal --positive-rating 4 \
		--out $(OUT)/ml-100k-ctr --overwrite
	rm -rf $(OUT)/models
	$(BIN)/recstack train retrieval --data $(OUT)/ml-100k --out $(OUT)/models/two_tower \
		--config configs/ml100k_retrieval.yaml --accelerator cpu
	for model in deepfm dlrm linear; do \
		$(BIN)/recstack train ranker --model $$model --data $(OUT)/ml-100k-ctr --out $(OUT)/models/$$model \
			--config configs/ml100k_ctr_$$model.yaml --accelerator cpu || exit 1; \
	done
	$(BIN)/recstack refresh --data $(OUT)/ml-100k --models $(OUT)/models --artifacts $(OUT)/artifacts \
		--config configs/refresh.yaml
	$(BIN)/recstack artifacts list --artifacts $(OUT)/artifacts
	$(BIN)/recstack evaluate drift --reference $(OUT)/ml-100k-ctr --reference-part train \
		--current $(OUT)/ml-100k-ctr --current-part test
	$(BIN)/recstack recommend --artifacts $(OUT)/artifacts --config configs/pipeline.yaml \
		--user 1 --recent 50 181 --context hour=20 weekday=5 --k 10

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT)
