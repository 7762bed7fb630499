#!/usr/bin/env bash
# The composed-retrieval stage (MTST + PTHA), step by step; needs the world and the dense stage.
set -euo pipefail
cd "$(dirname "$0")/../.."
for step in 01_train_mtst 02_synthesize 03_pretrain 04_finetune 05_evaluate; do bash "scripts/cir/$step.sh"; done
