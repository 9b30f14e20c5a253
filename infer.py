"""Generate images with Stable Diffusion 1.5 / SDXL, optionally personalised with a PSA adapter.

    accelerate launch infer.py --sd_model runwayml/stable-diffusion-v1-5 --meta_data data/sage/val/metadata.jsonl \
        --save_path outputs/sd15-psa --load_psa --psa_path trained_models/psa-sd15 --embeds_folder data/embeddings

Image i of the prompt list uses seed --seed + i (default 2025), whatever the batch size or number of processes.
See `python infer.py --help` and psa_adapter/infer_cli.py.
"""

import sys

from psa_adapter.infer_cli import main

if __name__ == "__main__":
    sys.exit(main())
