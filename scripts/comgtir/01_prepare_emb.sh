#!/usr/bin/env bash
# prepare_emb: image and caption embeddings from the dense retriever. The dense stage already writes them to
# $RUN_DIR/dense/emb; this step only encodes again if they are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

EMB_DIR="$RUN_DIR/dense/emb"

if [ -f "$EMB_DIR/image_test.npy" ] && [ -f "$EMB_DIR/text_train_ids.json" ]; then
  echo "prepare_emb: using $EMB_DIR"
  exit 0
fi
launch retriever.dense.encode --checkpoint "$RUN_DIR/dense/checkpoint-best" \
  --data_json "$DATA_DIR/dataset_shapes.json" --image_root "$DATA_DIR/images" \
  --output_dir "$EMB_DIR" --splits train,val,test "$@"
