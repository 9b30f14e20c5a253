"""Train a PSA adapter with personalised Diffusion-DPO on SAGE (SD1.5 or SDXL, detected from the model).

    accelerate launch train.py --config configs/sd15.yaml --sd_model PATH --train_data_dir SAGE \\
        --embeds_folder EMBEDS --output_dir outputs/psa_sd15

Every flag is a field of psa_adapter.config.TrainConfig (`python train.py --help`); flags override the YAML file.
"""

import sys

from psa_adapter.adapter import AdapterMismatchError
from psa_adapter.config import ConfigError, parse_train_args
from psa_adapter.data import MissingEmbeddingError, SageFormatError
from psa_adapter.pipeline import ModelLoadError
from psa_adapter.training import CheckpointError, NonFiniteLossError, ResumeMismatchError, train
from psa_adapter.users import EmbeddingDimensionError, EmbeddingStoreError

# Bad input and a diverging run end with one clear message, not a traceback.
USER_ERRORS = (AdapterMismatchError, CheckpointError, ConfigError, EmbeddingDimensionError, EmbeddingStoreError,
               FileNotFoundError, MissingEmbeddingError, ModelLoadError, NonFiniteLossError, ResumeMismatchError,
               SageFormatError)


def main(argv=None) -> int:
    try:
        config = parse_train_args(argv)
        train(config)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
