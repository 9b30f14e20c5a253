"""PSA on a diffusers pipeline: load, set scale, generate for a user, unload (as with IP-Adapter and LoRA).

    load_psa_adapter(pipe, "trained_models/psa-sd15")     # or PSAStableDiffusionPipeline.from_pretrained(...)
    image = pipe("a photo", user_embeds=u).images[0]      # u: (E,) or (B, E); or level="L3" / profile=...
    pipe.set_psa_scale({"down": 0.0, "mid": 1.0, "up": 1.0})
    pipe.unload_psa_adapter()                             # exactly the base pipeline again

``load_psa_adapter`` gives a stock ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (or any subclass)
the PSA verbs by switching its class to a subclass with ``PSAPipelineMixin``; ``unload_psa_adapter`` switches it
back. The user tokens reach the UNet explicitly, as ``cross_attention_kwargs={"psa_user_tokens": tokens}``, batched
here for classifier-free guidance: the unconditional half gets ``proj(0)`` (``psa_uncond="null"``, the paper's) or
zero tokens (``"off"``, a named variant: the unconditional pass is then exactly the base model's).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from psa_adapter.adapter import PSAAdapter
from psa_adapter.attention import USER_TOKENS_KWARG
from psa_adapter.pipeline import UNCOND_MODES, uses_cfg

DEFAULT_ENCODER = "sentence"  # all-MiniLM-L6-v2, E = 384: what `python -m psa_adapter.users` uses by default


class UserEncoderError(ValueError):
    """The user encoder an adapter was trained with cannot be determined or loaded."""


def user_encoder_for(adapter: PSAAdapter, source: str):
    """The encoder that embeds profiles for ``adapter``, from the ``encoder`` entry of its config (the embedding
    store's metadata at training time). An adapter that records none (e.g. a reference checkpoint) gets the default
    encoder with a warning that says so."""
    from psa_adapter import users

    info = adapter.config.encoder or {}
    encoder_id = str(info.get("encoder_id") or info.get("id") or "")
    name = info.get("name")
    if name is None:
        if not encoder_id:
            warnings.warn(
                f"the adapter {source} records no user encoder; assuming {DEFAULT_ENCODER!r} (all-MiniLM-L6-v2, "
                f"E=384). If it was trained on other embeddings, pass user_embeds (or --embeds_folder) made with "
                "its encoder instead of a level or profile", UserWarning, stacklevel=3,
            )
            name = DEFAULT_ENCODER
        elif "all-MiniLM-L6-v2" in encoder_id:
            name = DEFAULT_ENCODER
        elif encoder_id.startswith("unknown"):
            raise UserEncoderError(
                f"the adapter {source} was trained on imported embeddings of unknown origin ({encoder_id!r}), "
                "so a profile cannot be embedded for it: pass --embeds_folder with the user's <User_ID>.npy"
            )
        else:
            name = "llm"
    kwargs = {}
    if name == "llm":
        model, _, gguf_file = encoder_id.partition("::")
        kwargs = {"model": model, "gguf_file": gguf_file or None}
    try:
        encoder = users.get_encoder(name, **kwargs)
    except (ValueError, OSError, ImportError) as err:
        raise UserEncoderError(f"cannot load the user encoder {name!r} ({encoder_id or 'default'}) that the "
                               f"adapter {source} was trained with: {err}") from err
    expected_hash = info.get("template_hash")
    if expected_hash and encoder.info.get("template_hash") != expected_hash:
        warnings.warn(f"the adapter {source} was trained with another statement template (hash {expected_hash}) "
                      f"than the encoder's ({encoder.info.get('template_hash')})", UserWarning, stacklevel=3)
    return encoder


class PSAPipelineMixin:
    """The PSA verbs of a Stable Diffusion (1.5 or XL) pipeline; ``__call__`` takes ``user_embeds`` (or ``level`` /
    ``profile``), ``psa_uncond`` and ``psa_scale`` besides the pipeline's own arguments."""

    @property
    def psa_adapter(self) -> PSAAdapter | None:
        """The loaded adapter, or None."""
        return self.__dict__.get("_psa_adapter")

    def load_psa_adapter(self, pretrained: str | os.PathLike | PSAAdapter,
                         scale: float | dict | None = None) -> PSAAdapter:
        """Load an adapter (our folder, a Hub id, a reference ``psa_adapter.bin`` / ``.safetensors``, or a
        ``PSAAdapter``) onto this pipeline's UNet, replacing any other loaded before; ``scale`` (default: the
        adapter's own, 1.0 when loaded from a file) as in ``set_psa_scale``. Returns the adapter."""
        if isinstance(pretrained, PSAAdapter):
            adapter, source = pretrained, "given as an object"
        else:
            source = str(pretrained)
            adapter = PSAAdapter.from_pretrained(pretrained, unet=self.unet)  # a bad file leaves the pipeline as is
            adapter.to(next(self.unet.parameters()).device).eval()
        if self.psa_adapter is not None and self.psa_adapter is not adapter:
            self._detach_psa()
        adapter.attach(self.unet)
        if scale is not None:
            adapter.set_scale(scale)
        self.__dict__["_psa_adapter"] = adapter
        self.__dict__.setdefault("_psa_source", source)
        return adapter

    def set_psa_scale(self, scale: float | dict) -> None:
        """A float for every layer, or per block as ``set_ip_adapter_scale`` takes it (``PSAAdapter.set_scale``)."""
        self._require_psa().set_scale(scale)

    def unload_psa_adapter(self) -> None:
        """Remove the adapter: the UNet's processors and the pipeline's class are the base pipeline's again."""
        self._detach_psa()
        base = self.__dict__.pop("_psa_base_class", None)
        if base is not None:
            self.__class__ = base

    def _detach_psa(self) -> None:
        adapter = self.__dict__.pop("_psa_adapter", None)
        for key in ("_psa_source", "_psa_encoder"):
            self.__dict__.pop(key, None)
        if adapter is not None:
            adapter.detach()

    def _require_psa(self) -> PSAAdapter:
        if self.psa_adapter is None:
            raise RuntimeError("no PSA adapter is loaded on this pipeline: call pipe.load_psa_adapter(path) "
                               "(or load_psa_adapter(pipe, path)) first")
        return self.psa_adapter

    def psa_profile_embeds(self, level: str | None = None, profile=None) -> torch.Tensor:
        """(1, E) embedding of a level preset (``"L0"`` .. ``"L5"``) or a profile (a ``UserProfile`` or a profile
        file), made with the encoder the loaded adapter was trained with."""
        from psa_adapter import users

        adapter = self._require_psa()
        if (level is None) == (profile is None):
            raise ValueError("pass exactly one of level= and profile=")
        if level is not None:
            chosen = users.load_level(level)
        else:
            chosen = profile if isinstance(profile, users.UserProfile) else users.load_profile(profile)
        encoder = self.__dict__.get("_psa_encoder")
        if encoder is None:
            encoder = self.__dict__["_psa_encoder"] = user_encoder_for(adapter, self.__dict__["_psa_source"])
        return torch.from_numpy(encoder.encode([chosen]))

    def psa_user_tokens(self, user_embeds: torch.Tensor, num_images_per_prompt: int, do_cfg: bool,
                        psa_uncond: str = "null") -> torch.Tensor:
        """(B, E) user embeddings -> the (B*n, K, D) tokens of one UNet call, or (2*B*n, K, D) with guidance:
        unconditional half first, as diffusers' pipelines batch ``[negative, positive]``."""
        if psa_uncond not in UNCOND_MODES:
            raise ValueError(f"psa_uncond must be one of {UNCOND_MODES}, got {psa_uncond!r}")
        adapter = self._require_psa()
        device = self._execution_device
        if adapter.user_proj.proj.weight.device != torch.device(device):
            adapter.user_proj.to(device)  # pipe.to() moved the UNet (and the branch inside it), not the projection
        weight = adapter.user_proj.proj.weight
        with torch.no_grad():
            cond = adapter.user_tokens(user_embeds.to(device=device, dtype=weight.dtype))
            cond = cond.repeat_interleave(num_images_per_prompt, dim=0)
            if not do_cfg:
                return cond
            uncond = adapter.null_tokens(cond.shape[0]) if psa_uncond == "null" else torch.zeros_like(cond)
            return torch.cat([uncond, cond])

    def __call__(self, *args, user_embeds=None, level: str | None = None, profile=None, psa_uncond: str = "null",
                 psa_scale: float | dict | None = None, **kwargs):
        """The pipeline's own ``__call__`` for a user: ``user_embeds`` (E,) or (B, E), one row per prompt, or a
        ``level`` / ``profile`` for every prompt. ``psa_scale`` applies to this call only."""
        base_call = super().__call__
        adapter = self.psa_adapter
        wants_psa = user_embeds is not None or level is not None or profile is not None or psa_scale is not None
        if adapter is None:
            if wants_psa:
                self._require_psa()
            return base_call(*args, **kwargs)
        adapter.check_attached(self.unet)
        if user_embeds is None and level is None and profile is None:
            raise ValueError(
                "a PSA adapter is loaded, so every call must say whose image it is: pass user_embeds=(E,) or (B, E) "
                "(or level= / profile=); pipe.unload_psa_adapter() gives the base pipeline back"
            )
        if user_embeds is not None and (level is not None or profile is not None):
            raise ValueError("pass user_embeds or level/profile, not both")
        if user_embeds is None:
            user_embeds = self.psa_profile_embeds(level, profile)
        signature = inspect.signature(base_call)
        bound = signature.bind_partial(*args, **kwargs)
        given = bound.arguments

        def arg(name):
            return given.get(name, signature.parameters[name].default)

        prompt, prompt_embeds = arg("prompt"), arg("prompt_embeds")
        if prompt is not None:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        elif prompt_embeds is not None:
            batch = prompt_embeds.shape[0]
        else:
            raise ValueError("pass prompt or prompt_embeds")
        user_embeds = torch.as_tensor(user_embeds)
        if user_embeds.ndim == 1:
            user_embeds = user_embeds.unsqueeze(0)
        if user_embeds.ndim != 2 or user_embeds.shape[0] not in (1, batch):
            raise ValueError(f"user_embeds must have shape (E,) or ({batch}, E), one row per prompt; got "
                             f"{tuple(user_embeds.shape)}")
        user_embeds = user_embeds.expand(batch, -1)
        tokens = self.psa_user_tokens(user_embeds, arg("num_images_per_prompt") or 1,
                                      uses_cfg(self, arg("guidance_scale")), psa_uncond)
        attention_kwargs = dict(arg("cross_attention_kwargs") or {})
        if USER_TOKENS_KWARG in attention_kwargs:
            raise ValueError(f"pass user_embeds=..., not cross_attention_kwargs[{USER_TOKENS_KWARG!r}]")
        attention_kwargs[USER_TOKENS_KWARG] = tokens
        given["cross_attention_kwargs"] = attention_kwargs
        scale = adapter.scale_context(psa_scale) if psa_scale is not None else contextlib.nullcontext()
        with scale:
            return base_call(*bound.args, **bound.kwargs)


class PSAStableDiffusionPipeline(PSAPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with the PSA verbs."""


class PSAStableDiffusionXLPipeline(PSAPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with the PSA verbs."""


_PSA_CLASSES: dict[type, type] = {
    StableDiffusionPipeline: PSAStableDiffusionPipeline,
    StableDiffusionXLPipeline: PSAStableDiffusionXLPipeline,
}


def _psa_class(cls: type) -> type:
    if issubclass(cls, PSAPipelineMixin):
        return cls
    if cls not in _PSA_CLASSES:
        _PSA_CLASSES[cls] = type(f"PSA{cls.__name__}", (PSAPipelineMixin, cls), {"__module__": __name__})
    return _PSA_CLASSES[cls]


def load_psa_adapter(pipe, pretrained: str | os.PathLike | PSAAdapter,
                     scale: float | dict | None = None) -> PSAAdapter:
    """Give ``pipe`` the PSA verbs and load ``pretrained`` onto it (see ``PSAPipelineMixin.load_psa_adapter``)."""
    if not hasattr(pipe, "unet"):
        raise TypeError(f"load_psa_adapter needs a pipeline with a UNet, got {type(pipe).__name__}")
    cls = type(pipe)
    psa_cls = _psa_class(cls)
    if psa_cls is not cls:
        pipe.__class__ = psa_cls
        pipe.__dict__["_psa_base_class"] = cls
    try:
        return pipe.load_psa_adapter(pretrained, scale=scale)
    except Exception:
        if psa_cls is not cls:
            pipe.unload_psa_adapter()
        raise


def unload_psa_adapter(pipe) -> None:
    """``pipe.unload_psa_adapter()``; a pipeline without PSA is left as it is."""
    if isinstance(pipe, PSAPipelineMixin):
        pipe.unload_psa_adapter()


__all__ = [
    "PSAPipelineMixin",
    "PSAStableDiffusionPipeline",
    "PSAStableDiffusionXLPipeline",
    "UserEncoderError",
    "load_psa_adapter",
    "unload_psa_adapter",
    "user_encoder_for",
]
