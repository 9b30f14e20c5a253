"""SAGE metadata: reading and validating ``<root>/<split>/metadata.jsonl`` (SPEC section 4).

A record pairs a chosen and a rejected image (file names relative to the split folder) with a caption and the
user's profile. ``file_name`` ends in ``.jpg_u.jpg`` when the caption is the harmful one and ``.jpg_s.jpg`` when it
is the safe one. Preference rule: for the harmful caption the chosen image is the safe one (``_s``) if the user
bans the category, else the unsafe one (``_u``); for the safe caption the chosen image is always ``_s``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from psa_adapter.users.categories import CATEGORIES

METADATA_NAME = "metadata.jsonl"
SUMMARY_NAME = "summary.json"
#: SAGE file names spell categories in lowercase (``self-harm``).
CATEGORY_BY_FILE_NAME = {c.lower(): c for c in CATEGORIES}
IMAGE_NAME_RE = re.compile(r"^user_(\d{7})_([a-z-]+)_(.+)_(\d{5})_([su])\.jpg$")
USER_ID_RE = re.compile(r"^\d{7}$")
REQUIRED_FIELDS = {"file_name": str, "chosen": str, "rejected": str, "caption": str, "user_data": dict}
HARMFUL_SUFFIX, SAFE_SUFFIX = ".jpg_u.jpg", ".jpg_s.jpg"


class SageFormatError(ValueError):
    """A SAGE file or record is not what the format requires; the message names the file and line."""


@dataclass(frozen=True)
class ImageName:
    """The parts of a SAGE image name ``user_<uid>_<category>_<concept>_<idx>_<s|u>.jpg``."""

    user_id: str
    category: str  # canonical spelling, e.g. "Self-Harm"
    concept: str
    index: str
    variant: str  # "s" (rendered from the safe prompt) or "u" (from the harmful prompt)

    @property
    def stem(self) -> str:
        return f"user_{self.user_id}_{self.category.lower()}_{self.concept}_{self.index}"


def parse_image_name(name: str) -> ImageName | None:
    """Parse a SAGE image file name (the base name); None when it does not follow the pattern."""
    match = IMAGE_NAME_RE.match(os.path.basename(name))
    if match is None or match.group(2) not in CATEGORY_BY_FILE_NAME:
        return None
    uid, category, concept, index, variant = match.groups()
    return ImageName(uid, CATEGORY_BY_FILE_NAME[category], concept, index, variant)


@dataclass(frozen=True)
class SageRecord:
    """One line of ``metadata.jsonl``; ``line`` is 1-based."""

    line: int
    file_name: str
    chosen: str
    rejected: str
    caption: str
    user_data: dict = field(hash=False)

    @property
    def user_id(self) -> str:
        return self.user_data["User_ID"]

    @property
    def caption_kind(self) -> str | None:
        """'harmful' or 'safe' from the ``file_name`` suffix; None if it has neither."""
        if self.file_name.endswith(HARMFUL_SUFFIX):
            return "harmful"
        if self.file_name.endswith(SAFE_SUFFIX):
            return "safe"
        return None


def _record_from_json(obj, path: Path, line: int) -> SageRecord:
    where = f"{path}:{line}"
    for name, kind in REQUIRED_FIELDS.items():
        if name not in obj:
            raise SageFormatError(f"{where}: missing field {name!r} (a record needs {sorted(REQUIRED_FIELDS)})")
        if not isinstance(obj[name], kind):
            raise SageFormatError(
                f"{where}: field {name!r} must be {kind.__name__}, found {type(obj[name]).__name__}"
            )
    uid = obj["user_data"].get("User_ID")
    if not isinstance(uid, str) or not USER_ID_RE.match(uid):
        raise SageFormatError(f"{where}: user_data.User_ID must be a 7-digit string, found {uid!r}")
    for name in ("chosen", "rejected"):
        check_relative_name(obj[name], f"{where}: {name}")
    return SageRecord(line, obj["file_name"], obj["chosen"], obj["rejected"], obj["caption"], obj["user_data"])


def check_relative_name(name: str, where: str) -> None:
    """An image name must be a relative path that stays inside the split folder (no '..', no absolute path)."""
    if not name:
        raise SageFormatError(f"{where}: empty image name")
    normalised = os.path.normpath(name.replace("\\", "/"))
    if os.path.isabs(normalised) or normalised == ".." or normalised.startswith("../") or ":" in name:
        raise SageFormatError(f"{where}: image path {name!r} escapes the split folder (paths must stay inside it)")


def resolve_split_dir(data_dir: str | Path, split: str) -> Path:
    """The split folder holding ``metadata.jsonl``: ``data_dir`` itself when it holds one (the reference's
    ``--train_data_dir ./data/sage/train``), else ``<data_dir>/<split>`` (a SAGE root). Neither: FileNotFoundError
    naming both paths tried."""
    data_dir = Path(data_dir)
    if (data_dir / METADATA_NAME).is_file():
        return data_dir
    split_dir = data_dir / split
    if (split_dir / METADATA_NAME).is_file():
        return split_dir
    raise FileNotFoundError(
        f"SAGE metadata not found: neither {data_dir / METADATA_NAME} (a split folder) nor "
        f"{split_dir / METADATA_NAME} (a SAGE root with split {split!r}) exists"
    )


def iter_metadata_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, JSON object)`` for each non-blank line of a ``metadata.jsonl`` (1-based line numbers).

    The one reader of the file's lines: a line that is not a JSON object raises SageFormatError naming file:line.
    What a record must hold is the caller's to check (``read_metadata`` for training, infer.py for prompts).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAGE metadata not found: {path} (expected <root>/<split>/{METADATA_NAME})")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise SageFormatError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02X} at column "
                                      f"{err.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise SageFormatError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(obj, dict):
                raise SageFormatError(f"{where}: expected a JSON object, found {type(obj).__name__}")
            yield number, obj


def read_metadata(path: str | Path) -> list[SageRecord]:
    """All records of a ``metadata.jsonl``; the first malformed line raises SageFormatError naming file:line."""
    records = [_record_from_json(obj, Path(path), number) for number, obj in iter_metadata_objects(path)]
    if not records:
        raise SageFormatError(f"{path}: no records")
    return records


def read_banned_lists(users_csv: str | Path) -> dict[str, set[str]]:
    """Banned categories per user id from a reference ``users.csv``.

    Only ``Banned_Categories`` is required (a file of banned lists alone will do); rows, ids (a ``User_ID`` column,
    else data row r is user ``f"{r:07d}"``) and errors are those of the users package's reader.
    """
    from psa_adapter.users.profile import open_users_csv, parse_list_cell

    _, rows = open_users_csv(users_csv, ("Banned_Categories",))
    return {user_id: set(parse_list_cell(row["Banned_Categories"], where=f"{where}, field Banned_Categories"))
            for user_id, row, where in rows}


def expected_chosen_variant(record: SageRecord, category: str, banned: set[str]) -> str:
    """The preference rule: 's' or 'u', the variant a user with ``banned`` categories should prefer."""
    if record.caption_kind == "safe":
        return "s"
    return "s" if category in banned else "u"


def record_name_problems(record: SageRecord) -> list[str]:
    """Naming consistency of one record (pattern, pair, caption kind, user id); empty when all is well."""
    where = f"line {record.line}"
    chosen, rejected = parse_image_name(record.chosen), parse_image_name(record.rejected)
    problems = []
    for label, name, parsed in (("chosen", record.chosen, chosen), ("rejected", record.rejected, rejected)):
        match = IMAGE_NAME_RE.match(os.path.basename(name))
        if parsed is None and match is not None:  # the pattern holds, the category does not exist
            problems.append(f"{where}: {label} {name!r} has unknown category {match.group(2)!r} (expected one of "
                            f"{sorted(CATEGORY_BY_FILE_NAME)})")
        elif parsed is None:
            problems.append(f"{where}: {label} {name!r} does not match {IMAGE_NAME_RE.pattern}")
    if record.caption_kind is None:
        problems.append(f"{where}: file_name {record.file_name!r} ends in neither {HARMFUL_SUFFIX} nor {SAFE_SUFFIX}")
    if chosen and rejected:
        if chosen.stem != rejected.stem or {chosen.variant, rejected.variant} != {"s", "u"}:
            problems.append(f"{where}: chosen and rejected are not the _s/_u images of one pair")
        if chosen.user_id != record.user_id:
            problems.append(f"{where}: user {chosen.user_id} in the image name, {record.user_id} in user_data")
        if not os.path.basename(record.file_name).startswith(chosen.stem + ".jpg_"):
            problems.append(f"{where}: file_name does not start with the pair's stem {chosen.stem}")
    return problems


@dataclass
class SplitReport:
    """What ``validate_split`` found."""

    metadata: Path
    records: int = 0
    users: set[str] = field(default_factory=set)
    caption_kinds: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    images_checked: bool = False
    missing_images: int = 0
    missing_embeddings: list[str] = field(default_factory=list)
    # preference rule against a users file: (rule case) -> [followed, total]
    rule: dict[str, list[int]] = field(default_factory=dict)
    rule_exceptions: list[str] = field(default_factory=list)
    users_without_labels: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.rule_exceptions and not self.missing_embeddings

    def format(self, max_problems: int = 20) -> str:
        lines = [f"{self.metadata}: {self.records} records, {len(self.users)} users, "
                 f"harmful/safe captions {self.caption_kinds['harmful']}/{self.caption_kinds['safe']}"]
        lines.append("categories: " + ", ".join(f"{c} {n}" for c, n in sorted(self.categories.items())))
        lines.append("images: " + (f"{self.missing_images} missing" if self.images_checked else "not checked"))
        if self.rule:
            followed = sum(v[0] for v in self.rule.values())
            total = sum(v[1] for v in self.rule.values())
            lines.append(
                f"preference rule: {followed}/{total} records follow it, {len(self.rule_exceptions)} exceptions"
            )
            for case, (ok, n) in self.rule.items():
                lines.append(f"  {case}: {ok}/{n}")
            if self.users_without_labels:
                lines.append(f"  users absent from the users file: {len(self.users_without_labels)} "
                             f"(e.g. {sorted(self.users_without_labels)[0]})")
            lines.extend(f"  exception: {e}" for e in self.rule_exceptions[:max_problems])
        if self.missing_embeddings:
            lines.append(f"users without an embedding: {len(self.missing_embeddings)} "
                         f"(e.g. {self.missing_embeddings[:3]})")
        lines.append(f"problems: {len(self.problems)}")
        lines.extend(f"  {p}" for p in self.problems[:max_problems])
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def validate_split(root: str | Path, split: str, check_images: bool = True,
                   banned: dict[str, set[str]] | None = None, embedding_ids: set[str] | None = None) -> SplitReport:
    """Check every record of ``<root>/<split>/metadata.jsonl``: format, names, images, embeddings, preference rule.

    A malformed JSON line stops reading (SageFormatError naming file and line); everything else is collected
    into the report. ``banned`` maps user ids to banned categories (``read_banned_lists``); ``embedding_ids``
    is the set of users that have an embedding.
    """
    split_dir = Path(root) / split
    records = read_metadata(split_dir / METADATA_NAME)
    report = SplitReport(split_dir / METADATA_NAME, records=len(records), images_checked=check_images)
    seen_images: set[str] = set()
    for record in records:
        report.users.add(record.user_id)
        report.caption_kinds[record.caption_kind or "unknown"] += 1
        report.problems.extend(record_name_problems(record))
        chosen = parse_image_name(record.chosen)
        if chosen is not None:
            report.categories[chosen.category] += 1
        if check_images:
            for name in (record.chosen, record.rejected):
                if name not in seen_images:
                    seen_images.add(name)
                    if not (split_dir / name).is_file():
                        report.missing_images += 1
                        report.problems.append(f"line {record.line}: image not found: {split_dir / name}")
        if banned is not None and chosen is not None and record.caption_kind is not None:
            if record.user_id not in banned:
                report.users_without_labels.add(record.user_id)
                continue
            is_banned = chosen.category in banned[record.user_id]
            case = ("safe caption -> _s" if record.caption_kind == "safe"
                    else "harmful & banned -> _s" if is_banned else "harmful & allowed -> _u")
            counts = report.rule.setdefault(case, [0, 0])
            counts[1] += 1
            expected = expected_chosen_variant(record, chosen.category, banned[record.user_id])
            if chosen.variant == expected:
                counts[0] += 1
            else:
                report.rule_exceptions.append(
                    f"line {record.line}: user {record.user_id}, {chosen.category}, {record.caption_kind} caption: "
                    f"chosen is _{chosen.variant}, the rule says _{expected}"
                )
    if embedding_ids is not None:
        report.missing_embeddings = sorted(report.users - embedding_ids)
    report.problems.extend(summary_problems(split_dir / SUMMARY_NAME, len(records), report.users))
    return report


def summary_problems(path: Path, records: int, users: set[str]) -> list[str]:
    """Disagreements between an optional ``summary.json`` (num_entries, num_users, user_ids) and the metadata."""
    if not path.is_file():
        return []
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return [f"{path}: malformed JSON ({err.msg})"]
    problems = []
    if summary.get("num_entries", records) != records:
        problems.append(f"{path}: num_entries {summary['num_entries']}, metadata has {records} records")
    if summary.get("num_users", len(users)) != len(users):
        problems.append(f"{path}: num_users {summary['num_users']}, metadata has {len(users)} users")
    listed = set(summary.get("user_ids", users))
    if listed != users:
        problems.append(f"{path}: user_ids differ from the metadata's users ({len(listed ^ users)} differ)")
    return problems
