#!/usr/bin/env bash
# Stable Diffusion 1.5 with the PSA adapter in trained_models/psa-sd15; each user's profile (the
# user_data of the SAGE records) is embedded at generation time by Qwen/Qwen2.5-7B-Instruct, which also decides
# the banned categories (--policy llm). On the SAGE validation prompts. The adapter must have been trained on
# embeddings of the same LLM (checked before anything is embedded).
# The embeddings are kept in <save_path>/user_embeddings.safetensors (a rerun reuses them).
# Reference defaults: CFG 7.5, 50 steps, seed 2025 (image i uses seed 2025 + i), batch size 1, fp16 on GPU.
# Every GPU that accelerate is configured for shares the prompts; existing images are skipped (resume).
# Extra flags pass through and override these, e.g.: launchers/infer_sd15_psa_llm.sh --policy rules --limit 20
# (--prompt with --profile FILE, or --prompts_csv with --users_csv, replace the default SAGE prompts).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case " $* " in
    *" --prompt"* | *" --meta_data"*) PROMPTS=() ;;
    *) PROMPTS=(--meta_data "$ROOT/data/sage/val/metadata.jsonl") ;;
esac
accelerate launch "$ROOT/infer.py" \
    --sd_model runwayml/stable-diffusion-v1-5 "${PROMPTS[@]}" \
    --save_path "$ROOT/outputs/infer/sd15-psa-llm" \
    --load_psa \
    --psa_path "$ROOT/trained_models/psa-sd15" \
    --llm_model Qwen/Qwen2.5-7B-Instruct \
    --guidance 7.5 \
    --steps 50 \
    --seed 2025 \
    --batch_size 1 "$@"
