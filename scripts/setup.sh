#!/usr/bin/env bash
# Create .venv if there is none, install torch first (pinned: an unpinned torch pulls a multi-GB CUDA
# build), then slimlm itself, editable, with the extras named in $1 (e.g. "dev" or "dev,serve").
# Re-running is fast: a stamp of pyproject.toml + setup.py + extras skips a satisfied install.
# Override the torch requirement with SLIMLM_TORCH (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
torch_req="${SLIMLM_TORCH:-torch==2.13.0}"
py="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
stamp=".venv/.slimlm-setup"
want="$(cat pyproject.toml setup.py | sha256sum | cut -c1-16) extras=$extras torch=$torch_req"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import slimlm.toolkit" 2>/dev/null; then
  exit 0
fi
# --no-cache-dir: no second copy of every wheel on disk (a CI machine once ran out of space installing)
pip=(.venv/bin/python -m pip --disable-pip-version-check --no-cache-dir -q)
echo "setup: installing $torch_req"
"${pip[@]}" install "$torch_req"
target="."
[ -n "$extras" ] && target=".[$extras]"
echo "setup: installing slimlm ($target, editable)"
"${pip[@]}" install -e "$target" "$torch_req"
echo "$want" > "$stamp"
