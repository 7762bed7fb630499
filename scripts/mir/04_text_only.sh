#!/usr/bin/env bash
# MIR loop, mode text-only: records per (target, round) in $RUN_DIR/mir/text-only/records.jsonl; resumes where it stopped.
# Episode settings (targets, rounds, generator steps) are shared by all modes: scripts/mir/episodes.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/common.sh
source scripts/mir/episodes.sh

"$PYTHON" -m mir.text_only "${MIR_ARGS[@]}" "$@"
