"""``python -m evaluation run --config configs/eval_*.yaml``: generate, metrics and tables over a whole config.

Every stage resumes: complete cells generate nothing, computed records are reused, the tables are rewritten from
the summaries. Under ``accelerate launch`` every process generates its share; process 0 measures and tabulates.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from psa_adapter.evaluation.config import EvalConfig, EvalError, load_config
from psa_adapter.evaluation.generate import add_selection, generate, is_main_process, names

STAGES = ("generate", "metrics", "tables")


def run(cfg: EvalConfig, sets=None, methods=None, backbones=None, log=print, stages=STAGES) -> dict:
    """The stages (all three by default); returns ``{"generate": [CellReport], "metrics": {cell: {metric:
    summary}}, "tables": {...}, "seconds": {...}}`` (metrics and tables on process 0 only)."""
    from psa_adapter.evaluation.measure import measure
    from psa_adapter.evaluation.tables import tables

    seconds, out = {}, {}
    cfg.cells(sets, methods, backbones)  # every name checked before any work
    if "generate" in stages:
        t0 = time.time()
        out["generate"] = generate(cfg, sets, methods, backbones, log=log)
        seconds["generate"] = time.time() - t0
    if is_main_process():
        if "metrics" in stages:
            t0 = time.time()
            out["metrics"] = measure(cfg, sets, methods, backbones, log=log)
            seconds["metrics"] = time.time() - t0
        if "tables" in stages:
            t0 = time.time()
            out["tables"] = tables(cfg, log=log)  # always the whole config: every cell measured so far
            seconds["tables"] = time.time() - t0
    out["seconds"] = seconds
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_selection(parser)
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated stages to run, in this order: generate, metrics, tables (default all; "
                             "metrics,tables counts images not generated yet as missing)")
    args = parser.parse_args(argv)
    log = print if is_main_process() else (lambda *a, **k: None)
    stages = names(args.stages) or []
    bad = [s for s in stages if s not in STAGES]
    if bad:
        parser.error(f"--stages: unknown stage {bad[0]!r}; stages: {', '.join(STAGES)}")
    try:
        cfg = load_config(args.config)
        result = run(cfg, names(args.sets), names(args.methods), names(args.backbones), log=log, stages=stages)
    except EvalError as err:
        print(f"python -m evaluation run: error: {err}", file=sys.stderr)
        return 1
    log("[run] " + ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items()))
    return 0


__all__ = ["main", "run"]
