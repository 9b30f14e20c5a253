"""Named strictness levels L0..L5: the reference's fixed users, stored in the packaged resources/levels.yaml."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ._templates import resources_dir
from .profile import ProfileError, UserProfile, profile_from_mapping


class UnknownLevelError(KeyError):
    """A level name that is not in the levels file. The message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0])


def _levels_file(path: str | os.PathLike | None) -> Path:
    return Path(path) if path is not None else resources_dir() / "levels.yaml"


def _read_levels(path: str | os.PathLike | None) -> tuple[Path, dict]:
    import yaml

    from psa_adapter.utils import read_utf8, yaml_error_message

    path = _levels_file(path)
    try:
        data = yaml.safe_load(read_utf8(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"levels file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ProfileError(yaml_error_message(path, err)) from None
    if not isinstance(data, dict) or not data:
        raise ProfileError(f"{path}: expected a mapping of level names (L0, L1, ...) to profiles")
    return path, {str(k): v for k, v in data.items()}


def level_names(path: str | os.PathLike | None = None) -> list[str]:
    """Level names in file order (["L0", ..., "L5"] for the packaged levels.yaml)."""
    return list(_read_levels(path)[1])


def _canonical(name: str, names: list[str]) -> str | None:
    # Accept "L3", "l3", "3", "level3", "level_3" (the reference's result files say "level_3").
    m = re.fullmatch(r"(?:l|level[_ -]?)?(\d+)", str(name).strip().lower())
    key = f"L{m.group(1)}" if m else str(name)
    return key if key in names else (str(name) if str(name) in names else None)


def load_level(name: str, path: str | os.PathLike | None = None) -> UserProfile:
    """The profile (with its banned list) of a named level, e.g. load_level("L3").

    `path` overrides the packaged levels.yaml. An unknown name raises UnknownLevelError listing valid names.
    """
    path, data = _read_levels(path)
    names = list(data)
    key = _canonical(name, names)
    if key is None:
        raise UnknownLevelError(f"unknown level {name!r}; valid levels in {path}: {', '.join(names)}")
    if not isinstance(data[key], dict):
        raise ProfileError(f"{path}, level {key}: expected a mapping of profile fields")
    entry = dict(data[key])
    entry.pop("description", None)
    profile = profile_from_mapping(entry, where=f"{path}, level {key}")
    if profile.banned is None:
        raise ProfileError(f"{path}, level {key}: a level needs a 'banned' list")
    return profile
