#!/usr/bin/env bash
# MIR loop, mode text-only: records per (target, round) in $RUN_DIR/mir/text-only/records.jsonl; resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

N_TARGETS=$(fast_or 16 200)
ROUNDS=$(fast_or 3 10)
GEN_STEPS=$(fast_or 8 20)

"$PYTHON" -m mir.text_only --config configs/mir/shapes.yaml \
  --dialogues_json "$DATA_DIR/chatir/dialogues_test.json" --search_space_json "$DATA_DIR/chatir/search_space_test.json" \
  --image_root "$DATA_DIR" --dense_checkpoint "$RUN_DIR/dense/checkpoint-best" \
  --generator "$RUN_DIR/mir/generator/checkpoint-best" --user "$RUN_DIR/cir/mtst/checkpoint-best" \
  --output_dir "$RUN_DIR/mir" --n_targets "$N_TARGETS" --rounds "$ROUNDS" --gen_steps "$GEN_STEPS" --seed "$SEED" "$@"
