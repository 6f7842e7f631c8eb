#!/usr/bin/env bash
# For a CUDA machine (issue 11): calibrate -> prune (wanda and sparsegpt, 2:4) -> eval on the built-in
# SmolLM2 in bfloat16 on CUDA; the perplexities checked against the same pipeline in float32 on the CPU;
# peak device memory (torch.cuda.max_memory_allocated) against `stade plan`; block 0's 2:4 linear layers
# timed dense against torch.sparse.to_sparse_semi_structured at 1, 16 and 2048 tokens.
# Well under 10 minutes on one GPU. Results go to $OUT (or bench/results/gpu).
#
#   bash bench/gpu.sh             # on a CUDA machine
#   bash bench/gpu.sh --dry-run   # the same steps on the CPU, tiny shapes: checks the script, measures nothing
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RESULTS=${OUT:-bench/results/gpu}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

DEV=cuda DT=bfloat16 NS=32 SL=512 WIN=40
if [[ "${1:-}" == "--dry-run" ]]; then
  DEV=cpu DT=float32 NS=2 SL=64 WIN=2
elif ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench/gpu.sh needs a CUDA GPU (use --dry-run to check the script on the CPU)" >&2
  exit 2
fi
MODEL=smollm2-135m
CAL=(--data sample-wiki --nsamples "$NS" --seqlen "$SL")
EVAL=(--ppl sample-news --tasks none --seqlen "$SL" --max-windows "$WIN" --force)
stade() { $PY -c "from stade_cli.cli import main; main()" "$@"; }
helper() { $PY bench/gpu.py "$@"; }

# 1. The plan, then the CUDA bfloat16 pipeline with each command's peak device memory.
stade plan "$MODEL" "${CAL[@]}" --hessian --method sparsegpt --pattern 2:4 --device "$DEV" --dtype "$DT" \
  --json >"$RESULTS/plan.json"
helper peak "$RESULTS/peak-calibrate.json" -- calibrate "$MODEL" "${CAL[@]}" --hessian --device "$DEV" \
  --dtype "$DT" --out "$WORK/stats-$DEV"
helper peak "$RESULTS/peak-eval-dense.json" -- eval "$MODEL" "${EVAL[@]}" --device "$DEV" --dtype "$DT" \
  --out "$RESULTS/eval-dense-cuda.json"
for m in wanda sparsegpt; do
  helper peak "$RESULTS/peak-prune-$m.json" -- prune "$MODEL" --stats "$WORK/stats-$DEV" --method "$m" \
    --pattern 2:4 --device "$DEV" --out "$WORK/$m-$DEV"
  helper peak "$RESULTS/peak-eval-$m.json" -- eval "$WORK/$m-$DEV" "${EVAL[@]}" --device "$DEV" --dtype "$DT" \
    --out "$RESULTS/eval-$m-cuda.json"
done

# 2. The CPU float32 reference: the same pipeline, same windows.
stade calibrate "$MODEL" "${CAL[@]}" --hessian --device cpu --dtype float32 --out "$WORK/stats-cpu"
stade eval "$MODEL" "${EVAL[@]}" --device cpu --dtype float32 --out "$RESULTS/eval-dense-cpu.json"
for m in wanda sparsegpt; do
  stade prune "$MODEL" --stats "$WORK/stats-cpu" --method "$m" --pattern 2:4 --device cpu --out "$WORK/$m-cpu"
  stade eval "$WORK/$m-cpu" "${EVAL[@]}" --device cpu --dtype float32 --out "$RESULTS/eval-$m-cpu.json"
done

# 3. 2:4 speed: dense against semi-structured sparse kernels, then the summary (exit 1 if a check fails).
helper speed "$WORK/wanda-$DEV" "$RESULTS/speed.json"
helper report "$RESULTS"
