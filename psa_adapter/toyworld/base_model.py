"""The toy base model: a tiny SD1.5-architecture text-to-image pipeline trained from scratch on the toy world.

Same classes as SD1.5 (``AutoencoderKL``, ``UNet2DConditionModel``, ``CLIPTextModel`` + ``CLIPTokenizer``,
DDIM scheduler, no safety checker), only small: 32x32 images, 4x8x8 latents, about 1.9 M parameters.
Training has two stages, run one after the other on the CPU:

1. VAE: reconstruction (MSE + L1 + a tiny KL) on world images with and without marks; then
   ``scaling_factor = 1 / std(latents)`` is written into its config, as SD does.
2. UNet and text encoder jointly: epsilon prediction on VAE latents of (safe, harmful) images with their
   captions (like SD, trained on everything), 10% empty captions for classifier-free guidance.

The result is saved with ``StableDiffusionPipeline.save_pretrained`` and loads with ``from_pretrained(path)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from psa_adapter.toyworld.config import save_config
from psa_adapter.toyworld.tokenizer import check_single_tokens, write_world_tokenizer
from psa_adapter.toyworld.world import ToyWorld, WorldConfig, to_float_chw
from psa_adapter.utils import atomic_write_text

TRAIN_STREAM, HELDOUT_STREAM = 0, 1  # scene streams: training scenes and held-out scenes never overlap


@dataclass
class ToyBaseConfig:
    """Architecture and training settings of the toy base model (defaults: the measured settings in TOYWORLD.md)."""

    seed: int = field(default=0, metadata={"help": "torch and data seed; the whole run is deterministic from it."})
    world: dict = field(default_factory=dict, metadata={"help": "WorldConfig fields; {} = the default world."})
    n_scenes: int = field(default=12000, metadata={"help": "Training scenes; each gives a safe and a marked image."})
    # VAE
    vae_block_out_channels: list = field(default_factory=lambda: [32, 32, 64], metadata={"help": "VAE widths."})
    vae_norm_num_groups: int = field(default=16, metadata={"help": "GroupNorm groups in the VAE."})
    latent_channels: int = field(default=4, metadata={"help": "Latent channels (SD: 4)."})
    vae_steps: int = field(default=1200, metadata={"help": "VAE optimizer steps."})
    vae_batch_size: int = field(default=32, metadata={"help": "VAE batch size."})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE AdamW learning rate (cosine decay)."})
    vae_l1_weight: float = field(default=0.5, metadata={"help": "Weight of the L1 term beside MSE."})
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "KL weight: tiny, as in SD's VAE."})
    vae_mark_weight: float = field(default=10.0, metadata={"help": "Extra loss weight on mark pixels (tiny)."})
    vae_max_marks: int = field(default=3, metadata={"help": "VAE images carry 0..this many random marks."})
    # UNet + text encoder
    unet_block_out_channels: list = field(default_factory=lambda: [32, 64], metadata={"help": "UNet widths."})
    unet_norm_num_groups: int = field(default=16, metadata={"help": "GroupNorm groups in the UNet."})
    attention_heads: int = field(default=4, metadata={"help": "Attention heads in every UNet attention layer."})
    cross_attention_dim: int = field(default=64, metadata={"help": "Text hidden size = UNet cross-attention dim."})
    text_layers: int = field(default=2, metadata={"help": "CLIP text encoder layers."})
    text_heads: int = field(default=4, metadata={"help": "CLIP text encoder heads."})
    text_intermediate_size: int = field(default=256, metadata={"help": "CLIP text encoder MLP width."})
    max_length: int = field(default=16, metadata={"help": "Token positions (captions are at most 7 tokens)."})
    unet_steps: int = field(default=2000, metadata={"help": "UNet + text encoder optimizer steps."})
    unet_batch_size: int = field(default=64, metadata={"help": "UNet batch size."})
    unet_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (warm-up, then cosine)."})
    warmup_steps: int = field(default=200, metadata={"help": "Linear warm-up steps of the UNet stage."})
    caption_dropout: float = field(default=0.1, metadata={"help": "Share of empty captions (for CFG)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    num_train_timesteps: int = field(default=1000, metadata={"help": "Diffusion steps (SD: 1000)."})
    beta_start: float = field(default=0.00085, metadata={"help": "SD1.5 scaled-linear schedule start."})
    beta_end: float = field(default=0.012, metadata={"help": "SD1.5 scaled-linear schedule end."})
    log_every: int = field(default=100, metadata={"help": "Log the mean loss every this many steps."})

    def __post_init__(self):
        self.world_config = WorldConfig.from_dict(dict(self.world), where="ToyBaseConfig.world")
        for name in ("n_scenes", "vae_batch_size", "unet_batch_size", "max_length", "num_train_timesteps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ToyBaseConfig.{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("vae_steps", "unet_steps", "warmup_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"ToyBaseConfig.{name}: expected >= 0, got {getattr(self, name)}")
        if len(self.vae_block_out_channels) != 3:
            raise ValueError(
                f"ToyBaseConfig.vae_block_out_channels: expected 3 widths (32 px -> 8x8 latents), "
                f"got {self.vae_block_out_channels}"
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"ToyBaseConfig.caption_dropout: expected [0, 1), got {self.caption_dropout}")
        if self.cross_attention_dim % self.text_heads:
            raise ValueError("ToyBaseConfig: cross_attention_dim must be divisible by text_heads")


# -- model construction ----------------------------------------------------------------------------------------
def build_vae(cfg: ToyBaseConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_block_out_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_num_groups,
        sample_size=32,
    )


def build_unet(cfg: ToyBaseConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_block_out_channels)
    return UNet2DConditionModel(
        sample_size=32 // 2 ** (len(cfg.vae_block_out_channels) - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=tuple(cfg.unet_block_out_channels),
        layers_per_block=1,
        norm_num_groups=cfg.unet_norm_num_groups,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_heads,  # diffusers' SD1.5 naming: this is the number of heads
    )


def build_text_encoder(cfg: ToyBaseConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.cross_attention_dim,
        intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_scheduler(cfg: ToyBaseConfig):
    """DDIM with SD1.5's scaled-linear betas; training uses ``DDPMScheduler.from_config`` of the same config."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- data --------------------------------------------------------------------------------------------------------
def training_examples(world: ToyWorld, n_scenes: int, stream: int = TRAIN_STREAM) -> tuple[np.ndarray, list[str]]:
    """Images uint8 ``(2 n, 32, 32, 3)`` and captions: scene i's safe image then its marked image."""
    images, captions = [], []
    for item in world.sample_pairs(n_scenes, stream=stream):
        images.append(world.render(item["scene"]))
        captions.append(item["safe_caption"])
        images.append(world.render(item["scene"], [item["category"]]))
        captions.append(item["harmful_caption"])
    return np.stack(images), captions


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


# -- training ---------------------------------------------------------------------------------------------------
def marked_batch(world: ToyWorld, rng: np.random.Generator, n: int, n_scenes: int, stream: int,
                 max_marks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE data: ``n`` random scenes with 0..``max_marks`` random marks each.

    Returns images float ``(n, 3, 32, 32)`` in [-1, 1] and the mark mask float ``(n, 1, 32, 32)`` (1 where a
    mark changed a pixel).
    """
    cats = world.categories
    imgs, masks = [], []
    for _ in range(n):
        scene = world.scene(int(rng.integers(n_scenes)), stream)
        k = int(rng.integers(0, max_marks + 1))
        marks = [cats[j] for j in rng.choice(len(cats), size=k, replace=False)]
        clean, marked = world.render(scene), world.render(scene, marks)
        imgs.append(marked)
        masks.append((clean != marked).any(-1))
    return to_float_chw(np.stack(imgs)), torch.from_numpy(np.stack(masks)).float()[:, None]


def train_vae(cfg: ToyBaseConfig, world: ToyWorld, log: dict):
    """Train the VAE on world scenes with random marks; set its scaling factor. Returns the VAE.

    Marks cover 1-3% of an image, so a plain MSE lets the VAE drop them (28 dB, five of seven marks lost in a
    first run); mark pixels therefore weigh ``vae_mark_weight`` times more, the role SD's perceptual and
    adversarial losses play for small details.
    """
    vae = build_vae(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rng = np.random.default_rng([cfg.seed, 11])
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(50, cfg.vae_steps // 10), cfg.vae_steps))
    losses, t0 = [], time.time()
    vae.train()
    for step in tqdm(range(cfg.vae_steps), desc="VAE", mininterval=5):
        x, mask = marked_batch(world, rng, cfg.vae_batch_size, cfg.n_scenes, TRAIN_STREAM, cfg.vae_max_marks)
        weight = 1.0 + cfg.vae_mark_weight * mask
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / x[0].numel()
        err = recon - x
        loss = (weight * err**2).mean() + cfg.vae_l1_weight * (weight * err.abs()).mean() + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            tqdm.write(f"vae step {step + 1}: loss {np.mean(losses[-cfg.log_every :]):.5f}")
    vae.eval()
    held_rng = np.random.default_rng([cfg.seed, 12])
    heldout, held_mask = marked_batch(world, held_rng, 1024, 10**6, HELDOUT_STREAM, cfg.vae_max_marks)
    with torch.no_grad():
        train_imgs, _ = marked_batch(world, held_rng, 2048, cfg.n_scenes, TRAIN_STREAM, 1)
        z = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in train_imgs.split(256)])
        std = z.std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        rec = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in heldout.split(256)])
    on_marks = held_mask.expand_as(heldout).bool()
    log["vae"] = {
        "steps": cfg.vae_steps,
        "seconds": round(time.time() - t0, 1),
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "latent_std": std,
        "scaling_factor": 1.0 / std,
        "heldout_psnr_db": psnr(rec, heldout),
        "heldout_mark_pixels_psnr_db": psnr(rec[on_marks], heldout[on_marks]),
        "params": count_params(vae),
    }
    return vae


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Posterior means times the scaling factor: float ``(N, C, 8, 8)``."""
    return torch.cat([vae.encode(c).latent_dist.mean for c in images.split(256)]) * vae.config.scaling_factor


def train_unet(cfg: ToyBaseConfig, latents: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor,
               unet, text_encoder, log: dict) -> None:
    """Train ``unet`` and ``text_encoder`` jointly on ``latents (N, C, 8, 8)`` and ``input_ids (N, L)``."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
    )
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.unet_steps))
    unet.train()
    text_encoder.train()
    losses, t0 = [], time.time()
    for step in tqdm(range(cfg.unet_steps), desc="UNet", mininterval=5):
        idx = torch.randint(len(latents), (cfg.unet_batch_size,), generator=gen)
        x0, ids = latents[idx], input_ids[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < cfg.caption_dropout
        ids[drop] = empty_ids  # the pipeline's unconditional branch encodes "" exactly like this
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, cfg.num_train_timesteps, (len(idx),), generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        encoder_hidden_states = text_encoder(ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=encoder_hidden_states).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            tqdm.write(f"unet step {step + 1}: loss {np.mean(losses[-cfg.log_every :]):.5f}")
    unet.eval()
    text_encoder.eval()
    log["unet"] = {
        "steps": cfg.unet_steps,
        "seconds": round(time.time() - t0, 1),
        "final_loss": float(np.mean(losses[-100:])) if losses else None,
        "unet_params": count_params(unet),
        "text_encoder_params": count_params(text_encoder),
    }


def train_base(cfg: ToyBaseConfig, out: str | os.PathLike) -> Path:
    """Train the whole toy base model and save it as a ``StableDiffusionPipeline`` folder at ``out``.

    Writes the pipeline, ``resolved_config.yaml``, ``world.yaml`` and ``training_log.json`` (timings, PSNR).
    The folder is assembled beside ``out`` and moved into place at the end, so a crash leaves no half model.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(cfg.seed)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    world = ToyWorld(cfg.world_config)
    t_start = time.time()
    log: dict = {"torch_threads": torch.get_num_threads()}

    tok_dir = write_world_tokenizer(tmp / "_tokenizer", world.words(), model_max_length=cfg.max_length)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))

    vae = train_vae(cfg, world, log)
    images_np, captions = training_examples(world, cfg.n_scenes)
    latents = encode_latents(vae, to_float_chw(images_np))

    def tokenize(texts):
        return tokenizer(texts, padding="max_length", max_length=cfg.max_length, truncation=True,
                         return_tensors="pt").input_ids

    input_ids = tokenize(captions)
    empty_ids = tokenize([""])[0]
    text_encoder = build_text_encoder(cfg, tokenizer)
    unet = build_unet(cfg)
    train_unet(cfg, latents, input_ids, empty_ids, unet, text_encoder, log)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    # transformers 5 saves only tokenizer.json; keep the plain CLIP BPE files too (older readers, inspection).
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tok_dir / name, tmp / "tokenizer" / name)
    shutil.rmtree(tok_dir)
    save_config(cfg, tmp / "resolved_config.yaml")
    cfg.world_config.save_yaml(tmp / "world.yaml")
    log["total_seconds"] = round(time.time() - t_start, 1)
    atomic_write_text(tmp / "training_log.json", json.dumps(log, indent=2))
    _replace_dir(tmp, out)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` over ``dst`` (the old ``dst``, if any, is removed only after the move succeeded)."""
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def load_base_pipeline(path: str | os.PathLike, scheduler: str = "ddim"):
    """Load the toy base model as a ``StableDiffusionPipeline`` (offline), with a clear error if files are missing.

    ``scheduler``: ``"ddim"`` (saved default) or ``"ddpm"``.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    path = Path(path)
    require_files(
        path,
        ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
         "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt"],
        retrain=f"python -m psa_adapter.toyworld train-base --config configs/toy_base.yaml --out {path}",
    )
    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
    if scheduler == "ddpm":
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    elif scheduler != "ddim":
        raise ValueError(f"scheduler: expected 'ddim' or 'ddpm', got {scheduler!r}")
    pipe.set_progress_bar_config(disable=True)
    world = ToyWorld(WorldConfig.from_yaml(path / "world.yaml")) if (path / "world.yaml").exists() else None
    if world is not None:
        check_single_tokens(pipe.tokenizer, world.words())
    return pipe


class MissingWeightsError(FileNotFoundError):
    """A shipped toy-world weight file is missing; the message says how to retrain it."""


def require_files(folder: Path, names: list[str], retrain: str) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise MissingWeightsError(
            f"{folder}: missing {missing}. These weights ship with the repository (trained_models/toy/); "
            f"restore them with `git checkout -- {folder}` or retrain them with:\n    {retrain}"
        )
