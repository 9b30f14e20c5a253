"""``python -m psa_adapter.demo`` (what ``make demo`` runs): PSA on the toy world, end to end, in minutes on a CPU.

Trains a PSA adapter and a SafetyDPO-style baseline with the real ``train.py``, generates with the real
``infer.py`` (base, SafetyDPO, prompt-based, PSA for seen/unseen users and levels L0..L5), judges the images with
the toy judge and writes ``<out>/results.json``, ``<out>/results.md`` and ``<out>/grid.png``. Stages whose outputs
exist are skipped (delete ``<out>`` to start over). The logic lives in ``psa_adapter.toyworld.demo``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local


def main(argv: list[str] | None = None) -> int:
    from psa_adapter.toyworld.demo import DEFAULT_METHODS, METHODS, DemoError, DemoSettings, run_demo

    parser = argparse.ArgumentParser(prog="python -m psa_adapter.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the users, their split and both trainings")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke run: a few users, two training steps, a handful of images")
    parser.add_argument("--base", type=Path, default=None, help="toy base model folder (default: the shipped one)")
    parser.add_argument("--judge", type=Path, default=None, help="toy judge folder (default: the shipped one)")
    parser.add_argument("--psa-config", type=Path, default=None, help="PSA training config (configs/toy_psa.yaml)")
    parser.add_argument("--psa-overrides", default="",
                        help="extra train.py flags for PSA, one string, e.g. '--embed_norm none --sft_weight 0'")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="a finished demo folder: reuse its world and baseline images, train and judge PSA only")
    parser.add_argument("--psa-path", type=Path, default=None,
                        help="use this trained adapter instead of training one (inference-only variants)")
    parser.add_argument("--psa-scale", type=float, default=1.0, help="adapter scale at inference (default 1)")
    parser.add_argument("--psa-uncond", choices=("null", "off"), default=None,
                        help="unconditional branch of guidance: off = zero tokens, the adapter is off there (the "
                             "demo's default, a named variant) or null = proj(0) (the paper's)")
    parser.add_argument("--encoder", choices=("sentence", "banned"), default="sentence",
                        help="PSA's user encoder: sentence (MiniLM statements, default) or banned (a diagnostic "
                             "multi-hot oracle of the banned list, not the paper's encoder)")
    parser.add_argument("--extra-train-users", type=int, default=0,
                        help="training users beyond the demo's 60, drawn after the evaluation users so that those "
                             "stay the same (a named variant: a larger training population; default 0)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated rows to run, or 'all' (default {','.join(DEFAULT_METHODS)}); known: "
                             + ",".join(METHODS))
    parser.add_argument("--jobs", type=int, default=None,
                        help="stage processes run side by side (default: the CPU count, at most 4); each uses one "
                             "torch thread, so the figures do not depend on this or on the machine")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.extra_train_users < 0:
        parser.error(f"--extra-train-users must be >= 0, got {args.extra_train_users}")
    settings = DemoSettings.quick(args.out, args.seed) if args.quick else DemoSettings(out=args.out, seed=args.seed)
    settings.psa_scale = args.psa_scale
    settings.encoder = args.encoder
    settings.extra_train_users = args.extra_train_users
    if args.jobs is not None:
        settings.jobs = args.jobs
    if args.psa_uncond is not None:
        settings.psa_uncond = args.psa_uncond
    for name in ("base", "judge", "psa_config", "psa_path"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name).resolve())
    settings.out = settings.out.resolve()
    settings.psa_overrides = settings.psa_overrides + args.psa_overrides.split()
    if args.reuse is not None:
        settings.reuse = args.reuse.resolve()
        settings.methods = ("psa",)
    if args.methods:
        methods = METHODS if args.methods.strip() == "all" else \
            tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
        settings.methods = tuple(m for m in METHODS if m in methods)
    try:
        run_demo(settings)
    except (DemoError, FileNotFoundError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
