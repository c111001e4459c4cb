#!/usr/bin/env bash
# Issue #19's device check in one command on a lent GPU machine (bench/README.md, "GPU check"):
#
#   bash bench/device_run.sh [BUDGET_S] [more bench/gpu_levers.py arguments]
#
# run through the device tool with carry [".whl"] (the wheels the GPU image lacks, see bench/README.md)
# and timeout_s about 90 s above BUDGET_S (default 450 s: install, variants and the optional ranks check;
# so timeout_s 540; the machine's start is on top). It installs the wheels into /tmp/site, runs
# bench/gpu_levers.py with what is left of the budget, and writes everything to $OUT/gpu-<date>/ (the
# tool brings back at most 8 files, 2 folders down): levers.log, summary.txt, results.jsonl,
# raw.tar.gz, env.txt, ranks.txt. Without $OUT (a local run) it writes to bench/results/gpu-<date>/.
# WHEELS=none skips the install (a local run). RANKS_CMD sets the world-size-1 FSDP check (issue #15;
# default: `bench/ranks.py --gpu-check --repeats 1 --model {model_dir}` where its --help offers them).
set -u
t0=$(date +%s)
budget=450
case "${1:-}" in ''|*[!0-9]*) ;; *) budget=$1; shift ;; esac
wheels=${WHEELS:-.whl}  # WHEELS=none: use what is installed (a local run)
cd "$(dirname "$0")/.."
dest=${OUT:-bench/results}/gpu-$(date -u +%F)
mkdir -p "$dest"
if ls "$wheels"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$wheels"/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    echo "no wheels in $wheels: using the installed transformers/trl/datasets"
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
{
    date -u; git rev-parse HEAD 2>/dev/null || echo "no git here"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    python3 -c 'import sys, torch, transformers, trl, datasets, accelerate
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers",
      transformers.__version__, "trl", trl.__version__, "datasets", datasets.__version__, "accelerate",
      accelerate.__version__)' 2>&1
} >"$dest/env.txt"
cat "$dest/env.txt"
if [ -z "${RANKS_CMD+x}" ]; then
    RANKS_CMD=""
    help=$(python3 bench/ranks.py --help 2>/dev/null)
    if grep -q -- "--gpu-check" <<<"$help" && python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        RANKS_CMD="python3 bench/ranks.py --gpu-check --repeats 1"
        # on the lever check's 0.5B model ({model_dir}: gpu_levers.py fills it in) where ranks.py takes one
        if grep -q -- "--model" <<<"$help"; then RANKS_CMD="$RANKS_CMD --model {model_dir}"; fi
    fi
fi
left=$((budget - ($(date +%s) - t0) - 10))
set -o pipefail
python3 bench/gpu_levers.py --budget-s "$left" --out-dir "$dest" --ranks-cmd "$RANKS_CMD" "$@" 2>&1 \
    | tee "$dest/levers.log"
rc=$?
echo "device_run.sh: exit $rc after $(($(date +%s) - t0)) s; output in $dest"
exit $rc
