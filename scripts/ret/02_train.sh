#!/usr/bin/env bash
# Train ReT and its ablations (text-only, image-only, single-layer) on the cached tower tokens.
# Resumes each variant from its checkpoint-last; a finished variant is skipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

VARIANTS=ret,text-only,image-only,single-layer
EPOCHS=100  # the step budget below decides: the whole stage must fit in 3 minutes on 2 CPU cores
MAX_STEPS=$(fast_or 20 100)
BATCH_SIZE=64
LR=1e-3

launch retriever.ret.train --config configs/ret/shapes.yaml --encoder "$RUN_DIR/dense/checkpoint-best" \
  --queries_file "$DATA_DIR/m2kr/shapes_{split}.jsonl" --passages_file "$DATA_DIR/m2kr/shapes_passages_{split}.jsonl" \
  --image_root "$DATA_DIR" --cache_dir "$RUN_DIR/ret/cache" --output_dir "$RUN_DIR/ret" \
  --variants "$VARIANTS" --epochs "$EPOCHS" --max_steps "$MAX_STEPS" --batch_size "$BATCH_SIZE" --lr "$LR" \
  --seed "$SEED" "$@"
