#!/usr/bin/env bash
# prepare_emb: image and caption embeddings of every split from the best dense checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

launch retriever.dense.encode --checkpoint "$RUN_DIR/dense/checkpoint-best" \
  --data_json "$DATA_DIR/dataset_shapes.json" --image_root "$DATA_DIR/images" \
  --output_dir "$RUN_DIR/dense/emb" --splits train,val,test "$@"
