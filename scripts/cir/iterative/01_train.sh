#!/usr/bin/env bash
# Iterative CIR rounds 1..NUM_ITERATIONS from the CIR stage's best retriever (round 0), with its MTST generator as
# the foundation model -> $RUN_DIR/cir-iterative/. Rerunning continues a killed run (--auto_resume: every round
# whose manifest matches is reused). Multi-process: NPROC=2 bash scripts/cir/iterative/01_train.sh (torchrun, DDP: each
# global batch is split over the processes, mining/generation/validation are sharded; the batch size must divide).
set -euo pipefail
cd "$(dirname "$0")/../../.."
source scripts/common.sh

NUM_ITERATIONS=3
HARD_NEGATIVE_K=5
EPOCHS_PER_ROUND=$(fast_or 1 3)
MAX_AUGMENT_PER_ROUND=$(fast_or 32 256)   # 0 = every mined pair
LEARNING_RATE=1e-4
WANDB=$(fast_or false true)             # wandb (offline) start-up is a sizeable share of a FAST run
BEST_MODEL_FILE="$RUN_DIR/cir/best_model.txt"   # written by the CIR stage (scripts/cir/run.sh): its pretrain+ptha model
[ -f "$BEST_MODEL_FILE" ] || { echo "missing $BEST_MODEL_FILE: run scripts/cir/run.sh first" >&2; exit 1; }
MODEL_PATH="$(cat "$BEST_MODEL_FILE")"
FOUNDATION_MODEL_PATH="$RUN_DIR/cir/mtst/checkpoint-best"

launch cir.iterative.train_iterative --config configs/cir_iterative/shapes.yaml \
  --data_dir "$DATA_DIR/cirr" --model_path "$MODEL_PATH" \
  --foundation_model_backbone mtst --foundation_model_path "$FOUNDATION_MODEL_PATH" \
  --experiment_dir "$RUN_DIR/cir-iterative" --num_iterations "$NUM_ITERATIONS" --hard_negative_k "$HARD_NEGATIVE_K" \
  --epochs_per_round "$EPOCHS_PER_ROUND" --max_augment_per_round "$MAX_AUGMENT_PER_ROUND" \
  --learning_rate "$LEARNING_RATE" --wandb "$WANDB" --seed "$SEED" --auto_resume true "$@"
