#!/usr/bin/env bash
# Create the project virtualenv: torch first (CPU wheel where no CUDA GPU is present), then
# requirements.txt with that torch held fixed, so pip never swaps in a multi-GB CUDA build.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip wheel setuptools

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[bootstrap] CUDA GPU found: installing the default (CUDA) torch build"
        $PIP install torch
    else
        echo "[bootstrap] no CUDA GPU: installing the CPU wheel torch==$TORCH_CPU_VERSION"
        $PIP install "torch==$TORCH_CPU_VERSION"
    fi
fi
held=$(mktemp)
trap 'rm -f "$held"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$held"
echo "[bootstrap] installing requirements.txt with $(cat "$held") held"
$PIP install -q -r requirements.txt -c "$held"
# moe_ds itself, editable, so every process the launchers start imports this checkout (no path hacks).
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -f "$site/moe_ds_repo.pth"  # left by older versions of this script
$PIP install -q --no-deps --no-build-isolation -e .
touch "$VENV/.installed"
echo "[bootstrap] done: $VENV"
