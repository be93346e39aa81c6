#!/usr/bin/env bash
# Every GPU figure of the benchmarks in one run (< 8 minutes on an H100/H200), printed as tables and
# kept under ${OUT:-benchmarks/gpu_results}/ with the card and date. Run from the repository root:
#     bash benchmarks/gpu_suite.sh            # on a machine with one CUDA GPU
#     QUICK=1 bash benchmarks/gpu_suite.sh    # tiny sizes on the CPU: checks that the script runs
#     SUITE=small_data bash benchmarks/gpu_suite.sh   # issue 13 instead (~9.5 minutes): see below
# Each benchmark has its own time limit so one slow compile cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu_results}
mkdir -p "$OUT"
LOG="$OUT/gpu_suite_$(date -u +%Y%m%dT%H%M%SZ).txt"
PY=${PYTHON:-python}
run() {   # run LIMIT_SECONDS TITLE CMD...
    local limit=$1 title=$2; shift 2
    echo "== $title  (limit ${limit}s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | grep -v "^W[0-9]\{4\}" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "-- $title: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"
} 2>&1 | tee -a "$LOG"

if [[ "${QUICK:-0}" == 1 ]]; then
    run 300 "step, quick (CPU)" $PY benchmarks/bench_train_step.py --quick --device cpu --variants eager,percrop
    run 300 "data pipeline, quick (CPU)" $PY benchmarks/data_pipeline.py --quick
    echo "log: $LOG"; exit 0
fi

if [[ "${SUITE:-main}" == small_data ]]; then
    # issue 13: recipe=auto on all of CIFAR-10 (50,000 train images, 32 px) on one GPU, then DINO's
    # k-NN on all 50,000 train / 10,000 val images. The issue asks for 10 minutes of training; one call
    # on the lent machine is limited to 10 minutes in all, so this trains 8 (a lower bound for 10).
    # The quickstart's values (lr 0.004 per 256 images, linear scaling) at batch 256, bf16.
    run 590 "issue 13: recipe=auto on CIFAR-10, 8 min on one GPU, k-NN 50k/10k" \
        $PY benchmarks/small_data.py --device cuda --minutes 8 --seeds 0 --recipes auto \
        --knn-train 50000 --knn-val 10000 --threads 8 --out "$OUT/small_data" \
        max_images=50000 epochs=100 precision=bf16 batch_size_per_gpu=256 num_workers=8
    echo "log: $LOG"; exit 0
fi

STEP="$PY benchmarks/bench_train_step.py --device cuda --precision bf16 --steps 10 --warmup 3"
# issue 10: the training step against the official recipe (paper crops: 2x224 + 10x96, batch 64)
run 60  "step, XCiT-nano/16 quick look"   $STEP --arch xcit_nano_12_p16 --batch 64 --variants eager
run 150 "step, XCiT-S12/16 paper crops"   $STEP --arch xcit_small_12_p16 --batch 64 --variants eager,compile
run 150 "step, XCiT-S12/8 paper crops"    $STEP --arch xcit_small_12_p8 --batch 64 --variants eager,compile
run 30  "step, XCiT-S12/16 per-crop footnote" $STEP --arch xcit_small_12_p16 --batch 64 --steps 3 --variants percrop
# issue 11 (data pipeline, k-NN at scale): added here when those benchmarks exist. data_pipeline.py
# --device cuda: per-core rates, the CPU quickstart's augmentation, and JPEG files -> loss (PIL + official
# step vs augment=gpu + ssl_xcit step, XCiT-S12/16, paper crops, all CPU cores as workers): ~1 min
for extra in benchmarks/data_pipeline.py benchmarks/knn.py; do
    if [[ -f "$extra" ]]; then run 90 "$extra" $PY "$extra" --device cuda; fi
done
echo "log: $LOG"
