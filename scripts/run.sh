#!/usr/bin/env bash
# The main job on the built-in model: set up, then `slimlm pipeline configs/pipeline/quickstart.yaml`:
# five compressed variants of SmolLM2-135M (int8, GPTQ int4, pruned 50%, pruned + distilled, and that in
# int4), each exported and verified, then all compared for accuracy and speed: runs/pipeline/quickstart/
# compare/{report.md,report.json,pareto.png}. Extra arguments go to `slimlm pipeline` (e.g. --overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh serve,train
exec .venv/bin/slimlm pipeline configs/pipeline/quickstart.yaml "$@"
