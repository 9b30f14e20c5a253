"""Prompt-based safety (``--method prompt``): what a practitioner tries first, with no training.

The user's banned categories, spelled as concept words, go either into the negative prompt
(``--prompt_mode negative``) or into an instruction appended to the prompt (``--prompt_mode instruction``,
template ``--prompt_instruction``). Users come the way PSA's do: a level (``--level L3``), a profile file
(``--profile``), or a User_ID (``--user_id`` or a ``user_id`` column) looked up in ``--users_csv`` (a users table in
the reference format, e.g. upstream ``users/users.csv``, which records each user's banned categories). Every image's
prompt and negative prompt as used are recorded in the manifest (``method_prompt``, ``method_negative_prompt``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from psa_adapter.methods import Method, MethodError, register
from psa_adapter.users.categories import CATEGORIES, normalize_category

MODES = ("negative", "instruction")
# Concept words per category for Stable Diffusion prompts: the category's own name first, then a few of the concepts
# SAGE's captions are built on (its 7 categories x 3 concepts per user).
DEFAULT_CONCEPT_WORDS: dict[str, tuple[str, ...]] = {
    "Hate": ("hate", "hate speech", "slurs", "hate symbols"),
    "Harassment": ("harassment", "bullying", "threats", "stalking"),
    "Violence": ("violence", "blood", "weapons", "assault"),
    "Self-Harm": ("self-harm", "cutting", "suicide", "scars"),
    "Sexuality": ("sexual content", "nudity", "pornography", "erotic"),
    "Shocking": ("shocking", "gore", "corpse", "mutilation"),
    "Propaganda": ("propaganda", "extremist poster", "political slogan", "rally"),
}
DEFAULT_INSTRUCTION = "{prompt}, without {concepts}"
DEFAULT_JOIN = ", "


def read_concept_words(path: str | Path) -> dict[str, tuple[str, ...]]:
    """A JSON or YAML mapping category -> list of words (any spelling of the seven categories)."""
    path = Path(path)
    if not path.is_file():
        raise MethodError(f"--prompt_concepts file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - json / yaml parse errors
        raise MethodError(f"--prompt_concepts {path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {err}") from err
    if not isinstance(data, dict):
        raise MethodError(f"--prompt_concepts {path}: expected a mapping category -> list of words")
    words = {}
    for name, values in data.items():
        try:
            category = normalize_category(str(name))
        except ValueError as err:
            raise MethodError(f"--prompt_concepts {path}: {err}") from None
        if isinstance(values, str) or not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise MethodError(f"--prompt_concepts {path}: {name}: expected a list of words, got {values!r}")
        words[category] = tuple(values)
    return words


def concept_text(banned: Sequence[str], words: dict[str, Sequence[str]], join: str = DEFAULT_JOIN) -> str:
    """The concept words of the banned categories, in the paper's category order, joined with ``join``."""
    banned = {normalize_category(c) for c in banned}
    return join.join(w for c in CATEGORIES if c in banned for w in words.get(c, ()))


class UserBans:
    """Banned categories per job user: a level, a ``profile:<path>`` or a User_ID in a users CSV."""

    def __init__(self, users_csv: str | None):
        self.users_csv = users_csv
        self._table = None
        self.banned: dict[str, tuple[str, ...]] = {}

    def _by_id(self, user_id: str, where: str) -> tuple[str, ...] | None:
        from psa_adapter.users import ProfileError, read_users_csv

        if not self.users_csv:
            raise MethodError(f"{where}: user {user_id} needs its banned categories: pass --users_csv (a users table "
                              "with Banned_Categories, e.g. upstream users/users.csv)")
        if self._table is None:
            if not Path(self.users_csv).is_file():
                raise MethodError(f"--users_csv file not found: {self.users_csv}")
            try:
                self._table = {p.user_id: p for p in read_users_csv(self.users_csv)}
            except (ProfileError, ValueError, OSError) as err:
                raise MethodError(f"--users_csv {self.users_csv}: {err}") from err
        if user_id not in self._table:
            raise MethodError(f"{where}: user {user_id} is not in --users_csv {self.users_csv}")
        return self._table[user_id].banned

    def resolve(self, jobs: Sequence) -> None:
        """Fill ``banned`` for every job's user; ``MethodError`` naming the job's line or flag otherwise."""
        from psa_adapter import users

        for job in jobs:
            key = job.user
            if not key:
                raise MethodError(f"{job.where}: prompt has no user; give --user_id, --level or --profile, or a "
                                  "user_id column")
            if key in self.banned:
                continue
            if key.isdigit():
                banned = self._by_id(key, job.where)
            elif key.startswith("profile:"):
                try:
                    banned = users.load_profile(key.removeprefix("profile:")).banned
                except (OSError, ValueError, KeyError) as err:
                    raise MethodError(f"--profile {key.removeprefix('profile:')}: {err}") from err
            else:
                try:
                    banned = users.load_level(key).banned
                except (OSError, ValueError, KeyError) as err:
                    raise MethodError(f"--level {key}: {err}") from err
            if banned is None:
                raise MethodError(f"{job.where}: user {key} has no banned list (assign one with "
                                  "`python -m psa_adapter.users`)")
            self.banned[key] = tuple(banned)


@register
class PromptSafety(Method):
    """The user's banned concepts as a negative prompt or as an instruction appended to the prompt."""

    name = "prompt"
    uses_user = True
    # --users_csv is infer.py's own flag (shared with --llm_model); it holds the banned lists of User_IDs.
    flags = ("prompt_mode", "prompt_concepts", "prompt_instruction", "prompt_join")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("prompt-based safety (--method prompt)")
        group.add_argument("--prompt_mode", default=None, choices=MODES,
                           help="negative (default): the banned concepts join the negative prompt; instruction: "
                                "appended to the prompt with --prompt_instruction")
        group.add_argument("--prompt_concepts", default=None,
                           help="JSON/YAML category -> list of words (default: each category's name and a few SAGE "
                                "concepts)")
        group.add_argument("--prompt_instruction", default=None,
                           help=f"instruction template with {{prompt}} and {{concepts}} (default "
                                f"{DEFAULT_INSTRUCTION!r})")
        group.add_argument("--prompt_join", default=None, help=f"separator of the words (default {DEFAULT_JOIN!r})")

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.mode = getattr(args, "prompt_mode", None) or "negative"
        if self.mode not in MODES:
            raise MethodError(f"unknown --prompt_mode {self.mode!r}; known modes: {', '.join(MODES)}")
        self.template = getattr(args, "prompt_instruction", None) or DEFAULT_INSTRUCTION
        self.join = getattr(args, "prompt_join", None)
        self.join = DEFAULT_JOIN if self.join is None else self.join
        self.concepts_file = getattr(args, "prompt_concepts", None)
        self.words = dict(DEFAULT_CONCEPT_WORDS)
        self.bans = UserBans(getattr(args, "users_csv", None))

    def validate(self, jobs: Sequence) -> None:
        if self.mode == "instruction":
            try:
                self.template.format(prompt="p", concepts="c")
            except (KeyError, IndexError, ValueError) as err:
                raise MethodError(f"--prompt_instruction {self.template!r}: use only {{prompt}} and {{concepts}} "
                                  f"({err})") from None
            if "{prompt}" not in self.template:
                raise MethodError(f"--prompt_instruction {self.template!r} has no {{prompt}}")
        if self.concepts_file:
            self.words = read_concept_words(self.concepts_file)
        self.bans.resolve(jobs)

    def prepare(self, pipe, jobs: Sequence, users=None) -> None:
        from psa_adapter.methods import _lora

        _lora(pipe, getattr(self.args, "lora_path", None))

    def texts(self, job, negative_prompt: str | None) -> tuple[str, str | None]:
        """(prompt, negative prompt) given to the pipeline for ``job`` (``negative_prompt``: the common one)."""
        concepts = concept_text(self.bans.banned[job.user], self.words, self.join)
        if not concepts:
            return job.prompt, negative_prompt
        if self.mode == "instruction":
            return self.template.format(prompt=job.prompt, concepts=concepts), negative_prompt
        return job.prompt, self.join.join(t for t in (negative_prompt, concepts) if t)

    def generate(self, pipe, batch: Sequence, seeds: Sequence[int], **common) -> list:
        from psa_adapter.pipeline import generate

        negative = common.pop("negative_prompt", None)
        texts = [self.texts(job, negative) for job in batch]
        images: list = [None] * len(batch)
        for neg in dict.fromkeys(n for _, n in texts):  # one pipeline call per negative prompt; seeds are per image
            idx = [i for i, (_, n) in enumerate(texts) if n == neg]
            out = generate(pipe, [texts[i][0] for i in idx], [seeds[i] for i in idx], negative_prompt=neg, **common)
            for i, image in zip(idx, out):
                images[i] = image
        return images

    def job_settings(self, job) -> dict:
        prompt, negative = self.texts(job, job.negative_prompt)
        return {"banned": list(self.bans.banned.get(job.user, ())), "method_prompt": prompt,
                "method_negative_prompt": negative}

    def settings(self) -> dict:
        return {"method": self.name, "prompt_mode": self.mode, "users_csv": self.bans.users_csv,
                "prompt_concepts": self.concepts_file,
                "prompt_instruction": self.template if self.mode == "instruction" else None,
                "prompt_join": self.join, "lora": getattr(self.args, "lora_path", None)}


__all__ = ["DEFAULT_CONCEPT_WORDS", "DEFAULT_INSTRUCTION", "MODES", "PromptSafety", "UserBans", "concept_text",
           "read_concept_words"]
