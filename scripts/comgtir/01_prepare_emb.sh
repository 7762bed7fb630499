#!/usr/bin/env bash
# prepare_emb: image and caption embeddings (EMB_DIR) of every split. Shapes: the dense stage's trained model, which
# already writes them to $RUN_DIR/dense/emb (encoded again only if missing). Real data: CLIP as released (the
# dataset's encoder.yaml, or the folder COMGTIR_CLIP), through the dense stage's encoder; kept when current.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh

if is_shapes && [ -f "$EMB_DIR/image_test.npy" ] && [ -f "$EMB_DIR/text_train_ids.json" ]; then
  echo "prepare_emb: using $EMB_DIR"
  exit 0
fi
if ! is_shapes && [ -z "${COMGTIR_CLIP:-}" ]; then
  "$PYTHON" -m retriever.generative.named_encoder --config "$COMGTIR_CONFIGS/encoder.yaml" --output_dir "$ENCODER"
fi
launch retriever.dense.encode --config "$COMGTIR_CONFIGS/prepare_emb.yaml" --checkpoint "$ENCODER" \
  --data_json "$DATA_JSON" --image_root "$IMAGE_ROOT" \
  --output_dir "$EMB_DIR" --splits train,val,test "$@"
