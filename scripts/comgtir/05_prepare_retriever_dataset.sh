#!/usr/bin/env bash
# Retriever training data: (query, image id, identifier) JSONL from training captions + pseudo queries.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

PSEUDO_SPLITS=train,val,test  # pseudo queries index every gallery image (never a caption of val/test)

"$PYTHON" -m retriever.generative.prepare_dataset --data_json "$DATA_DIR/dataset_shapes.json" \
  --image_root "$DATA_DIR/images" --codes "$RUN_DIR/comgtir/codes.json" \
  --pseudo_queries "$RUN_DIR/comgtir/pseudo_queries.jsonl" --pseudo_splits "$PSEUDO_SPLITS" \
  --output_dir "$RUN_DIR/comgtir/data" --seed "$SEED" "$@"
