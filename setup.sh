#!/usr/bin/env bash
# Set up the project on a fresh machine: a virtualenv in .venv with the pinned torch pair and the package
# (editable, with test tools). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON_BIN:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch and torchvision first, pinned as a pair, so nothing else pulls another torch build.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchvision, open_clip, faiss, transformers, diffusers; print('environment ready: torch', torch.__version__)"
