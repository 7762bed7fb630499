#!/usr/bin/env bash
# MTST generator: the tiny LM learns the world's language from text, then the Q-Former learns to write the
# modification text of (reference, target) from the annotated triplets. -> $RUN_DIR/cir/mtst/checkpoint-best/
# Multi-process: NPROC=2 bash scripts/cir/01_train_mtst.sh (torchrun, DDP; the global batch is split over the processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

LM_STEPS=$(fast_or 15 300)
STEPS=$(fast_or 40 600)
BATCH_SIZE=32
LR=1e-3
EVAL_EVERY=$(fast_or 40 150)
MAX_NEW_TOKENS=$(fast_or 24 32)
TEST_PAIRS=$(fast_or 100 500)

launch cir.train_mtst --config configs/cir/shapes_mtst.yaml \
  --cirr_root "$DATA_DIR/cirr" --data_json "$DATA_DIR/dataset_shapes.json" \
  --dense_checkpoint "$RUN_DIR/dense/checkpoint-best" --output_dir "$RUN_DIR/cir/mtst" \
  --lm_steps "$LM_STEPS" --steps "$STEPS" --batch_size "$BATCH_SIZE" --lr "$LR" --eval_every "$EVAL_EVERY" \
  --max_new_tokens "$MAX_NEW_TOKENS" --test_pairs "$TEST_PAIRS" \
  --seed "$SEED" "$@"
