#!/usr/bin/env bash
# Hits@10 per round for every mode (from the record stores), the plot, the example dialogue sheet, the rows mir/*
# of results.json; then the text-only dialogues replayed under ChatIR's protocol.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

"$PYTHON" -m mir.report --output_dir "$RUN_DIR/mir" --image_root "$DATA_DIR" --summary "$RUN_DIR/results.json" "$@"
