"""``python -m evaluation prepare``: where to get each prompt set, and whether the copy in place is complete.

The project does not redistribute prompt sets or reference images. For each set (all known ones, or those of a
config, or ``--sets``) this prints the expected file under ``--prompts-dir`` (or the config's ``prompts_dir``), its
status (``complete``: the published number of rows and, where known, the published bytes; ``modified``: same
rows, other bytes; ``incomplete``; ``missing``) and where to get it. With ``--reference SET=DIR`` it also checks a
set's reference images (FID's real images, e.g. ``coco=data/coco_val2014``). Exit status 1 when a set checked is
not complete.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from psa_adapter.evaluation.config import EvalError, load_config
from psa_adapter.evaluation.prompt_sets import (
    PROMPT_SETS,
    PromptSetError,
    check_prompt_file,
    check_reference_folder,
    get_spec,
    read_prompt_rows,
)


def prepare(names: list[str], paths: dict[str, Path], references: dict[str, Path], log=print) -> bool:
    """Check each set; returns True when every set checked is complete."""
    ok = True
    for name in names:
        spec = get_spec(name) if name in PROMPT_SETS else None
        path = paths[name]
        if spec is None:  # a config's own set: only readability is checked
            try:
                rows = read_prompt_rows(path)
                log(f"{name}: complete ({len(rows)} rows, your own set) {path}")
            except PromptSetError as err:
                ok = False
                log(f"{name}: missing or unreadable: {err}")
            continue
        report = check_prompt_file(spec, path)
        counts = f"{report.rows}/{spec.rows} rows" if spec.rows else f"{report.rows} rows"
        log(f"{name}: {report.status} ({counts}) {path}")
        for problem in report.problems:
            log(f"    {problem}")
        if report.status != "complete":
            ok = False
            log(f"    get it from: {spec.source}")
        if name in references:
            expected = [r.file_name for r in read_prompt_rows(path, spec.columns)] if report.rows else None
            found, absent = check_reference_folder(references[name], expected)
            status = "complete" if found and not absent else "incomplete"
            ok = ok and status == "complete"
            log(f"    reference images: {status} ({found} images in {references[name]}"
                + (f"; {len(absent)} named in the prompt set are missing, e.g. {absent[0]}" if absent else "") + ")")
            if status != "complete" and spec.reference:
                log(f"    get them from: {' '.join(spec.reference.split())}")
        elif spec.reference:
            log(f"    FID also needs reference images: {' '.join(spec.reference.split())} (check with "
                f"--reference {name}=DIR)")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts-dir", default=None, help="folder holding the prompt-set CSVs (default: the "
                                                            "config's prompts_dir, else the current folder)")
    parser.add_argument("--config", help="check the sets of this evaluation config (their files and references)")
    parser.add_argument("--sets", help="comma-separated prompt sets (default: all known, or the config's)")
    parser.add_argument("--reference", action="append", default=[], metavar="SET=DIR",
                        help="check a set's reference images, e.g. coco=data/coco_val2014 (repeatable)")
    args = parser.parse_args(argv)
    prog = "python -m evaluation prepare"
    try:
        references = {}
        for item in args.reference:
            name, sep, folder = item.partition("=")
            if not sep or not folder:
                raise EvalError(f"--reference {item!r}: expected SET=DIR")
            references[name] = Path(folder)
        chosen = [s.strip() for s in args.sets.split(",") if s.strip()] if args.sets else None
        if args.config:
            cfg = load_config(args.config)
            for name in chosen or []:
                if name not in cfg.sets:
                    raise EvalError(f"unknown prompt set {name!r}; {args.config} has: {', '.join(cfg.sets)}")
            names = chosen or list(cfg.sets)
            paths = {n: (Path(args.prompts_dir) / cfg.sets[n].path.name if args.prompts_dir else cfg.sets[n].path)
                     for n in names}
            for n in names:
                if cfg.sets[n].reference is not None:
                    references.setdefault(n, cfg.sets[n].reference)
        else:
            names = chosen or list(PROMPT_SETS)
            for name in names:
                get_spec(name)
            paths = {n: Path(args.prompts_dir or ".") / PROMPT_SETS[n].file for n in names}
        for name in references:
            if name not in names:
                raise EvalError(f"--reference {name}=...: {name!r} is not among the sets checked ({', '.join(names)})")
        ok = prepare(names, paths, references)
    except (EvalError, PromptSetError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    if not ok:
        print(f"{prog}: some prompt sets are not complete (see above); the project does not redistribute them",
              file=sys.stderr)
    return 0 if ok else 1


__all__ = ["main", "prepare"]
