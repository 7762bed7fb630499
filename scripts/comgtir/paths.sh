# Sourced by every ComGTIR-D step after scripts/common.sh: where the stage writes and how its result rows are named.
# The main job uses the defaults; scripts/comgtir/ablation_no_pseudo.sh points them elsewhere to rerun the steps.
export COMGTIR_DIR="${COMGTIR_DIR:-$RUN_DIR/comgtir}"
export ROW_SUFFIX="${ROW_SUFFIX:-}"                 # appended to every result row name, e.g. " (no pseudo)"
export PSEUDO_QUERIES="${PSEUDO_QUERIES:-1}"       # 0: train the retriever on captions only
