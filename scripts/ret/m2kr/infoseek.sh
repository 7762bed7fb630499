#!/usr/bin/env bash
# ReT-M2KR InfoSeek test set: its column(s) of the ReT table (Recall@5 and Pseudo Recall@5). Any --key value is passed on.
set -euo pipefail
exec bash "$(dirname "$0")/eval.sh" infoseek "$@"
