# Sourced by every stage script: the run folder, the seed, the fast switch, and the Python to use.
# RUN_DIR (default runs/shapes), SEED (default 0) and FAST (1 = tiny sizes, for checking) come from the environment.
export RUN_DIR="${RUN_DIR:-runs/shapes}"
export SEED="${SEED:-0}"
export FAST="${FAST:-0}"
export DATA_DIR="${DATA_DIR:-$RUN_DIR/data}"
export WANDB_MODE="${WANDB_MODE:-offline}"
export WANDB_DIR="${WANDB_DIR:-$RUN_DIR}"
# Use the project's virtualenv when one is there and none is active.
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$(dirname "${BASH_SOURCE[0]}")/../.venv/bin/python" ]; then
  PYTHON="${PYTHON:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python}"
fi
export PYTHON="${PYTHON:-python}"

# fast_or FAST_VALUE FULL_VALUE: the first under FAST=1, else the second.
fast_or() { if [ "$FAST" = "1" ]; then echo "$1"; else echo "$2"; fi; }

# stage_time NAME START: print how long a stage took.
stage_time() { echo "[$1] finished in $(( $(date +%s) - $2 ))s"; }

# launch MODULE ARGS...: `python -m MODULE ARGS` in one process, or under torchrun when NPROC > 1 (processes per
# node) or NNODES > 1 (several machines meeting at RDZV_ENDPOINT=host:port, the same RDZV_ID on every node).
export NPROC="${NPROC:-1}" NNODES="${NNODES:-1}"
launch() {
  if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
    local rdzv=(--standalone)
    [ "$NNODES" -gt 1 ] && rdzv=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port for NNODES > 1}" --rdzv_id "${RDZV_ID:-genretrieval}")
    "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node "$NPROC" -m "$@"
  else
    "$PYTHON" -m "$@"
  fi
}
