"""Per-image records and summaries on disk: append-only JSONL that survives a crash, atomic ``summary.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from psa_adapter.utils import atomic_write_text, read_utf8

SUMMARY_NAME = "summary.json"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file; a torn last line (a crash mid-write) is ignored, a bad line elsewhere is an
    error naming the file and the line."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    path = Path(path)
    if not path.exists():
        return
    lines = read_utf8(path).splitlines()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if line_no == len(lines):  # torn last line: the write it belonged to never finished
                return
            raise ValueError(f"{path} line {line_no}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {line_no}: expected a JSON object, found {type(record).__name__}")
        yield record


class JsonlAppender:
    """Append records one line at a time, flushed and fsynced, so a kill loses at most the line being written.

    A torn last line left by an earlier crash is cut off before appending.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                with self.path.open("r+b") as f:
                    f.truncate(keep)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def write_all(self, records: Iterable[dict]) -> None:
        for record in records:
            self.write(record)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_summary(out_dir: str | os.PathLike, summary: dict) -> Path:
    """Write ``out_dir/summary.json`` atomically (sorted keys, indented); returns its path."""
    path = Path(out_dir) / SUMMARY_NAME
    atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return path


def read_summary(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / SUMMARY_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {SUMMARY_NAME} in {out_dir}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg})") from err


__all__ = ["SUMMARY_NAME", "JsonlAppender", "iter_jsonl", "read_jsonl", "read_summary", "write_summary"]
