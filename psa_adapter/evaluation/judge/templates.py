"""The judge's prompt templates: text files in ``prompts/`` (package data), rendered per item, hashed for records.

The templates see a user (profile, banned and allowed categories) and what the image was generated for; nothing
else. No method, folder or file name is ever placed into a prompt: the runner keeps those to itself, and the images
travel as bytes. ``$name`` placeholders (``string.Template``) are filled by ``render_evaluate``/``render_compare``;
a template that names an unknown placeholder or leaves one out is an error when it is loaded.
"""

from __future__ import annotations

import hashlib
import os
import string
from dataclasses import dataclass
from pathlib import Path

from psa_adapter.evaluation.judge.base import JudgeItem, JudgeUser

PROMPT_DIR = Path(__file__).resolve().with_name("prompts")
TEMPLATE_NAMES = ("system", "evaluate", "compare")
PLACEHOLDERS = {"user_profile", "banned_categories", "allowed_categories", "request"}


def _placeholders(template: string.Template) -> set[str]:
    return {m.group("named") or m.group("braced") for m in template.pattern.finditer(template.template)
            if m.group("named") or m.group("braced")}


@dataclass(frozen=True)
class PromptTemplates:
    """The three template texts. ``hash`` (16 hex digits of a SHA-256 over names and texts) goes into every
    record, so results from different wordings are never mixed silently."""

    system: str
    evaluate: str
    compare: str

    @classmethod
    def load(cls, folder: str | os.PathLike | None = None) -> PromptTemplates:
        """Read ``system.txt``, ``evaluate.txt`` and ``compare.txt`` from ``folder`` (default: the packaged ones)."""
        folder = Path(folder) if folder is not None else PROMPT_DIR
        texts = {}
        for name in TEMPLATE_NAMES:
            path = folder / f"{name}.txt"
            try:
                texts[name] = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise FileNotFoundError(f"judge prompt template not found: {path}") from None
            found = _placeholders(string.Template(texts[name]))
            unknown = found - PLACEHOLDERS
            if unknown:
                raise ValueError(f"{path}: unknown placeholder(s) {sorted(unknown)}; known: {sorted(PLACEHOLDERS)}")
            if name != "system" and found != PLACEHOLDERS:
                raise ValueError(f"{path}: missing placeholder(s) {sorted(PLACEHOLDERS - found)}")
        return cls(**texts)

    @property
    def hash(self) -> str:
        h = hashlib.sha256()
        for name in TEMPLATE_NAMES:
            h.update(name.encode() + b"\0" + getattr(self, name).encode("utf-8") + b"\0")
        return h.hexdigest()[:16]

    def render_evaluate(self, item: JudgeItem) -> str:
        """The user message for judging one image (the image itself is attached separately)."""
        return string.Template(self.evaluate).substitute(_fields(item))

    def render_compare(self, first: JudgeItem, second: JudgeItem) -> str:
        """The user message for comparing two images made for the same user and request."""
        if first.user.user_id != second.user.user_id or first.prompt != second.prompt:
            raise ValueError("a comparison needs two images for the same user and the same request")
        return string.Template(self.compare).substitute(_fields(first))


def profile_text(user: JudgeUser) -> str:
    """One ``- Field: value`` line per profile field, in the profile's order (reference users.csv columns).

    Age and Age_Group share a line: ``- Age: 18 (adolescents)``.
    """
    profile = dict(user.profile)
    lines = []
    if "Age" in profile:
        group = profile.pop("Age_Group", None)
        lines.append(f"- Age: {profile.pop('Age')}" + (f" ({group})" if group else ""))
    for key, value in profile.items():
        label = key.replace("_", " ")
        label = label[:1].upper() + label[1:].lower()
        lines.append(f"- {label}: {'none' if value in (None, 'None') else value}")
    return "\n".join(lines) if lines else "- (no profile given)"


def request_text(item: JudgeItem) -> str:
    """What the image was generated for: the prompt when known, else the theme from the SAGE file name."""
    if item.prompt:
        return '"' + " ".join(item.prompt.split()) + '"'
    if item.concept and item.category:
        return f"an image on the theme \"{item.concept.replace('_', ' ')}\" (category {item.category})"
    if item.category:
        return f"an image in the category {item.category}"
    return "not given"


def _fields(item: JudgeItem) -> dict[str, str]:
    return {
        "user_profile": profile_text(item.user),
        "banned_categories": ", ".join(item.user.banned) if item.user.banned else "none",
        "allowed_categories": ", ".join(item.user.allowed) if item.user.allowed else "none",
        "request": request_text(item),
    }


__all__ = ["PLACEHOLDERS", "PROMPT_DIR", "PromptTemplates", "profile_text", "request_text"]
