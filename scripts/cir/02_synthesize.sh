#!/usr/bin/env bash
# MTST triplets: mine image pairs within the training sets (annotated pairs excluded), write their modification texts
# with the generator, filter; plus the reverse texts of the annotated triplets. -> $RUN_DIR/cir/synthetic/
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

MAX_PAIRS=$(fast_or 192 6000)
MAX_NEW_TOKENS=$(fast_or 24 32)

"$PYTHON" -m cir.synthesize --config configs/cir/shapes_synthesize.yaml \
  --cirr_root "$DATA_DIR/cirr" --generator "$RUN_DIR/cir/mtst/checkpoint-best" \
  --output_dir "$RUN_DIR/cir/synthetic" --max_pairs "$MAX_PAIRS" --max_new_tokens "$MAX_NEW_TOKENS" --seed "$SEED" "$@"
