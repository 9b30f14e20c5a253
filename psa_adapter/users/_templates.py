"""Locating the package's resource files (level presets, prompt templates) and filling text templates."""

from __future__ import annotations

import hashlib
import os
import string
from pathlib import Path

from .categories import CATEGORIES
from .profile import UserProfile

#: Shipped inside the package (package data), so a non-editable install has them too.
RESOURCES = ("levels.yaml", "policy_prompt.txt", "statement_template.txt")


def resources_dir() -> Path:
    """The package's resource folder ``psa_adapter/users/resources/`` (its files: ``RESOURCES``)."""
    return Path(__file__).resolve().parent / "resources"


def load_template(path: str | os.PathLike | None, default_name: str, fields: set[str]) -> tuple[str, Path]:
    """Read a str.format template and check it uses only `fields` (doubled braces are literal braces).

    Returns (text, resolved path). `path` None means the packaged resources/<default_name>.
    """
    path = Path(path) if path is not None else resources_dir() / default_name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"template file not found: {path}") from None
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:
        raise ValueError(f"{path}: not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted(used - fields)
    if unknown:
        raise ValueError(f"{path}: unknown placeholder(s) {unknown}; available placeholders {sorted(fields)}")
    return text, path


def template_hash(text: str) -> str:
    """First 16 hex digits of the SHA-256 of a template's text; recorded with every embedding store."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _join(items) -> str:
    return ", ".join(items) if items else "none"


def profile_text_fields(profile: UserProfile, *, need_banned: bool) -> dict[str, str]:
    """Placeholder values for templates: the profile in words, plus banned/allowed lists when assigned."""
    fields = {
        "user_id": profile.user_id,
        "age": str(profile.age),
        "age_group": profile.age_group,
        "gender": profile.gender,
        "religion": "none" if profile.religion == "None" else profile.religion,
        "physical_condition": profile.physical_condition,
        "mental_condition": profile.mental_condition,
        "categories": ", ".join(CATEGORIES),
    }
    if need_banned:
        if profile.banned is None:
            raise ValueError(
                f"user {profile.user_id} has no banned list; assign one first "
                "(python -m psa_adapter.users assign --policy rules ...)"
            )
        fields["banned"] = _join(profile.banned)
        fields["allowed"] = _join(profile.allowed)
    return fields
