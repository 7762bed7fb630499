#!/usr/bin/env bash
# Hybrid retrieval: re-rank the dual-id top-k with an ITM cross-encoder → row dual-id+itm-rerank. Shapes: the
# head of 13_train_itm.sh; real data: the BLIP ITM of the dataset's rerank.yaml (or the model COMGTIR_ITM).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh

if is_shapes; then
  SCORER=(--itm_checkpoint "$COMGTIR_DIR/itm/checkpoint-best")
  HP=(--depth 20)  # the same candidates as the dense re-ranking
else
  SCORER=(); HP=()  # the dataset's rerank.yaml: blip_model and depth
  if [ -n "${COMGTIR_ITM:-}" ]; then SCORER=(--blip_model "$COMGTIR_ITM"); fi
fi

"$PYTHON" -m retriever.generative.rerank --config "$COMGTIR_CONFIGS/rerank.yaml" --method itm \
  --candidates "$COMGTIR_DIR/eval/dual-id/candidates.jsonl" --emb_dir "$EMB_DIR" \
  --dense_checkpoint "$ENCODER" "${SCORER[@]}" \
  --data_json "$DATA_JSON" --image_root "$IMAGE_ROOT" "${HP[@]}" \
  --output_dir "$COMGTIR_DIR/eval/dual-id+itm-rerank" \
  --summary "$RUN_DIR/results.json" --summary_row "comgtir/dual-id+itm-rerank$ROW_SUFFIX" "$@"
