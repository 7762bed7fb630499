#!/usr/bin/env bash
# The ComGTIR-D stage, step by step (each step skips work already done), on one dataset:
#   bash scripts/comgtir/run.sh                    # Shapes (the main job's)
#   DATASET=coco bash scripts/comgtir/run.sh       # COCO 2014, Karpathy split: $RUN_DIR/data/dataset_coco.json
#   DATASET=flickr30k bash scripts/comgtir/run.sh  # Flickr30K: $RUN_DIR/data/dataset_flickr30k.json
# RUN_DIR defaults to runs/$DATASET; scripts/comgtir/paths.sh lists the dataset's files and the model overrides.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/comgtir/paths.sh  # refuses a DATASET without configs before any step runs
for step in 01_prepare_emb 02_train_rqvae 03_generate_codes 04_generate_pseudo_query 05_prepare_retriever_dataset \
            06_stage1_seqid 07_stage2_setid 09_stage3_tir 10_test_tir 11_test_tir_dual \
            12_test_tir_clip_rerank 13_train_itm 14_test_tir_itm_rerank 15_test_tir_priors; do
  t=$(date +%s); bash "scripts/comgtir/$step.sh"; stage_time "comgtir/$step" "$t"
done
