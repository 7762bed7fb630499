#!/usr/bin/env bash
# What the set identifier's guidance adds, and in which form: the unified model decoded with the guidance off
# (guidance 0: isolates the prior from the extra training), with the prefix prior and with both forms; the main
# job's dual-id row is the `prior:` form of evaluate.yaml (token). Test rows -> comgtir/dual-id (...); the three
# forms on validation -> comgtir-val/dual-id (...), the split a default is chosen on.
# PRIOR_ROWS=0 skips the step (default 1 on Shapes, 0 on real data: six more decodings of the whole test set).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh
if [ "${PRIOR_ROWS:-$(is_shapes && echo 1 || echo 0)}" != 1 ]; then
  echo "priors: skipped (PRIOR_ROWS=1 decodes the test set without guidance and with each prior form)"
  exit 0
fi

GUIDANCE=()  # real data: the dataset's evaluate.yaml
BEAMS=()
if is_shapes; then GUIDANCE=(--guidance 4.0); BEAMS=(--num_beams 20); fi  # as 11_test_tir_dual.sh
VAL_QUERIES=1000  # validation captions decoded per form (0 = all)

evaluate() {  # evaluate SPLIT ROW OUTPUT ARGS...
  local split=$1 row=$2 out=$3; shift 3
  "$PYTHON" -m retriever.generative.evaluate --config "$COMGTIR_CONFIGS/evaluate.yaml" --split "$split" \
    --checkpoint "$COMGTIR_DIR/stage3_unified/checkpoint-best" "${GUIDANCE[@]}" \
    --codes "$COMGTIR_DIR/codes.json" --emb_dir "$EMB_DIR" "${BEAMS[@]}" \
    --output_dir "$COMGTIR_DIR/eval/$out" --summary "$RUN_DIR/results.json" --summary_row "$row$ROW_SUFFIX" "$@"
}

evaluate test "comgtir/dual-id (guidance 0)" dual-id-guidance0 --guidance 0
evaluate test "comgtir/dual-id (prefix prior)" dual-id-prefix --prior prefix
evaluate test "comgtir/dual-id (both priors)" dual-id-both --prior both
[ "$FAST" = 1 ] && exit 0  # FAST=1 checks the plumbing: the test rows above run every form already
for prior in token prefix both; do
  evaluate val "comgtir-val/dual-id ($prior prior)" "val-$prior" --prior "$prior" --max_queries "$VAL_QUERIES"
done
