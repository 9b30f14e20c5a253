"""Command line of the toy world: ``python -m psa_adapter.toyworld <command> ...``.

Commands:
  train-base   train the toy base model (a StableDiffusionPipeline folder)
  train-judge  train the toy judge (needs the base model's VAE for reconstructions)
  measure      generate with the base model and judge the images (mark rates, scene accuracy)
  make-data    write a SAGE-format toy data set and prompt-set CSVs
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never try the hub


def main(argv: list[str] | None = None) -> int:
    from psa_adapter.toyworld.base_model import ToyBaseConfig
    from psa_adapter.toyworld.config import add_override_flags, load_config, overrides_from_args
    from psa_adapter.toyworld.judge import JudgeTrainConfig

    parser = argparse.ArgumentParser(prog="python -m psa_adapter.toyworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-base", help="train the toy base model")
    p.add_argument("--config", default=None, help="YAML config (e.g. configs/toy_base.yaml)")
    p.add_argument("--out", required=True, help="output pipeline folder (e.g. trained_models/toy/base)")
    add_override_flags(p, ToyBaseConfig)

    p = sub.add_parser("train-judge", help="train the toy judge")
    p.add_argument("--config", default=None, help="YAML config (e.g. configs/toy_judge.yaml)")
    p.add_argument("--base", required=True, help="toy base model folder (its VAE makes reconstructions)")
    p.add_argument("--out", required=True, help="output folder (e.g. trained_models/toy/judge)")
    add_override_flags(p, JudgeTrainConfig)

    p = sub.add_parser("measure", help="generate with the base model and judge the images")
    p.add_argument("--base", required=True, help="toy base model folder")
    p.add_argument("--judge", required=True, help="toy judge folder")
    p.add_argument("--out", default=None, help="folder for results.json and grid.png (optional)")
    p.add_argument("--per-concept", type=int, default=12, help="harmful captions per concept word")
    p.add_argument("--n-safe", type=int, default=120, help="safe captions")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=2025)

    p = sub.add_parser("make-data", help="write a SAGE-format toy data set")
    from psa_adapter.toyworld.sage import add_make_data_args

    add_make_data_args(p)

    args = parser.parse_args(argv)
    if args.command == "train-base":
        from psa_adapter.toyworld.base_model import train_base

        cfg = load_config(ToyBaseConfig, args.config, overrides_from_args(args, ToyBaseConfig))
        out = train_base(cfg, args.out)
        print(f"saved toy base model to {out}")
        print((out / "training_log.json").read_text())
    elif args.command == "train-judge":
        from psa_adapter.toyworld.judge import train_judge

        cfg = load_config(JudgeTrainConfig, args.config, overrides_from_args(args, JudgeTrainConfig))
        out = train_judge(cfg, args.base, args.out)
        print(f"saved toy judge to {out}")
        print((out / "training_log.json").read_text())
    elif args.command == "measure":
        from psa_adapter.toyworld.measure import measure_base

        results = measure_base(args.base, args.judge, out=args.out, per_concept=args.per_concept,
                               n_safe=args.n_safe, steps=args.steps, guidance_scale=args.guidance_scale,
                               seed=args.seed)
        print(json.dumps(results, indent=2))
    elif args.command == "make-data":
        from psa_adapter.toyworld.sage import make_data_from_args

        make_data_from_args(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
