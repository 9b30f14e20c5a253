#!/usr/bin/env bash
# Metrics (InPro, FID, CLIPScore, the judge's pass and win rates) and tables of an evaluation config whose images
# are generated (run_gen.sh); computed records are reused, so a rerun computes only what is missing.
#   evaluation/scripts/run_eval.sh --config configs/eval_reference.yaml
# All arguments pass through to `python -m evaluation run --stages metrics,tables` (images not generated are
# counted as missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
python -m evaluation run --stages metrics,tables "$@"
