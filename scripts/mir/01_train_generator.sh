#!/usr/bin/env bash
# The Shapes text-to-image generator (diffusers UNet2DConditionModel + DDPM/DDIM) on the training split, conditioned on
# the dense text tower; then generated-image -> real-image R@K on the test split. Resumes from checkpoint-last;
# skips when checkpoint-best already holds STEPS steps. -> $RUN_DIR/mir/generator/
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

STEPS=$(fast_or 20 1000)  # quality first: see docs/mir.md for quality against steps and learning rate
BATCH_SIZE=32
LR=2e-3  # at 1000 steps: gen->real R@10 39.3 (2e-3), 39.0 (3e-3), 31.0 (1e-3; 40.7 only after 1500 steps).
         # 2e-3 diverges near step 1600: for longer runs use 1e-3 (docs/mir.md)
EVAL_IMAGES=$(fast_or 40 300)
SAMPLE_STEPS=$(fast_or 8 10)

"$PYTHON" -m mir.train_generator --config configs/mir/generator_shapes.yaml \
  --data_json "$DATA_DIR/dataset_shapes.json" --image_root "$DATA_DIR/images" \
  --dense_checkpoint "$RUN_DIR/dense/checkpoint-best" --output_dir "$RUN_DIR/mir/generator" \
  --steps "$STEPS" --batch_size "$BATCH_SIZE" --lr "$LR" --eval_images "$EVAL_IMAGES" --sample_steps "$SAMPLE_STEPS" \
  --seed "$SEED" --summary "$RUN_DIR/results.json" "$@"
