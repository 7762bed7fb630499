#!/usr/bin/env bash
# Retriever training data: (query, image id, identifier) JSONL from training captions + pseudo queries.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh

PSEUDO_SPLITS=train,val,test  # pseudo queries index every gallery image (never a caption of val/test)
PSEUDO_FILE=$([ "$PSEUDO_QUERIES" = "1" ] && echo "$COMGTIR_DIR/pseudo_queries.jsonl" || echo "")  # "" = captions only

"$PYTHON" -m retriever.generative.prepare_dataset --config "$COMGTIR_CONFIGS/prepare_dataset.yaml" \
  --data_json "$DATA_JSON" --image_root "$IMAGE_ROOT" --codes "$COMGTIR_DIR/codes.json" \
  --pseudo_queries "$PSEUDO_FILE" --pseudo_splits "$PSEUDO_SPLITS" \
  --output_dir "$COMGTIR_DIR/data" "$@"
