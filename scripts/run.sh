#!/usr/bin/env bash
# The main job on the built-in model: set up, then evaluate SmolLM2-135M on held-out text.
# (Until `slimlm pipeline` lands, the main job is this evaluation.) Extra arguments go to `slimlm eval`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
exec .venv/bin/slimlm eval smollm2-135m --data builtin:wiki --json out/eval-smollm2-135m.json "$@"
