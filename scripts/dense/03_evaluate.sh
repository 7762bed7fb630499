#!/usr/bin/env bash
# Recall@1/5/10 on the test split, both directions, through the faiss index; adds the row dense/dense.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

INDEX_KIND=flat

"$PYTHON" -m retriever.dense.evaluate --emb_dir "$RUN_DIR/dense/emb" --split test \
  --output_dir "$RUN_DIR/dense/eval" --index_kind "$INDEX_KIND" \
  --summary "$RUN_DIR/results.json" --summary_row dense/dense "$@"
