#!/usr/bin/env bash
# Every image's sequential identifier (made unique by a suffix) and set identifier → codes.json; the tokenizer
# report (reconstruction, usage per level, collision rate before/after) → results.json row comgtir/rqvae.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh

"$PYTHON" -m rqvae.generate_codes --config "$COMGTIR_CONFIGS/generate_codes.yaml" \
  --checkpoint "$COMGTIR_DIR/rqvae/checkpoint-best" \
  --emb_dir "$EMB_DIR" --splits train,val,test --output "$COMGTIR_DIR/codes.json" \
  --summary "$RUN_DIR/results.json" --summary_row "comgtir/rqvae$ROW_SUFFIX" "$@"
