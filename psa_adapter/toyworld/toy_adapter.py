"""The committed toy PSA adapter (``trained_models/toy/psa``): trained exactly as ``make demo`` trains its adapter.

``python -m psa_adapter.toyworld.toy_adapter`` (``make toy-adapter``) builds the demo's toy world and trains PSA
with the real ``train.py`` and the demo's setting (``DemoSettings()``: the same world, seed, config and flags), in
a work folder (``outputs/toy_adapter``), then copies the adapter (``config.json``, ``psa_adapter.safetensors``,
``resolved_config.yaml``) into ``trained_models/toy/psa`` together with ``demo_setting.json``: the setting it was
trained with. ``tests/test_app.py`` checks that this record equals ``training_setting(DemoSettings())``, so a change
of the demo's setting that is not followed by a retraining fails the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from psa_adapter.toyworld.demo import REPO, DemoError, DemoSettings, stage_train, stage_world, train_dir
from psa_adapter.utils import atomic_write_text

DEFAULT_OUT = REPO / "trained_models" / "toy" / "psa"
DEFAULT_WORK = REPO / "outputs" / "toy_adapter"
SETTING_NAME = "demo_setting.json"
ADAPTER_FILES = ("config.json", "psa_adapter.safetensors", "resolved_config.yaml")
# The DemoSettings fields that decide the trained adapter (the world, the seed, the training config and flags).
TRAINING_FIELDS = ("seed", "n_train", "n_val", "n_test_seen", "n_test_unseen", "unseen", "n_benign",
                   "n_unsafe_per_category", "psa_overrides", "encoder")
# Fields of the training config that are paths of one run, not part of the setting.
PATH_KEYS = ("sd_model", "train_data_dir", "embeds_folder", "output_dir")


def _relative(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def training_setting(settings: DemoSettings) -> dict:
    """What an adapter trained by the demo with ``settings`` depends on, as a JSON-able dict.

    The world and training fields of ``settings``, the base model folder (relative to the repository), and the
    PSA training config's content (path keys left out), so editing ``configs/toy_psa.yaml`` changes it too.
    """
    import yaml

    config = yaml.safe_load(Path(settings.psa_config).read_text(encoding="utf-8")) or {}
    weights = Path(settings.base) / "unet" / "diffusion_pytorch_model.safetensors"
    return {
        "demo": {name: getattr(settings, name) for name in TRAINING_FIELDS},
        "base": _relative(settings.base),
        # A retrained base model needs a retrained adapter.
        "base_unet_sha256": hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None,
        "psa_config": _relative(settings.psa_config),
        "psa_config_values": {k: v for k, v in sorted(config.items()) if k not in PATH_KEYS},
        # Inference-time choices the app uses with this adapter (the demo's).
        "inference": {"psa_uncond": settings.psa_uncond, "psa_scale": settings.psa_scale,
                      "guidance": settings.guidance, "steps": settings.steps},
    }


def read_setting(folder: Path = DEFAULT_OUT) -> dict:
    """The recorded setting of the adapter in ``folder``."""
    path = Path(folder) / SETTING_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no recorded training setting (retrain with `make toy-adapter`)")
    return json.loads(path.read_text(encoding="utf-8"))


def train_toy_adapter(out: Path = DEFAULT_OUT, work: Path = DEFAULT_WORK) -> Path:
    """Train the demo's PSA adapter in ``work`` and copy it with its setting into ``out``; returns ``out``."""
    settings = DemoSettings(out=Path(work).resolve())
    t0 = time.time()
    stage_world(settings)
    seconds = stage_train(settings, "psa")
    trained = train_dir(settings, "psa")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        src = trained / name
        if not src.is_file():
            raise DemoError(f"{src} is missing after training; see {settings.out / 'logs'}")
        tmp = out / f".{name}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, out / name)
    previous = json.loads((out / SETTING_NAME).read_text(encoding="utf-8")) if (out / SETTING_NAME).is_file() else {}
    record = training_setting(settings)
    # Wall time of the training run (a rerun that finds the adapter already trained keeps the recorded time).
    record["train_seconds"] = round(seconds, 1) if seconds > 0 else previous.get("train_seconds")
    record["total_seconds"] = round(time.time() - t0, 1) if seconds > 0 else previous.get("total_seconds")
    atomic_write_text(out / SETTING_NAME, json.dumps(record, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m psa_adapter.toyworld.toy_adapter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="adapter folder (trained_models/toy/psa)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="world and training folder")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        out = train_toy_adapter(args.out, args.work)
    except (DemoError, FileNotFoundError) as err:
        print(f"toy-adapter: error: {err}", file=sys.stderr)
        return 1
    print(f"saved the toy PSA adapter and {SETTING_NAME} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
