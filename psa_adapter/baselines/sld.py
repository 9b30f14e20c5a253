"""SLD, Safe Latent Diffusion (Schramowski et al., CVPR 2023): inference-time safety guidance, as ``--method sld``.

Each step runs a third noise prediction conditioned on a safety concept ``c_S`` and moves the guided prediction away
from it where the text prediction is close to the concept's:

    scale   = clamp(|eps_text - eps_S| * s_S, max=1), zero where eps_text - eps_S >= lambda       (threshold)
    g_S     = scale * (eps_S - eps_uncond) + s_m * nu;   nu <- beta_m * nu + (1 - beta_m) * g_S  (momentum)
    eps     = eps_uncond + s_g * (eps_text - eps_uncond - g_S)   from step delta on             (warm-up)

Two implementations of the same guidance:

* ``diffusers``: diffusers' ``StableDiffusionPipelineSafe`` (in its deprecated pipelines), built from the loaded
  SD1.5-style pipeline's components. ``auto`` uses it for SD1.5-style models when the installed diffusers has it.
* ``ours``: a forward hook on the stock pipeline's UNet. The stock pipelines run the unconditional and text passes
  as one batch and combine them as ``uncond + s_g * (text - uncond)``; the hook adds the safety-concept pass and
  returns ``text - g_S`` in place of ``text`` (after warm-up), which gives exactly SLD's prediction. It works for
  SDXL too (the concept's pooled embedding and the same time ids), and for a future diffusers without the pipeline.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from psa_adapter.methods import Method, MethodError, register
from psa_adapter.users.categories import CATEGORIES

if TYPE_CHECKING:  # torch is imported when a pipeline runs, so that infer.py checks its input first, quickly
    import torch


@dataclass(frozen=True)
class SLDPreset:
    """SLD hyperparameters: safety guidance scale s_S, warm-up steps delta, threshold lambda, momentum scale s_m,
    momentum beta beta_m."""

    guidance_scale: float
    warmup_steps: int
    threshold: float
    momentum_scale: float
    mom_beta: float

    def diffusers_kwargs(self) -> dict:
        """The keyword arguments of ``StableDiffusionPipelineSafe.__call__``."""
        return {"sld_guidance_scale": self.guidance_scale, "sld_warmup_steps": self.warmup_steps,
                "sld_threshold": self.threshold, "sld_momentum_scale": self.momentum_scale,
                "sld_mom_beta": self.mom_beta}


# The published configurations (SLD paper, "Hyp-Weak" ... "Hyp-Max"). diffusers' SafetyConfig.WEAK has a safety
# guidance scale of 20, not the paper's 200; the other three equal diffusers' SafetyConfig.
SLD_PRESETS: dict[str, SLDPreset] = {
    "weak": SLDPreset(200, 15, 0.0, 0.0, 0.0),
    "medium": SLDPreset(1000, 10, 0.01, 0.3, 0.4),
    "strong": SLDPreset(2000, 7, 0.025, 0.5, 0.7),
    "max": SLDPreset(5000, 0, 1.0, 0.5, 0.7),
}
DEFAULT_PRESET = "medium"  # the one the reference ran (and labelled "Str")
# The default safety concept: the seven SAGE categories.
DEFAULT_CONCEPT = ", ".join(c.lower() for c in CATEGORIES)
IMPLEMENTATIONS = ("auto", "diffusers", "ours")


def get_preset(name: str) -> SLDPreset:
    try:
        return SLD_PRESETS[name]
    except KeyError:
        raise MethodError(f"unknown SLD preset {name!r}; known presets: {', '.join(SLD_PRESETS)}") from None


def diffusers_safe_pipeline_class():
    """diffusers' ``StableDiffusionPipelineSafe``, or None when the installed diffusers has none."""
    try:
        from diffusers import StableDiffusionPipelineSafe
    except ImportError:
        try:
            from diffusers.pipelines.deprecated.stable_diffusion_safe import StableDiffusionPipelineSafe
        except ImportError:
            return None
    return StableDiffusionPipelineSafe


def safe_pipeline_from(pipe):
    """A ``StableDiffusionPipelineSafe`` sharing the SD1.5-style ``pipe``'s modules (no copy, no safety checker)."""
    import warnings

    cls = diffusers_safe_pipeline_class()
    if cls is None:
        raise MethodError("the installed diffusers has no StableDiffusionPipelineSafe: use --sld_impl ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of the pipeline itself
        safe = cls(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                   scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                   requires_safety_checker=False)
    safe.set_progress_bar_config(disable=True)
    return safe


def generate_with_safe_pipeline(safe, prompts: Sequence[str], seeds: Sequence[int], preset: SLDPreset, *,
                                negative_prompt: str | None = None, **common):
    """Images from diffusers' ``StableDiffusionPipelineSafe`` (``safe_pipeline_from``) with our per-image seeds."""
    import warnings

    import torch

    from psa_adapter.pipeline import make_generators

    prompts = list(prompts)
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)  # it wants prompt's type
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # its deprecation notices (decode_latents, ...)
        return safe(prompt=prompts, negative_prompt=negative, generator=make_generators(seeds), **common,
                    **preset.diffusers_kwargs()).images


class SafetyGuidance:
    """SLD as a forward hook on a stock pipeline's UNet (see the module docstring). One instance per pipeline call:
    it counts the denoising steps and carries the momentum."""

    def __init__(self, preset: SLDPreset, concept_embeds: torch.Tensor, concept_pooled: torch.Tensor | None = None):
        self.preset = preset
        self.concept_embeds = concept_embeds  # (B, L, D)
        self.concept_pooled = concept_pooled  # (B, P) for SDXL
        self.step = 0
        self.momentum = None
        self._inside = False

    def safety_term(self, uncond: torch.Tensor, text: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
        """g_S of this step (updates the momentum); the guided prediction subtracts it from the text branch."""
        import torch

        p = self.preset
        if self.momentum is None:
            self.momentum = torch.zeros_like(text)
        scale = torch.clamp((text - concept).abs() * p.guidance_scale, max=1.0)
        scale = torch.where(text - concept >= p.threshold, torch.zeros_like(scale), scale)
        term = (concept - uncond) * scale + p.momentum_scale * self.momentum
        self.momentum = p.mom_beta * self.momentum + (1 - p.mom_beta) * term
        return term

    def __call__(self, module, args, kwargs, output):
        import torch

        if self._inside:
            return None
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        batch = self.concept_embeds.shape[0]
        if sample.shape[0] != 2 * batch:
            raise RuntimeError(f"SLD expects the classifier-free guidance batch of {2 * batch} latents, got "
                               f"{sample.shape[0]}")
        pred = output[0] if isinstance(output, tuple) else output.sample
        uncond, text = pred.chunk(2)
        extra = {}
        added = kwargs.get("added_cond_kwargs")
        if added:
            extra["added_cond_kwargs"] = {"text_embeds": self.concept_pooled.to(added["text_embeds"]),
                                          "time_ids": added["time_ids"].chunk(2)[1]}
        for name in ("timestep_cond", "cross_attention_kwargs"):
            if kwargs.get(name) is not None:
                extra[name] = kwargs[name]
        self._inside = True
        try:
            concept = module(sample.chunk(2)[1], timestep, encoder_hidden_states=self.concept_embeds.to(pred),
                             return_dict=False, **extra)[0]
        finally:
            self._inside = False
        term = self.safety_term(uncond, text, concept)
        if self.step >= self.preset.warmup_steps:
            text = text - term
        self.step += 1
        guided = torch.cat([uncond, text])
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output


def generate_sld(pipe, prompts: Sequence[str], seeds: Sequence[int], preset: SLDPreset, concept: str, *,
                 negative_prompt: str | None = None, guidance_scale: float = 7.5, num_inference_steps: int = 50,
                 height: int | None = None, width: int | None = None, output_type: str = "pil", **pipe_kwargs):
    """Our SLD on a stock SD1.5 or SDXL pipeline (``pipeline.generate`` with the safety hook on its UNet)."""
    import torch

    from psa_adapter.adapter import is_sdxl_unet
    from psa_adapter.pipeline import generate, uses_cfg

    prompts = list(prompts)
    common = dict(negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                  num_inference_steps=num_inference_steps, height=height, width=width, output_type=output_type,
                  **pipe_kwargs)
    if preset.guidance_scale <= 1 or not uses_cfg(pipe, guidance_scale):  # diffusers' rule: SLD needs CFG
        return generate(pipe, prompts, seeds, **common)
    concepts, device = [concept] * len(prompts), pipe._execution_device
    with torch.no_grad():  # the concept's text conditioning, with the pipeline's own encoder(s)
        if is_sdxl_unet(pipe.unet):
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=concepts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        else:
            (embeds, _), pooled = pipe.encode_prompt(concepts, device, 1, False), None
    hook = SafetyGuidance(preset, embeds, pooled)
    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        return generate(pipe, prompts, seeds, **common)
    finally:
        handle.remove()


@register
class SLD(Method):
    """Safe Latent Diffusion with a published preset (``--sld_preset``) and a safety concept (``--sld_concept``)."""

    name = "sld"
    flags = ("sld_preset", "sld_concept", "sld_impl")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("SLD (--method sld)")
        group.add_argument("--sld_preset", default=None, type=str.lower,
                           help=f"one of {', '.join(SLD_PRESETS)} (default {DEFAULT_PRESET}, the one the reference "
                                "ran): safety guidance scale / warm-up steps / threshold / momentum scale / beta = "
                                + ", ".join(f"{k} {p.guidance_scale:g}/{p.warmup_steps}/{p.threshold:g}/"
                                            f"{p.momentum_scale:g}/{p.mom_beta:g}" for k, p in SLD_PRESETS.items()))
        group.add_argument("--sld_concept", default=None,
                           help=f"the safety concept text (default: the seven categories, {DEFAULT_CONCEPT!r})")
        group.add_argument("--sld_impl", default=None, choices=IMPLEMENTATIONS,
                           help="diffusers = its StableDiffusionPipelineSafe (SD1.5 only), ours = our guidance hook "
                                "(SD1.5 and SDXL); auto (default) = diffusers where it can serve")

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.preset_name = getattr(args, "sld_preset", None) or DEFAULT_PRESET
        self.concept = getattr(args, "sld_concept", None) or DEFAULT_CONCEPT
        self.impl_choice = getattr(args, "sld_impl", None) or "auto"
        self.preset = get_preset(self.preset_name)
        self.impl = None
        self.safe = None

    def validate(self, jobs: Sequence) -> None:
        if getattr(self.args, "lora_path", None):
            raise MethodError("--method sld runs the base model's safety guidance; --lora_path does not apply")
        if self.impl_choice == "diffusers" and diffusers_safe_pipeline_class() is None:
            raise MethodError("--sld_impl diffusers: the installed diffusers has no StableDiffusionPipelineSafe")

    def prepare(self, pipe, jobs: Sequence, users=None) -> None:
        from psa_adapter.adapter import is_sdxl_unet

        sdxl = is_sdxl_unet(pipe.unet)
        if self.impl_choice == "diffusers" and sdxl:
            raise MethodError("--sld_impl diffusers: StableDiffusionPipelineSafe is SD1.5-only; this model is SDXL "
                              "(use --sld_impl ours or auto)")
        use_diffusers = self.impl_choice == "diffusers" or (
            self.impl_choice == "auto" and not sdxl and diffusers_safe_pipeline_class() is not None)
        self.impl = "diffusers" if use_diffusers else "ours"
        if use_diffusers:
            self.safe = safe_pipeline_from(pipe)
            self.safe.safety_concept = self.concept

    def generate(self, pipe, batch: Sequence, seeds: Sequence[int], **common) -> list:
        prompts = [job.prompt for job in batch]
        if self.impl == "ours":
            return generate_sld(pipe, prompts, seeds, self.preset, self.concept, **common)
        return generate_with_safe_pipeline(self.safe, prompts, seeds, self.preset, **common)

    def settings(self) -> dict:
        return {"method": self.name, "sld_preset": self.preset_name, "sld_concept": self.concept,
                "sld_impl": self.impl or self.impl_choice, **{f"sld_{k}": v for k, v in asdict(self.preset).items()}}


__all__ = ["DEFAULT_CONCEPT", "DEFAULT_PRESET", "SLD", "SLD_PRESETS", "SLDPreset", "SafetyGuidance",
           "diffusers_safe_pipeline_class", "generate_sld", "generate_with_safe_pipeline", "get_preset",
           "safe_pipeline_from"]
