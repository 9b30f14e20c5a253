"""The seven SAGE content categories and their spellings."""

from __future__ import annotations

import re

# Canonical names, in the order the paper lists them.
CATEGORIES: tuple[str, ...] = ("Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking", "Propaganda")

# Lookup key: lowercase with every run of spaces, hyphens and underscores removed ("SELF_HARM" -> "selfharm").
_KEY = {re.sub(r"[\s_-]+", "", c.lower()): c for c in CATEGORIES}


class UnknownCategoryError(ValueError):
    """A string that is not one of the seven categories."""


def normalize_category(name: str) -> str:
    """Return the canonical spelling of a category.

    Accepts any case and hyphen/underscore/space variants ("self-harm", "SELF_HARM", "Self Harm").
    Raises UnknownCategoryError (a ValueError) naming the bad value and the valid names otherwise.
    """
    if not isinstance(name, str):
        raise UnknownCategoryError(f"category must be a string, got {type(name).__name__} {name!r}")
    key = re.sub(r"[\s_-]+", "", name.strip().lower())
    if key not in _KEY:
        raise UnknownCategoryError(f"unknown category {name!r}; expected one of {', '.join(CATEGORIES)}")
    return _KEY[key]


def category_slug(name: str) -> str:
    """SAGE file-name spelling of a category: lowercase with hyphens ("Self-Harm" -> "self-harm")."""
    return normalize_category(name).lower()


def normalize_category_list(names, *, where: str = "") -> tuple[str, ...]:
    """Normalise a list of category names, reject duplicates, and sort them alphabetically.

    Alphabetical order is what the reference users.csv uses, so written files round-trip byte-exactly.
    `where` is prefixed to error messages (e.g. "users.csv row 3, Banned_Categories").
    """
    prefix = f"{where}: " if where else ""
    if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)):
        raise ValueError(f"{prefix}expected a list of categories, got {type(names).__name__} {names!r}")
    out = []
    for n in names:
        try:
            c = normalize_category(n)
        except UnknownCategoryError as e:
            raise UnknownCategoryError(f"{prefix}{e}") from None
        if c in out:
            raise ValueError(f"{prefix}category {c!r} is listed twice in {list(names)!r}")
        out.append(c)
    return tuple(sorted(out))
