#!/usr/bin/env bash
# MIR loop, mode prediction: records per (target, round) in $RUN_DIR/mir/prediction/records.jsonl; resumes where it stopped.
# Episode settings (targets, rounds, generator steps) are shared by all modes: scripts/mir/episodes.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/mir/episodes.sh

"$PYTHON" -m mir.prediction "${MIR_ARGS[@]}" "$@"
