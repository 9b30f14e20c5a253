"""Generation methods by name: what ``infer.py --method NAME`` and the evaluation driver run.

A method turns a loaded stock pipeline into the thing being evaluated (load a LoRA, fine-tuned UNet weights, an
adapter, a safety-guided pipeline, ...) and generates one image per job. Every method gets the same prompts,
seeds, steps, guidance and negative prompt from the caller (``infer_cli.run``); what is particular to a method is
its own flags, checked in ``validate`` (before the model loads) and recorded per image by ``settings``.

Add a method by subclassing ``Method`` and decorating it with ``@register``; ``infer.py`` and the evaluation
driver find it by name.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import ClassVar

METHODS: dict[str, type[Method]] = {}


class MethodError(Exception):
    """Bad method settings (an unknown name, a missing file, a flag the method needs): one message, no traceback."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; an unknown name is a ``MethodError`` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; known methods: {', '.join(method_names())}") from None


class Method:
    """One way of generating images, configured by the parsed ``infer.py`` flags ``args``.

    Life cycle (``infer_cli.run``): ``validate(jobs)`` before any model loads; ``prepare(pipe, jobs, users)`` once
    after the pipeline loads (``users``: the jobs' ``infer_cli.UserEmbeddings`` when ``needs_user``, else None);
    ``generate(pipe, batch, seeds, **common)`` per batch; ``settings()`` into every manifest entry.
    """

    name: ClassVar[str]
    needs_user: ClassVar[bool] = False  # every prompt must carry a user (an embedding or a profile)

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def validate(self, jobs: Sequence) -> None:
        """Check the method's flags and inputs; raise ``MethodError`` naming the flag or the file."""

    def prepare(self, pipe, jobs: Sequence, users=None) -> None:
        """Modify the loaded pipeline in place (load weights, attach an adapter, ...)."""

    def generate(self, pipe, batch: Sequence, seeds: Sequence[int], **common) -> list:
        """One PIL image per job of ``batch``. ``common``: negative_prompt, guidance_scale, num_inference_steps,
        height, width (identical for every method)."""
        from psa_adapter.pipeline import generate

        return generate(pipe, [job.prompt for job in batch], seeds, **common)

    def settings(self) -> dict:
        """Method settings recorded in every manifest entry (``method`` plus its own flags)."""
        return {"method": self.name}


def _lora(pipe, path: str | None) -> None:
    from pathlib import Path

    if not path:
        return
    if not Path(path).exists():
        raise MethodError(f"--lora_path not found: {path}")
    try:
        pipe.load_lora_weights(path)
    except Exception as err:  # noqa: BLE001 - diffusers/peft/safetensors raise many types; one message, no traceback
        detail = str(err).strip().splitlines()
        raise MethodError(f"--lora_path {path}: not a LoRA for this model ({type(err).__name__}: "
                          f"{' '.join(line.strip() for line in detail[:2])[:400]})") from err


@register
class Base(Method):
    """The plain pipeline (optionally with a LoRA from ``--lora_path``, as before methods had names)."""

    name = "base"

    def prepare(self, pipe, jobs: Sequence, users=None) -> None:
        _lora(pipe, self.args.lora_path)

    def settings(self) -> dict:
        return {"method": self.name, "lora": self.args.lora_path}


@register
class PSA(Method):
    """A PSA adapter (``--psa_path``) with each prompt's user embedding, at ``--psa_scale``."""

    name = "psa"
    needs_user = True

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.adapter = None
        self.users = None

    def validate(self, jobs: Sequence) -> None:
        if not self.args.psa_path:
            raise MethodError("--method psa needs --psa_path (an adapter folder or a reference psa_adapter.bin)")

    def prepare(self, pipe, jobs: Sequence, users=None) -> None:
        _lora(pipe, self.args.lora_path)
        self.users = users
        self.adapter = self._load_adapter(pipe, jobs)

    def _load_adapter(self, pipe, jobs: Sequence):
        from psa_adapter.adapter import AdapterMismatchError
        from psa_adapter.loaders import load_psa_adapter

        path = self.args.psa_path
        try:
            adapter = load_psa_adapter(pipe, path, scale=self.args.psa_scale)
        except (AdapterMismatchError, FileNotFoundError, OSError, ValueError, KeyError) as err:
            message = str(err)
            raise MethodError(message if str(path) in message else f"PSA adapter {path}: {message}") from err
        if self.args.num_tokens is not None and self.args.num_tokens != adapter.config.num_tokens:
            raise MethodError(f"--num_tokens {self.args.num_tokens} but the adapter {path} has "
                              f"{adapter.config.num_tokens} user tokens")
        self.users.load_presets(jobs, adapter, path)
        self.users.check_dim(adapter.config.embed_dim, path)
        return adapter

    def generate(self, pipe, batch: Sequence, seeds: Sequence[int], **common) -> list:
        from psa_adapter.pipeline import generate

        return generate(pipe, [job.prompt for job in batch], seeds, user_embeds=self.users.stack(batch),
                        psa_uncond=self.args.psa_uncond, **common)

    def settings(self) -> dict:
        return {"method": self.name, "adapter": self.args.psa_path, "psa_scale": self.args.psa_scale,
                "psa_uncond": self.args.psa_uncond, "lora": self.args.lora_path}


__all__ = ["METHODS", "Method", "MethodError", "get_method", "method_names", "register"]
