#!/usr/bin/env bash
# The whole pipeline, offline, on the built-in SmolLM2-135M and the built-in English text:
# calibrate once on Wikipedia text, prune five methods x two patterns in one sweep, evaluate the dense
# and pruned models on held-out news (never the calibration text), and compare.
set -euo pipefail
OUT=${DEMO_OUT:-demo-out}
STADE=${STADE:-.venv/bin/stade}
WINDOWS=${DEMO_WINDOWS:-32}   # held-out perplexity windows of 512 tokens (147 exist; 32 keep the demo short)
ITEMS=${DEMO_ITEMS:-150}      # cloze items per model (4 endings each)
start=$(date +%s)
mkdir -p "$OUT/results"

echo "== 1/4 calibrate: SmolLM2-135M on 32 x 512 tokens of Wikipedia text"
$STADE calibrate smollm2-135m --data sample-wiki --nsamples 32 --seqlen 512 --hessian --out "$OUT/stats" --force >/dev/null

echo "== 2/4 prune: magnitude, wanda, stade, stadew, sparsegpt at 50% unstructured and 2:4 (one sweep)"
$STADE prune smollm2-135m --stats "$OUT/stats" --method magnitude,wanda,stade,stadew,sparsegpt \
  --pattern unstructured,2:4 --sparsity 0.5 --out "$OUT/pruned" --force

echo "== 3/4 eval: held-out news perplexity ($WINDOWS x 512) and the offline cloze task ($ITEMS items), 11 models"
$STADE eval smollm2-135m "$OUT"/pruned/*/ --ppl sample-news --seqlen 512 --max-windows "$WINDOWS" \
  --tasks stade_cloze --limit "$ITEMS" --out "$OUT/results" --force >/dev/null

echo "== 4/4 compare"
$STADE compare "$OUT/results" --sort ppl:sample-news
$STADE compare "$OUT/results" --sort ppl:sample-news --markdown > "$OUT/table.md"
echo "demo finished in $(( $(date +%s) - start )) s; results in $OUT/ (markdown table: $OUT/table.md)"
