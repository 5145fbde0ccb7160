#!/usr/bin/env bash
# Create or reuse .venv and install Encore's pinned dependencies.
#
# Why the order: torch comes first (a CPU wheel, or CUDA where nvidia-smi finds a GPU), then FBGEMM to
# match, then everything else from the lock file, and torchrec last with --no-deps, because its metadata
# requires the CUDA `fbgemm-gpu` package even on CPU machines. A stamp file keyed on the lock file's hash
# makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=infra/requirements.lock
STAMP="$VENV/.encore-installed"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FBGEMM="fbgemm-gpu==1.8.0"; FLAVOUR=gpu
else
  FBGEMM="fbgemm-gpu-cpu==1.8.0"; FLAVOUR=cpu
fi
want="$(cat "$LOCK" pyproject.toml infra/install.sh | sha256sum | cut -c1-16)-$FLAVOUR"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/encore" ]; then
  echo "install: $VENV is up to date ($FLAVOUR)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Encore needs Python >= 3.11"'
  echo "install: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
export PIP_PROGRESS_BAR=off

echo "install: torch 2.13.0 + $FBGEMM"
"${PIP[@]}" install -q "torch==2.13.0" "$FBGEMM"
echo "install: pinned dependencies from $LOCK"
"${PIP[@]}" install -q -r "$LOCK"
echo "install: torchrec 1.8.0 (--no-deps: its metadata names the CUDA fbgemm-gpu)"
"${PIP[@]}" install -q --no-deps "torchrec==1.8.0"
echo "install: encore (editable)"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import torch, torchrec, fbgemm_gpu, dagster, feast, mlflow, kafka; print('install: ok, torch', torch.__version__, 'torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '1.8.0')"
echo "$want" > "$STAMP"
