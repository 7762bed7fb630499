#!/usr/bin/env bash
# The dense stage, step by step.
set -euo pipefail
cd "$(dirname "$0")/../.."
for step in 01_train 02_encode 03_evaluate; do bash "scripts/dense/$step.sh"; done
