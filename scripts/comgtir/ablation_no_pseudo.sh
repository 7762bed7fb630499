#!/usr/bin/env bash
# Ablation: the same retriever trained on captions only (no pseudo queries), with the main run's identifiers.
# Run after scripts/comgtir/run.sh; writes $RUN_DIR/comgtir-no-pseudo/ and rows "<row> (no pseudo)" of stage comgtir.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh
MAIN_CODES="$RUN_DIR/comgtir/codes.json"
[ -f "$MAIN_CODES" ] || { echo "missing $MAIN_CODES: run scripts/comgtir/run.sh first" >&2; exit 1; }

export COMGTIR_DIR="$RUN_DIR/comgtir-no-pseudo" ROW_SUFFIX=" (no pseudo)" PSEUDO_QUERIES=0
mkdir -p "$COMGTIR_DIR"
cp "$MAIN_CODES" "$COMGTIR_DIR/codes.json"   # same identifiers as the main run, so only the training data differs
for step in 05_prepare_retriever_dataset 06_stage1_seqid 07_stage2_setid 09_stage3_tir \
            10_test_tir 11_test_tir_dual 12_test_tir_clip_rerank; do
  t=$(date +%s); bash "scripts/comgtir/$step.sh"; stage_time "comgtir-no-pseudo/$step" "$t"
done
