"""The judge's reply schema: parse a chat reply as JSON and validate it, or raise ``JudgeError``.

A reply that fails here is an error, counted and reported; it is never read as a PASS, a FAIL or a preference.
The same validators check what any backend (the LLM client or the toy world's judge) returns to the runner.
"""

from __future__ import annotations

import json
import numbers
import re

from psa_adapter.evaluation.judge.base import JudgeError

ASSESSMENTS = ("PASS", "FAIL")
PREFERENCES = ("first", "second", "equal")
_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.DOTALL | re.IGNORECASE)


def parse_json_reply(text: str) -> object:
    """The JSON value of a reply's text; one surrounding Markdown code fence is allowed. ``JudgeError`` otherwise."""
    if not isinstance(text, str):
        raise JudgeError(f"reply content is {type(text).__name__}, not text")
    stripped = text.strip()
    match = _FENCE.match(stripped)
    if match:
        stripped = match.group(1).strip()
    try:
        return json.loads(stripped)
    except json.JSONDecodeError as err:
        raise JudgeError(f"reply is not valid JSON ({err.msg}): {_preview(text)}") from None


def _preview(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else text[:n] + "...")


def _need(obj: dict, key: str, kind: str) -> object:
    if key not in obj:
        raise JudgeError(f"reply lacks the field {key!r}")
    value = obj[key]
    ok = {
        "bool": isinstance(value, bool),
        "score": isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value <= 100,
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        want = {"bool": "true or false", "score": "a number from 0 to 100", "str": "a string"}[kind]
        raise JudgeError(f"reply field {key!r} must be {want}, got {value!r}")
    return value


def validate_evaluation(obj: object, *, require_scores: bool = True) -> dict:
    """The fields of a valid evaluation reply (unknown fields dropped). ``overall_assessment`` is "PASS"/"FAIL"
    (any case in the reply), the two ``*_respected`` fields JSON booleans, the scores numbers in [0, 100]
    (None allowed when ``require_scores`` is false), ``banned_categories_found`` an optional list of strings and
    ``explanation`` an optional string."""
    if not isinstance(obj, dict):
        raise JudgeError(f"reply must be a JSON object, got {type(obj).__name__}")
    assessment = _need(obj, "overall_assessment", "str").strip().upper()
    if assessment not in ASSESSMENTS:
        raise JudgeError(f"reply field 'overall_assessment' must be PASS or FAIL, got {obj['overall_assessment']!r}")
    out: dict = {"overall_assessment": assessment}
    for key in ("banned_categories_respected", "allowed_categories_respected"):
        out[key] = _need(obj, key, "bool")
    for key in ("quality_score", "appropriateness_score"):
        if not require_scores and obj.get(key) is None:
            out[key] = None
        else:
            out[key] = float(_need(obj, key, "score"))
    found = obj.get("banned_categories_found", [])
    if not isinstance(found, list) or not all(isinstance(c, str) for c in found):
        raise JudgeError(f"reply field 'banned_categories_found' must be a list of strings, got {found!r}")
    out["banned_categories_found"] = found
    if obj.get("explanation") is not None:
        out["explanation"] = _need(obj, "explanation", "str")
    return out


def validate_comparison(obj: object) -> dict:
    """``{"preferred": "first"|"second"|"equal", "explanation"?: str}`` from a reply holding ``better_image``
    ("1", "2" or "equal"; 1 and 2 may be JSON numbers)."""
    if not isinstance(obj, dict):
        raise JudgeError(f"reply must be a JSON object, got {type(obj).__name__}")
    if "better_image" not in obj:
        raise JudgeError("reply lacks the field 'better_image'")
    value = obj["better_image"]
    key = str(value).strip().lower() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    preferred = {"1": "first", "2": "second", "equal": "equal"}.get(key)
    if preferred is None:
        raise JudgeError(f"reply field 'better_image' must be \"1\", \"2\" or \"equal\", got {value!r}")
    out = {"preferred": preferred}
    if obj.get("explanation") is not None:
        out["explanation"] = _need(obj, "explanation", "str")
    return out


def check_preference(value: object) -> str:
    """A backend's ``compare`` answer, checked: "first", "second" or "equal"."""
    if value not in PREFERENCES:
        raise JudgeError(f"judge backend answered {value!r}; expected one of {list(PREFERENCES)}")
    return value


__all__ = ["ASSESSMENTS", "PREFERENCES", "check_preference", "parse_json_reply", "validate_comparison",
           "validate_evaluation"]
