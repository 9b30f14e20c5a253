"""``python -m evaluation generate --config CFG``: every cell's images through ``infer.py``'s own code.

Each cell (prompt set x method x backbone x level) is one ``infer_cli.run`` call with a command line built from the
config: the backbone's model, the set's prompt CSV, the method's name and its own flags, the level (``--level L3``)
or each prompt's own user, and the config's generation settings, which are the same for every method (seed,
steps, guidance, negative prompt; recorded per image in ``manifest.jsonl``). Image i of a set uses seed
``seed + i`` whatever the method, so the methods' images differ only by the method.

Resumable: a cell whose images all exist is skipped without loading a model, and ``infer.py`` generates only the
missing images of the others. Under ``accelerate launch`` every process runs this command and ``infer.py`` shards
each cell's prompts over the processes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from psa_adapter.evaluation.config import GENERATION_KEYS, LEVELS, Cell, EvalConfig, EvalError, load_config
from psa_adapter.evaluation.prompt_sets import PromptSetError, read_prompt_rows


@dataclass
class CellReport:
    cell: Cell
    expected: int
    generated: int = 0
    skipped: bool = False


def expected_files(cfg: EvalConfig, prompt_set: str) -> list[str]:
    """The image names a set's cells hold (``infer.py``'s names, after the set's ``limit``)."""
    entry = cfg.sets[prompt_set]
    try:
        rows = read_prompt_rows(entry.path, entry.spec.columns)
    except PromptSetError as err:
        raise EvalError(f"sets.{prompt_set}: {err} (python -m evaluation prepare says where to get it)") from None
    return [r.file_name for r in rows[: entry.limit]]


def _flag_value(value, cell: Cell) -> str:
    return str(value).format(backbone=cell.backbone, level=cell.level, prompt_set=cell.prompt_set,
                             method=cell.method)


def infer_argv(cfg: EvalConfig, cell: Cell) -> list[str]:
    """The ``infer.py`` command line of one cell."""
    entry, method, backbone = cfg.sets[cell.prompt_set], cfg.methods[cell.method], cfg.backbones[cell.backbone]
    gen = {**cfg.generation, **{k: v for k, v in backbone.items() if k in GENERATION_KEYS}}
    argv = ["--sd_model", str(backbone["sd_model"]), "--prompts_csv", str(entry.path),
            "--save_path", str(cfg.images_dir(cell)), "--method", method.method]
    for key in GENERATION_KEYS:
        if gen.get(key) is not None:
            argv += [f"--{key}", str(gen[key])]
    if entry.limit is not None:
        argv += ["--limit", str(entry.limit)]
    if cell.level in LEVELS:
        argv += ["--level", cell.level]
    for key, value in method.flags.items():
        if value is None or value is False:
            continue
        argv += [f"--{key}"] if value is True else [f"--{key}", _flag_value(value, cell)]
    return argv


def generate_cell(cfg: EvalConfig, cell: Cell, files: list[str] | None = None) -> CellReport:
    """Generate one cell's missing images (nothing when all exist)."""
    from psa_adapter import infer_cli
    from psa_adapter.infer_cli import InferError

    files = expected_files(cfg, cell.prompt_set) if files is None else files
    folder = cfg.images_dir(cell)
    report = CellReport(cell, len(files))
    if (folder / infer_cli.MANIFEST_NAME).is_file() and all((folder / f).is_file() for f in files):
        report.skipped = True
        return report
    argv = infer_argv(cfg, cell)
    parser = infer_cli.build_parser()
    try:
        args = parser.parse_args(argv)
        infer_cli._validate(parser, args)
    except SystemExit:  # argparse printed the reason
        raise EvalError(f"{cell}: infer.py refused the command built from methods.{cell.method} and the config: "
                        f"{' '.join(argv)}") from None
    try:
        counts = infer_cli.run(args)
    except InferError as err:
        raise EvalError(f"{cell}: {err}") from None
    report.generated = counts["generated"]
    return report


def generate(cfg: EvalConfig, sets=None, methods=None, backbones=None, log=print) -> list[CellReport]:
    """Every cell of the config (optionally restricted by name); returns one report per cell."""
    cells = cfg.cells(sets, methods, backbones)
    files = {s: expected_files(cfg, s) for s in dict.fromkeys(c.prompt_set for c in cells)}  # all inputs first
    reports = []
    for cell in cells:
        report = generate_cell(cfg, cell, files[cell.prompt_set])
        state = "complete, skipped" if report.skipped else f"generated {report.generated}"
        log(f"[generate] {cell}: {report.expected} images ({state})")
        reports.append(report)
    return reports


def names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="evaluation config (configs/eval_*.yaml)")
    parser.add_argument("--sets", help="only these prompt sets (comma-separated)")
    parser.add_argument("--methods", help="only these methods (comma-separated row labels of the config)")
    parser.add_argument("--backbones", help="only these backbones (comma-separated)")


def is_main_process() -> bool:
    """Process 0 of an ``accelerate launch`` / ``torchrun`` run (or a plain run): it logs, measures and tabulates."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_selection(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        log = print if is_main_process() else (lambda *a, **k: None)
        reports = generate(cfg, names(args.sets), names(args.methods), names(args.backbones), log=log)
    except EvalError as err:
        print(f"python -m evaluation generate: error: {err}", file=sys.stderr)
        return 1
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    who = f" by process 0 of {world} (each process generates its share)" if world > 1 else ""
    log(f"[generate] {len(reports)} cells, {sum(r.generated for r in reports)} images generated{who}; images in "
        f"{Path(cfg.out) / 'images'}")
    return 0


__all__ = ["CellReport", "expected_files", "generate", "generate_cell", "infer_argv", "main"]
