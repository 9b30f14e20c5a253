"""Dataclass configs for the toy-world jobs: YAML file, then ``--key value`` overrides, validated once."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path

import yaml

from psa_adapter.utils import atomic_write_text


def config_from_dict(cls, data: dict, where: str):
    """Build dataclass ``cls`` from ``data``; an unknown key is an error that names the file and the known keys."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    return cls(**data)


def load_config(cls, path: str | os.PathLike | None, overrides: dict | None = None):
    """Read ``cls`` from a YAML file (or defaults when ``path`` is None) and apply ``overrides`` on top."""
    data: dict = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(cls, data, where)


def add_override_flags(parser: argparse.ArgumentParser, cls) -> None:
    """Add one ``--field`` flag per dataclass field (values parsed as YAML, so lists and numbers work)."""
    group = parser.add_argument_group(f"{cls.__name__} overrides (default: the config file's value)")
    for f in dataclasses.fields(cls):
        helptext = f.metadata.get("help", "")
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", type=yaml.safe_load, help=helptext)


def overrides_from_args(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f"cfg_{f.name}") for f in dataclasses.fields(cls)}


def save_config(config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML beside an output (atomically)."""
    atomic_write_text(Path(path), yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def field_help(cls) -> dict[str, str]:
    hints = typing.get_type_hints(cls)
    return {f.name: f"{hints.get(f.name)}: {f.metadata.get('help', '')}" for f in dataclasses.fields(cls)}
