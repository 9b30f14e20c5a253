"""Training configuration: one dataclass with help text on every field, loaded from YAML plus command-line flags.

Precedence: dataclass defaults (the reference's SD1.5 hyperparameters) < ``--config FILE.yaml`` < flags.
The resolved config is validated once (``__post_init__``) and written as ``resolved_config.yaml`` beside every
checkpoint and the final adapter.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from psa_adapter.utils import NotUTF8Error, atomic_write_text, read_utf8, yaml_error_message

MODES = ("personalised", "non_personalised")
MIXED_PRECISION = ("no", "fp16", "bf16")
EMBED_NORMS = ("none", "standardize")
PAIR_BALANCES = ("none", "category")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class ConfigError(ValueError):
    """A config value, file or flag is invalid; the message names the field (and file)."""


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


@dataclass
class TrainConfig:
    """Everything one PSA training run depends on. Defaults are the reference's SD1.5 recipe (SPEC section 5)."""

    # ------------------------------------------------------------------------------------------------ inputs
    sd_model: str = field(default="", **_help("Diffusers model folder (SD1.5- or SDXL-style) to adapt. Required."))
    train_data_dir: str = field(default="", **_help(
        "The SAGE split folder holding metadata.jsonl and the images (as in the reference, e.g. data/sage/train), "
        "or a SAGE root holding <train_split>/metadata.jsonl."))
    train_split: str = field(default="train", **_help(
        "Which SAGE split to train on when train_data_dir is a SAGE root (unused when it is a split folder)."))
    embeds_folder: str | None = field(
        default=None,
        **_help("User embeddings: an embedding-store .safetensors file or a folder of <User_ID>.npy files. "
                "Required in personalised mode; every user in the split must have one (no zero fallback)."),
    )
    output_dir: str = field(default="outputs/psa_sd15", **_help("Where checkpoints, logs and the adapter go."))
    sdxl: bool | None = field(
        default=None,
        **_help("Accepted for compatibility with the reference scripts. The family is detected from the UNet "
                "config (addition_embed_type == 'text_time'); a flag that contradicts it is an error."),
    )
    max_train_samples: int | None = field(
        default=None, **_help("Use only the first N records of the split (quick experiments).")
    )

    # ------------------------------------------------------------------------------------------- what trains
    mode: str = field(
        default="personalised",
        **_help("'personalised': the PSA adapter with the user's preference (the method). 'non_personalised': "
                "SafetyDPO-style baseline, a LoRA on the UNet's attention projections, the safe image always "
                "preferred and no user input."),
    )
    num_tokens_user: int = field(default=1, **_help("K, user tokens per user (reference: 1)."))
    lora_rank: int = field(default=4, **_help("LoRA rank in non_personalised mode (SafetyDPO upstream: 4)."))
    embed_norm: str = field(
        default="none",
        **_help("Adapter variant. 'none' = the reference. 'standardize' = standardise user embeddings with the "
                "training users' mean and std before the projection (a named variant, saved in the adapter)."),
    )

    # ------------------------------------------------------------------------------------------------ loss
    beta_dpo: float = field(
        default=5000.0,
        **_help("The paper's beta: inside = -(beta/2) * ((e_pol_w - e_pol_l) - (e_ref_w - e_ref_l)). "
                "diffusers' DPO example calls beta/2 (2500) its beta."),
    )
    sft_weight: float = field(
        default=0.0,
        **_help("Weight of an added supervised term mean((eps_pol(w) - eps)^2). 0 = the paper's loss; "
                "> 0 is the 'DPO + SFT' variant (about 1000 worked in the toy world)."),
    )
    pair_balance: str = field(
        default="none",
        **_help("Sampling of the training pairs. 'none' = uniform, the paper's. 'category' = the named variant "
                "'balanced pairs': each (category, case) cell (case: safe caption / harmful caption with the safe "
                "image chosen / with the unsafe image chosen) is drawn equally often, so categories that few "
                "training users ban get as many 'remove it' pairs as the rest."),
    )
    min_timestep: int = field(
        default=0, **_help("Training timesteps are drawn uniformly from [min_timestep, max_timestep). 0 and null "
                           "(the scheduler's num_train_timesteps) = every timestep, the paper's; a narrower range is "
                           "the named variant 'timestep window'."),
    )
    max_timestep: int | None = field(default=None, **_help("Upper end (exclusive) of the training timesteps."))

    # ------------------------------------------------------------------------------------------- optimiser
    learning_rate: float = field(default=5e-6, **_help("Peak learning rate (reference: 5e-6)."))
    lr_scheduler: str = field(default="constant_with_warmup", **_help(f"One of {', '.join(LR_SCHEDULERS)}."))
    lr_warmup_steps: int = field(default=500, **_help("Linear warm-up, in optimizer steps (reference: 500)."))
    max_train_steps: int = field(default=5000, **_help("Optimizer steps in total (reference: 5000)."))
    use_adafactor: bool = field(
        default=False,
        **_help("Adafactor (clip threshold 1, no relative step, no parameter scaling) instead of AdamW; the "
                "reference uses it for SDXL."),
    )
    adam_beta1: float = field(default=0.9, **_help("AdamW beta1."))
    adam_beta2: float = field(default=0.999, **_help("AdamW beta2."))
    adam_weight_decay: float = field(default=1e-2, **_help("Weight decay (AdamW and Adafactor)."))
    adam_epsilon: float = field(default=1e-8, **_help("AdamW epsilon."))
    max_grad_norm: float = field(default=1.0, **_help("Gradient clipping norm; 0 disables clipping."))

    # ----------------------------------------------------------------------------------------------- batch
    train_batch_size: int = field(default=6, **_help("Preference pairs per process per micro-step."))
    gradient_accumulation_steps: int = field(
        default=8, **_help("Micro-steps per optimizer step. Global batch = batch x processes x this.")
    )
    mixed_precision: str = field(
        default="bf16",
        **_help("'no', 'fp16' or 'bf16': autocast for the forward passes and the dtype of the frozen models. "
                "Trainable weights stay fp32."),
    )
    gradient_checkpointing: bool = field(default=False, **_help("Trade compute for UNet activation memory."))
    allow_tf32: bool = field(default=True, **_help("Allow TF32 matmuls on Ampere+ GPUs (no effect elsewhere)."))
    dataloader_num_workers: int = field(default=0, **_help("DataLoader worker processes per training process."))

    # ------------------------------------------------------------------------------------------------ data
    resolution: int = field(default=512, **_help("Training resolution: shorter side resized, then center crop."))
    random_flip: bool = field(
        default=True, **_help("Random horizontal flip, drawn independently for each image (as the reference).")
    )
    proportion_empty_prompts: float = field(
        default=0.2, **_help("Share of pairs whose caption is replaced by '' (applied once, also for SDXL).")
    )
    cache_conditioning: bool = field(
        default=False,
        **_help("Encode every image (both flips) with the frozen VAE and every caption with the frozen text "
                "encoders once, then train from that cache."),
    )
    cache_dir: str | None = field(
        default=None, **_help("Where the conditioning cache lives (default: <output_dir>/cache). Reused when "
                              "the data, model and resolution match.")
    )

    # ------------------------------------------------------------------------------------- saving / resuming
    checkpointing_steps: int = field(default=500, **_help("Save checkpoint-<step>/ every N optimizer steps."))
    checkpoints_total_limit: int | None = field(
        default=None, **_help("Keep at most this many checkpoints (oldest deleted after a new one is saved).")
    )
    resume_from_checkpoint: str | None = field(
        default=None, **_help("'latest' (the newest checkpoint in output_dir, if any) or a checkpoint folder.")
    )
    stop_after_steps: int | None = field(
        default=None,
        **_help("Stop after this optimizer step as if interrupted (a checkpoint is saved, no final adapter); "
                "for time-limited jobs: rerun with --resume_from_checkpoint latest."),
    )
    seed: int = field(default=2025, **_help("Run seed: data order, augmentation, noise and timesteps."))
    report_to: str = field(default="tensorboard", **_help("Experiment tracker for accelerate ('none' to skip)."))

    # ---------------------------------------------------------------------------------------------- validation
    validation_steps: int = field(default=0, **_help("Write an image grid every N optimizer steps (0: never)."))
    validation_prompts: list[str] = field(
        default_factory=list, **_help("Grid rows. Empty: the first two distinct captions of the split.")
    )
    validation_users: list[str] = field(
        default_factory=list,
        **_help("Grid columns: user ids or level presets (L0..L5, which are fixed users; their embeddings must be "
                "in the store). Empty: the first three users of the split."),
    )
    validation_guidance_scale: float = field(default=7.5, **_help("CFG scale for validation images."))
    validation_num_inference_steps: int = field(default=25, **_help("Denoising steps for validation images."))

    def __post_init__(self):
        problems = []
        for name in ("sd_model", "train_data_dir", "output_dir"):
            if not getattr(self, name):
                problems.append(f"{name} is required")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "personalised" and not self.embeds_folder:
            problems.append("embeds_folder is required in personalised mode")
        if self.embed_norm not in EMBED_NORMS:
            problems.append(f"embed_norm must be one of {EMBED_NORMS}, got {self.embed_norm!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        for name in ("num_tokens_user", "lora_rank", "max_train_steps", "train_batch_size",
                     "gradient_accumulation_steps", "checkpointing_steps", "validation_num_inference_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lr_warmup_steps", "dataloader_num_workers", "validation_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("checkpoints_total_limit", "stop_after_steps", "max_train_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be a positive integer or null, got {value!r}")
        if self.min_timestep < 0 or (self.max_timestep is not None and self.max_timestep <= self.min_timestep):
            problems.append(f"timesteps: need 0 <= min_timestep < max_timestep, got {self.min_timestep} and "
                            f"{self.max_timestep}")
        if self.pair_balance not in PAIR_BALANCES:
            problems.append(f"pair_balance must be one of {PAIR_BALANCES}, got {self.pair_balance!r}")
        if self.beta_dpo <= 0:
            problems.append(f"beta_dpo must be > 0, got {self.beta_dpo}")
        if self.sft_weight < 0:
            problems.append(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm < 0:
            problems.append(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if not 0.0 <= self.proportion_empty_prompts < 1.0:
            problems.append(f"proportion_empty_prompts must be in [0, 1), got {self.proportion_empty_prompts}")
        if self.resolution < 8 or self.resolution % 8:
            problems.append(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    # --------------------------------------------------------------------------------------------- file I/O
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        """Write the resolved config (every field) atomically."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        return cls(**{**load_yaml_config(path), **overrides})


def load_yaml_config(path: str | Path) -> dict:
    """Read a YAML mapping of TrainConfig fields; unknown keys are an error naming the file and key."""
    path = Path(path)
    try:
        data = yaml.safe_load(read_utf8(path)) or {}
    except NotUTF8Error as err:
        raise ConfigError(f"cannot read config {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot read config {yaml_error_message(path, err)}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, found {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown config keys {unknown} (see `train.py --help` for the fields)")
    return {key: _coerce(key, value, path) for key, value in data.items()}


def _field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a TrainConfig field."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _coerce(name: str, value, source) -> object:
    """YAML reads ``5e-6`` as a string (YAML 1.1 wants ``5.0e-6``): convert numbers, and say where a value is bad."""
    hint, optional = _field_type(name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {name} may not be null")
    if hint is float and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError as err:
            raise ConfigError(f"{source}: {name} must be a number, got {value!r}") from err
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
        return [str(v) for v in value]
    if hint in (int, bool, str) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{source}: {name} must be {hint.__name__}, got {value!r}")
    return value


def _none_or(convert):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = convert.__name__
    return parse


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """An argparse parser with one ``--<field>`` flag per TrainConfig field, plus ``--config``.

    Defaults are suppressed so that only flags given on the command line override the YAML file.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a PSA adapter with personalised Diffusion-DPO on SAGE.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of config fields; flags override it.")
    for f in dataclasses.fields(TrainConfig):
        hint, optional = _field_type(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default!r})"
        flag = f"--{f.name}"
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(hint) is list:
            parser.add_argument(flag, nargs="*", type=str, help=help_text)
        else:
            convert = _none_or(hint) if optional else hint
            parser.add_argument(flag, type=convert, help=help_text)
    return parser


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """YAML (``--config``) then command-line overrides -> a validated TrainConfig."""
    args = vars(build_parser().parse_args(argv))
    values = load_yaml_config(args.pop("config")) if "config" in args else {}
    values.update(args)
    return TrainConfig(**values)
