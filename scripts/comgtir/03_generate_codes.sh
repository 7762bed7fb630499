#!/usr/bin/env bash
# Every image's sequential identifier (made unique by a suffix) and set identifier → codes.json; the tokenizer
# report (reconstruction, usage per level, collision rate before/after) → results.json row comgtir/rqvae.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

"$PYTHON" -m rqvae.generate_codes --checkpoint "$RUN_DIR/comgtir/rqvae/checkpoint-best" \
  --emb_dir "$RUN_DIR/dense/emb" --splits train,val,test --output "$RUN_DIR/comgtir/codes.json" \
  --summary "$RUN_DIR/results.json" --summary_row comgtir/rqvae --seed "$SEED" "$@"
