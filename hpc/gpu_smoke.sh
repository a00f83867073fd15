#!/usr/bin/env bash
# First run on a GPU node: every CUDA path of lungbench once, in under 10 minutes, into one
# folder. For a bare one-GPU node with torch (CUDA) preinstalled: lungbench is installed
# without touching torch. Each step's output is kept (OUT/<step>.out, .err) and OUT/steps.log
# says which passed; a failing step does not stop the others.
#
#   hpc/gpu_smoke.sh OUT                 # on the GPU node
#   hpc/gpu_smoke.sh OUT --dry-run       # the same steps on CPU with tiny sizes (tested in CI)
#
# Steps: install (no deps: torch stays), env --peak, bench --device cpu cuda (the thesis's
# table), the tuning pass and the ablation on CUDA, a 1-GPU DDP run under torchrun (NCCL),
# profile (CPU + CUDA activities), NVML telemetry beside the bench, the CUDA-marked tests,
# and `predict --validate --gpu` (its table in results/predict-validate-gpu.md).
# Wheels of what the image lacks (MONAI, python-hostlist): WHEELS=/path/to/wheels.
set -uo pipefail

OUT=${1:?usage: hpc/gpu_smoke.sh OUT_DIR [--dry-run]}
MODE=${2:-}
PY=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS="$OUT/results"
: >"$OUT/steps.log"

if [[ $MODE == --dry-run ]]; then
    DEV=cpu
    DEVICES=(cpu)
    ACTIVITIES=cpu
    SIZE=(--preset dey2018 --filters 2 --batch 2 --repeats 2 --warmup 1 --synth-n 24)
    EPOCH=(--epoch-samples 8)
    ABLATE=(--ablation --preset dey2018 --filters 2 --batch 2 --repeats 2 --compile off)
    PROFILE=(--preset dey2018 --filters 2 --batch 2 --wait 0 --warmup 1 --active 1)
    # one module's CUDA-marked tests (all skipped on CPU): the step runs, without the
    # whole suite's collection (18 s)
    GPU_TESTS=(tests/test_switches.py)
else
    DEV=cuda
    DEVICES=(cpu cuda)
    ACTIVITIES=cpu,cuda
    SIZE=(--filters 8 16 --batch 2)
    EPOCH=(--epoch-samples 64)
    ABLATE=(--ablation --filters 16 --batch 2 --repeats 10 --compile off)
    PROFILE=(--filters 16 --batch 2)
    GPU_TESTS=(tests)
fi

step() {  # step NAME COMMAND...: run it with a time limit, log ok / FAILED and the seconds
    local name=$1
    shift
    local start=$SECONDS status=0
    echo "== $name: $*" >>"$OUT/steps.log"
    timeout "$STEP_TIMEOUT" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err" || status=$?
    if [[ $status == 0 ]]; then
        echo "ok      $name ($((SECONDS - start)) s)" | tee -a "$OUT/steps.log"
    else
        echo "FAILED  $name (exit $status, $((SECONDS - start)) s; see $name.err)" | tee -a "$OUT/steps.log"
    fi
}

if [[ $MODE != --dry-run ]]; then
    step install "$PY" -m pip install --no-deps ${WHEELS:+--find-links "$WHEELS"} -e . monai python-hostlist
fi
step env "$PY" -m lungbench env --peak --device "$DEV" --save "$OUT/environment.json"
step bench "$PY" -m lungbench bench --device "${DEVICES[@]}" "${SIZE[@]}" "${EPOCH[@]}" \
    --telemetry-interval 0.2 --out "$RESULTS" --run-id thesis-table
step tuning "$PY" -m lungbench bench --device "$DEV" --retune "${SIZE[@]}" --no-epoch \
    --out "$RESULTS" --run-id tuning
step ablation "$PY" -m lungbench bench --device "$DEV" "${ABLATE[@]}" --out "$RESULTS" \
    --run-id ablation
step ddp "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m lungbench bench \
    --device "$DEV" "${SIZE[@]}" "${EPOCH[@]}" --out "$RESULTS" --run-id ddp-1gpu
step profile "$PY" -m lungbench profile --device "$DEV" --activities "$ACTIVITIES" \
    "${PROFILE[@]}" --out "$RESULTS" --run-id profile
step gpu-tests "$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}"
# The prediction model's error on this GPU (GPU -> GPU and CPU -> GPU), its table written
# beside the bench's: results/predict-validate-gpu.md. Needs CUDA: not in --dry-run.
if [[ $MODE != --dry-run ]]; then
    STEP_TIMEOUT=${PREDICT_TIMEOUT:-900} step predict-gpu "$PY" -m lungbench predict --validate --gpu
    mkdir -p "$RESULTS"
    cp "$OUT/predict-gpu.out" "$RESULTS/predict-validate-gpu.md" 2>/dev/null || true
fi

failed=$(grep -c '^FAILED' "$OUT/steps.log" || true)
echo "done: $failed step(s) failed; everything is in $OUT" | tee -a "$OUT/steps.log"
