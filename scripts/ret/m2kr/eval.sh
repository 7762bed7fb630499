#!/usr/bin/env bash
# eval.sh SET [--key value ...]: evaluate one ReT-M2KR test set (configs/ret/m2kr_test/SET.yaml) and refresh the
# table (runs/m2kr/eval/table.md) with the columns measured so far. Overrides go to the evaluation step, e.g.
#   bash scripts/ret/m2kr/okvqa.sh --checkpoint runs/m2kr/ret/ret/checkpoint-best
set -euo pipefail
cd "$(dirname "$0")/../../.."
source scripts/common.sh

SET="${1:?usage: eval.sh SET [--key value ...]}"
shift
EVAL_DIR="${EVAL_DIR:-runs/m2kr/eval}"

"$PYTHON" -m retriever.ret.evaluate --config "configs/ret/m2kr_test/$SET.yaml" --output_dir "$EVAL_DIR/$SET" "$@"
"$PYTHON" -m retriever.ret.m2kr_table --eval_dir "$EVAL_DIR"
