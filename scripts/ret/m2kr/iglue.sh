#!/usr/bin/env bash
# ReT-M2KR IGLUE test set: its column(s) of the ReT table (Recall@1). Any --key value is passed on.
set -euo pipefail
exec bash "$(dirname "$0")/eval.sh" iglue "$@"
