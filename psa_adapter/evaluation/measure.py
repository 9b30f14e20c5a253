"""The driver's metrics step: every cell's images through the shared metric functions and the judge runner.

Per cell and metric the results go to ``<out>/metrics/<set>/<backbone>/<method>/<level>/<metric>/`` (per-image
``records.jsonl`` and ``summary.json``, written by ``metrics.compute`` or ``judge.runner``); a rerun computes only
what is not there yet. Backends are looked up by name in the registries (``metrics.base``; the real ones and the
toy world's ``toy``), constructed with the options of the config's ``metrics:`` section. The images expected are
the prompt set's file names, so an image that was never generated is counted as missing, never dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from psa_adapter.evaluation.config import LEVELS, USER, Cell, EvalConfig, EvalError
from psa_adapter.evaluation.generate import expected_files
from psa_adapter.evaluation.judge.base import JudgeError

DEFAULT_DETECTORS = ("q16", "nudenet")
JUDGE_BACKENDS = {"openai": ("psa_adapter.evaluation.judge.openai_api", "ChatJudge"),
                  "toy": ("psa_adapter.toyworld.eval_backends", "ToyJudgeBackend")}


class Backends:
    """Metric backends and the judge, each constructed once per run from the config's options."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self._made: dict[str, object] = {}

    def _make(self, kind: str, name: str, options: dict):
        from psa_adapter.evaluation.metrics.base import (
            DETECTORS,
            FEATURE_EXTRACTORS,
            TEXT_IMAGE_SCORERS,
            load_builtin_backends,
            lookup,
        )

        key = json.dumps([kind, name, options], sort_keys=True, default=str)
        if key not in self._made:
            load_builtin_backends()
            registry = {"detector": DETECTORS, "feature extractor": FEATURE_EXTRACTORS,
                        "text-image scorer": TEXT_IMAGE_SCORERS}[kind]
            try:
                cls = lookup(registry, name, kind)
            except KeyError as err:
                raise EvalError(f"{self.cfg.path or 'config'}: metrics: {err.args[0]}") from None
            try:
                self._made[key] = cls(**options)
            except (OSError, ValueError, TypeError) as err:
                raise EvalError(f"{kind} {name!r} with options {options}: {err}") from None
        return self._made[key]

    def detectors(self) -> list:
        section = self.cfg.metrics.get("inpro", {})
        names = section.get("detectors", list(DEFAULT_DETECTORS))
        names = names.split(",") if isinstance(names, str) else names
        return [self._make("detector", n, dict(section.get(n) or {})) for n in names]

    def extractor(self):
        section = self.cfg.metrics.get("fid", {})
        name = section.get("extractor", "inception")
        return self._make("feature extractor", name, dict(section.get(name) or {}))

    def scorer(self):
        section = self.cfg.metrics.get("clip_score", {})
        name = section.get("scorer", "clip")
        return self._make("text-image scorer", name, dict(section.get(name) or {}))

    def judge(self):
        if "judge" not in self._made:
            import importlib

            spec = self.cfg.judge or {}
            backend = spec.get("backend")
            if backend not in JUDGE_BACKENDS:
                raise EvalError(f"{self.cfg.path or 'config'}: judge.backend: unknown judge {backend!r}; known: "
                                f"{', '.join(JUDGE_BACKENDS)}")
            module, cls = JUDGE_BACKENDS[backend]
            options = dict(spec.get("options") or {})
            if backend == "openai":  # a rerun sends no request: responses are cached beside the results
                options.setdefault("cache", str(self.cfg.out / "cache" / "judge_cache.jsonl"))
            try:
                self._made["judge"] = getattr(importlib.import_module(module), cls)(**options)
            except (OSError, ValueError, TypeError) as err:
                raise EvalError(f"judge {backend!r}: {err}") from None
        return self._made["judge"]

    def users(self) -> dict:
        """The judge's users: the users CSV, plus the level users L0..L5 (their presets)."""
        if "users" not in self._made:
            from psa_adapter.evaluation.judge.base import JudgeUser
            from psa_adapter.evaluation.judge.runner import read_users
            from psa_adapter.users import load_level

            try:
                users = read_users(self.cfg.judge["users"])
            except (OSError, ValueError) as err:
                raise EvalError(f"judge.users: {err}") from None
            for name in LEVELS:
                p = load_level(name)
                users.setdefault(p.user_id, JudgeUser(p.user_id, {}, tuple(p.banned or ()), tuple(p.allowed or ())))
            self._made["users"] = users
        return self._made["users"]


def _judge_meta(cfg: EvalConfig, cell: Cell) -> dict[str, dict]:
    """Per image: its user (the level's, or the prompt's own) and its prompt, for the judge."""
    from psa_adapter.evaluation.prompt_sets import read_prompt_rows
    from psa_adapter.users import load_level

    entry = cfg.sets[cell.prompt_set]
    rows = read_prompt_rows(entry.path, entry.spec.columns)[: entry.limit]
    level_user = load_level(cell.level).user_id if cell.level in LEVELS else None
    meta = {}
    for r in rows:
        uid = level_user or r.user_id
        if uid is None:
            raise EvalError(f"{cell}: the judge needs a user per image: {entry.path} line {r.line} has no user_id "
                            "and the cell has no level")
        meta[r.file_name] = {"user_id": uid, "prompt": r.caption}
    return meta


def measure_cell(cfg: EvalConfig, cell: Cell, backends: Backends, log: Callable = print) -> dict[str, dict]:
    """Every metric of the cell's prompt set; returns ``{metric: summary}``."""
    from psa_adapter.evaluation.metrics import compute

    entry = cfg.sets[cell.prompt_set]
    images, files = cfg.images_dir(cell), expected_files(cfg, cell.prompt_set)
    absent = sum(not (images / f).is_file() for f in files)
    if absent:
        log(f"[metrics] {cell}: {absent} of {len(files)} images missing (counted as missing)")
    images.mkdir(parents=True, exist_ok=True)  # a cell never generated: every image is counted as missing
    out = {}
    for metric in entry.metrics:
        where = cfg.metric_dir(cell, metric)
        try:
            if metric == "inpro":
                out[metric] = compute.inpro(images, where, backends.detectors(), files=files)
            elif metric == "fid":
                ref = entry.reference
                paired = ref.is_dir() and all((ref / f).is_file() for f in files)
                out[metric] = compute.fid(images, ref, where, backends.extractor(), files=files,
                                          cache_dir=cfg.out / "cache" / "fid",
                                          reference_files=files if paired else None)
            elif metric == "clip_score":
                prompts = {r.file_name: r.caption for r in _rows(cfg, cell)}
                out[metric] = compute.clip_score(images, prompts, where, backends.scorer(), files=files)
            elif metric == "pass_rate":
                from psa_adapter.evaluation.judge.runner import evaluate_folder

                out[metric] = evaluate_folder(backends.judge(), images, backends.users(), where, files=files,
                                              meta=_judge_meta(cfg, cell),
                                              concurrency=int((cfg.judge or {}).get("concurrency", 8)))
            elif metric == "win_rate":
                out.update(_compare(cfg, cell, backends, files))
        except (FileNotFoundError, ValueError, JudgeError) as err:  # what was computed stays on disk
            raise EvalError(f"{cell} {metric}: {err}") from None
    for name, summary in out.items():
        log(f"[metrics] {cell} {name}: {_short(summary)}")
    return out


def _rows(cfg: EvalConfig, cell: Cell):
    from psa_adapter.evaluation.prompt_sets import read_prompt_rows

    entry = cfg.sets[cell.prompt_set]
    return read_prompt_rows(entry.path, entry.spec.columns)[: entry.limit]


def _compare(cfg: EvalConfig, cell: Cell, backends: Backends, files: list[str]) -> dict[str, dict]:
    from psa_adapter.evaluation.judge.runner import compare_folders

    out = {}
    for mine, other in (cfg.judge or {}).get("compare", []) or []:
        if mine != cell.method:
            continue
        level = cell.level if cfg.methods[other].uses_user() else "none"
        if level == USER and USER not in cfg.sets[cell.prompt_set].levels:
            continue
        other_cell = Cell(cell.prompt_set, other, cell.backbone, level)
        for c in (cell, other_cell):
            cfg.images_dir(c).mkdir(parents=True, exist_ok=True)
        out[f"win_rate_vs_{other}"] = compare_folders(
            backends.judge(), cfg.images_dir(cell), cfg.images_dir(other_cell), backends.users(),
            cfg.compare_dir(cell, other), files=files, meta=_judge_meta(cfg, cell),
            concurrency=int((cfg.judge or {}).get("concurrency", 8)))
    return out


def _short(summary: dict) -> str:
    key = summary.get("metric") or next((k for k in ("pass_rate", "win_rate_a") if k in summary), None)
    value = summary.get(key)
    shown = "-" if value is None else f"{value:.4g}"
    return f"{key}={shown} n={summary.get('n')} missing={summary.get('missing', 0)}"


def measure(cfg: EvalConfig, sets=None, methods=None, backbones=None, log: Callable = print) -> dict:
    """Every cell's metrics; returns ``{cell: {metric: summary}}``."""
    backends = Backends(cfg)
    return {cell: measure_cell(cfg, cell, backends, log) for cell in cfg.cells(sets, methods, backbones)}


__all__ = ["Backends", "measure", "measure_cell"]
