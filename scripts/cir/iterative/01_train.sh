#!/usr/bin/env bash
# Iterative CIR rounds 1..NUM_ITERATIONS from the CIR stage's best retriever (round 0). The foundation model that
# writes the new modification texts is FOUNDATION (environment): scene_reader (default: reads the reference and the
# hard negative with the scene reader and says what differs -> $RUN_DIR/cir-iterative/) or mtst (the CIR stage's
# MTST generator -> $RUN_DIR/cir-iterative-mtst/). Rerunning continues a killed run (--auto_resume: every round
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
FOUNDATION="${FOUNDATION:-scene_reader}"
case "$FOUNDATION" in
  scene_reader)
    FOUNDATION_MODEL_PATH="$RUN_DIR/scene_reader/scene_reader.pt"   # trained on the world's training images only
    EXPERIMENT_DIR="$RUN_DIR/cir-iterative"
    "$PYTHON" -m core.shapes.scene_reader --data_json "$DATA_DIR/dataset_shapes.json" --out "$FOUNDATION_MODEL_PATH" \
      --seed "$SEED" ;;
  mtst)
    FOUNDATION_MODEL_PATH="$RUN_DIR/cir/mtst/checkpoint-best"
    EXPERIMENT_DIR="$RUN_DIR/cir-iterative-mtst" ;;
  *) echo "FOUNDATION must be scene_reader or mtst, got '$FOUNDATION'" >&2; exit 1 ;;
esac

launch cir.iterative.train_iterative --config configs/cir_iterative/shapes.yaml \
  --data_dir "$DATA_DIR/cirr" --model_path "$MODEL_PATH" \
  --foundation_model_backbone "$FOUNDATION" --foundation_model_path "$FOUNDATION_MODEL_PATH" \
  --experiment_dir "$EXPERIMENT_DIR" --num_iterations "$NUM_ITERATIONS" --hard_negative_k "$HARD_NEGATIVE_K" \
  --epochs_per_round "$EPOCHS_PER_ROUND" --max_augment_per_round "$MAX_AUGMENT_PER_ROUND" \
  --learning_rate "$LEARNING_RATE" --wandb "$WANDB" --seed "$SEED" --auto_resume true "$@"
