#!/usr/bin/env bash
# Set up (with the dev extra), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,serve,train
exec .venv/bin/python -m pytest -q "$@"
