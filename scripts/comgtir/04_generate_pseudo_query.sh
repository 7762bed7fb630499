#!/usr/bin/env bash
# Pseudo queries for every image (written from the scene on Shapes; the dataset's BLIP captioner on real data,
# or the model COMGTIR_CAPTIONER).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh

SOURCE=()  # real data: the captioner and n_per_image of the dataset's pseudo_query.yaml
if is_shapes; then
  SOURCE=(--scenes "$DATA_DIR/scenes.json" --n_per_image 2)
elif [ -n "${COMGTIR_CAPTIONER:-}" ]; then
  SOURCE=(--captioner "$COMGTIR_CAPTIONER")
fi

"$PYTHON" -m tools.generate_pseudo_query --config "$COMGTIR_CONFIGS/pseudo_query.yaml" \
  --data_json "$DATA_JSON" --image_root "$IMAGE_ROOT" "${SOURCE[@]}" \
  --output "$COMGTIR_DIR/pseudo_queries.jsonl" --seed "$SEED" "$@"
