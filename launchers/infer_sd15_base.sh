#!/usr/bin/env bash
# Stable Diffusion 1.5, base model without adapter, on the SAGE validation prompts
# (same settings and negative prompt, none by default, as the PSA launcher).
# Reference defaults: CFG 7.5, 50 steps, seed 2025 (image i uses seed 2025 + i), batch size 1, fp16 on GPU.
# Every GPU that accelerate is configured for shares the prompts; existing images are skipped (resume).
# Extra flags pass through and override these, e.g.: launchers/infer_sd15_base.sh --limit 20 --save_path outputs/try
# (--prompt, --prompts_csv or --meta_data replace the default SAGE prompts).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case " $* " in
    *" --prompt"* | *" --meta_data"*) PROMPTS=() ;;
    *) PROMPTS=(--meta_data "$ROOT/data/sage/val/metadata.jsonl") ;;
esac
accelerate launch "$ROOT/infer.py" \
    --sd_model runwayml/stable-diffusion-v1-5 "${PROMPTS[@]}" \
    --save_path "$ROOT/outputs/infer/sd15-base" \
    --guidance 7.5 \
    --steps 50 \
    --seed 2025 \
    --batch_size 1 "$@"
