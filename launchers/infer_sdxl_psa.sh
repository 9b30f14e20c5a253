#!/usr/bin/env bash
# SDXL base 1.0 with the PSA adapter in trained_models/psa-sdxl,
# the users' <User_ID>.npy embeddings in data/embeddings, on the SAGE validation prompts.
# Reference defaults: CFG 7.5, 50 steps, seed 2025 (image i uses seed 2025 + i), batch size 1, fp16 on GPU.
# Every GPU that accelerate is configured for shares the prompts; existing images are skipped (resume).
# Extra flags pass through and override these, e.g.: launchers/infer_sdxl_psa.sh --limit 20 --save_path outputs/try
# (--prompt, --prompts_csv or --meta_data replace the default SAGE prompts).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case " $* " in
    *" --prompt"* | *" --meta_data"*) PROMPTS=() ;;
    *) PROMPTS=(--meta_data "$ROOT/data/sage/val/metadata.jsonl") ;;
esac
accelerate launch "$ROOT/infer.py" \
    --sd_model stabilityai/stable-diffusion-xl-base-1.0 "${PROMPTS[@]}" \
    --save_path "$ROOT/outputs/infer/sdxl-psa" \
    --load_psa \
    --psa_path "$ROOT/trained_models/psa-sdxl" \
    --embeds_folder "$ROOT/data/embeddings" \
    --guidance 7.5 \
    --steps 50 \
    --seed 2025 \
    --batch_size 1 "$@"
