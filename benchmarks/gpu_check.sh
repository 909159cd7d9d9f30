#!/usr/bin/env bash
# Runs every CUDA path of the project in one short go on a GPU machine, and prints a table for each
# part and a summary:
#   1. training steps on CUDA (train_throughput.py): fp32 Lightning vs a plain loop on a small
#      DLRM, then bf16 on the large config (26 tables x 1M rows x 128 dims, batch 16,384) with
#      samples/s and peak GPU memory;
#   2. TorchScript export of DLRM, DeepFM and the query tower, loaded onto CUDA and compared with
#      eager there; exact top-k retrieval timed on CUDA and CPU, each checked against float64
#      scores (gpu_paths.py);
#   3. a Triton model repository exported with KIND_GPU instance groups, its TorchScript rankers
#      run on CUDA against CPU scores (triton_gpu_check.py; no GPU Triton server is needed);
#   4. row-sparse embedding updates (embedding_optimizer.py speed): row-wise Adagrad against dense
#      Adam at 26 x 200k x 64, then row-wise Adagrad alone on 26 x 1M x 64 and on the large config
#      (26 x 1M x 128, batch 16,384, bf16), with samples/s and peak GPU memory.
#
#   WHEELS=wheels benchmarks/gpu_check.sh                        # on the GPU machine
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh --dry-run    # anywhere: CPU only, short runs
#
# The dry run checks that every part runs; its CPU throughput verdict rests on short runs.
#
# The GPU machine has Python 3.12, torch 2.11 with CUDA and lightning, but no torchrec and no
# package registry. $WHEELS holds torchrec 1.6.1 and fbgemm-gpu-cpu 1.6.0 (the pair made for torch
# 2.11) and any of torchrec's needs that the image lacks (tensordict and its pyvers, for one; part 3
# also needs tritonclient[grpc], grpcio and protobuf); the
# script names whatever is still missing. They install with --no-deps into a folder on PYTHONPATH,
# not into a venv: the image's python3 is itself a venv, and a venv made from it with
# --system-site-packages would see the base interpreter's packages, not torch. JSON results go to
# $OUT when it is set, else to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=false
if [[ ${1:-} == --dry-run ]]; then
    dry_run=true
elif [[ $# -gt 0 ]]; then
    echo "usage: WHEELS=DIR $0 [--dry-run]" >&2
    exit 2
fi
results=${OUT:-benchmarks/results}
mkdir -p "$results"
export PYTHONUNBUFFERED=1

if $dry_run; then
    python=${PYTHON:-python3}
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    python=python3
    wheels=${WHEELS:-wheels}
    if ! compgen -G "$wheels/*.whl" >/dev/null; then
        echo "no wheels in $wheels; expected torchrec 1.6.1 and fbgemm-gpu-cpu 1.6.0 there (set WHEELS)" >&2
        exit 1
    fi
    site=/tmp/recstack-gpu-site
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheels"/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# torchrec and what it loads (fbgemm, tensordict, pyre-extensions), then what the benchmarks import
"$python" - "$dry_run" <<'EOF'
import importlib
import sys

missing = []
for name in ("torch", "lightning", "torchmetrics", "tensordict", "pyre_extensions", "fbgemm_gpu", "torchrec",
             "numpy", "pandas", "pyarrow", "pydantic", "yaml", "google.protobuf", "tritonclient.grpc"):
    try:
        importlib.import_module(name)
    except Exception as error:  # a wheel built for another torch fails with OSError or RuntimeError
        missing.append(f"  {name}: {type(error).__name__}: {error}".splitlines()[0])
if missing:
    sys.exit("cannot import these; carry their wheels (and their needs) in $WHEELS:\n" + "\n".join(missing))
import torch
import torchrec

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(f"torch {torch.__version__}, torchrec {torchrec.__version__}, CUDA device: {gpu}")
if gpu is None and sys.argv[1] == "false":
    sys.exit("torch sees no CUDA device; on a machine without one, run gpu_check.sh --dry-run")
EOF

if $dry_run; then
    # CPU time per step as RESULTS.md measures it: with two torch threads, the idle one spins
    # through Lightning's Python between ops and its CPU time counts as Lightning's
    export OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
    train_args=(--device cpu --steps 10 --repeats 3)
    paths_args=(--items 100000 --queries 256)
    rows_args=(--device cpu --quick --steps 3)
else
    train_args=(--device cuda --steps 20 --repeats 1)
    paths_args=()
    rows_args=(--device cuda --steps 20)
fi

summary=()
run_part() {  # run_part NAME COMMAND...: runs on after a failure, so every part is reported
    local name=$1 start=$SECONDS status=ok
    shift
    echo
    echo "## $name"
    echo
    "$@" || status="FAIL (exit $?)"
    summary+=("| $name | $status | $((SECONDS - start)) |")
}
run_part "training steps, fp32 and bf16" \
    "$python" benchmarks/train_throughput.py "${train_args[@]}" --json "$results/train_throughput.json"
run_part "TorchScript export and exact retrieval" \
    "$python" benchmarks/gpu_paths.py "${paths_args[@]}" --json "$results/gpu_paths.json"
run_part "Triton GPU repository (KIND_GPU, TorchScript on CUDA vs CPU)" \
    "$python" benchmarks/triton_gpu_check.py --json "$results/triton_gpu_check.json"
run_part "row-wise Adagrad on the tables, large config" \
    "$python" benchmarks/embedding_optimizer.py speed "${rows_args[@]}" --json "$results/embedding_optimizer.json"

echo
if $dry_run; then
    echo "## gpu_check summary (dry run: CPU only, short runs)"
else
    echo "## gpu_check summary"
fi
echo
echo "| part | result | seconds |"
echo "|---|---|---:|"
printf '%s\n' "${summary[@]}"
[[ "${summary[*]}" != *FAIL* ]]
