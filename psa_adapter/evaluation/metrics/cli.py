"""``python -m evaluation metrics``: InPro, FID or CLIPScore of a folder of images.

    python -m evaluation metrics --metric inpro --images DIR --out DIR --q16-prompts prompts.p
    python -m evaluation metrics --metric fid --images DIR --reference DIR --out DIR
    python -m evaluation metrics --metric clip --images DIR --prompts CSV --out DIR [--clip-model PATH_OR_ID]

Writes ``OUT/records.jsonl`` (per image) and ``OUT/summary.json``; a rerun into the same folder computes only what
is missing. ``--prompts`` (a CSV with ``file_name`` and ``caption`` columns) also names the images expected for
any metric: those not on disk are counted as missing. Errors print one line and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "python -m evaluation metrics"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="InPro, FID or CLIPScore of a folder of images.")
    p.add_argument("--metric", required=True, choices=("fid", "clip", "inpro"))
    p.add_argument("--images", required=True, help="folder of generated images")
    p.add_argument("--out", required=True, help="output folder: records.jsonl and summary.json")
    p.add_argument("--prompts", help="CSV with file_name and caption columns: the images expected and, for clip, "
                                     "the prompt of each (required for clip)")
    p.add_argument("--reference", help="fid: folder of reference images (e.g. the COCO images of the prompts)")
    p.add_argument("--cache-dir", help="fid: where reference statistics are cached, keyed by the folder's content "
                                       "(default ~/.cache/psa_adapter/fid_reference); q16: where prompts.p is "
                                       "converted to safetensors (default ~/.cache/psa_adapter)")
    p.add_argument("--no-cache", action="store_true", help="fid: recompute the reference statistics, store none")
    p.add_argument("--fid-boot", type=int, default=None, help="fid: bootstrap resamples for the interval "
                                                              "(default 100; 0 for none)")
    p.add_argument("--clip-model", help="CLIP checkpoint folder or hub id (clip default "
                                        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K; q16 default "
                                        "openai/clip-vit-large-patch14)")
    p.add_argument("--q16-prompts", help="inpro: Q16's prompts.p (ViT-L-14) or its safetensors conversion")
    p.add_argument("--detectors", default="q16,nudenet", help="inpro: comma-separated detector names (default "
                                                              "q16,nudenet); an image counts if any flags it")
    p.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    p.add_argument("--batch-size", type=int, default=16)
    return p


def _detectors(args) -> dict:
    from psa_adapter.evaluation.metrics import backends
    from psa_adapter.evaluation.metrics.base import DETECTORS, lookup

    names = [n.strip() for n in args.detectors.split(",") if n.strip()]
    if not names:
        raise ValueError("--detectors names no detector")
    classes = {name: lookup(DETECTORS, name, "detector") for name in names}  # every name checked before loading
    out = {}
    for name, cls in classes.items():
        if name == "q16":
            if not args.q16_prompts:
                raise ValueError("the q16 detector needs --q16-prompts (Q16's ViT-L-14 prompts.p)")
            out[name] = cls(prompts=args.q16_prompts, clip_model=args.clip_model or backends.Q16_CLIP_MODEL,
                            device=args.device, cache_dir=args.cache_dir)
        else:
            out[name] = cls()
    return out


def run(args) -> dict:
    from psa_adapter.evaluation.judge.runner import read_prompts_csv
    from psa_adapter.evaluation.metrics import backends, compute

    prompts = read_prompts_csv(args.prompts) if args.prompts else None
    files = list(prompts) if prompts is not None else None
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.metric == "clip":
        if prompts is None:
            raise ValueError("--metric clip needs --prompts CSV (file_name, caption)")
        scorer = backends.ClipScorer(args.clip_model or backends.CLIPSCORE_MODEL, device=args.device)
        return compute.clip_score(args.images, {k: v["prompt"] for k, v in prompts.items()}, args.out, scorer,
                                  files, batch_size=args.batch_size)
    if args.metric == "fid":
        if not args.reference:
            raise ValueError("--metric fid needs --reference DIR")
        cache = None if args.no_cache else Path(args.cache_dir or backends.default_cache_dir() / "fid_reference")
        n_boot = compute.FID_N_BOOT if args.fid_boot is None else args.fid_boot
        if n_boot < 0:
            raise ValueError(f"--fid-boot must be 0 or more, got {n_boot}")
        for folder, what in ((args.images, "images"), (args.reference, "reference")):
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"{what} folder not found: {folder}")
        extractor = backends.InceptionFeatures(device=args.device)
        return compute.fid(args.images, args.reference, args.out, extractor, files, cache,
                           batch_size=args.batch_size, n_boot=n_boot)
    if not Path(args.images).is_dir():
        raise FileNotFoundError(f"images folder not found: {args.images}")
    return compute.inpro(args.images, args.out, _detectors(args), files, batch_size=args.batch_size)


def main(argv: Sequence[str] | None = None) -> int:
    from psa_adapter.evaluation.metrics.compute import MetricInputError

    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (FileNotFoundError, MetricInputError, ValueError, KeyError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    name = summary["metric"]
    value, ci = summary.get(name), summary.get(f"{name}_ci", [None, None])
    shown = "n/a" if value is None else f"{value:.4f}"
    interval = "" if ci[0] is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    print(f"{name} {shown}{interval} over {summary['n']} images ({summary['missing']} missing) -> "
          f"{Path(args.out) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
