#!/usr/bin/env bash
# Recall@1/5/10 of ReT and its ablations on the test queries (exhaustive MaxSim), and the index's top-10
# agreement with exhaustive MaxSim; writes the rows ret/{ret,text-only,image-only,single-layer,index}.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

VARIANTS=ret,text-only,image-only,single-layer

"$PYTHON" -m retriever.ret.evaluate --run_dir "$RUN_DIR/ret" --variants "$VARIANTS" \
  --queries_file "$DATA_DIR/m2kr/shapes_{split}.jsonl" --passages_file "$DATA_DIR/m2kr/shapes_passages_{split}.jsonl" \
  --image_root "$DATA_DIR" --split test --cache_dir "$RUN_DIR/ret/cache" \
  --index_dir "$RUN_DIR/ret/index" --rankings_file "$RUN_DIR/ret/search/rankings_test.jsonl" \
  --output_dir "$RUN_DIR/ret/eval" --summary "$RUN_DIR/results.json" "$@"
