"""A response cache for the judge: one JSONL line per validated reply, keyed by a hash of the whole request.

The key is the SHA-256 of the request's model, parameters, prompt text and image bytes (the request body, which
never holds the API key: that travels in a header). A rerun of the same request is answered from the cache and
sends nothing. Only validated replies are stored, so a reply that failed validation is asked again next time.
A torn last line (a crash mid-write) is ignored and cut off; a bad line elsewhere is an error naming the line.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from psa_adapter.evaluation.records import JsonlAppender, read_jsonl


def request_key(material: dict) -> str:
    """SHA-256 (hex) of ``material`` as canonical JSON."""
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


class ResponseCache:
    """Thread-safe ``key -> reply`` store backed by an append-only JSONL file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._appender: JsonlAppender | None = None
        self._replies: dict[str, dict] = {}
        for line_no, record in enumerate(read_jsonl(self.path), start=1):
            if not isinstance(record.get("key"), str) or not isinstance(record.get("reply"), dict):
                raise ValueError(f"{self.path} line {line_no}: not a judge cache entry (needs 'key' and 'reply')")
            self._replies[record["key"]] = record["reply"]

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str) -> dict | None:
        with self._lock:
            reply = self._replies.get(key)
        return None if reply is None else dict(reply)

    def put(self, key: str, reply: dict, *, model: str) -> None:
        with self._lock:
            if key in self._replies:
                return
            if self._appender is None:
                self._appender = JsonlAppender(self.path)
            self._appender.write({"key": key, "model": model, "reply": reply})
            self._replies[key] = dict(reply)

    def close(self) -> None:
        with self._lock:
            if self._appender is not None:
                self._appender.close()
                self._appender = None


__all__ = ["ResponseCache", "request_key"]
