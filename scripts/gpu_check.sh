#!/usr/bin/env bash
# The GPU checks, in one run of at most about 8 minutes, with every figure under one folder.
#
#   scripts/gpu_check.sh [OUT]          # OUT defaults to $OUT (the device tool's) or runs/gpu-check
#
# Steps (each under its own time limit; a failed step is recorded and the next one runs):
#   install    a virtual environment with upstream vLLM (it brings CUDA torch) and eetb, when the
#              package index serves them; an interpreter that already has CUDA torch is used as is
#   gpu-tests  the `gpu`-marked tests (native engine on CUDA against the CPU)
#   model      the reference model (eetb model prepare), else the built-in model, said so
#   throughput native full depth against transformers.generate (and vLLM when installed)
#   early-exit the native early-exit bench: speedup, ideal, layers, ROUGE-L
#   vllm       vLLM early exit against vLLM full depth, and vLLM against native
#   oracle     one oracle capture
#   validate   a short validation (calibration, oracle, simulate, measure)
# OUT/summary.md holds each step's status and its headline lines; OUT/<step>.log the whole output.
#
# Knobs (the CPU test of this script uses them): GPU_CHECK_DEVICE (cuda), GPU_CHECK_MODEL
# (smollm2-135m), GPU_CHECK_REQUESTS (64), GPU_CHECK_SKIP_INSTALL (unset), PYTHON (python3).
set -u -o pipefail

OUT_DIR=${1:-${OUT:-runs/gpu-check}}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
MODEL=${GPU_CHECK_MODEL:-smollm2-135m}
N=${GPU_CHECK_REQUESTS:-64}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.md"
export EETB_CACHE_DIR=${EETB_CACHE_DIR:-$PWD/.cache/eetb}
export VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
START_S=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS CMD...: run CMD under a time limit, log it, keep its headline lines
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s) rc
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  note ""
  note "### $name: rc $rc in $(( $(date +%s) - t0 )) s (limit $limit s)"
  # the lines a bench or a validation ends with: ratios, tables, the report's verdict
  grep -E 'x$|%$|x throughput|tok/s|largest|Kendall|wrote|error:|passed|failed|skipped|clipped' \
    "$OUT_DIR/$name.log" | grep -v '^INFO\|WARNING' | tail -25 | sed 's/^/    /' >>"$SUMMARY"
  return $rc
}

: >"$SUMMARY"
note "# eetb GPU check ($(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
note ""
note "device $DEVICE, model $MODEL, $N requests per bench"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
  || echo "no nvidia-smi"; } | sed 's/^/    /' >>"$SUMMARY"

if [ -z "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    step install 300 bash -c "'$PY' -m venv .venv-gpu \
      && .venv-gpu/bin/python -m pip install -q 'vllm==0.32.0' \
      && .venv-gpu/bin/python -m pip install -q -e '.[dev]'"
    PY=.venv-gpu/bin/python
  else
    step install 240 "$PY" -m pip install -q -e '.[dev]'
  fi
fi
EETB=("$PY" -m testbed.cli)
HAS_VLLM=$("$PY" -c 'import importlib.util as u; print(int(u.find_spec("vllm") is not None))' 2>/dev/null || echo 0)
note "python $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1)"

step gpu-tests 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_device.py

if [ "$MODEL" != builtin ] && ! step model 90 "${EETB[@]}" model prepare "$MODEL"; then
  note "    (the reference model could not be prepared here: the built-in model stands in)"
  MODEL=builtin
fi
FIRST_EXIT=$([ "$MODEL" = builtin ] && echo 4 || echo 15)
# CNN/DM prompts when the data directory is here (ROUGE-L needs its references), else random ids
DATASET=synthetic
if [ -n "${EETB_DATA_DIR:-}" ] && [ -d "$EETB_DATA_DIR/helm_cnndm_xsum_0shot" ]; then DATASET=cnndm; fi
note "prompts: $DATASET"
DEV=(--device "$DEVICE")

step throughput 120 "${EETB[@]}" bench --suite throughput --model "$MODEL" "${DEV[@]}" \
  --num-requests "$N" --max-new-tokens 64 --out "$OUT_DIR/throughput"
if [ "$DATASET" = cnndm ]; then
  step early-exit 150 "${EETB[@]}" bench --suite early-exit --model "$MODEL" "${DEV[@]}" \
    --num-requests $(( N < 32 ? N : 32 )) --batchings consensus,shrink \
    --points "classifier:0.9:$FIRST_EXIT,hidden:0.98:$FIRST_EXIT" --out "$OUT_DIR/early-exit"
else
  note ""
  note "### early-exit: skipped (its ROUGE-L needs CNN/DM: set EETB_DATA_DIR)"
fi
if [ "$HAS_VLLM" = 1 ]; then
  step vllm 150 "${EETB[@]}" bench --suite vllm --model "$MODEL" "${DEV[@]}" \
    --num-requests "$N" --rule classifier --threshold 0.9 --min-exit-layer "$FIRST_EXIT" \
    --out "$OUT_DIR/vllm"
else
  note ""
  note "### vllm: skipped (vLLM is not installed in this interpreter)"
fi
WORKLOAD="poisson:rate=32,n=$N,prompt=64-256,output=48"
step oracle 90 "${EETB[@]}" capture --model "$MODEL" "${DEV[@]}" --mode oracle \
  --workload "$WORKLOAD" --dataset "$DATASET" --out "$OUT_DIR/oracle"
step validate 150 "${EETB[@]}" validate --model "$MODEL" "${DEV[@]}" --workload "$WORKLOAD" \
  --calibrate "$WORKLOAD" --trace "$OUT_DIR/oracle" --batching shrink --rule classifier \
  --threshold 0.9 --min-exit-layer "$FIRST_EXIT" --dataset "$DATASET" --out "$OUT_DIR/validate"

note ""
note "total $(( $(date +%s) - START_S )) s"
