#!/usr/bin/env bash
# Train the SafetyDPO baseline on SDXL: a non-personalised LoRA (rank 4, as SafetyDPO upstream), the same trainer
# and DPO loss as PSA with the safe image always preferred, no user embeddings; the recipe of configs/sdxl.yaml.
#   launchers/train_safetydpo_sdxl.sh --sd_model MODEL --train_data_dir SAGE --output_dir OUT
# Writes OUT/pytorch_lora_weights.safetensors (diffusers' LoRA format): infer.py --method safetydpo --lora_path OUT
# GPUs and processes come from your accelerate config; flags after the script override the config.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec accelerate launch "$here/train.py" --config "$here/configs/sdxl.yaml" --mode non_personalised \
    --output_dir outputs/safetydpo_sdxl "$@"
