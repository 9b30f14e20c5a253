"""Image generation on a stock diffusers SD1.5 or SDXL pipeline, with or without a PSA adapter.

``generate`` calls the pipeline's own ``__call__`` with per-image seeds; with a PSA adapter loaded
(``psa_adapter.loaders.load_psa_adapter``) it also passes each prompt's user embedding. Classifier-free guidance
batching, schedulers, SDXL's pooled embeddings and time ids all stay diffusers' own code.

Seeds are per image: image ``i`` starts from the noise of ``torch.Generator("cpu").manual_seed(seeds[i])``, so an
image does not depend on the batch it was generated in, on the number of processes, or on the device's RNG.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch


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


UNCOND_MODES = ("null", "off")


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
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
    """Generate one image per prompt, with the pipeline's PSA adapter if one is loaded.

    Args:
        pipe: a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``, with or without a PSA
            adapter (``load_psa_adapter(pipe, path)``).
        prompts: B captions.
        seeds: B integers; image ``i`` uses ``torch.Generator("cpu").manual_seed(seeds[i])``.
        user_embeds: (B, E) user embeddings, one row per prompt; required with an adapter, never zeros for a
            missing user (the caller must fail instead); an error without one.
        psa_scale: the adapter's scale for this call only (a float or a per-block dict); None keeps its scale.
        psa_uncond: what the unconditional branch of guidance gets: ``"null"`` (``proj(0)``, the paper's) or
            ``"off"`` (zero tokens: the adapter is off there; a named variant).
        negative_prompt: one negative prompt for every image (None: empty, diffusers' default).
        output_type: ``"pil"`` (list of B images), ``"np"`` ((B, H, W, 3) floats in [0, 1]) or ``"pt"``.

    Returns:
        The pipeline's ``images`` for the batch.
    """
    prompts = list(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    if "adapter" in pipe_kwargs:
        raise TypeError("generate() takes no adapter: load it onto the pipeline with load_psa_adapter(pipe, adapter) "
                        "(a path or a PSAAdapter) and pass user_embeds")
    psa = {}
    if getattr(pipe, "psa_adapter", None) is not None:
        psa = {"user_embeds": user_embeds, "psa_scale": psa_scale, "psa_uncond": psa_uncond}
    elif user_embeds is not None or psa_scale is not None:
        raise RuntimeError("user_embeds were given but no PSA adapter is loaded on this pipeline: call "
                           "load_psa_adapter(pipe, path) first")
    result = pipe(
        prompt=prompts,
        negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts),
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        height=height,
        width=width,
        generator=make_generators(seeds),
        output_type=output_type,
        **psa,
        **pipe_kwargs,
    )
    return result.images


__all__ = [
    "UNCOND_MODES",
    "ModelLoadError",
    "default_dtype",
    "generate",
    "load_pipeline",
    "make_generators",
    "uses_cfg",
]
