#!/usr/bin/env bash
# Stage 4: Recall@1/5/10 on the test split (prepare_emb's queries and gallery) of stage 1 alone, decoding without
# the set identifier (row seq-id). Writes the candidate lists.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh

HP=()  # real data: the dataset's evaluate.yaml
if is_shapes; then HP=(--num_beams 20); fi

"$PYTHON" -m retriever.generative.evaluate --config "$COMGTIR_CONFIGS/evaluate.yaml" \
  --checkpoint "$COMGTIR_DIR/stage1_seqid/checkpoint-best" --guidance 0 \
  --codes "$COMGTIR_DIR/codes.json" --emb_dir "$EMB_DIR" "${HP[@]}" \
  --output_dir "$COMGTIR_DIR/eval/seq-id" --summary "$RUN_DIR/results.json" --summary_row "comgtir/seq-id$ROW_SUFFIX" "$@"
