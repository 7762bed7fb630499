#!/usr/bin/env bash
# Pseudo queries for every image (written from the scene on Shapes; a captioning model on real data).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/comgtir/paths.sh

N_PER_IMAGE=2

"$PYTHON" -m tools.generate_pseudo_query --config configs/comgtir/shapes/pseudo_query.yaml \
  --data_json "$DATA_DIR/dataset_shapes.json" --image_root "$DATA_DIR/images" --scenes "$DATA_DIR/scenes.json" \
  --n_per_image "$N_PER_IMAGE" --output "$COMGTIR_DIR/pseudo_queries.jsonl" --seed "$SEED" "$@"
