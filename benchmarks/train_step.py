"""One DPO training step at the real SD1.5 (or SDXL) architecture with random weights: ours vs a two-UNet design.

* ours: one frozen UNet; the reference prediction is the same UNet with the adapter at scale 0.
* two-UNet: what the reference implementation does: a second, frozen copy of the UNet for the reference pass.
* cache: ours again, with VAE moments and text embeddings precomputed (``--cache_conditioning``).

Each design runs in its own process so that its peak memory is its own (peak RSS on CPU, peak allocated CUDA memory
on GPU). Times are medians over ``--steps`` steps after one warm-up step; ours and two-UNet steps are interleaved in
the two-UNet process so that both see the same machine load. Batch: one preference pair. The last line is
``memory_ratio=<ours/two-unet> time_ratio=<ours/two-unet> cache_speedup=<uncached/cached>``.

    python benchmarks/train_step.py                      # SD1.5 architecture, 128 px, CPU, fp32
    python benchmarks/train_step.py --device cuda --dtype bf16 --resolution 512
    python benchmarks/train_step.py --device cuda --dtype bf16 --model sdxl --resolution 1024 --gradient_checkpointing
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Public architecture configs (diffusers' config.json of the released models), random weights.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")


def build_models(args, device, dtype):
    """Frozen UNet, VAE and text encoder(s) with random weights, as a training.Models bundle."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from psa_adapter.conditioning import TextConditioner
    from psa_adapter.testing import tiny_tokenizer
    from psa_adapter.training import Models

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(SDXL_UNET if args.model == "sdxl" else SD15_UNET))
        vae = AutoencoderKL(**SD_VAE)
        tokenizer = tiny_tokenizer()  # tokenisation cost is negligible; the encoders are full size
        encoders = [CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **CLIP_L))]
        if args.model == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tokenizer), **CLIP_BIGG)))
    for module in (unet, vae, *encoders):
        module.requires_grad_(False).eval().to(dtype)
    if dtype == torch.float16:
        vae.to(torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    conditioner = TextConditioner([tokenizer] * len(encoders), encoders, sdxl=args.model == "sdxl")
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return Models(None, unet, vae, conditioner, scheduler, args.model == "sdxl")


class TwoUNetDPOModel(torch.nn.Module):
    """The reference implementation's design: the reference prediction comes from a separate frozen UNet copy."""

    def __init__(self, unet, ref_unet, branch):
        super().__init__()
        self.unet, self.ref_unet, self.branch = unet, ref_unet, branch

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, user_embeds=None, added_cond_kwargs=None):
        with torch.no_grad():
            ref_pred = self.ref_unet(noisy_latents, timesteps, encoder_hidden_states,
                                     added_cond_kwargs=added_cond_kwargs).sample
        policy_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                                **self.branch.unet_kwargs(user_embeds)).sample
        return policy_pred, ref_pred


def make_batch(args, models, cached: bool, step: int):
    """One preference pair as the dataset would deliver it (pixels) or as the cache would (moments + text)."""
    from psa_adapter.data.cache import vae_moments

    g = torch.Generator().manual_seed(step)
    r = args.resolution
    batch = {"caption": ["a photo of a cat on a red sofa"], "noise_seed": torch.tensor([1000 + step]),
             "user_embeds": torch.randn(1, args.embed_dim, generator=g),
             "pixel_values_w": torch.rand(1, 3, r, r, generator=g) * 2 - 1,
             "pixel_values_l": torch.rand(1, 3, r, r, generator=g) * 2 - 1}
    if cached:  # what build_conditioning_cache stores, computed once outside the timed step
        batch["moments_w"] = vae_moments(models.vae, batch.pop("pixel_values_w"))
        batch["moments_l"] = vae_moments(models.vae, batch.pop("pixel_values_l"))
        text = models.conditioner.encode(batch["caption"])
        batch["encoder_hidden_states"] = text.encoder_hidden_states
        if text.pooled_text_embeds is not None:
            batch["pooled_text_embeds"] = text.pooled_text_embeds
    return batch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, models, optimizer, batch, args, device, autocast) -> float:
    """One full optimizer step (encode, noise, reference + policy passes, DPO loss, backward, AdamW); seconds."""
    from psa_adapter.loss import dpo_loss
    from psa_adapter.training import diffusion_inputs

    synchronize(device)
    start = time.perf_counter()
    with autocast:
        noisy, t, target, hidden, users, added = diffusion_inputs(batch, models, args.resolution, device)
        policy, ref = model(noisy, t, hidden, users, added)
    loss, _ = dpo_loss(policy[:1], policy[1:], ref[:1], ref[1:], target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(args) -> dict:
    """Measure one design in this process; returns figures as a dict."""
    from psa_adapter.adapter import PSAAdapter
    from psa_adapter.training import DPOModel, PSABranch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    models = build_models(args, device, dtype)
    # The second UNet of the two-UNet design: a copy of the base UNet, made before the adapter wraps its processors.
    ref_unet = copy.deepcopy(models.unet) if args.worker != "ours" else None
    adapter = PSAAdapter.for_unet(models.unet, embed_dim=args.embed_dim, num_tokens=1).to(device)
    branch = PSABranch(models.unet, adapter)
    ours = DPOModel(models.unet, branch)
    optimizer = torch.optim.AdamW(branch.trainable_parameters(), lr=5e-6, weight_decay=1e-2)
    designs = {}
    if args.worker == "ours":
        designs = {"ours": (ours, False), "ours_cached": (ours, True)}
    else:
        designs = {"two_unet": (TwoUNetDPOModel(models.unet, ref_unet, branch), False), "ours": (ours, False)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {name: [] for name in designs}
    for step in range(args.steps + 1):  # step 0 warms up
        for name, (model, cached) in designs.items():
            batch = make_batch(args, models, cached, step)
            seconds = train_step(model, models, optimizer, batch, args, device, autocast)
            if step:
                times[name].append(seconds)
    figures = {f"{name}_s": statistics.median(values) for name, values in times.items()}
    figures["peak_gib"] = peak_memory_gib(device)
    figures["trainable_params"] = sum(p.numel() for p in branch.trainable_parameters())
    return figures


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sd15", help="UNet architecture.")
    parser.add_argument("--resolution", type=int, default=128, help="Image size in pixels (latents are /8).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="Frozen-model dtype and autocast (trainable weights stay fp32).")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per design (after one warm-up).")
    parser.add_argument("--embed_dim", type=int, default=3584, help="User-embedding size E (reference: 3584).")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default). 1 is steadier on a shared, busy machine.")
    parser.add_argument("--worker", choices=("ours", "two_unet"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {}
    for name in ("ours", "two_unet"):  # one after the other: two torch jobs at once would distort times
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", name]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        if done.returncode != 0:
            raise SystemExit(f"worker {name} failed:\n{done.stderr[-4000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, two = results["ours"], results["two_unet"]
    print(f"{args.model} architecture, random weights, {args.resolution}x{args.resolution}, 1 pair per step, "
          f"{args.device}, {args.dtype}, torch threads {args.threads or torch.get_num_threads()}, "
          f"{ours['trainable_params']:,} trainable parameters (E={args.embed_dim}, K=1)")
    print(f"{'design':<22}{'step s':>10}{'peak GiB':>10}")
    print(f"{'ours':<22}{ours['ours_s']:>10.3f}{ours['peak_gib']:>10.2f}")
    print(f"{'ours + cache':<22}{ours['ours_cached_s']:>10.3f}{'':>10}")
    print(f"{'two-UNet':<22}{two['two_unet_s']:>10.3f}{two['peak_gib']:>10.2f}")
    print(f"{'ours (same process)':<22}{two['ours_s']:>10.3f}{'':>10}")
    if args.device == "cuda":
        print(f"pairs/s: ours {1 / ours['ours_s']:.2f}, ours + cache {1 / ours['ours_cached_s']:.2f}, "
              f"two-UNet {1 / two['two_unet_s']:.2f}")
    memory_ratio = ours["peak_gib"] / two["peak_gib"]
    time_ratio = two["ours_s"] / two["two_unet_s"]
    cache_speedup = ours["ours_s"] / ours["ours_cached_s"]
    print(f"memory_ratio={memory_ratio:.3f} time_ratio={time_ratio:.3f} cache_speedup={cache_speedup:.3f}")


if __name__ == "__main__":
    main()
