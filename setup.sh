#!/usr/bin/env bash
# Set up the project on a fresh machine: a virtualenv in .venv with the pinned torch pair and the package
# (editable, with test tools and one faiss build), every install bounded by constraints.txt. Safe to rerun.
#
#   bash setup.sh                                                         # faiss-gpu if nvidia-smi lists a GPU, else faiss-cpu
#   FAISS=cpu bash setup.sh                                               # force one faiss build (cpu | gpu)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 bash setup.sh  # torch for another CUDA (cu126, cu128, cu130, ...)
#
# Unset TORCH_INDEX_URL means the default pip index (on Linux its torch wheel is a CUDA 13 build that also runs
# on CPU-only machines).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON_BIN:-python3}"
TORCH_PAIR=("torch==2.14.1" "torchvision==0.29.1")
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
FAISS="${FAISS:-}"
CONSTRAINTS=constraints.txt

pip_install() {
  # The machine's pip config names find-links folders that may not exist; drop those warnings but keep pip's
  # exit status (the braces make grep always succeed, pipefail passes pip's failure on to set -e).
  .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

if [ -z "$FAISS" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then FAISS=gpu; else FAISS=cpu; fi
fi
case "$FAISS" in
  cpu) WANT_FAISS=faiss-cpu; OTHER_FAISS=faiss-gpu-cu12 ;;
  gpu) WANT_FAISS=faiss-gpu-cu12; OTHER_FAISS=faiss-cpu ;;
  *) echo "setup.sh: FAISS must be 'cpu' or 'gpu', got '$FAISS'" >&2; exit 2 ;;
esac

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install --upgrade pip

# torch and torchvision first, pinned as a pair, so nothing else pulls another torch build.
if [ -n "$TORCH_INDEX_URL" ]; then
  # An installed build of the same version (say 2.14.1+cu130) satisfies `torch==2.14.1`, so pip would keep it;
  # when its local tag is not the index's (the URL's last part, e.g. cu126), remove the pair first.
  want_tag="${TORCH_INDEX_URL%/}"; want_tag="${want_tag##*/}"
  have=$(.venv/bin/python -c "import torch; print(torch.__version__)" 2>/dev/null || true)
  if [ -n "$have" ] && [[ "$have" != *"+$want_tag" ]]; then
    echo "setup.sh: replacing torch $have with the build from $TORCH_INDEX_URL"
    .venv/bin/python -m pip uninstall -y -q torch torchvision
  fi
  pip_install --index-url "$TORCH_INDEX_URL" "${TORCH_PAIR[@]}"
else
  pip_install "${TORCH_PAIR[@]}"
fi

# Both faiss wheels install the module `faiss`; the one not wanted is removed so the wanted one is what imports.
if .venv/bin/python -m pip show -q "$OTHER_FAISS" >/dev/null 2>&1; then
  .venv/bin/python -m pip uninstall -y -q "$OTHER_FAISS"
  # that uninstall also deleted the files of faiss/ the wanted wheel shares with it: put them back
  if .venv/bin/python -m pip show -q "$WANT_FAISS" >/dev/null 2>&1; then
    pip_install -c "$CONSTRAINTS" --force-reinstall --no-deps "$WANT_FAISS"
  fi
fi
pip_install -c "$CONSTRAINTS" -e ".[${FAISS},test]"
.venv/bin/python -c "import torch, torchvision, open_clip, faiss, transformers, diffusers, peft; print(f'environment ready: torch {torch.__version__} | faiss {faiss.__version__} ($FAISS build, {faiss.get_num_gpus()} GPUs seen)')"
