#!/usr/bin/env bash
# The iterative CIR stage in the main job, step by step; needs the CIR stage (scripts/cir/run.sh) first.
set -euo pipefail
cd "$(dirname "$0")/../../.."
for step in 01_train 02_evaluate; do bash "scripts/cir/iterative/$step.sh"; done
