"""Image generation with a PSA adapter on a stock diffusers SD1.5 or SDXL pipeline.

The user tokens travel inside the text conditioning: we encode the prompts with the pipeline's own
``encode_prompt``, append ``adapter.user_tokens(u)`` (B, K, D) to the conditional ``prompt_embeds`` (B, L, D) and
``adapter.null_tokens(B)`` (``proj(0)``, as the reference does) to the unconditional ``negative_prompt_embeds``, and
call the unmodified pipeline with those embeddings. Classifier-free guidance batching, schedulers, SDXL's pooled
embeddings and time ids all stay diffusers' own code.

Seeds are per image: image ``i`` starts from the noise of ``torch.Generator("cpu").manual_seed(seeds[i])``, so an
image does not depend on the batch it was generated in, on the number of processes, or on the device's RNG.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from psa_adapter.adapter import PSAAdapter, is_sdxl_unet


class ModelLoadError(RuntimeError):
    """A diffusers model could not be found or loaded; the message names the path or id."""


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on CUDA (the reference's inference precision), fp32 elsewhere (CPU fp16 is slow and partly missing)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_pipeline(model: str | os.PathLike, device: torch.device | str = "cpu",
                  torch_dtype: torch.dtype | None = None):
    """Load an SD1.5-style or SDXL-style pipeline with ``from_pretrained(path_or_id)``, safety checker off.

    The pipeline class is chosen from the UNet's config (``addition_embed_type == "text_time"`` is SDXL), not from
    the model's name. ``torch_dtype`` defaults to ``default_dtype(device)``. Raises ``ModelLoadError`` naming
    ``model`` when it is neither a local folder nor an id that ``from_pretrained`` can resolve.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    model = str(model)
    local = Path(model).expanduser()
    looks_local = local.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1
    if looks_local and not local.exists():
        raise ModelLoadError(f"model folder not found: {model}")
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ModelLoadError(f"{model} is not a diffusers pipeline folder (no model_index.json in it)")
        model = str(local)
    torch_dtype = torch_dtype or default_dtype(device)
    try:
        unet_config = UNet2DConditionModel.load_config(model, subfolder="unet")
    except (OSError, ValueError) as err:
        # Hub ids land here when they are neither cached nor downloadable (e.g. HF_HUB_OFFLINE=1).
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load the UNet config of model {model!r}: {first_line}") from err
    sdxl = unet_config.get("addition_embed_type") == "text_time"
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        with warnings.catch_warnings():
            # Newer diffusers rename torch_dtype to dtype; the old name works in every version we support.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipe = cls.from_pretrained(model, torch_dtype=torch_dtype, **extra)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load model {model!r}: {first_line}") from err
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded ``seeds[i]``: results do not depend on batching or on the device."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def uses_cfg(pipe, guidance_scale: float) -> bool:
    """Whether the pipeline will run classifier-free guidance, by the rule diffusers' SD/SDXL pipelines use."""
    return guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


@dataclass
class Conditioning:
    """Text conditioning for one batch, in the form the stock pipelines accept.

    ``prompt_embeds`` (B, L, D) and ``negative_prompt_embeds`` (B, L, D) or None without guidance; with an adapter
    both are (B, L + K, D). SDXL also carries ``pooled_prompt_embeds`` and ``negative_pooled_prompt_embeds`` (B, P).
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def pipeline_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``pipe(...)``, leaving out what is None."""
        fields = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}


@torch.no_grad()
def encode_conditioning(pipe, prompts: Sequence[str], negative_prompt: str | None = None,
                        do_cfg: bool = True) -> Conditioning:
    """Encode ``prompts`` (B strings) with the pipeline's own ``encode_prompt`` (SD1.5 or SDXL)."""
    prompts = list(prompts)
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    device = pipe._execution_device
    if is_sdxl_unet(pipe.unet):
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
            negative_prompt=negative,
        )
        return Conditioning(embeds, negative_embeds if do_cfg else None, pooled, negative_pooled if do_cfg else None)
    embeds, negative_embeds = pipe.encode_prompt(
        prompts, device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg, negative_prompt=negative
    )
    return Conditioning(embeds, negative_embeds if do_cfg else None)


UNCOND_MODES = ("null", "off")


@torch.no_grad()
def add_user_tokens(cond: Conditioning, adapter: PSAAdapter, user_embeds: torch.Tensor,
                    uncond: str = "null") -> Conditioning:
    """Append the user tokens of ``user_embeds`` (B, E) to the conditional embeddings and, to the unconditional
    ones, ``proj(0)`` (``uncond="null"``, the paper's and the reference's) or zero tokens (``uncond="off"``, a named
    variant: the user branch of a zero token has zero keys and values, so the unconditional pass is exactly the
    base model's): (B, L, D) -> (B, L + K, D). The adapter must already sit on the pipeline's device."""
    if uncond not in UNCOND_MODES:
        raise ValueError(f"uncond must be one of {UNCOND_MODES}, got {uncond!r}")
    batch = cond.prompt_embeds.shape[0]
    if user_embeds.ndim != 2 or user_embeds.shape[0] != batch:
        raise ValueError(f"user_embeds must have shape ({batch}, E), one per prompt; got {tuple(user_embeds.shape)}")
    weight = adapter.user_proj.proj.weight
    tokens = adapter.user_tokens(user_embeds.to(device=weight.device, dtype=weight.dtype))
    prompt_embeds = adapter.extend_hidden_states(cond.prompt_embeds, tokens.to(cond.prompt_embeds.device))
    negative = cond.negative_prompt_embeds
    if negative is not None:
        null = adapter.null_tokens(batch) if uncond == "null" else torch.zeros_like(tokens)
        negative = adapter.extend_hidden_states(negative, null.to(negative.device))
    return replace(cond, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative)


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    adapter: PSAAdapter | None = None,
    user_embeds: torch.Tensor | None = None,
    psa_scale: float | Mapping[str, float] | None = None,
    psa_uncond: str = "null",
    negative_prompt: str | None = None,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    height: int | None = None,
    width: int | None = None,
    output_type: str = "pil",
    **pipe_kwargs,
):
    """Generate one image per prompt, with or without a PSA adapter.

    Args:
        pipe: a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.
        prompts: B captions.
        seeds: B integers; image ``i`` uses ``torch.Generator("cpu").manual_seed(seeds[i])``.
        adapter: a ``PSAAdapter`` attached to ``pipe.unet`` (``adapter.attach(pipe.unet)``), or None for the base
            model (then no adapter may be attached).
        user_embeds: (B, E) user embeddings, one row per prompt; required with an adapter, never zeros for a
            missing user (the caller must fail instead).
        psa_scale: if given, ``adapter.set_scale(psa_scale)`` before generating (a float or a per-block dict).
        psa_uncond: what the unconditional branch of guidance gets: ``"null"`` (``proj(0)``, the paper's) or
            ``"off"`` (zero tokens: the adapter is off there; a named variant), see ``add_user_tokens``.
        negative_prompt: one negative prompt for every image (None: empty, diffusers' default).
        output_type: ``"pil"`` (list of B images), ``"np"`` ((B, H, W, 3) floats in [0, 1]) or ``"pt"``.

    Returns:
        The pipeline's ``images`` for the batch.
    """
    prompts = list(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    do_cfg = uses_cfg(pipe, guidance_scale)
    cond = encode_conditioning(pipe, prompts, negative_prompt, do_cfg)
    if adapter is not None:
        if user_embeds is None:
            raise ValueError("an adapter needs user_embeds (B, E), one row per prompt")
        if psa_scale is not None:
            adapter.set_scale(psa_scale)
        cond = add_user_tokens(cond, adapter, user_embeds, uncond=psa_uncond)
    elif user_embeds is not None:
        raise ValueError("user_embeds were given without an adapter")
    result = pipe(
        **cond.pipeline_kwargs(),
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        height=height,
        width=width,
        generator=make_generators(seeds),
        output_type=output_type,
        **pipe_kwargs,
    )
    return result.images


__all__ = [
    "UNCOND_MODES",
    "Conditioning",
    "ModelLoadError",
    "add_user_tokens",
    "default_dtype",
    "encode_conditioning",
    "generate",
    "load_pipeline",
    "make_generators",
    "uses_cfg",
]
