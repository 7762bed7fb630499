#!/usr/bin/env bash
# The seed's one-command entry: train every round, then evaluate every round. Options go to the training, e.g.
#   bash scripts/cir/iterative/run_iterative_training.sh --fast_mode
#   bash scripts/cir/iterative/run_iterative_training.sh --num_iterations 5 --hard_negative_k 10
#   bash scripts/cir/iterative/run_iterative_training.sh --resume_from_iteration 2
# Real data: python -m cir.iterative.train_iterative --config configs/cir_iterative/cirr.yaml (see docs/cir_iterative.md).
set -euo pipefail
cd "$(dirname "$0")/../../.."
bash scripts/cir/iterative/01_train.sh "$@"
bash scripts/cir/iterative/02_evaluate.sh
