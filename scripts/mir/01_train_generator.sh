#!/usr/bin/env bash
# The Shapes text-to-image generator (diffusers UNet2DConditionModel + DDPM/DDIM) on the training split, conditioned on
# the caption's layout (a caption -> layout encoder trained first) and the dense text tower; then generated-image ->
# real-image R@K and the object check on the test split. Resumes from checkpoint-last;
# skips when checkpoint-best already holds STEPS steps. -> $RUN_DIR/mir/generator/
# Multi-process: NPROC=2 bash scripts/mir/01_train_generator.sh (torchrun, DDP; BATCH_SIZE is the global batch,
# split over the processes, so it must be a multiple of NPROC).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

STEPS=$(fast_or 20 2000)  # quality first: objects drawn right 60 % after 1000 steps, 81 % after 2000 (docs/mir.md)
BATCH_SIZE=32
LR=2e-3  # the training prints a warning naming the step if the loss diverges (docs/mir.md)
EVAL_IMAGES=$(fast_or 40 300)
SAMPLE_STEPS=$(fast_or 8 10)

launch mir.train_generator --config configs/mir/generator_shapes.yaml \
  --data_json "$DATA_DIR/dataset_shapes.json" --image_root "$DATA_DIR/images" \
  --dense_checkpoint "$RUN_DIR/dense/checkpoint-best" --output_dir "$RUN_DIR/mir/generator" \
  --steps "$STEPS" --batch_size "$BATCH_SIZE" --lr "$LR" --eval_images "$EVAL_IMAGES" --sample_steps "$SAMPLE_STEPS" \
  --seed "$SEED" --summary "$RUN_DIR/results.json" "$@"

# The scene reader the pixel-reading user sees with (cached: the iterative CIR stage trains the same one).
"$PYTHON" -m core.shapes.scene_reader --data_json "$DATA_DIR/dataset_shapes.json" \
  --out "$RUN_DIR/scene_reader/scene_reader.pt" --seed "$SEED"
