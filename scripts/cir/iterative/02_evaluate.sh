#!/usr/bin/env bash
# CIRR metrics of rounds 0..3 on the Shapes test split, with the statistics of the mining each round trained with
# -> $RUN_DIR/cir-iterative/evaluation_results.json (+ each round's CIRR server files beside it) and rows
# cir-iterative/round0..round3 of $RUN_DIR/results.json (FOUNDATION=mtst: $RUN_DIR/cir-iterative-mtst/, stage
# cir-iterative-mtst).
# NPROC=N shards the embeddings over N processes (torchrun).
set -euo pipefail
cd "$(dirname "$0")/../../.."
source scripts/common.sh

SPLIT=test
FOUNDATION="${FOUNDATION:-scene_reader}"
STAGE=$([ "$FOUNDATION" = mtst ] && echo cir-iterative-mtst || echo cir-iterative)

launch cir.iterative.eval_iterative --experiment_dir "$RUN_DIR/$STAGE" --eval_dataset "$SPLIT" \
  --summary "$RUN_DIR/results.json" --summary_stage "$STAGE" "$@"
