#!/usr/bin/env bash
# CIRR metrics of rounds 0..3 on the Shapes test split, with the statistics of the mining each round trained with
# -> $RUN_DIR/cir-iterative/evaluation_results.json (+ each round's CIRR server files beside it) and rows
# cir-iterative/round0..round3 of $RUN_DIR/results.json.
# NPROC=N shards the embeddings over N processes (torchrun).
set -euo pipefail
cd "$(dirname "$0")/../../.."
source scripts/common.sh

SPLIT=test

launch cir.iterative.eval_iterative --experiment_dir "$RUN_DIR/cir-iterative" --eval_dataset "$SPLIT" \
  --summary "$RUN_DIR/results.json" "$@"
