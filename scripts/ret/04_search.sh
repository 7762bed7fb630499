#!/usr/bin/env bash
# Search the test queries through the index: faiss candidates per query token, exact MaxSim re-scoring.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

K=100
PER_TOKEN=64

"$PYTHON" -m retriever.ret.search --checkpoint "$RUN_DIR/ret/ret/checkpoint-best" --index_dir "$RUN_DIR/ret/index" \
  --queries_file "$DATA_DIR/m2kr/shapes_{split}.jsonl" --image_root "$DATA_DIR" --split test \
  --cache_dir "$RUN_DIR/ret/cache" --k "$K" --per_token "$PER_TOKEN" \
  --output_file "$RUN_DIR/ret/search/rankings_test.jsonl" "$@"
