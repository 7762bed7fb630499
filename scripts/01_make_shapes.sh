#!/usr/bin/env bash
# Render the Shapes world (images, captions and every task's files) into $DATA_DIR. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

N_TRAIN=$(fast_or 400 5000)
N_VAL=$(fast_or 60 500)
N_TEST=$(fast_or 120 1000)
IMAGE_SIZE=64

"$PYTHON" -m tools.make_shapes --out_dir "$DATA_DIR" --seed "$SEED" \
  --n_train "$N_TRAIN" --n_val "$N_VAL" --n_test "$N_TEST" --image_size "$IMAGE_SIZE" "$@"
