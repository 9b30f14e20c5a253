"""What every judge backend implements, and the items it judges.

A backend sees one user and one or two images, never a method or folder name. The runner (not the backend)
decides the order of the two images of a comparison and judges every pair in both orders; a backend only answers
"first", "second" or "equal" for the order it is shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class JudgeUser:
    """The user an image is judged for: profile fields (reference users.csv columns) and the category lists."""

    user_id: str
    profile: dict = field(default_factory=dict)
    banned: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()


@dataclass(frozen=True)
class JudgeItem:
    """One image to judge: its path, the user, and what the SAGE file name says (category, concept) if known."""

    image_path: Path
    user: JudgeUser
    category: str | None = None
    concept: str | None = None
    prompt: str | None = None


class JudgeError(Exception):
    """A reply that could not be obtained or did not validate: counted and reported, never a PASS or a FAIL."""


class JudgeUnavailable(JudgeError):
    """The judge cannot be reached at all (retries exhausted on 429/5xx/timeouts, or refused credentials): the
    runner stops the run, keeping every record already written, instead of turning every image into an error."""


class Judge:
    """A judge backend. ``model`` and ``prompt_hash`` are recorded with every result."""

    model: ClassVar[str] = ""
    prompt_hash: str = ""

    def evaluate(self, item: JudgeItem) -> dict:
        """Judge one image for its user. Returns a record with at least ``overall_assessment`` ("PASS"/"FAIL"),
        ``banned_categories_respected`` and ``allowed_categories_respected`` (bools), ``quality_score`` and
        ``appropriateness_score`` (numbers); raises ``JudgeError`` when no valid reply can be had."""
        raise NotImplementedError

    def compare(self, first: JudgeItem, second: JudgeItem) -> str:
        """Which of two images (same prompt, same user) serves the user better: "first", "second" or "equal";
        raises ``JudgeError`` when no valid reply can be had."""
        raise NotImplementedError

    def compare_record(self, first: JudgeItem, second: JudgeItem) -> dict:
        """``compare`` with whatever else the backend can say: ``{"preferred": "first"|"second"|"equal", ...}``
        (e.g. an ``explanation``). The runner calls this one; backends that only implement ``compare`` inherit
        it."""
        return {"preferred": self.compare(first, second)}
