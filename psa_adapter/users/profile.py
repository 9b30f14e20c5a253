"""User profiles: the SAGE schema, the reference users.csv format, and one-person YAML/JSON files."""

from __future__ import annotations

import ast
import csv
import io
import json
import numbers
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from psa_adapter.utils import read_utf8, yaml_error_message

from ._io import atomic_write_text
from .categories import CATEGORIES, normalize_category_list

# Age groups with the inclusive age range the SAGE sampler draws from. Validation allows ages up to 120 for the
# oldest group (the sampler stops at 100, real people do not).
AGE_GROUPS: dict[str, tuple[int, int]] = {
    "infants & toddlers": (0, 3),
    "children": (4, 12),
    "adolescents": (13, 19),
    "young adults": (20, 34),
    "middle-aged": (35, 59),
    "young elderly": (60, 74),
    "elderly": (75, 89),
    "long-lived elderly": (90, 100),
}
_MAX_AGE = 120
GENDERS: tuple[str, ...] = ("male", "female")
# "None" is a value of its own (no religion), spelled as in the reference files.
RELIGIONS: tuple[str, ...] = ("Christianity", "Islam", "Buddhism", "None")
PHYSICAL_CONDITIONS: tuple[str, ...] = (
    "visual impairment",
    "hearing impairment",
    "intellectual disability",
    "healthy",
)
MENTAL_CONDITIONS: tuple[str, ...] = (
    "depression",
    "anxiety",
    "war",
    "sexual assault",
    "major accidents",
    "natural disasters",
    "healthy",
)

# Column names of the reference users.csv, in its order. User_ID is optional (absent in the reference file).
PROFILE_COLUMNS: tuple[str, ...] = (
    "Age",
    "Age_Group",
    "Gender",
    "Religion",
    "Physical_Condition",
    "Mental_Condition",
)
LIST_COLUMNS: tuple[str, ...] = ("Banned_Categories", "Allowed_Categories")
ID_COLUMN = "User_ID"

_FIELD_FOR_COLUMN = {
    "User_ID": "user_id",
    "Age": "age",
    "Age_Group": "age_group",
    "Gender": "gender",
    "Religion": "religion",
    "Physical_Condition": "physical_condition",
    "Mental_Condition": "mental_condition",
    "Banned_Categories": "banned",
    "Allowed_Categories": "allowed",
}
_VOCAB = {
    "age_group": tuple(AGE_GROUPS),
    "gender": GENDERS,
    "religion": RELIGIONS,
    "physical_condition": PHYSICAL_CONDITIONS,
    "mental_condition": MENTAL_CONDITIONS,
}


class ProfileError(ValueError):
    """A profile, profile file or users CSV that does not follow the schema. The message says where."""


@dataclass(frozen=True)
class UserProfile:
    """One person: the SAGE profile fields and, once a policy has assigned it, the banned categories.

    `banned` is None while no policy has assigned a list, and otherwise a tuple of canonical category names sorted
    alphabetically (the reference order). `allowed` is always the complement of `banned`.
    Vocabulary fields are matched case-insensitively and stored in the reference spelling.
    """

    user_id: str
    age: int
    age_group: str
    gender: str
    religion: str
    physical_condition: str
    mental_condition: str
    banned: tuple[str, ...] | None = None

    def __post_init__(self):
        who = f"user {self.user_id!r}"
        if not isinstance(self.user_id, str) or not re.fullmatch(r"\d{7}", self.user_id):
            raise ProfileError(
                f"{who}: field 'user_id' must be a 7-digit string such as '0000042', got {self.user_id!r}"
            )
        if isinstance(self.age, bool) or not isinstance(self.age, numbers.Integral):
            raise ProfileError(f"{who}: field 'age' must be an integer, got {type(self.age).__name__} {self.age!r}")
        object.__setattr__(self, "age", int(self.age))
        if not 0 <= self.age <= _MAX_AGE:
            raise ProfileError(f"{who}: field 'age' must be between 0 and {_MAX_AGE}, got {self.age}")
        religion = "None" if self.religion is None else self.religion  # YAML/JSON null means no religion
        object.__setattr__(self, "religion", religion)
        for field, vocab in _VOCAB.items():
            value = getattr(self, field)
            match = [v for v in vocab if isinstance(value, str) and v.lower() == value.strip().lower()]
            if not match:
                raise ProfileError(f"{who}: field {field!r} must be one of {list(vocab)}, got {value!r}")
            object.__setattr__(self, field, match[0])
        lo, hi = AGE_GROUPS[self.age_group]
        hi = _MAX_AGE if self.age_group == "long-lived elderly" else hi
        if not lo <= self.age <= hi:
            raise ProfileError(
                f"{who}: field 'age' is {self.age}, outside the range {lo}-{hi} of age_group {self.age_group!r}"
            )
        if self.banned is not None:
            try:
                banned = normalize_category_list(self.banned)
            except ValueError as e:
                raise ProfileError(f"{who}: field 'banned': {e}") from None
            object.__setattr__(self, "banned", banned)

    @property
    def allowed(self) -> tuple[str, ...] | None:
        """Categories not banned, sorted alphabetically; None while `banned` is None."""
        if self.banned is None:
            return None
        return tuple(sorted(c for c in CATEGORIES if c not in self.banned))

    def with_banned(self, banned) -> UserProfile:
        """A copy of this profile with a new banned list (validated)."""
        return UserProfile(**{**self.to_dict(), "banned": banned})

    def to_dict(self) -> dict:
        """Plain dict with snake_case keys (banned as a list or None); the inverse of profile_from_mapping."""
        return {
            "user_id": self.user_id,
            "age": self.age,
            "age_group": self.age_group,
            "gender": self.gender,
            "religion": self.religion,
            "physical_condition": self.physical_condition,
            "mental_condition": self.mental_condition,
            "banned": None if self.banned is None else list(self.banned),
        }


def profile_from_mapping(data: dict, *, where: str) -> UserProfile:
    """Build a profile from a mapping with snake_case keys or the reference column names.

    Keys are matched case-insensitively ("Age_Group" == "age_group"); "banned"/"Banned_Categories" and
    "allowed"/"Allowed_Categories" are lists of categories. If both lists are given, they must be complements.
    Unknown keys are an error (they are usually typos). `where` names the source in error messages.
    """
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping of profile fields, got {type(data).__name__}")
    known = {k.lower(): v for k, v in _FIELD_FOR_COLUMN.items()} | {v: v for v in _FIELD_FOR_COLUMN.values()}
    fields: dict = {}
    for key, value in data.items():
        name = known.get(str(key).lower())
        if name is None:
            raise ProfileError(f"{where}: unknown field {key!r}; expected fields {sorted(set(known.values()))}")
        if name in fields:
            raise ProfileError(f"{where}: field {name!r} is given twice")
        fields[name] = value
    allowed = fields.pop("allowed", None)
    missing = [f for f in ("user_id", "age", "age_group", "gender", "religion", "physical_condition",
                           "mental_condition") if f not in fields]
    if missing:
        raise ProfileError(f"{where}: missing field(s) {missing}")
    if isinstance(fields["user_id"], int) and not isinstance(fields["user_id"], bool):
        raise ProfileError(f"{where}: field 'user_id' must be a quoted 7-digit string such as '0000042', "
                           f"got the number {fields['user_id']}")
    try:
        profile = UserProfile(**fields)
    except ProfileError as e:
        raise ProfileError(f"{where}: {e}") from None
    if allowed is not None:
        if profile.banned is None:
            raise ProfileError(
                f"{where}: 'allowed' is given without 'banned'; give 'banned' (allowed is its complement)"
            )
        try:
            allowed = normalize_category_list(allowed, where=f"{where}, field 'allowed'")
        except ValueError as e:
            raise ProfileError(str(e)) from None
        if allowed != profile.allowed:
            raise ProfileError(
                f"{where}: 'allowed' {list(allowed)} is not the complement of 'banned' {list(profile.banned)} "
                f"(expected {list(profile.allowed)})"
            )
    return profile


# ----------------------------------------------------------------------------------------------------------------
# users.csv


def parse_list_cell(text: str, *, where: str) -> tuple[str, ...]:
    """A users.csv list cell such as "['Hate', 'Violence']" -> canonical category names, sorted."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ProfileError(f"{where}: expected a Python list such as \"['Hate', 'Violence']\", got {text!r}") from None
    if not isinstance(value, list):
        raise ProfileError(f"{where}: expected a list, got {type(value).__name__} {text!r}")
    try:
        return normalize_category_list(value, where=where)
    except ValueError as e:
        raise ProfileError(str(e)) from None


def open_users_csv(
    path: str | os.PathLike, required: Sequence[str]
) -> tuple[list[str], Iterator[tuple[str, dict[str, str], str]]]:
    """Open a users table in the reference format: ``(header, rows)``, rows giving ``(user_id, row, where)``.

    The one reader of users.csv rows (profiles: ``read_users_csv``; banned lists alone: ``data.read_banned_lists``).
    Checks that the ``required`` columns are present and that every row has as many fields as the header. Without
    a User_ID column, data row r (1-based) is user f"{r:07d}", as in the reference; a repeated id is an error.
    ``where`` ("<file> row r (line n)") prefixes the caller's own messages about the row.
    """
    path = Path(path)
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark, which would hide the first column.
        text = read_utf8(path, bom=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"users file not found: {path}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = list(reader.fieldnames or [])
    missing = [c for c in required if c not in header]
    if missing:
        raise ProfileError(f"{path}: missing column(s) {missing}; found columns {header}")

    def rows() -> Iterator[tuple[str, dict[str, str], str]]:
        seen: dict[str, int] = {}
        for r, row in enumerate(reader, start=1):
            where = f"{path} row {r} (line {reader.line_num})"
            if None in row or any(row[c] is None for c in header):
                raise ProfileError(f"{where}: expected {len(header)} fields as in the header, found a different "
                                   "number")
            user_id = row[ID_COLUMN].strip() if ID_COLUMN in header else f"{r:07d}"
            if user_id in seen:
                raise ProfileError(f"{where}, field User_ID: user {user_id} already appears in row {seen[user_id]}")
            seen[user_id] = r
            yield user_id, row, where

    return header, rows()


def read_users_csv(path: str | os.PathLike) -> list[UserProfile]:
    """Read a users table in the reference format (upstream `users.csv`).

    Columns Age, Age_Group, Gender, Religion, Physical_Condition, Mental_Condition are required; Banned_Categories
    and Allowed_Categories (Python-list strings) are optional but come together. Without a User_ID column, data
    row r (1-based) is user f"{r:07d}", as in the reference. Extra columns (Cluster_ID, tsne_x, ...) are ignored.
    Errors name the file, the row, its line and the field.
    """
    header, rows = open_users_csv(path, PROFILE_COLUMNS)
    has_lists = [c for c in LIST_COLUMNS if c in header]
    if has_lists == ["Allowed_Categories"]:
        raise ProfileError(f"{path}: has Allowed_Categories but no Banned_Categories column")
    profiles: list[UserProfile] = []
    for user_id, row, where in rows:
        age_text = row["Age"].strip()
        if not re.fullmatch(r"-?\d+", age_text):
            raise ProfileError(f"{where}, field Age: expected a non-negative integer, got {row['Age']!r}")
        if int(age_text) < 0:
            raise ProfileError(f"{where}, field Age: expected a non-negative integer, got {int(age_text)}")
        banned = None
        if has_lists:
            banned = parse_list_cell(row["Banned_Categories"], where=f"{where}, field Banned_Categories")
        # center_users.csv writes "no religion" as an empty field; the other reference files write "None".
        religion = row["Religion"] if row["Religion"].strip() else "None"
        try:
            profile = UserProfile(
                user_id=user_id,
                age=int(age_text),
                age_group=row["Age_Group"],
                gender=row["Gender"],
                religion=religion,
                physical_condition=row["Physical_Condition"],
                mental_condition=row["Mental_Condition"],
                banned=banned,
            )
        except ProfileError as e:
            raise ProfileError(f"{where}: {e}") from None
        if "Allowed_Categories" in has_lists:
            allowed = parse_list_cell(row["Allowed_Categories"], where=f"{where}, field Allowed_Categories")
            if allowed != profile.allowed:
                raise ProfileError(
                    f"{where}, field Allowed_Categories: {list(allowed)} is not the complement of Banned_Categories "
                    f"{list(profile.banned)} (expected {list(profile.allowed)})"
                )
        profiles.append(profile)
    return profiles


def write_users_csv(profiles, path: str | os.PathLike) -> Path:
    """Write profiles in the reference users.csv format, atomically.

    If the ids are exactly 0000001..000000N in order, no User_ID column is written and the reference file
    round-trips byte-exactly; otherwise a leading User_ID column keeps the ids. The list columns are written
    only when every profile has a banned list (all or none must have one).
    """
    profiles = list(profiles)
    with_lists = [p.banned is not None for p in profiles]
    if any(with_lists) and not all(with_lists):
        first = profiles[with_lists.index(False)].user_id
        raise ProfileError(f"cannot write {path}: user {first} has no banned list while others have one")
    has_lists = bool(profiles) and all(with_lists)
    has_id = [p.user_id for p in profiles] != [f"{r:07d}" for r in range(1, len(profiles) + 1)]
    header = ([ID_COLUMN] if has_id else []) + list(PROFILE_COLUMNS) + (list(LIST_COLUMNS) if has_lists else [])
    buf = io.StringIO()
    # The reference file uses "\n" line endings and minimal quoting.
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for p in profiles:
        row = [p.user_id] if has_id else []
        row += [p.age, p.age_group, p.gender, p.religion, p.physical_condition, p.mental_condition]
        if has_lists:
            row += [repr(list(p.banned)), repr(list(p.allowed))]
        writer.writerow(row)
    return atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# One person's profile file


def _read_mapping(path: Path):
    try:
        text = read_utf8(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"profile file not found: {path}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ProfileError(yaml_error_message(path, e)) from None
    raise ProfileError(f"{path}: expected a .yaml, .yml or .json profile file, got suffix {path.suffix!r}")


def load_profile(path: str | os.PathLike) -> UserProfile:
    """Load one person's profile from a YAML or JSON file (see profile_from_mapping for the keys).

    Example YAML: user_id: "0000042", age: 34, age_group: young adults, gender: female, religion: None,
    physical_condition: healthy, mental_condition: anxiety, banned: [Self-Harm, Shocking].
    """
    path = Path(path)
    return profile_from_mapping(_read_mapping(path), where=str(path))


def save_profile(profile: UserProfile, path: str | os.PathLike) -> Path:
    """Write one profile as YAML (.yaml/.yml) or JSON (.json), atomically; the allowed list is included for
    readers and checked on load."""
    path = Path(path)
    data = profile.to_dict()
    if profile.banned is not None:
        data["allowed"] = list(profile.allowed)
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    elif suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    else:
        raise ProfileError(f"{path}: expected a .yaml, .yml or .json file name, got suffix {path.suffix!r}")
    return atomic_write_text(path, text)
