"""Personalised Diffusion-DPO training (SPEC section 5) with accelerate: one CPU, one GPU or many.

Read top to bottom: models -> data -> what trains (a "branch") -> checkpoints -> ``train`` = ``setup_run`` ->
``resume_run`` -> ``train_loop`` -> ``finish_run``, sharing one ``TrainRun``. Fixes of the reference's training
bugs (SPEC section 9) are marked "bug N".

* The reference model is the same UNet with the trainable branch switched off (adapter at scale 0, or LoRA
  disabled), never a second copy.
* One ``accelerator.accumulate`` context over one module that holds every trainable weight (bug 1).
* Trainable weights in fp32; frozen models in the mixed-precision dtype; forward passes under autocast (bug 2).
* Each sample's flips, caption dropout (once; bug 5), noise and timestep come from generators seeded by
  (seed, epoch, index): results do not depend on the number of processes.
* Exceptions are never swallowed; a non-finite loss stops the run naming the step and the last good checkpoint
  (bug 6); ``--resume_from_checkpoint`` really resumes, and refuses a checkpoint of a run with another data order
  (batch size, accumulation, process count, seed or data set).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from psa_adapter.adapter import AdapterMismatchError, PSAAdapter, PSAAdapterConfig, is_sdxl_unet
from psa_adapter.conditioning import TextConditioner, added_cond_kwargs
from psa_adapter.config import ConfigError, TrainConfig
from psa_adapter.data.cache import build_conditioning_cache, vae_moments
from psa_adapter.data.dataset import SageDataset
from psa_adapter.data.embeddings import MissingEmbeddingError, open_embedding_store
from psa_adapter.data.sampling import ShardedBatchSampler, balanced_weights
from psa_adapter.loss import dpo_loss
from psa_adapter.utils import atomic_write, atomic_write_text, image_grid

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
BRANCH_DIR = "trainable"  # inside a checkpoint: the branch's own weights (adapter or LoRA)
STATE_NAME = "training_state.json"
CONFIG_NAME = "resolved_config.yaml"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; nothing already saved is touched."""


# --------------------------------------------------------------------------------------------- trainable branches
class TrainableBranch(nn.Module):
    """What DPO trains, behind one interface so that the loop does not care which method it is.

    A branch adds trainable weights to a frozen UNet, can switch them off (the DPO reference) and saves them.
    """

    personalised: bool = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def unet_kwargs(self, user_embeds: torch.Tensor | None) -> dict:
        """Extra keyword arguments of the UNet call for (N, E) user embeddings (none for a non-personal branch)."""
        return {}

    def reference(self):
        """Context in which the UNet is exactly the frozen base model."""
        raise NotImplementedError

    def save_weights(self, directory: Path) -> None:
        raise NotImplementedError

    def load_weights(self, directory: Path) -> None:
        raise NotImplementedError


class PSABranch(TrainableBranch):
    """The PSA adapter: user tokens passed with every UNet call, read by every cross-attention layer."""

    personalised = True

    def __init__(self, unet, adapter: PSAAdapter):
        super().__init__()
        self.adapter = adapter
        adapter.attach(unet)

    def trainable_parameters(self) -> list[nn.Parameter]:
        # With K = 1 the adapter freezes to_k_user (it cannot get a gradient); DDP must not wait for it.
        return self.adapter.trainable_parameters()

    def unet_kwargs(self, user_embeds):
        return self.adapter.unet_kwargs(self.adapter.user_tokens(user_embeds))

    def reference(self):
        return self.adapter.scale_context(0.0)

    def save_weights(self, directory: Path) -> None:
        self.adapter.save_pretrained(directory)

    def load_weights(self, directory: Path) -> None:
        saved = PSAAdapterConfig.from_json_file(Path(directory) / "config.json")
        current = self.adapter.config
        fields = ("embed_dim", "num_tokens", "cross_attention_dim", "base_family", "embed_norm")
        diffs = [f"{f}: checkpoint {getattr(saved, f)!r}, this run {getattr(current, f)!r}"
                 for f in fields if getattr(saved, f) != getattr(current, f)]
        if saved.layers != current.layers:
            diffs.append("cross-attention layers differ (a different UNet architecture)")
        if diffs:
            raise AdapterMismatchError(f"cannot resume from {directory}: the adapter does not fit this model/data: "
                                       + "; ".join(diffs))
        from safetensors.torch import load_file

        weights = Path(directory) / "psa_adapter.safetensors"
        self.adapter.load_adapter_state_dict(load_file(str(weights)), source=str(weights))


class LoRABranch(TrainableBranch):
    """Non-personalised baseline (SafetyDPO-style): a LoRA on the UNet's attention projections, through peft.

    The weights are saved in diffusers' LoRA format (``pytorch_lora_weights.safetensors``), so
    ``pipe.load_lora_weights(folder)`` loads them.
    """

    personalised = False
    TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, unet, rank: int = 4):
        super().__init__()
        try:
            from peft import LoraConfig
        except ImportError as err:
            raise ImportError("mode non_personalised needs peft: pip install peft") from err
        # Plain attribute: DPOModel already holds the UNet; the LoRA weights live inside it.
        self.__dict__["unet"] = unet
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=list(self.TARGET_MODULES)))
        for p in self.trainable_parameters():
            p.data = p.data.float()  # bug 2: fp32 trainable weights, whatever the UNet's dtype

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self):
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def _pipeline_class(self):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline if is_sdxl_unet(self.unet) else StableDiffusionPipeline

    def save_weights(self, directory: Path) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        self._pipeline_class().save_lora_weights(str(directory), unet_lora_layers=state, safe_serialization=True)

    def load_weights(self, directory: Path) -> None:
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        state, _ = self._pipeline_class().lora_state_dict(str(directory))
        state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(self.unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        expected = {k for k, p in self.unet.named_parameters() if p.requires_grad}
        if unexpected or len(state) != len(expected):
            raise AdapterMismatchError(f"cannot resume from {directory}: its LoRA has {len(state)} tensors "
                                       f"({len(unexpected or [])} unexpected); this run's LoRA has {len(expected)}")


class DPOModel(nn.Module):
    """The frozen UNet plus a trainable branch; one forward gives policy and reference predictions.

    Holding both in one module lets ``accelerator.prepare`` wrap every trainable weight in one DDP module and one
    autocast region, and lets ``accelerator.accumulate`` cover all of them.
    """

    def __init__(self, unet, branch: TrainableBranch):
        super().__init__()
        self.unet = unet
        self.branch = branch

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, user_embeds=None, added_cond_kwargs=None):
        """(N, C, h, w) latents, (N,) timesteps, (N, S, D) text states, (N, E) user embeddings ->
        (policy prediction, reference prediction), each (N, C, h, w). N = 2B: chosen images then rejected."""
        extra = self.branch.unet_kwargs(user_embeds)
        # Reference first, without a graph, so its activations are freed before the policy pass builds one.
        with torch.no_grad(), self.branch.reference():
            ref_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs, **extra).sample
        policy_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                                **extra).sample
        return policy_pred, ref_pred


def build_branch(config: TrainConfig, unet, embed_dim: int | None, user_embeds: torch.Tensor | None,
                 encoder: dict | None) -> TrainableBranch:
    """The trainable part for ``config.mode``: the PSA adapter (personalised) or a LoRA (non-personalised)."""
    if config.mode == "non_personalised":
        return LoRABranch(unet, rank=config.lora_rank)
    adapter = PSAAdapter.for_unet(unet, embed_dim=embed_dim, num_tokens=config.num_tokens_user, encoder=encoder,
                                  embed_norm=config.embed_norm)
    if config.embed_norm == "standardize":
        adapter.fit_embedding_norm(user_embeds)
    return PSABranch(unet, adapter)


# ------------------------------------------------------------------------------------------------- model loading
@dataclass
class Models:
    pipe: object  # the diffusers pipeline (for validation images); shares the modules below
    unet: nn.Module
    vae: nn.Module
    conditioner: TextConditioner
    noise_scheduler: object
    sdxl: bool


def load_models(config: TrainConfig, device: torch.device, weight_dtype: torch.dtype) -> Models:
    """Load the frozen SD1.5/SDXL components; the family is read from the UNet config."""
    from diffusers import DDPMScheduler

    from psa_adapter.pipeline import load_pipeline

    pipe = load_pipeline(config.sd_model, device="cpu", torch_dtype=weight_dtype)
    unet = pipe.unet
    sdxl = is_sdxl_unet(unet)
    if config.sdxl is not None and config.sdxl != sdxl:
        raise ConfigError(f"--sdxl {config.sdxl} contradicts the model: {config.sd_model} has an "
                         f"{'SDXL' if sdxl else 'SD1.5'}-style UNet (addition_embed_type="
                         f"{unet.config.addition_embed_type!r})")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if noise_scheduler.config.prediction_type != "epsilon":
        raise ConfigError(f"{config.sd_model}: prediction_type {noise_scheduler.config.prediction_type!r} is not "
                         "supported; the DPO loss here regresses the noise (SD1.5 and SDXL use 'epsilon')")
    # fp16 SDXL VAEs overflow; keep the VAE in fp32 then (bf16 is safe).
    if weight_dtype == torch.float16:
        pipe.vae.to(torch.float32)
    for module in (unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    pipe.to(device)
    conditioner = TextConditioner.from_pipeline_components(
        unet, pipe.tokenizer, pipe.text_encoder, getattr(pipe, "tokenizer_2", None),
        getattr(pipe, "text_encoder_2", None),
    )
    return Models(pipe, unet, pipe.vae, conditioner, noise_scheduler, sdxl)


# ------------------------------------------------------------------------------------------------ one batch
def diffusion_inputs(batch: dict, models: Models, resolution: int, device: torch.device,
                     timestep_range: tuple[int, int | None] = (0, None)):
    """Encode a collated batch and noise it. Returns (noisy (2B,C,h,w), timesteps (2B,), target (B,C,h,w),
    encoder_hidden_states (2B,S,D), user_embeds (2B,E) or None, added_cond_kwargs or None).

    One noise and one timestep per pair, shared by both images; every draw comes from the pair's own generator.
    Timesteps are uniform in ``[lo, hi)`` of ``timestep_range`` (``hi`` None: the scheduler's number of steps).
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if "moments_w" in batch:
        moments = torch.cat([batch["moments_w"], batch["moments_l"]]).to(device)
        hidden = batch["encoder_hidden_states"].to(device)
        pooled = batch.get("pooled_text_embeds")
        pooled = pooled.to(device) if pooled is not None else None
    else:
        moments = vae_moments(models.vae, torch.cat([batch["pixel_values_w"], batch["pixel_values_l"]]))
        text = models.conditioner.encode(list(batch["caption"]))
        hidden, pooled = text.encoder_hidden_states, text.pooled_text_embeds
    latent_shape = (moments.shape[1] // 2, *moments.shape[2:])  # moments hold mean and log-variance
    num_timesteps = models.noise_scheduler.config.num_train_timesteps
    lo, hi = timestep_range[0], num_timesteps if timestep_range[1] is None else timestep_range[1]
    if not 0 <= lo < hi <= num_timesteps:
        raise ValueError(f"timestep range [{lo}, {hi}) is not inside the scheduler's [0, {num_timesteps})")
    timesteps, noise, z_w, z_l = [], [], [], []
    for seed in batch["noise_seed"].tolist():
        generator = torch.Generator().manual_seed(int(seed))
        timesteps.append(torch.randint(lo, hi, (1,), generator=generator))
        noise.append(torch.randn(latent_shape, generator=generator))
        z_w.append(torch.randn(latent_shape, generator=generator))
        z_l.append(torch.randn(latent_shape, generator=generator))
    timesteps = torch.cat(timesteps).to(device)
    noise = torch.stack(noise).to(device)
    posterior = DiagonalGaussianDistribution(moments.float())
    latents = posterior.mean + posterior.std * torch.cat([torch.stack(z_w), torch.stack(z_l)]).to(device)
    vae_config = models.vae.config
    if getattr(vae_config, "shift_factor", None) is not None:
        latents = latents - vae_config.shift_factor
    latents = latents * vae_config.scaling_factor
    timesteps2 = torch.cat([timesteps, timesteps])
    noisy = models.noise_scheduler.add_noise(latents, torch.cat([noise, noise]), timesteps2)
    user_embeds = batch.get("user_embeds")
    user_embeds = torch.cat([user_embeds, user_embeds]).to(device) if user_embeds is not None else None
    added = added_cond_kwargs(torch.cat([pooled, pooled]) if pooled is not None else None, resolution)
    return noisy, timesteps2, noise, torch.cat([hidden, hidden]), user_embeds, added


# ------------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` folders in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, corrupt or holds more than plain tensors and numbers."""


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(checkpoint: Path) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` of every file in a checkpoint folder but its state record."""
    return {p.relative_to(checkpoint).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != STATE_NAME}


def verify_checkpoint(checkpoint: Path) -> dict:
    """The checkpoint's ``training_state.json`` once the folder is known to be whole and safe to load.

    Raises CheckpointError naming the checkpoint and the file: a missing or unreadable state record, a file missing,
    truncated or changed since it was written (sizes and SHA-256 are recorded at save time), a safetensors file that
    does not parse, or a pickle file (optimizer, scheduler, RNG states) that holds anything but tensors, numbers and
    arrays. accelerate unpickles some of these with ``weights_only=False``; each is first opened here with
    ``weights_only=True``, so a planted callable is refused before anything could run it.
    """
    state_path = checkpoint / STATE_NAME
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint}: no {STATE_NAME} (an incomplete checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{state_path}: unreadable ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CheckpointError(f"{state_path}: no integer global_step")
    recorded = state.get("files")
    if recorded is not None:  # older checkpoints have no record: only the content checks below apply
        for rel, info in sorted(recorded.items()):
            path = checkpoint / rel
            if not path.is_file():
                raise CheckpointError(f"{checkpoint}: {rel} is missing")
            size = path.stat().st_size
            if size != info.get("bytes"):
                raise CheckpointError(f"{checkpoint}: {rel} has {size} bytes, {info.get('bytes')} were written "
                                      "(truncated or replaced)")
            if _sha256(path) != info.get("sha256"):
                raise CheckpointError(f"{checkpoint}: {rel} changed since it was written (SHA-256 differs)")
    for path in sorted(checkpoint.rglob("*")):
        rel = path.relative_to(checkpoint).as_posix()
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        f.get_slice(key)
            elif path.suffix in (".bin", ".pkl", ".pt", ".pth"):
                try:
                    _load_weights_only(path)
                except Exception as err:  # noqa: BLE001 - torch raises many types; one line naming the file
                    from psa_adapter.reference import describe_load_error

                    raise CheckpointError(f"{checkpoint}: {rel} cannot be read safely: "
                                          f"{describe_load_error(err)}") from None
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure to parse means the file is not usable
            raise CheckpointError(f"{checkpoint}: {rel} cannot be read safely ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return state


def _load_weights_only(path: Path) -> None:
    """Open a torch pickle allowing tensors, numbers, strings, containers and numpy arrays only."""
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS  # numpy arrays of the RNG states
    except ImportError:
        TORCH_SAFE_GLOBALS = []
    with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
        torch.load(path, map_location="cpu", weights_only=True)


def resolve_resume(output_dir: Path, value: str | None) -> Path | None:
    """``latest`` -> the newest checkpoint that is whole (``verify_checkpoint``; broken ones are skipped with a
    warning naming them; None if there is none); a path -> that checkpoint (CheckpointError if it is broken)."""
    if not value:
        return None
    if value == "latest":
        for checkpoint in reversed(list_checkpoints(output_dir)):
            try:
                verify_checkpoint(checkpoint)
            except CheckpointError as err:
                logger.warning("skipping a broken checkpoint: %s", err)
                continue
            return checkpoint
        return None
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = output_dir / value
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: {path} is not a checkpoint (no {STATE_NAME})")
    verify_checkpoint(path)
    return path


def _flat_hparams(config: TrainConfig) -> dict:
    # TensorBoard's hparams accept scalars only.
    return {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}


# ------------------------------------------------------------------------------------------- resume safety
#: What decides which samples an optimizer step sees; a checkpoint resumes only into a run where all of it matches.
RUN_FIELDS = ("train_batch_size", "gradient_accumulation_steps", "num_processes", "seed", "pair_balance")


class ResumeMismatchError(ValueError):
    """A checkpoint from a run with another data order (batch size, accumulation, processes, seed or data set)."""


def run_identity(config: TrainConfig, num_processes: int, dataset: SageDataset) -> dict:
    """The record a checkpoint keeps of its run's data order: ``RUN_FIELDS`` plus the data set's identity."""
    return {"train_batch_size": config.train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "num_processes": num_processes, "seed": config.seed, "pair_balance": config.pair_balance,
            "data": dataset.identity()}


def check_resume_identity(checkpoint: Path, saved: dict | None, current: dict) -> None:
    """Raise ResumeMismatchError naming every field where ``saved`` (the checkpoint's record) differs from
    ``current`` (this run's). A checkpoint written before the record existed gets a warning."""
    if saved is None:
        logger.warning("%s records no batch size, accumulation, process count, seed or data set (written by an "
                       "older version); resuming without checking that they match this run", checkpoint)
        return
    diffs = [f"{name}: checkpoint {saved[name]!r}, this run {current[name]!r}"
             for name in RUN_FIELDS if name in saved and saved[name] != current[name]]
    old, new = saved.get("data"), current["data"]
    if old is not None and (old.get("sha256"), old.get("records")) != (new["sha256"], new["records"]):
        diffs.append(f"data set: checkpoint {old.get('metadata')} ({old.get('records')} records, sha256 "
                     f"{str(old.get('sha256'))[:12]}), this run {new['metadata']} ({new['records']} records, "
                     f"sha256 {new['sha256'][:12]})")
    elif old is not None and old.get("metadata") != new["metadata"]:
        logger.warning("%s was written with the data at %s; the same records (same content) are now at %s",
                       checkpoint, old.get("metadata"), new["metadata"])
    if diffs:
        raise ResumeMismatchError(
            f"cannot resume from {checkpoint}: it was written by a run with a different data order ("
            + "; ".join(diffs) + "). Resume with the checkpoint's settings, or start a new run in another "
            "--output_dir."
        )


# --------------------------------------------------------------------------------------------------- training
@dataclass
class TrainRun:
    """What one training job holds between its phases: ``setup_run`` -> ``resume_run`` -> ``train_loop`` ->
    ``finish_run``."""

    config: TrainConfig
    accelerator: object
    output_dir: Path
    models: Models
    dataset: SageDataset
    validation: ValidationSetup | None
    model: nn.Module  # the prepared DPOModel (wrapped for DDP with several processes)
    params: list[nn.Parameter]  # the trainable weights, all fp32
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    identity: dict  # run_identity(): recorded in every checkpoint, checked on resume
    global_step: int = 0
    last_checkpoint: Path | None = None

    @property
    def branch(self) -> TrainableBranch:
        return self.accelerator.unwrap_model(self.model).branch


def train(config: TrainConfig) -> Path | None:
    """Run one training job; returns the output folder holding the final adapter (None if stopped early)."""
    run = setup_run(config)
    resume_run(run)
    if run.accelerator.is_main_process:  # after resume_run: a refused checkpoint leaves the folder as it was
        config.save_yaml(run.output_dir / CONFIG_NAME)
    if not train_loop(run):
        return None
    return finish_run(run)


def setup_run(config: TrainConfig) -> TrainRun:
    """Accelerator, frozen models, data, the trainable branch, optimiser and schedule.

    The order is part of the result: the branch's initialisation draws from the global generator seeded here.
    """
    from accelerate.utils import set_seed

    output_dir = Path(config.output_dir)
    accelerator = _make_accelerator(config, output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)  # same adapter initialisation on every process and every run (bug 6: no default seed)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]

    # ---- models and data
    models = load_models(config, accelerator.device, weight_dtype)
    store = open_embedding_store(config.embeds_folder) if config.mode == "personalised" else None
    dataset = SageDataset(
        config.train_data_dir, config.train_split, embeddings=store, resolution=config.resolution,
        random_flip=config.random_flip, proportion_empty_prompts=config.proportion_empty_prompts, seed=config.seed,
        non_personalised=config.mode == "non_personalised", max_samples=config.max_train_samples,
    )
    validation = ValidationSetup.create(config, dataset, store) if config.validation_steps else None
    if config.cache_conditioning:
        cache_root = Path(config.cache_dir) if config.cache_dir else output_dir / "cache"
        dataset.cache = build_conditioning_cache(
            cache_root, dataset, models.vae, models.conditioner, model=config.sd_model, dtype=weight_dtype,
            process_index=accelerator.process_index, num_processes=accelerator.num_processes,
            barrier=accelerator.wait_for_everyone, show_progress=accelerator.is_local_main_process,
        )

    # ---- what trains
    user_matrix = torch.stack(list(dataset.user_embeds.values())) if dataset.user_embeds else None
    encoder = getattr(store, "metadata", None) if store is not None else None
    branch = build_branch(config, models.unet, getattr(dataset, "embed_dim", None), user_matrix,
                          encoder if isinstance(encoder, dict) else None)
    branch.to(accelerator.device)
    if config.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    params = branch.trainable_parameters()
    if any(p.dtype != torch.float32 for p in params):
        raise RuntimeError("trainable weights must be fp32 (bug 2: bf16 master weights round updates away)")

    # ---- optimiser and schedule
    optimizer, lr_scheduler = _make_optimizer(config, params)
    model, optimizer = accelerator.prepare(DPOModel(models.unet, branch), optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    # Only the branch's weights go into a checkpoint, never the frozen UNet.
    accelerator.register_save_state_pre_hook(functools.partial(_save_branch_hook, accelerator))
    accelerator.register_load_state_pre_hook(functools.partial(_load_branch_hook, accelerator))
    return TrainRun(config, accelerator, output_dir, models, dataset, validation, model, params, optimizer,
                    lr_scheduler, run_identity(config, accelerator.num_processes, dataset))


def _make_accelerator(config: TrainConfig, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    # accelerate only runs multi-process CPU jobs (gloo) when told to use the CPU; without GPUs, say so for it.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=multi_cpu,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


def _make_optimizer(config: TrainConfig, params: list[nn.Parameter]):
    """(optimizer, lr scheduler) for ``params``."""
    from diffusers.optimization import get_scheduler

    if config.use_adafactor:
        from transformers.optimization import Adafactor

        optimizer = Adafactor(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay,
                              clip_threshold=1.0, relative_step=False, scale_parameter=False, warmup_init=False)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                      weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    # Not passed to prepare(): a prepared scheduler steps once per process, so warm-up would depend on the count.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_train_steps)
    return optimizer, lr_scheduler


def _save_branch_hook(accelerator, hook_models, weights, directory) -> None:
    if accelerator.is_main_process:
        for m in hook_models:
            accelerator.unwrap_model(m).branch.save_weights(Path(directory) / BRANCH_DIR)
    weights.clear()


def _load_branch_hook(accelerator, hook_models, directory) -> None:
    while hook_models:
        accelerator.unwrap_model(hook_models.pop()).branch.load_weights(Path(directory) / BRANCH_DIR)


def resume_run(run: TrainRun) -> None:
    """Load the checkpoint ``--resume_from_checkpoint`` names (if any) into ``run`` and set its step.

    The checkpoint must come from a run with the same data order (``check_resume_identity``), else resuming
    would train on other samples than an uninterrupted run; the branch's shape is checked while loading.
    """
    config, accelerator = run.config, run.accelerator
    resume = resolve_resume(run.output_dir, config.resume_from_checkpoint)
    if resume is None:
        if config.resume_from_checkpoint:
            accelerator.print(f"no checkpoint in {run.output_dir}; starting a new run")
        return
    state = json.loads((resume / STATE_NAME).read_text(encoding="utf-8"))  # verified by resolve_resume
    check_resume_identity(resume, state.get("run"), run.identity)
    accelerator.print(f"resuming from {resume} (step {state['global_step']})")
    accelerator.load_state(str(resume))
    run.global_step, run.last_checkpoint = int(state["global_step"]), resume


def save_checkpoint(run: TrainRun, step: int) -> Path:
    """Write ``checkpoint-<step>`` whole or not at all (built in a temporary folder, then renamed); rotate old ones."""
    config, accelerator, output_dir = run.config, run.accelerator, run.output_dir
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        remove_leftovers(output_dir)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        config.save_yaml(tmp / CONFIG_NAME)
        # The state record is written last and lists every file with its size and hash: verify_checkpoint then
        # tells a whole checkpoint from a truncated or damaged one.
        state = {"global_step": step, "sd_model": config.sd_model, "mode": config.mode, "run": run.identity,
                 "files": checkpoint_files(tmp)}
        atomic_write_text(tmp / STATE_NAME, json.dumps(state, indent=2) + "\n")
        old = output_dir / f".old-checkpoint-{step}"
        if final.exists():  # a checkpoint of an earlier run at this step: replace it only once ours is whole
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
        if config.checkpoints_total_limit:
            for stale in list_checkpoints(output_dir)[:-config.checkpoints_total_limit]:
                # Renamed first, so a kill while deleting never leaves a half-deleted checkpoint-<n> behind.
                doomed = output_dir / f".old-{stale.name}"
                if doomed.exists():
                    shutil.rmtree(doomed)
                os.replace(stale, doomed)
                shutil.rmtree(doomed)
    accelerator.wait_for_everyone()
    return final


def remove_leftovers(output_dir: Path) -> None:
    """Delete what a run killed while writing leaves behind: half-built ``.tmp-checkpoint-*`` folders, half-deleted
    ``.old-checkpoint-*`` ones and temporary files of atomic writes. Never touches a ``checkpoint-<n>`` folder."""
    for leftover in [*output_dir.glob(".tmp-checkpoint-*"), *output_dir.glob(".old-checkpoint-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in output_dir.glob(".*.tmp"):
        if leftover.is_file():
            leftover.unlink()


def train_loop(run: TrainRun) -> bool:
    """Optimizer steps from ``run.global_step`` on, with checkpoints and validation grids on their schedule.

    Returns True when ``max_train_steps`` is reached, False when the run stopped at ``stop_after_steps``.
    """
    from tqdm.auto import tqdm

    config, accelerator, dataset = run.config, run.accelerator, run.dataset
    # The data position follows from the step alone (the sampler skips the global batches already trained on).
    weights = None
    if config.pair_balance == "category":
        groups = dataset.pair_groups()
        weights, sizes = balanced_weights(groups), collections.Counter(groups).values()
        accelerator.print(f"pair_balance category: {len(sizes)} (category, case) cells drawn equally often "
                          f"({min(sizes)} to {max(sizes)} pairs each)")
    sampler = ShardedBatchSampler(len(dataset), config.train_batch_size, accelerator.num_processes,
                                  accelerator.process_index, seed=config.seed,
                                  start_batch=run.global_step * config.gradient_accumulation_steps, weights=weights)
    dataloader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                             num_workers=config.dataloader_num_workers)
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("psa_train", config=_flat_hparams(config))
    global_batch = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    accelerator.print(
        f"{len(dataset)} pairs, {sampler.batches_per_epoch} global micro-batches per epoch; "
        f"{global_batch} pairs per optimizer step; {sum(p.numel() for p in run.params):,} trainable parameters"
    )

    run.model.train()
    progress = tqdm(total=config.max_train_steps, initial=run.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    window: list[torch.Tensor] = []  # per micro-batch metrics of the current optimizer step
    for batch in dataloader if run.global_step < config.max_train_steps else ():
        metrics, grad_norm = train_micro_step(run, batch)
        window.append(torch.stack([v.float() for v in metrics.values()]))
        if not accelerator.sync_gradients:
            continue

        run.global_step += 1
        step = run.global_step
        _log_step(run, list(metrics), window, grad_norm, progress)
        window = []
        if step % config.checkpointing_steps == 0 or step == config.stop_after_steps:
            run.last_checkpoint = save_checkpoint(run, step)
        if run.validation is not None and step % config.validation_steps == 0:
            if accelerator.is_main_process:
                run.validation.run(run.models.pipe, run.branch, step, accelerator, run.output_dir)
            accelerator.wait_for_everyone()
        if step == config.stop_after_steps and step < config.max_train_steps:
            accelerator.print(f"stopped after step {step} as asked; resume with --resume_from_checkpoint latest")
            progress.close()
            accelerator.end_training()
            return False
        if step >= config.max_train_steps:
            break
    progress.close()
    return True


def train_micro_step(run: TrainRun, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Forward and backward of one micro-batch; the optimizer steps when gradients are synchronised.

    Returns (scalar metrics of ``dpo_loss``, the gradient norm before clipping or None).
    """
    config, accelerator = run.config, run.accelerator
    grad_norm = None
    with accelerator.accumulate(run.model):
        noisy, timesteps, target, hidden, user_embeds, added = diffusion_inputs(
            batch, run.models, config.resolution, accelerator.device, (config.min_timestep, config.max_timestep)
        )
        policy_pred, ref_pred = run.model(noisy, timesteps, hidden, user_embeds, added)
        b = target.shape[0]
        loss, metrics = dpo_loss(policy_pred[:b], policy_pred[b:], ref_pred[:b], ref_pred[b:], target,
                                 beta=config.beta_dpo, sft_weight=config.sft_weight)
        # Every process must see the same verdict, or the healthy ones would wait forever.
        losses = accelerator.gather(loss.detach().reshape(1))
        if not torch.isfinite(losses).all():
            raise NonFiniteLossError(
                f"loss became {losses.tolist()} at optimizer step {run.global_step + 1} (epoch "
                f"{int(batch['epoch'][0])}); stopping. Last good checkpoint: "
                f"{run.last_checkpoint or 'none (no checkpoint saved yet)'}. Try a lower learning rate or "
                "mixed_precision bf16 instead of fp16."
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            if config.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(run.params, config.max_grad_norm)
            run.optimizer.step()
            if not getattr(run.optimizer, "step_was_skipped", False):
                run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
    return {k: v for k, v in metrics.items() if v.ndim == 0}, grad_norm


def _log_step(run: TrainRun, names: list[str], window: list[torch.Tensor], grad_norm, progress) -> None:
    """Log one optimizer step: its micro-batches' metrics averaged over them and over the processes."""
    accelerator = run.accelerator
    averaged = accelerator.reduce(torch.stack(window).mean(0), reduction="mean").tolist()
    logs = dict(zip(names, averaged))
    logs["lr"] = run.lr_scheduler.get_last_lr()[0]
    if grad_norm is not None:
        logs["grad_norm"] = float(grad_norm)
    accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=run.global_step)
    progress.update(1)
    progress.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['implicit_acc']:.2f}")


def finish_run(run: TrainRun) -> Path:
    """Save the final weights and the resolved config into the output folder; returns it."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.branch.save_weights(run.output_dir)
        run.config.save_yaml(run.output_dir / CONFIG_NAME)
        remove_leftovers(run.output_dir)
        accelerator.print(f"saved the trained weights and {CONFIG_NAME} to {run.output_dir}")
    accelerator.end_training()
    return run.output_dir


# ------------------------------------------------------------------------------------------------ validation
@dataclass
class ValidationSetup:
    """A small image grid: rows are prompts, columns the base model then each validation user."""

    prompts: list[str]
    labels: list[str]  # one per user column: the user id, or "L3=0000002" for a level preset
    user_embeds: torch.Tensor | None  # (U, E)
    config: TrainConfig

    @classmethod
    def create(cls, config: TrainConfig, dataset: SageDataset, store) -> ValidationSetup:
        prompts = config.validation_prompts or [c for c in dataset.captions() if c][:2]
        if not dataset.non_personalised:
            labels, user_ids = [], []
            for name in config.validation_users or dataset.user_ids()[:3]:
                if re.fullmatch(r"[Ll]\d+", name):  # a strictness level preset (SPEC section 3) is a fixed user
                    from psa_adapter.users import load_level

                    uid = load_level(name).user_id
                    labels.append(f"{name.upper()}={uid}")
                else:
                    uid = name
                    labels.append(uid)
                user_ids.append(uid)
            rows = []
            for uid in user_ids:  # checked now, not after an hour of training
                if uid in dataset.user_embeds:
                    rows.append(dataset.user_embeds[uid])
                    continue
                try:
                    rows.append(torch.tensor(np.asarray(store[uid]), dtype=torch.float32).reshape(-1))
                except KeyError as err:
                    source = getattr(store, "source", "the embedding store")
                    raise MissingEmbeddingError(uid, f"{source} (needed for validation images)") from err
            return cls(prompts, labels, torch.stack(rows), config)
        return cls(prompts, [], None, config)

    @torch.no_grad()
    def run(self, pipe, branch: TrainableBranch, step: int, accelerator, output_dir: Path) -> Path:
        from psa_adapter.loaders import load_psa_adapter
        from psa_adapter.pipeline import generate

        config = self.config
        seeds = [config.seed + i for i in range(len(self.prompts))]
        kwargs = dict(guidance_scale=config.validation_guidance_scale, height=config.resolution,
                      width=config.resolution, num_inference_steps=config.validation_num_inference_steps)
        columns, labels = [], []
        with accelerator.autocast():
            if isinstance(branch, PSABranch):
                load_psa_adapter(pipe, branch.adapter)  # already on pipe.unet: gives the pipeline the PSA verbs
                n = len(self.prompts)
                columns.append(generate(pipe, self.prompts, seeds, user_embeds=self.user_embeds[:1].expand(n, -1),
                                        psa_scale=0.0, **kwargs))
                labels.append("base")
                for label, embeds in zip(self.labels, self.user_embeds):
                    columns.append(generate(pipe, self.prompts, seeds, user_embeds=embeds.expand(n, -1), **kwargs))
                    labels.append(label)
            else:
                with branch.reference():
                    columns.append(generate(pipe, self.prompts, seeds, **kwargs))
                columns.append(generate(pipe, self.prompts, seeds, **kwargs))
                labels = ["base", "policy"]
        rows, cols = len(columns[0]), len(columns)
        grid = image_grid([columns[c][r] for r in range(rows) for c in range(cols)], cols=cols)
        path = output_dir / "validation" / f"step-{step:06d}.png"
        atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
        atomic_write_text(path.with_suffix(".json"),
                          json.dumps({"rows": self.prompts, "columns": labels, "seeds": seeds}, indent=2) + "\n")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        return path


__all__ = [
    "DPOModel",
    "NonFiniteLossError",
    "LoRABranch",
    "PSABranch",
    "ResumeMismatchError",
    "TrainRun",
    "TrainableBranch",
    "CheckpointError",
    "build_branch",
    "check_resume_identity",
    "verify_checkpoint",
    "diffusion_inputs",
    "finish_run",
    "list_checkpoints",
    "load_models",
    "resume_run",
    "run_identity",
    "setup_run",
    "train",
    "train_loop",
]
