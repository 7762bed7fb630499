#!/usr/bin/env bash
# Fine-tune on the few annotated triplets, one run per table row (each resumable, a finished one is skipped):
#   no-pretrain    from scratch, L_q2t          pretrain       from pretrain-synthetic, L_q2t
#   pretrain+ptha  PTHA, alpha 0.5 (the paper)  ptha-alpha0/1  PTHA with alpha 0 / 1
# -> $RUN_DIR/cir/<row>/checkpoint-best/ and $RUN_DIR/cir/best_model.txt (the pretrain+ptha folder).
# Multi-process: NPROC=2 bash scripts/cir/04_finetune.sh (torchrun, DDP; the global batch is split over the processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

EPOCHS=$(fast_or 2 10)
BATCH_SIZE=32  # more updates per epoch: on 1,000 annotated triplets, 32 × 10 epochs beats 64 × 10 (val Avg 45 vs 32 from scratch)
LR_SCRATCH=1e-3
LR_FINETUNE=5e-4
PRETRAINED="$RUN_DIR/cir/pretrain-synthetic/checkpoint-best"
COMMON=(--config configs/cir/shapes_train.yaml --cirr_root "$DATA_DIR/cirr" --image_root "$DATA_DIR/cirr/img_raw"
        --data_json "$DATA_DIR/dataset_shapes.json" --dense_checkpoint "$RUN_DIR/dense/checkpoint-best"
        --reverse_root "$RUN_DIR/cir/synthetic" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --seed "$SEED")

launch cir.finetune_rows "${COMMON[@]}" --run_root "$RUN_DIR/cir" --init_from "$PRETRAINED" \
  --lr_scratch "$LR_SCRATCH" --lr "$LR_FINETUNE" "$@"
