#!/usr/bin/env bash
# Train a PSA adapter on SD15 with the reference recipe in configs/sd15.yaml; flags after the script override it:
#   launchers/train_psa_sd15.sh --sd_model MODEL --train_data_dir SAGE --embeds_folder EMBEDS --output_dir OUT
# GPUs and processes come from your accelerate config (accelerate config / --num_processes).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec accelerate launch "$here/train.py" --config "$here/configs/sd15.yaml" "$@"
