#!/usr/bin/env bash
# Index the test passages with the trained ReT: passage tokens into a faiss IVF-PQ index (kept if up to date).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh

INDEX_KIND=ivfpq
NLIST=$(fast_or 64 256)
NPROBE=32
PQ_M=16
CHUNK_SIZE=512  # passages added per chunk

"$PYTHON" -m retriever.ret.index --checkpoint "$RUN_DIR/ret/ret/checkpoint-best" \
  --passages_file "$DATA_DIR/m2kr/shapes_passages_{split}.jsonl" --image_root "$DATA_DIR" --split test \
  --cache_dir "$RUN_DIR/ret/cache" --output_dir "$RUN_DIR/ret/index" \
  --index_kind "$INDEX_KIND" --nlist "$NLIST" --nprobe "$NPROBE" --pq_m "$PQ_M" --chunk_size "$CHUNK_SIZE" "$@"
