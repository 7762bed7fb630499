#!/usr/bin/env bash
# Hybrid retrieval: re-rank the dual-id top-k with the ITM cross-encoder → row dual-id+itm-rerank
# (real data: --blip_model Salesforce/blip-itm-base-coco).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

DEPTH=20  # the same candidates as the dense re-ranking

"$PYTHON" -m retriever.generative.rerank --config configs/comgtir/shapes/rerank.yaml --method itm \
  --candidates "$COMGTIR_DIR/eval/dual-id/candidates.jsonl" --emb_dir "$RUN_DIR/dense/emb" \
  --dense_checkpoint "$RUN_DIR/dense/checkpoint-best" --itm_checkpoint "$COMGTIR_DIR/itm/checkpoint-best" \
  --data_json "$DATA_DIR/dataset_shapes.json" --image_root "$DATA_DIR/images" --depth "$DEPTH" \
  --output_dir "$COMGTIR_DIR/eval/dual-id+itm-rerank" \
  --summary "$RUN_DIR/results.json" --summary_row "comgtir/dual-id+itm-rerank$ROW_SUFFIX" "$@"
