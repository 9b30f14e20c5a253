"""An evaluation config (``configs/eval_*.yaml``) and the grid of cells it spans.

A cell is (prompt set, method, backbone, level): one folder of generated images and, per metric, one folder of
per-image records and a ``summary.json``. The level is ``L0``..``L5`` (a fixed strictness user for every prompt),
``user`` (each prompt's own user, from the set's ``user_id`` column) or ``none`` (a method that uses no user runs
once per prompt set and backbone).

Config keys (relative paths are relative to the working directory)::

    out: outputs/eval                 # images/, metrics/, tables/ go here
    prompts_dir: data/eval_data       # where the prompt-set CSVs are (python -m evaluation prepare checks them)
    generation: {seed: 2025, steps: 40, guidance: 7.5, negative_prompt: null, batch_size: 4}
    backbones: {sd15: runwayml/stable-diffusion-v1-5}     # or {sd15: {sd_model: ..., height: 512, ...}}
    methods:                          # row label -> infer.py flags; `method:` names a registered method
      base: {}
      safetydpo: {method: base, lora_path: "trained_models/safetydpo-{backbone}"}
      psa: {psa_path: "trained_models/psa-{backbone}", embeds_folder: embeddings}
    sets:                             # a known prompt set (prompt_sets.yaml), or any name with its own `file:`
      sage_unseen: {levels: [user, L1, L2, L3, L4, L5], metrics: [inpro]}
      coco: {metrics: [fid, clip_score], reference: data/coco_val2014}
    metrics: {inpro: {detectors: [q16, nudenet]}, fid: {extractor: inception}, clip_score: {scorer: clip}}
    judge: {backend: openai, options: {...}, users: users.csv, compare: [[psa, base]]}   # optional
    grid: {prompts: 8}

Every method gets the same ``generation`` settings (seed, steps, guidance, negative prompt); a method's own entry
may hold only its own flags, never those.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from psa_adapter.evaluation.prompt_sets import PROMPT_SETS, PromptSetError, PromptSetSpec

LEVELS = ("L0", "L1", "L2", "L3", "L4", "L5")
USER, NONE = "user", "none"
# Generation settings shared by every method (infer.py flag names); a method entry may not override them.
GENERATION_KEYS = ("seed", "steps", "guidance", "negative_prompt", "batch_size", "dtype", "height", "width")
GENERATION_DEFAULTS = {"seed": 2025, "steps": 50, "guidance": 7.5, "negative_prompt": None, "batch_size": 1,
                       "dtype": "auto", "height": None, "width": None}
IMAGE_METRICS = ("inpro", "fid", "clip_score")
JUDGE_METRICS = ("pass_rate", "win_rate")
# Flags the driver sets itself for every cell.
DRIVER_FLAGS = ("sd_model", "prompts_csv", "meta_data", "prompt", "save_path", "method", "level", "user_id",
                "profile", "limit")


def _infer_flags() -> set[str]:
    """The option names ``infer.py`` accepts (``psa_scale`` for ``--psa_scale``)."""
    from psa_adapter.infer_cli import build_parser

    return {opt[2:] for action in build_parser()._actions for opt in action.option_strings if opt.startswith("--")}


class EvalError(Exception):
    """Bad evaluation input (config, prompt set, method, folder): one message naming the file, key or name."""


@dataclass(frozen=True)
class MethodEntry:
    label: str  # the row name in tables and the folder name
    method: str  # the registered method (psa_adapter.methods)
    flags: dict = field(default_factory=dict)

    def uses_user(self) -> bool:
        from psa_adapter.methods import MethodError, get_method

        try:
            cls = get_method(self.method)
        except MethodError as err:
            raise EvalError(f"methods.{self.label}: {err}") from None
        return bool(getattr(cls, "uses_user", getattr(cls, "needs_user", False)))


@dataclass
class SetEntry:
    name: str
    spec: PromptSetSpec
    path: Path  # the prompt CSV
    levels: tuple[str, ...]
    metrics: tuple[str, ...]
    limit: int | None = None
    reference: Path | None = None  # FID's real images


@dataclass(frozen=True)
class Cell:
    prompt_set: str
    method: str  # label
    backbone: str
    level: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.prompt_set, self.method, self.backbone, self.level

    def rel(self) -> Path:
        return Path(self.prompt_set) / self.backbone / self.method / self.level

    def __str__(self) -> str:
        return "/".join(self.key)


@dataclass
class EvalConfig:
    path: Path | None
    out: Path
    prompts_dir: Path
    generation: dict
    backbones: dict[str, dict]
    methods: dict[str, MethodEntry]
    sets: dict[str, SetEntry]
    metrics: dict[str, dict] = field(default_factory=dict)
    judge: dict | None = None
    grid: dict = field(default_factory=dict)

    # -- folders ---------------------------------------------------------------------------------------------------
    def images_dir(self, cell: Cell) -> Path:
        return self.out / "images" / cell.rel()

    def metric_dir(self, cell: Cell, metric: str) -> Path:
        return self.out / "metrics" / cell.rel() / metric

    def compare_dir(self, cell: Cell, other: str) -> Path:
        return self.out / "metrics" / cell.rel() / f"win_rate_vs_{other}"

    @property
    def tables_dir(self) -> Path:
        return self.out / "tables"

    # -- the grid of cells -----------------------------------------------------------------------------------------
    def levels_for(self, method: str, entry: SetEntry) -> tuple[str, ...]:
        return entry.levels if self.methods[method].uses_user() else (NONE,)

    def cells(self, sets=None, methods=None, backbones=None) -> list[Cell]:
        """Every (set, method, backbone, level) of the config, optionally restricted by name (each name checked)."""
        sets = _restrict(sets, self.sets, "prompt set")
        methods = _restrict(methods, self.methods, "method")
        backbones = _restrict(backbones, self.backbones, "backbone")
        out = []
        for s in sets:
            for b in backbones:
                for m in methods:
                    out += [Cell(s, m, b, level) for level in self.levels_for(m, self.sets[s])]
        return out


def _restrict(names, known: dict, kind: str) -> list[str]:
    if not names:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise EvalError(f"unknown {kind} {unknown[0]!r}; this config has: {', '.join(known)}")
    return list(names)


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EvalError(f"{where}: expected a mapping, found {type(value).__name__}")
    return dict(value)


def _levels(value, where: str, users: bool) -> tuple[str, ...]:
    if value is None:
        return (USER,) if users else LEVELS
    if isinstance(value, str):
        value = [value]
    levels = []
    for v in value:
        given, v = v, str(v).upper() if str(v).upper() in LEVELS else str(v).lower()
        if v not in LEVELS + (USER,):
            raise EvalError(f"{where}: unknown level {given!r}; levels are {', '.join(LEVELS)} and {USER!r} (each "
                            "prompt's own user)")
        if v == USER and not users:
            raise EvalError(f"{where}: level 'user' needs a prompt set with a user_id column")
        levels.append(v)
    return tuple(dict.fromkeys(levels))


def parse_config(data: dict, path: str | os.PathLike | None = None) -> EvalConfig:
    """Validate a config mapping (as read from YAML); errors name the file and the key."""
    where = str(path) if path else "config"
    if not isinstance(data, dict):
        raise EvalError(f"{where}: expected a mapping at the top level")
    known = {"out", "prompts_dir", "generation", "backbones", "methods", "sets", "metrics", "judge", "grid"}
    extra = sorted(set(data) - known)
    if extra:
        raise EvalError(f"{where}: unknown key {extra[0]!r}; known keys: {', '.join(sorted(known))}")
    for key in ("backbones", "methods", "sets"):
        if not data.get(key):
            raise EvalError(f"{where}: {key!r} is missing or empty")
    generation = dict(GENERATION_DEFAULTS)
    for k, v in _mapping(data.get("generation"), f"{where}: generation").items():
        if k not in GENERATION_KEYS:
            raise EvalError(f"{where}: generation.{k} is not a generation setting ({', '.join(GENERATION_KEYS)})")
        generation[k] = v
    backbones = {}
    for name, value in _mapping(data["backbones"], f"{where}: backbones").items():
        entry = {"sd_model": value} if isinstance(value, str) else _mapping(value, f"{where}: backbones.{name}")
        if not entry.get("sd_model"):
            raise EvalError(f"{where}: backbones.{name} needs sd_model (a diffusers folder or hub id)")
        bad = sorted(set(entry) - {"sd_model", *GENERATION_KEYS})
        if bad:
            raise EvalError(f"{where}: backbones.{name}.{bad[0]} is not a backbone setting")
        backbones[str(name)] = entry
    methods = {}
    for label, value in _mapping(data["methods"], f"{where}: methods").items():
        entry = _mapping(value, f"{where}: methods.{label}")
        name = str(entry.pop("method", label))
        clash = sorted(set(entry) & set(GENERATION_KEYS + DRIVER_FLAGS))
        if clash:
            raise EvalError(f"{where}: methods.{label}.{clash[0]}: set by the driver (generation settings are the "
                            "same for every method; prompts, users and folders come from the sets)")
        unknown = sorted(set(entry) - _infer_flags())
        if unknown:  # caught here, not as a usage dump of infer.py at the first cell
            raise EvalError(f"{where}: methods.{label}.{unknown[0]} is not an infer.py flag (see `python infer.py "
                            "--help`)")
        methods[str(label)] = MethodEntry(str(label), name, entry)
    from psa_adapter.methods import MethodError, get_method

    for entry in methods.values():
        try:
            get_method(entry.method)
        except MethodError as err:
            raise EvalError(f"{where}: methods.{entry.label}: {err}") from None
    prompts_dir = Path(data.get("prompts_dir") or ".")
    sets = {}
    for name, value in _mapping(data["sets"], f"{where}: sets").items():
        entry = _mapping(value, f"{where}: sets.{name}")
        bad = sorted(set(entry) - {"file", "columns", "users", "levels", "metrics", "limit", "reference", "rows"})
        if bad:
            raise EvalError(f"{where}: sets.{name}.{bad[0]} is not a prompt-set setting")
        spec = PROMPT_SETS.get(name)
        if spec is None:
            if "file" not in entry:
                raise EvalError(f"{where}: sets.{name}: unknown prompt set {name!r}; known prompt sets: "
                                f"{', '.join(PROMPT_SETS)} (or give your own set a file:)")
            users = bool(entry.get("users", False))
            spec = PromptSetSpec(name=name, file=str(entry["file"]), columns=tuple(entry.get("columns") or (
                ("caption", "file_name", "user_id") if users else ("caption",))), rows=entry.get("rows"),
                users=users, source="your own prompt set", metrics=("inpro",))
        file = Path(entry.get("file") or spec.file)
        csv_path = file if file.is_absolute() or "file" in entry else prompts_dir / file
        metrics = entry.get("metrics", list(spec.metrics))
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        for m in metrics:
            if m not in IMAGE_METRICS + JUDGE_METRICS:
                raise EvalError(f"{where}: sets.{name}.metrics: unknown metric {m!r}; known: "
                                f"{', '.join(IMAGE_METRICS + JUDGE_METRICS)}")
        limit = entry.get("limit")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise EvalError(f"{where}: sets.{name}.limit must be a positive integer")
        if "fid" in metrics and not entry.get("reference"):
            raise EvalError(f"{where}: sets.{name}: fid needs reference: (a folder of real images)")
        levels = _levels(entry.get("levels"), f"{where}: sets.{name}.levels", spec.users)
        sets[str(name)] = SetEntry(str(name), spec, csv_path, levels, tuple(metrics), limit,
                                   Path(entry["reference"]) if entry.get("reference") else None)
    judge = data.get("judge")
    if judge is not None:
        judge = _mapping(judge, f"{where}: judge")
        if "backend" not in judge:
            raise EvalError(f"{where}: judge.backend is missing (openai or toy)")
        if any(m in s.metrics for s in sets.values() for m in JUDGE_METRICS) and not judge.get("users"):
            raise EvalError(f"{where}: judge.users (a users CSV) is missing")
        for pair in judge.get("compare", []) or []:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise EvalError(f"{where}: judge.compare: expected pairs [method, other], found {pair!r}")
            for m in pair:
                if m not in methods:
                    raise EvalError(f"{where}: judge.compare: unknown method {m!r}; this config has: "
                                    f"{', '.join(methods)}")
    elif any(m in s.metrics for s in sets.values() for m in JUDGE_METRICS):
        raise EvalError(f"{where}: a set asks for pass_rate or win_rate but there is no judge: section")
    cfg = EvalConfig(path=Path(path) if path else None, out=Path(data.get("out") or "outputs/eval"),
                     prompts_dir=prompts_dir, generation=generation, backbones=backbones, methods=methods, sets=sets,
                     metrics={k: _mapping(v, f"{where}: metrics.{k}") for k, v in
                              _mapping(data.get("metrics"), f"{where}: metrics").items()},
                     judge=judge, grid=_mapping(data.get("grid"), f"{where}: grid"))
    for name in cfg.metrics:
        if name not in IMAGE_METRICS:
            raise EvalError(f"{where}: metrics.{name}: unknown metric; known: {', '.join(IMAGE_METRICS)}")
    return cfg


def load_config(path: str | os.PathLike) -> EvalConfig:
    import yaml

    path = Path(path)
    from psa_adapter.utils import NotUTF8Error, read_utf8, yaml_error_message

    try:
        text = read_utf8(path)
    except FileNotFoundError:
        raise EvalError(f"config file not found: {path}") from None
    except NotUTF8Error as err:
        raise EvalError(str(err)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise EvalError(yaml_error_message(path, err)) from None
    try:
        return parse_config(data, path)
    except PromptSetError as err:
        raise EvalError(str(err)) from None


__all__ = ["Cell", "EvalConfig", "EvalError", "GENERATION_KEYS", "IMAGE_METRICS", "JUDGE_METRICS", "LEVELS",
           "MethodEntry", "NONE", "SetEntry", "USER", "load_config", "parse_config"]
