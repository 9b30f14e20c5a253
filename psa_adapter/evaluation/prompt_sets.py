"""The paper's prompt sets (``resources/prompt_sets.yaml``) and the check of what a user put in place.

The project does not redistribute prompt sets or reference images; ``python -m evaluation prepare`` says where to
get each one and whether the copy in place is complete (the file exists, has the required columns, the published
number of rows, and, where the published file's hash is known, the same bytes).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class PromptSetError(ValueError):
    """An unknown prompt set, or a prompt file that cannot be read: the message names the set or the file."""


@dataclass(frozen=True)
class PromptSetSpec:
    name: str
    file: str
    columns: tuple[str, ...] = ("caption",)
    rows: int | None = None
    sha256: str | None = None
    users: bool = False  # each prompt carries its own user (user_id column)
    source: str = ""
    reference: str | None = None  # what FID's reference images are, for sets that need them
    metrics: tuple[str, ...] = ()


def _load_specs() -> dict[str, PromptSetSpec]:
    import yaml

    text = resources.files("psa_adapter.evaluation").joinpath("resources/prompt_sets.yaml").read_text("utf-8")
    specs = {}
    for name, entry in yaml.safe_load(text).items():
        specs[name] = PromptSetSpec(name=name, file=entry["file"], columns=tuple(entry.get("columns", ["caption"])),
                                    rows=entry.get("rows"), sha256=entry.get("sha256"),
                                    users=bool(entry.get("users", False)), source=" ".join(entry["source"].split()),
                                    reference=entry.get("reference"), metrics=tuple(entry.get("metrics", ())))
    return specs


PROMPT_SETS: dict[str, PromptSetSpec] = _load_specs()


def get_spec(name: str) -> PromptSetSpec:
    """The spec of a known prompt set; an unknown name is a ``PromptSetError`` listing the known ones."""
    try:
        return PROMPT_SETS[name]
    except KeyError:
        raise PromptSetError(f"unknown prompt set {name!r}; known prompt sets: {', '.join(PROMPT_SETS)}") from None


@dataclass
class PromptRow:
    caption: str
    file_name: str
    user_id: str | None = None
    line: int = 0


@dataclass
class PromptFileReport:
    """What ``check_prompt_file`` found: ``status`` is ``complete``, ``incomplete``, ``modified`` or ``missing``."""

    name: str
    path: Path
    status: str
    rows: int = 0
    expected_rows: int | None = None
    problems: list[str] = field(default_factory=list)


def read_prompt_rows(path: str | os.PathLike, columns: tuple[str, ...] = ("caption",)) -> list[PromptRow]:
    """The rows of a prompt CSV (``caption`` and optional ``file_name``, ``user_id``), read the way ``infer.py``
    reads them (missing file names become ``<index:05d>.png``; repeated ones get ``_<k>``), so that the file names
    here are the images ``infer.py`` writes."""
    from psa_adapter.infer_cli import InferError, dedupe_file_names, read_csv_jobs

    path = Path(path)
    from psa_adapter.utils import NotUTF8Error, read_utf8

    try:
        text = read_utf8(path, bom=True, translate_newlines=False)
    except FileNotFoundError:
        raise PromptSetError(f"prompt file not found: {path}") from None
    except NotUTF8Error as err:
        raise PromptSetError(str(err)) from None
    header = next(csv.reader(io.StringIO(text, newline="")), [])
    absent = [c for c in columns if c not in header]
    if absent:
        raise PromptSetError(f"{path}: missing column(s) {', '.join(absent)} (found: {', '.join(header) or 'none'})")
    try:
        jobs = read_csv_jobs(path)
    except InferError as err:
        raise PromptSetError(str(err)) from err
    dedupe_file_names(jobs)
    return [PromptRow(j.prompt, j.file_name, j.user, int(j.where.rsplit(" ", 1)[-1])) for j in jobs]


def check_prompt_file(spec: PromptSetSpec, path: str | os.PathLike) -> PromptFileReport:
    """Is the file at ``path`` a complete copy of the prompt set ``spec``?"""
    path = Path(path)
    report = PromptFileReport(spec.name, path, "missing", expected_rows=spec.rows)
    if not path.is_file():
        report.problems.append(f"not found: {path}")
        return report
    try:
        rows = read_prompt_rows(path, spec.columns)
    except PromptSetError as err:
        report.status = "incomplete"
        report.problems.append(str(err))
        return report
    report.rows = len(rows)
    empty = [r.line for r in rows if not r.caption.strip()]
    if empty:
        report.problems.append(f"{len(empty)} empty caption(s), first at line {empty[0]}")
    if spec.rows is not None and len(rows) != spec.rows:
        report.problems.append(f"{len(rows)} rows, the published set has {spec.rows}")
    if report.problems:
        report.status = "incomplete"
    elif spec.sha256 and hashlib.sha256(path.read_bytes()).hexdigest() != spec.sha256:
        report.status = "modified"
        report.problems.append("same number of rows as the published file but different bytes")
    else:
        report.status = "complete"
    return report


def check_reference_folder(folder: str | os.PathLike, expected: list[str] | None = None) -> tuple[int, list[str]]:
    """``(images found, expected names missing)`` for a folder of reference images (FID's real set)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0, list(expected or [])
    present = {p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    return len(present), [n for n in (expected or []) if Path(n).name not in present]


__all__ = ["PROMPT_SETS", "PromptFileReport", "PromptRow", "PromptSetError", "PromptSetSpec", "check_prompt_file",
           "check_reference_folder", "get_spec", "read_prompt_rows"]
