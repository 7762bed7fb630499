# Sourced by every ComGTIR-D step (it sources scripts/common.sh): the dataset, its configs and data, where the stage
# writes and how its result rows are named. The main job uses the defaults (DATASET=shapes);
# scripts/comgtir/ablation_no_pseudo.sh points COMGTIR_DIR elsewhere to rerun the steps.
#   DATASET            shapes (default), coco or flickr30k: a folder of configs/comgtir/
#   RUN_DIR            default runs/$DATASET; the data is read from DATA_DIR (default $RUN_DIR/data)
#   COMGTIR_CONFIGS    the step configs (default configs/comgtir/$DATASET)
# Real data only, models to use instead of the configs' pretrained names (a local folder or another name):
#   COMGTIR_CLIP       a dual-encoder folder (encoder.json, meta.json, model.pt if fine-tuned) for prepare_emb and
#                      the dense re-ranking (default: $COMGTIR_DIR/clip, written from encoder.yaml)
#   COMGTIR_T5         the T5 and its tokenizer (default retriever.yaml's)
#   COMGTIR_CAPTIONER  the BLIP captioner of the pseudo queries (default pseudo_query.yaml's)
#   COMGTIR_ITM        the BLIP ITM model of the cross-encoder re-ranking (default rerank.yaml's)
export DATASET="${DATASET:-shapes}"
export RUN_DIR="${RUN_DIR:-runs/$DATASET}"
source scripts/common.sh
export COMGTIR_CONFIGS="${COMGTIR_CONFIGS:-configs/comgtir/$DATASET}"
if [ ! -d "$COMGTIR_CONFIGS" ]; then
  echo "error: $COMGTIR_CONFIGS: no configs for DATASET=$DATASET (datasets: $(ls configs/comgtir | paste -sd ' '))" >&2
  exit 2
fi
export COMGTIR_DIR="${COMGTIR_DIR:-$RUN_DIR/comgtir}"
export ROW_SUFFIX="${ROW_SUFFIX:-}"                 # appended to every result row name, e.g. " (no pseudo)"
export PSEUDO_QUERIES="${PSEUDO_QUERIES:-1}"       # 0: train the retriever on captions only

# The dataset's files (Karpathy JSON, image root) and the dual encoder that embeds images and captions: on Shapes
# the dense stage's trained model and embeddings, on real data CLIP as released, embedded by this stage.
case "$DATASET" in
  shapes)    DATA_JSON="$DATA_DIR/dataset_shapes.json";    IMAGE_ROOT="$DATA_DIR/images" ;;
  coco)      DATA_JSON="$DATA_DIR/dataset_coco.json";      IMAGE_ROOT="$DATA_DIR/images" ;;  # train2014/, val2014/
  flickr30k) DATA_JSON="$DATA_DIR/dataset_flickr30k.json"; IMAGE_ROOT="$DATA_DIR/flickr30k-images" ;;
  *)         DATA_JSON="$DATA_DIR/dataset_$DATASET.json";  IMAGE_ROOT="$DATA_DIR/images" ;;
esac
if [ "$DATASET" = shapes ]; then
  EMB_DIR="$RUN_DIR/dense/emb"; ENCODER="$RUN_DIR/dense/checkpoint-best"
else
  EMB_DIR="$COMGTIR_DIR/emb"; ENCODER="${COMGTIR_CLIP:-$COMGTIR_DIR/clip}"
fi
export DATA_JSON IMAGE_ROOT EMB_DIR ENCODER

# is_shapes: true on Shapes, where the step scripts hold the hyperparameters (the main job's values); on real data
# they are the dataset's configs' (one place for each value).
is_shapes() { [ "$DATASET" = shapes ]; }
