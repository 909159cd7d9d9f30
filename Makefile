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

# MovieLens-100K end to end, on one split (per-user random 80/10/10, seed 2020): prepare it, train
# two-tower retrieval, build the rankers' table of what retrieval proposes on the same split and
# train the three rankers on it; build and publish an artefact version (TorchScript models, Triton
# repository, item embeddings, FAISS index, candidate lists, store snapshot) from the train part
# alone and list it; one recommendation; the pipeline against retrieval alone and popularity on
# the test part. The temporal click-through example (rating >= 4) stays apart: how its inputs
# drifted from the training period to the test period.
demo: install
	$(BIN)/recstack data prepare --dataset ml-100k --out $(OUT)/ml-100k --overwrite
	$(BIN)/recstack data prepare --dataset ml-100k --split temporal --positive-rating 4 \
		--out $(OUT)/ml-100k-ctr --overwrite
	rm -rf $(OUT)/models
	$(BIN)/recstack train retrieval --data $(OUT)/ml-100k --out $(OUT)/models/two_tower \
		--config configs/ml100k_retrieval.yaml --accelerator cpu
	$(BIN)/recstack data candidates --data $(OUT)/ml-100k --models $(OUT)/models --out $(OUT)/ml-100k-rerank \
		--config configs/candidates.yaml --overwrite
	for model in deepfm dlrm linear; do \
		$(BIN)/recstack train ranker --model $$model --data $(OUT)/ml-100k-rerank --out $(OUT)/models/$$model \
			--config configs/ml100k_rerank_$$model.yaml --accelerator cpu || exit 1; \
	done
	$(BIN)/recstack data prepare --dataset files --path $(OUT)/ml-100k/split/train.parquet \
		--users-file $(OUT)/ml-100k/users.parquet --items-file $(OUT)/ml-100k/items.parquet \
		--out $(OUT)/ml-100k-train --overwrite
	$(BIN)/recstack refresh --data $(OUT)/ml-100k-train --models $(OUT)/models --artifacts $(OUT)/artifacts \
		--config configs/refresh.yaml
	$(BIN)/recstack artifacts list --artifacts $(OUT)/artifacts
	$(BIN)/recstack evaluate drift --reference $(OUT)/ml-100k-ctr --reference-part train \
		--current $(OUT)/ml-100k-ctr --current-part test
	$(BIN)/recstack recommend --artifacts $(OUT)/artifacts --config configs/pipeline.yaml \
		--user 1 --recent 50 181 --context hour=20 weekday=5 --k 10
	$(BIN)/recstack evaluate offline --artifacts $(OUT)/artifacts --config configs/pipeline.yaml \
		--data $(OUT)/ml-100k --part test --k 10 --out $(OUT)/offline

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT)
