#!/usr/bin/env bash
# Generate every image of an evaluation config (prompt set x method x backbone x level), sharded over the
# processes accelerate is configured for; complete cells are skipped, so a rerun generates only what is missing.
#   evaluation/scripts/run_gen.sh --config configs/eval_reference.yaml [--sets sage_unseen] [--methods psa]
# All arguments pass through to `python -m evaluation generate`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
accelerate launch -m evaluation generate "$@"
