"""Inference time of the PSA pipeline over the base pipeline, measured side by side in one run.

Same pipeline object, prompts, seeds and steps; the adapter is loaded (``load_psa_adapter``) for the PSA runs and
unloaded for the base runs, and the two alternate (ABBA order) so that drifting machine load hits both alike. Two
model sizes:

* ``tiny``: the tiny SD1.5-style test pipeline (psa_adapter.testing), 32 px;
* ``sd15-arch``: the real SD1.5 UNet architecture (UNet2DConditionModel with SD1.5's config, 860 M parameters,
  random weights) with a small CLIP text encoder (D=768) and a small VAE (8x downsampling) so that the UNet, where
  the adapter works, dominates; small resolution and few steps so that it runs on a CPU.

K = 1 is the reference setting (a fast path: the branch is ``scale * to_v_user(u)``, no attention); K = 4 runs
real attention over the user tokens. It also prints adapter parameter counts for the SD1.5 and SDXL layouts at
E = 3584 (SDXL's UNet is built on the meta device, so no memory is used).

    python benchmarks/infer_overhead.py                 # CPU defaults
    python benchmarks/infer_overhead.py --device cuda   # fp16, larger default resolution

The last line is ``psa_over_base=<sd15-arch, K=1: median over repeats of PSA time / base time of the same repeat>``.
On a CPU shared with other jobs the per-repeat ratios spread by several percent either way; the table shows the
spread. The adapter's own work at K=1 is one (B, 1, D) x (D, H) product and one broadcast add per layer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from psa_adapter.adapter import PSAAdapter, cross_attention_layers  # noqa: E402
from psa_adapter.loaders import load_psa_adapter, unload_psa_adapter  # noqa: E402
from psa_adapter.pipeline import generate  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # the other SD1.5 values are diffusers' defaults
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def sd15_architecture_pipeline(dtype: torch.dtype):
    """StableDiffusionPipeline around SD1.5's UNet (random weights), a 2-layer D=768 text encoder and a small VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from psa_adapter.testing import tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
        max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    ))
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8, latent_channels=4,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe


def tiny_pipeline(dtype: torch.dtype):
    from psa_adapter.testing import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(seed=0)
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe


def random_adapter(unet, embed_dim: int, num_tokens: int) -> PSAAdapter:
    """An adapter with non-zero branch weights (a zero branch would cost the same, but nonzero is honest)."""
    adapter = PSAAdapter.for_unet(unet, embed_dim=embed_dim, num_tokens=num_tokens)
    with torch.no_grad():
        for branch in adapter.branches.values():
            branch.to_k_user.weight.normal_(0, 0.02)
            branch.to_v_user.weight.normal_(0, 0.02)
    return adapter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(pipe, adapters: dict[int, PSAAdapter], *, device, batch: int, steps: int, size: int, repeats: int,
            embed_dim: int, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per generate() call for "base" and "K=<k>" for each adapter, interleaved ABBA over repeats.

    ``clock`` is wall time by default; on a shared CPU, ``time.process_time`` (this process's CPU seconds) ignores
    the time spent waiting for a core that other jobs hold.
    """
    prompts, seeds = [PROMPT] * batch, list(range(batch))
    user_embeds = torch.randn(batch, embed_dim, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=steps, height=size, width=size, guidance_scale=7.5, output_type="np")

    def run(mode: str) -> float:
        adapter = adapters.get(int(mode[2:])) if mode != "base" else None
        if adapter is not None:
            load_psa_adapter(pipe, adapter, scale=1.0)
        try:
            _sync(device)
            start = clock()
            generate(pipe, prompts, seeds, user_embeds=None if adapter is None else user_embeds, **kwargs)
            _sync(device)
            return clock() - start
        finally:
            unload_psa_adapter(pipe)

    modes = ["base"] + [f"K={k}" for k in adapters]
    for mode in modes:  # warm-up: allocator, kernels, lazy imports
        run(mode)
    times = {mode: [] for mode in modes}
    for r in range(repeats):
        order = modes if r % 2 == 0 else modes[::-1]
        for mode in order:
            times[mode].append(run(mode))
    return times


def flop_ratio(unet, adapter: PSAAdapter, size_latent: int, batch: int = 2) -> tuple[float, float]:
    """Floating-point operations of one UNet call with the adapter (scale 1) and without, counted by torch's
    FlopCounterMode (matmuls, convolutions, attention): deterministic, unlike times on a shared machine."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(unet.parameters())
    sample = torch.randn(batch, unet.config.in_channels, size_latent, size_latent, device=param.device,
                         dtype=param.dtype)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, device=param.device, dtype=param.dtype)
    timestep = torch.full((batch,), 500, device=param.device)
    weight = adapter.user_proj.proj.weight
    with torch.no_grad():
        tokens = adapter.user_tokens(torch.randn(batch, adapter.config.embed_dim, device=weight.device))
    counts = []
    for use_adapter in (False, True):
        if use_adapter:
            adapter.attach(unet)
        try:
            extra = adapter.unet_kwargs(tokens) if use_adapter else {}
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                unet(sample, timestep, text, **extra)
            counts.append(counter.get_total_flops())
        finally:
            adapter.detach()
    return counts[0], counts[1]


def parameter_counts(embed_dim: int = 3584, num_tokens: int = 1) -> list[str]:
    """Adapter sizes for the SD1.5 and SDXL UNet layouts, built on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    lines = []
    for name, config in (("sd15", SD15_UNET), ("sdxl", SDXL_UNET)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
            adapter = PSAAdapter.for_unet(unet, embed_dim=embed_dim, num_tokens=num_tokens)
        layers = cross_attention_layers(unet)
        total = sum(p.numel() for p in adapter.parameters())
        grads = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
        proj = sum(p.numel() for p in adapter.user_proj.parameters())
        lines.append(
            f"params {name}: E={embed_dim} K={num_tokens}: {len(layers)} attn2 layers, sum H={sum(layers.values())}; "
            f"adapter {total:,} ({total / 1e6:.1f} M; user_proj {proj:,}); receiving gradients {grads:,} "
            f"({grads / 1e6:.1f} M: with K=1 to_k_user gets none, softmax over one key is 1)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per mode (after one warm-up)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 10 tiny, 3 CPU / 20 GPU)")
    parser.add_argument("--size", type=int, default=None, help="sd15-arch image size (default 128 CPU, 512 GPU)")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                        help="auto: wall time on GPU; on CPU this process's CPU time, robust to other jobs' load")
    parser.add_argument("--embed_dim", type=int, default=3584, help="E of the timed adapters (reference 3584)")
    parser.add_argument("--skip_tiny", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.float16 if gpu else torch.float32
    # One thread on the CPU: CPU time then equals compute time, and other jobs on the machine cannot stretch it.
    torch.set_num_threads(args.threads or (torch.get_num_threads() if gpu else 1))
    clock_name = args.clock if args.clock != "auto" else ("wall" if gpu else "cpu")
    clock = time.perf_counter if clock_name == "wall" else time.process_time
    torch.set_flush_denormal(True)  # random weights can produce denormals, which are slow on some CPUs
    import diffusers

    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"diffusers={diffusers.__version__} repeats={args.repeats} batch={args.batch} E={args.embed_dim} "
          f"clock={clock_name}")

    configs = []
    if not args.skip_tiny:
        configs.append(("tiny", tiny_pipeline, 32, args.steps or 10))
    configs.append(("sd15-arch", sd15_architecture_pipeline, args.size or (512 if gpu else 128),
                     args.steps or (20 if gpu else 3)))
    print(f"{'model':<10} {'size':>4} {'steps':>5} {'mode':<5} {'median_s':>9} {'min_s':>8} "
          f"{'psa/base':>9} {'paired median [min, max]':>26}")
    final = None
    for name, build, size, steps in configs:
        pipe = build(dtype).to(device)
        adapters = {k: random_adapter(pipe.unet, args.embed_dim, k).to(device) for k in (1, 4)}
        times = measure(pipe, adapters, device=device, batch=args.batch, steps=steps, size=size,
                        repeats=args.repeats, embed_dim=args.embed_dim, clock=clock)
        base = statistics.median(times["base"])
        for mode, values in times.items():
            # Runs of one repeat are adjacent in time (ABBA), so their ratio cancels slow drifts in machine load.
            paired = sorted(p / b for p, b in zip(values, times["base"]))
            spread = f"{statistics.median(paired):.4f} [{paired[0]:.4f}, {paired[-1]:.4f}]"
            print(f"{name:<10} {size:>4} {steps:>5} {mode:<5} {statistics.median(values):>9.4f} {min(values):>8.4f} "
                  f"{statistics.median(values) / base:>9.4f} {spread:>26}")
            if name == "sd15-arch" and mode == "K=1":
                final = statistics.median(paired)
        for k, adapter in adapters.items():
            latent = size // pipe.vae_scale_factor
            base_flops, psa_flops = flop_ratio(pipe.unet, adapter, latent)
            print(f"{name:<10} flops per UNet call (batch 2, {latent}x{latent} latents) K={k}: base {base_flops:.4g}, "
                  f"PSA {psa_flops:.4g}, ratio {psa_flops / base_flops:.5f}")
        del pipe, adapters
    for line in parameter_counts():
        print(line)
    print(f"psa_over_base={final:.4f}")


if __name__ == "__main__":
    main()
