"""Generation methods by name: what ``infer.py --method NAME`` and the evaluation driver run.

A method turns a loaded stock pipeline into the thing being evaluated (load a LoRA, fine-tuned UNet weights, an
adapter, a safety-guided pipeline, ...) and generates one image per job. Every method gets the same prompts,
seeds, steps, guidance and negative prompt from the caller (``infer_cli.run``); what is particular to a method is
its own flags, checked in ``validate`` (before the model loads) and recorded per image by ``settings``.

Add a method by subclassing ``Method`` and decorating it with ``@register``; ``infer.py`` and the evaluation
driver find it by name. A method declares its own command-line flags in ``add_arguments`` (``infer.py`` calls it
for every registered method) and lists them in ``flags``: a flag of another method given to this one is an error,
never silently ignored. The baselines (SafetyDPO, SLD, ESD-u, UCE, prompt-based safety) live in
``psa_adapter.baselines`` and are registered when this module is imported.
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


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Let every registered method add its own flags to ``parser`` (a hook shared by several methods runs once)."""
    seen = set()
    for name in method_names():
        hook = METHODS[name].add_arguments
        key = getattr(hook, "__func__", hook)
        if key not in seen:
            seen.add(key)
            hook(parser)


class Method:
    """One way of generating images, configured by the parsed ``infer.py`` flags ``args``.

    Life cycle (``infer_cli.run``): ``validate(jobs)`` before any model loads; ``prepare(pipe, jobs, users)`` once
    after the pipeline loads (``users``: the jobs' ``infer_cli.UserEmbeddings`` when ``needs_user``, else None);
    ``generate(pipe, batch, seeds, **common)`` per batch; ``settings()`` into every manifest entry, plus
    ``job_settings(job)`` for what differs per image (e.g. the prompt a method actually used).
    """

    name: ClassVar[str]
    needs_user: ClassVar[bool] = False  # every prompt must carry a user embedding (an id, level or profile)
    # The method reads each prompt's user (needs_user implies it; the prompt baseline reads banned lists): the
    # evaluation driver runs such a method per level and per user.
    uses_user: ClassVar[bool] = False
    # This method's own flags (argparse dests, default None); given to another method they are an error.
    flags: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.needs_user:
            cls.uses_user = True

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._check_foreign_flags()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this method's flags to the ``infer.py`` parser (default None, so that a flag given to another
        method can be told from one left out)."""

    def _check_foreign_flags(self) -> None:
        own = set(self.flags)
        for other in METHODS.values():
            for flag in other.flags:
                if flag not in own and getattr(self.args, flag, None) is not None:
                    owners = sorted(m.name for m in METHODS.values() if flag in m.flags)
                    raise MethodError(f"--{flag} applies to --method {' / '.join(owners)}, not --method {self.name}")

    def job_settings(self, job) -> dict:
        """Settings of one image that are particular to this method (recorded in its manifest entry)."""
        return {}

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
    """Load the LoRA of ``--lora_path`` (checked against the pipeline first; see ``baselines.lora``)."""
    if not path:
        return
    from psa_adapter.baselines.lora import load_lora

    load_lora(pipe, path)


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


# The baselines register themselves on import (they import Method and register from this module).
from psa_adapter import baselines  # noqa: E402, F401

__all__ = ["METHODS", "Method", "MethodError", "add_method_arguments", "get_method", "method_names", "register"]
