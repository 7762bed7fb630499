#!/usr/bin/env bash
# Cache every layer's tokens of the frozen Shapes towers (the dense stage's checkpoint-best) for the M2KR-style
# queries and passages of each split, once; later steps and every ablation read them. Skipped when up to date,
# rebuilt when the towers, their preprocessing or the corpus change. Pretrained towers are not cached (they run live).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

ENCODER="$RUN_DIR/dense/checkpoint-best"
SPLITS=train,val,test
MAX_CACHE_GB=20  # refuse a larger cache before any work (float16, every layer of every image and text)

"$PYTHON" -m retriever.ret.cache --encoder "$ENCODER" \
  --queries_file "$DATA_DIR/m2kr/shapes_{split}.jsonl" --passages_file "$DATA_DIR/m2kr/shapes_passages_{split}.jsonl" \
  --image_root "$DATA_DIR" --splits "$SPLITS" --max_cache_gb "$MAX_CACHE_GB" --output_dir "$RUN_DIR/ret/cache" "$@"
