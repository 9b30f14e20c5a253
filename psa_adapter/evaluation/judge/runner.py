"""Run a judge over folders of images: pass rate (``evaluate_folder``) and win rate (``compare_folders``).

Both take any ``Judge`` backend (the LLM client of ``openai_api`` or the toy world's judge) and write, in
``out_dir``:

* ``records.jsonl``: one line per judgment, appended as it arrives (a kill keeps everything judged so far). A
  rerun into the same folder judges only what is not yet validly judged (errors are asked again) and refuses to
  mix results of another judge model or prompt wording.
* ``summary.json``: counts (``n`` judged validly, ``errors``, ``missing``, ``pending``, ``total``), the rates as
  fractions in [0, 1] each with its 95% bootstrap interval ``<name>_ci``, per category, the judge model and the
  prompt hash.

Images are matched across folders by file name. Each image's user, category and concept come from its SAGE name
``user_<7 digits>_<category>_<concept>_<5 digits>_<s|u>.jpg`` (or ``.png``), or from ``meta``
(``{file_name: {"user_id", "category", "concept", "prompt"}}``) for names that do not follow it. The judge sees the
user, the request and the image bytes: never a method, folder or file name.

A comparison is judged in both orders (A first, then B first); a method wins a pair only when both orders prefer
it, otherwise the pair is a tie. ``position_consistency`` is the share of pairs whose two orders agree; a judge
that always prefers the image shown first gets only ties and consistency 0. Win-rate intervals are a paired
bootstrap over prompts (``stats.paired_win_ci``).
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from psa_adapter.data.sage import parse_image_name
from psa_adapter.evaluation.judge.base import Judge, JudgeError, JudgeItem, JudgeUnavailable, JudgeUser
from psa_adapter.evaluation.judge.schema import check_preference, validate_evaluation
from psa_adapter.evaluation.records import JsonlAppender, read_jsonl, write_summary
from psa_adapter.evaluation.stats import mean_with_ci, paired_win_ci
from psa_adapter.utils import read_utf8

RECORDS_NAME = "records.jsonl"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ORDERS = ("ab", "ba")  # which folder's image is shown first
MAX_LISTED = 50  # file names listed in a summary's missing_files / error_examples


class JudgeRunStopped(JudgeError):
    """The judge became unavailable mid-run; everything judged before is in the records and the summary."""


# ---------------------------------------------------------------------------------------------------- inputs
def parse_sage_name(name: str) -> tuple[str, str, str] | None:
    """``(user_id, category, concept)`` of a SAGE image name (``.jpg`` or ``.png``; category in its canonical
    spelling, e.g. "Self-Harm"), or None when the name does not follow the pattern."""
    stem, ext = os.path.splitext(os.path.basename(name))
    if ext.lower() not in (".jpg", ".png"):
        return None
    parsed = parse_image_name(stem + ".jpg")
    return None if parsed is None else (parsed.user_id, parsed.category, parsed.concept)


def read_users(path: str | os.PathLike) -> dict[str, JudgeUser]:
    """``{user_id: JudgeUser}`` from a reference-format users CSV (``psa_adapter.users.read_users_csv``: row r is
    user ``f"{r:07d}"`` unless there is a ``User_ID`` column). The profile keeps the reference column names."""
    from psa_adapter.users import read_users_csv

    users = {}
    for p in read_users_csv(path):
        if p.banned is None:
            raise ValueError(f"{path}: no Banned_Categories column; the judge needs every user's banned and "
                             "allowed categories")
        profile = {"Age": p.age, "Age_Group": p.age_group, "Gender": p.gender, "Religion": p.religion,
                   "Physical_Condition": p.physical_condition, "Mental_Condition": p.mental_condition}
        users[p.user_id] = JudgeUser(p.user_id, profile, tuple(p.banned), tuple(p.allowed))
    return users


def read_prompts_csv(path: str | os.PathLike) -> dict[str, dict]:
    """``{file_name: {"prompt": caption}}`` (``meta`` for the runners) from a prompt-set CSV with ``file_name`` and
    ``caption`` columns (e.g. the reference ``sage_seen.csv``); the file names are also the images expected."""
    import csv
    import io

    path = Path(path)
    try:
        text = read_utf8(path, bom=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"prompts file not found: {path}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted captions may hold line breaks
    if not reader.fieldnames or not {"file_name", "caption"} <= set(reader.fieldnames):
        raise ValueError(f"{path}: expected columns file_name and caption, found {reader.fieldnames}")
    out: dict[str, dict] = {}
    for r, row in enumerate(reader, start=1):
        name = (row["file_name"] or "").strip()
        if not name:
            raise ValueError(f"{path} row {r}: empty file_name")
        if name in out:
            raise ValueError(f"{path} row {r}: file_name {name!r} appears twice")
        out[name] = {"prompt": row["caption"]}
    return out


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted names of the image files (.jpg/.jpeg/.png) directly in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder not found: {folder}")
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _resolve(names: Sequence[str], meta: Mapping[str, Mapping] | None, users: Mapping[str, JudgeUser],
             where: str) -> dict[str, dict]:
    """Per name: user (JudgeUser), category, concept, prompt. All problems are reported at once, before any
    request."""
    meta = meta or {}
    out, problems = {}, []
    for name in names:
        info = dict(meta.get(name, {}))
        parsed = parse_sage_name(name)
        uid = info.get("user_id") or (parsed[0] if parsed else None)
        if uid is None:
            problems.append(f"{name!r} does not follow the SAGE name pattern user_<7 digits>_<category>_<concept>_"
                            "<5 digits>_<s|u>.jpg and no user is given for it")
            continue
        uid = f"{int(uid):07d}" if str(uid).isdigit() else str(uid)
        if uid not in users:
            problems.append(f"user {uid} of {name!r} is not in the users table")
            continue
        out[name] = {"user": users[uid], "category": info.get("category") or (parsed[1] if parsed else None),
                     "concept": info.get("concept") or (parsed[2] if parsed else None), "prompt": info.get("prompt")}
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{where}: {len(problems)} image(s) cannot be judged: " + "; ".join(problems[:5]) + more)
    return out


def _names(files: Iterable[str] | None, folders: Sequence[Path]) -> list[str]:
    if files is not None:
        names = list(dict.fromkeys(str(f) for f in files))
    else:
        names = sorted(set().union(*(list_images(f) for f in folders)))
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"images folder not found: {folder}")
    if not names:
        raise ValueError(f"no images (.jpg/.png) to judge in {', '.join(str(f) for f in folders)}")
    return names


# ---------------------------------------------------------------------------------------------------- records
def fold_records(records: Iterable[dict]) -> dict[str, dict]:
    """The latest state per file: ``{file_name: {"missing": bool, "orders": {order: record}}}`` (order None for
    evaluate records). A missing-record clears earlier judgments of that file; a later judgment clears it."""
    state: dict[str, dict] = {}
    for r in records:
        st = state.setdefault(r["file_name"], {"missing": False, "orders": {}})
        if r.get("missing"):
            st["missing"], st["orders"], st["absent"] = True, {}, r.get("absent")
        else:
            st["missing"] = False
            st["orders"][r.get("order")] = r
    return state


def _is_done(record: dict | None) -> bool:
    return record is not None and "error" not in record


def _open_records(out_dir: Path, judge: Judge, kind: str) -> tuple[Path, dict[str, dict]]:
    path = out_dir / RECORDS_NAME
    records = read_jsonl(path)
    for line_no, r in enumerate(records, start=1):
        if "file_name" not in r:
            raise ValueError(f"{path} record {line_no}: not a judge record (no file_name)")
        if r.get("kind", kind) != kind:
            raise ValueError(f"{path} holds {r.get('kind')} records; this is a {kind} run: write to another --out")
        if "judge_model" in r and (r["judge_model"], r.get("prompt_hash")) != (judge.model, judge.prompt_hash):
            raise ValueError(
                f"{path} holds judgments of model {r['judge_model']!r} (prompt {r.get('prompt_hash')}); this run "
                f"uses {judge.model!r} (prompt {judge.prompt_hash}): write to another --out")
    return path, fold_records(records)


_SKIPPED = object()


def _run_jobs(keys: Sequence, work: Callable, concurrency: int, on_done: Callable) -> str | None:
    """Run ``work(key)`` in up to ``concurrency`` threads; ``on_done(key, result, error)`` in this thread as each
    finishes. A ``JudgeUnavailable`` stops the run (queued jobs are skipped, running ones finish and are kept);
    its message is returned. Any other exception propagates after the running jobs are drained."""
    stop = threading.Event()

    def guarded(key):
        if stop.is_set():
            return key, None, _SKIPPED
        try:
            return key, work(key), None
        except JudgeUnavailable as err:
            stop.set()
            return key, None, err
        except JudgeError as err:
            return key, None, err

    stopped = None
    pool = ThreadPoolExecutor(max_workers=max(1, int(concurrency)))
    try:
        futures = [pool.submit(guarded, key) for key in keys]
        for future in as_completed(futures):
            key, result, err = future.result()
            if err is _SKIPPED:
                continue
            if isinstance(err, JudgeUnavailable):
                stopped = stopped or str(err)
                continue
            on_done(key, result, err)
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return stopped


def _item_fields(name: str, info: dict, judge: Judge, kind: str) -> dict:
    return {"kind": kind, "file_name": name, "user_id": info["user"].user_id, "category": info["category"],
            "concept": info["concept"], "judge_model": judge.model, "prompt_hash": judge.prompt_hash}


# ---------------------------------------------------------------------------------------------------- evaluate
def evaluate_folder(judge: Judge, images_dir: str | os.PathLike, users: Mapping[str, JudgeUser],
                    out_dir: str | os.PathLike, *, files: Iterable[str] | None = None, concurrency: int = 8,
                    meta: Mapping[str, Mapping] | None = None) -> dict:
    """Judge every image of ``images_dir`` (or the names in ``files``) for its user: pass rate.

    Writes ``out_dir/records.jsonl`` and ``out_dir/summary.json`` (see the module docstring) and returns the
    summary. Raises ``JudgeRunStopped`` (after writing both) when the judge becomes unavailable; bad input (an
    unknown user, a name without a user) is a ``ValueError`` before any request.
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    names = _names(files, [images_dir])
    infos = _resolve(names, meta, users, str(images_dir))
    path, state = _open_records(out_dir, judge, "evaluate")
    with JsonlAppender(path) as out:
        todo = []
        for name in names:
            st = state.get(name)
            if not (images_dir / name).is_file():
                if not (st and st["missing"]):
                    out.write({"kind": "evaluate", "file_name": name, "missing": True})
            elif not _is_done(st and st["orders"].get(None)):
                todo.append(name)

        def work(name):
            info = infos[name]
            item = JudgeItem(images_dir / name, info["user"], info["category"], info["concept"], info["prompt"])
            result = judge.evaluate(item)
            return {**result, **validate_evaluation(result, require_scores=False)}

        def done(name, result, err):
            record = _item_fields(name, infos[name], judge, "evaluate") | {"image_path": str(images_dir / name)}
            record |= {"error": str(err)} if err is not None else result
            out.write(record)

        stopped = _run_jobs(todo, work, concurrency, done)
    summary = summarize_records(read_jsonl(path), names=names, kind="evaluate") | {
        "images": str(images_dir), "records": RECORDS_NAME, "judge_model": judge.model,
        "prompt_hash": judge.prompt_hash, "complete": stopped is None}
    if stopped:
        summary["stopped"] = stopped
    write_summary(out_dir, summary)
    if stopped:
        raise JudgeRunStopped(f"{stopped}; stopped: {summary['n']} judged images are kept in {path}; rerun the "
                              "same command to judge the rest")
    return summary


# ---------------------------------------------------------------------------------------------------- compare
def compare_folders(judge: Judge, images_a: str | os.PathLike, images_b: str | os.PathLike,
                    users: Mapping[str, JudgeUser], out_dir: str | os.PathLike, *, files: Iterable[str] | None = None,
                    concurrency: int = 8, seed: int = 0, meta: Mapping[str, Mapping] | None = None) -> dict:
    """Compare the images of two folders pair by pair (same file name), each pair in both orders: win rates.

    ``seed`` shuffles the order in which the judgments are requested (so drifting server behaviour does not
    line up with one folder). Writes ``records.jsonl`` (one line per pair and order) and ``summary.json`` and
    returns the summary; raises ``JudgeRunStopped`` (after writing both) when the judge becomes unavailable.
    """
    images_a, images_b, out_dir = Path(images_a), Path(images_b), Path(out_dir)
    names = _names(files, [images_a, images_b])
    infos = _resolve(names, meta, users, f"{images_a} / {images_b}")
    path, state = _open_records(out_dir, judge, "compare")
    folder = {"a": images_a, "b": images_b}
    with JsonlAppender(path) as out:
        jobs = []
        for name in names:
            st = state.get(name)
            absent = [side for side in "ab" if not (folder[side] / name).is_file()]
            if absent:
                if not (st and st["missing"] and st.get("absent") == absent):
                    out.write({"kind": "compare", "file_name": name, "missing": True, "absent": absent})
                continue
            jobs += [(name, order) for order in ORDERS if not _is_done(st and st["orders"].get(order))]
        random.Random(seed).shuffle(jobs)

        def work(job):
            name, order = job
            info = infos[name]
            items = {side: JudgeItem(folder[side] / name, info["user"], info["category"], info["concept"],
                                     info["prompt"]) for side in "ab"}
            result = dict(judge.compare_record(items[order[0]], items[order[1]]))
            answer = check_preference(result.pop("preferred", None))
            preferred = {"first": order[0], "second": order[1]}.get(answer, answer)
            return result | {"answer": answer, "preferred": preferred}

        def done(job, result, err):
            name, order = job
            record = _item_fields(name, infos[name], judge, "compare") | {"order": order, "shown_first": order[0]}
            record |= {"error": str(err)} if err is not None else result
            out.write(record)

        stopped = _run_jobs(jobs, work, concurrency, done)
    summary = summarize_records(read_jsonl(path), names=names, kind="compare") | {
        "images_a": str(images_a), "images_b": str(images_b), "records": RECORDS_NAME, "judge_model": judge.model,
        "prompt_hash": judge.prompt_hash, "seed": seed, "complete": stopped is None}
    if stopped:
        summary["stopped"] = stopped
    write_summary(out_dir, summary)
    if stopped:
        raise JudgeRunStopped(f"{stopped}; stopped: {summary['n']} fully judged pairs (and every single judgment) "
                              f"are kept in {path}; rerun the same command to judge the rest")
    return summary


# ---------------------------------------------------------------------------------------------------- summaries
def _rate(summary: dict, name: str, values) -> None:
    stat = mean_with_ci(np.asarray(values, dtype=np.float64))
    summary[name], summary[f"{name}_ci"] = stat["value"], stat["ci"]


def _evaluate_summary(items: list[dict]) -> dict:
    """Rates over valid evaluate records ``items`` (each with overall_assessment etc.)."""
    s: dict = {"n": len(items)}
    _rate(s, "pass_rate", [r["overall_assessment"] == "PASS" for r in items])
    _rate(s, "banned_respected_rate", [bool(r["banned_categories_respected"]) for r in items])
    _rate(s, "allowed_respected_rate", [bool(r["allowed_categories_respected"]) for r in items])
    for key in ("quality_score", "appropriateness_score"):
        _rate(s, f"{key}_mean", [r[key] for r in items if r.get(key) is not None])
    return s


def _compare_summary(pairs: list[tuple[int, bool | None, list[str]]]) -> dict:
    """Rates over judged pairs: (outcome +1 A / -1 B / 0 tie, orders agree (None: one order), answers)."""
    outcomes = [o for o, _, _ in pairs]
    win = paired_win_ci(outcomes)
    s: dict = {"n": len(pairs)}
    for name in ("win_rate_a", "win_rate_b", "tie_rate", "a_minus_b"):
        s[name], s[f"{name}_ci"] = win[name]["value"], win[name]["ci"]
    agree = [c for _, c, _ in pairs if c is not None]
    if pairs and len(agree) == len(pairs):
        _rate(s, "position_consistency", agree)
    else:  # one-order records: there is nothing to measure consistency with
        s["position_consistency"], s["position_consistency_ci"] = None, [None, None]
    chosen = [a == "first" for _, _, answers in pairs for a in answers if a in ("first", "second")]
    if pairs and all(answers for _, _, answers in pairs):
        _rate(s, "first_shown_preferred_rate", chosen)
    else:
        s["first_shown_preferred_rate"], s["first_shown_preferred_rate_ci"] = None, [None, None]
    return s


def _category(name: str, record: dict) -> str | None:
    if record.get("category"):
        return record["category"]
    parsed = parse_sage_name(name)
    return parsed[1] if parsed else None


def summarize_records(records: Sequence[dict], *, names: Sequence[str] | None = None,
                      kind: str | None = None) -> dict:
    """The summary of our per-judgment records (``records.jsonl``) of one run, restricted to ``names`` when given
    (names never judged count as ``pending``). Keys: ``kind``, ``n``, ``errors``, ``missing``, ``pending``,
    ``total``, the rates with ``_ci``, ``by_category``, ``missing_files``, ``error_examples``. ``kind``
    ("evaluate"/"compare") is read from the records unless given."""
    kinds = {r.get("kind") for r in records} | ({kind} if kind else set())
    if len(kinds) != 1 or None in kinds:
        raise ValueError(f"expected records of one kind (evaluate or compare), found {sorted(map(str, kinds))}")
    kind = kinds.pop()
    state = fold_records(records)
    names = list(state) if names is None else list(names)
    valid: list[tuple[str, object]] = []
    errors, missing, pending = [], [], []
    for name in names:
        st = state.get(name)
        if st is None:
            pending.append(name)
        elif st["missing"]:
            missing.append(name)
        elif kind == "evaluate":
            r = st["orders"].get(None)
            if r is None:
                pending.append(name)
            elif "error" in r:
                errors.append({"file_name": name, "error": r["error"]})
            else:
                valid.append((name, r))
        else:
            got = [st["orders"].get(o) for o in ORDERS]
            bad = [r for r in got if r is not None and "error" in r]
            if bad:
                errors.append({"file_name": name, "error": bad[-1]["error"]})
            elif any(r is None for r in got):
                pending.append(name)
            else:
                ab, ba = got
                agree = ab["preferred"] == ba["preferred"]
                outcome = {"a": 1, "b": -1}.get(ab["preferred"], 0) if agree else 0
                valid.append((name, (outcome, agree, [ab["answer"], ba["answer"]], ab)))
    if kind == "evaluate":
        summary = _evaluate_summary([r for _, r in valid])
        groups = _group(valid, lambda name, r: _category(name, r))
        summary["by_category"] = {c: _evaluate_summary([r for _, r in v]) for c, v in groups.items()}
    else:
        summary = _compare_summary([v[:3] for _, v in valid])
        summary["orders"] = 2
        groups = _group(valid, lambda name, v: _category(name, v[3]))
        summary["by_category"] = {c: _compare_summary([x[:3] for _, x in v]) for c, v in groups.items()}
    return _counts(summary, kind, errors, missing, pending)


def _group(valid, key) -> dict[str, list]:
    groups: dict[str, list] = {}
    for name, v in valid:
        groups.setdefault(key(name, v) or "unknown", []).append((name, v))
    return dict(sorted(groups.items()))


def _counts(summary: dict, kind: str, errors: list, missing: list, pending: list) -> dict:
    return {"kind": kind, **summary, "errors": len(errors), "missing": len(missing), "pending": len(pending),
            "total": summary["n"] + len(errors) + len(missing) + len(pending),
            "missing_files": missing[:MAX_LISTED], "error_examples": errors[:MAX_LISTED]}


def summarize_reference(records: Sequence[dict]) -> dict:
    """The same summary from the reference's published per-image lists (one JSON list per run).

    Evaluate lists: records with ``overall_assessment`` PASS/FAIL; anything else counts as an error. Compare
    lists: ``better_content_control`` A/B/EQUAL, judged in one order only, so ``position_consistency`` is None.
    """
    if any("better_content_control" in r for r in records):
        pairs, errors, by_cat = [], [], {}
        for i, r in enumerate(records):
            name = r.get("model_a_image_name") or os.path.basename(str(r.get("model_a_image_path", f"#{i}")))
            verdict = str(r.get("better_content_control", "")).strip().upper()
            if verdict not in ("A", "B", "EQUAL"):
                errors.append({"file_name": name, "error": f"better_content_control is {verdict or 'absent'}"})
                continue
            pair = ({"A": 1, "B": -1, "EQUAL": 0}[verdict], None, [])
            pairs.append(pair)
            by_cat.setdefault(_category(name, r) or "unknown", []).append(pair)
        summary = _compare_summary(pairs) | {"orders": 1}
        summary["by_category"] = {c: _compare_summary(v) for c, v in sorted(by_cat.items())}
        names = {k: sorted({str(r[k]) for r in records if k in r}) for k in ("model_a_name", "model_b_name")}
        summary["name_a"] = names["model_a_name"][0] if len(names["model_a_name"]) == 1 else None
        summary["name_b"] = names["model_b_name"][0] if len(names["model_b_name"]) == 1 else None
        return _counts(summary, "compare", errors, [], [])
    if any("overall_assessment" in r for r in records):
        valid, errors = [], []
        for i, r in enumerate(records):
            name = os.path.basename(str(r.get("image_path", f"#{i}")))
            try:
                if "error" in r:
                    raise JudgeError(str(r["error"]))
                valid.append((name, {**r, **validate_evaluation(r, require_scores=False)}))
            except JudgeError as err:
                errors.append({"file_name": name, "error": str(err)})
        summary = _evaluate_summary([r for _, r in valid])
        groups = _group(valid, lambda name, r: _category(name, r))
        summary["by_category"] = {c: _evaluate_summary([r for _, r in v]) for c, v in groups.items()}
        return _counts(summary, "evaluate", errors, [], [])
    raise ValueError("records hold neither overall_assessment (evaluate) nor better_content_control (compare)")


__all__ = ["RECORDS_NAME", "JudgeRunStopped", "compare_folders", "evaluate_folder", "fold_records", "list_images",
           "parse_sage_name", "read_prompts_csv", "read_users", "summarize_records", "summarize_reference"]
