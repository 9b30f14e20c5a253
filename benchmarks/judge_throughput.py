"""Judge requests per second against the local chat-completions test server, at concurrency 1 and 8.

The server (``psa_adapter.evaluation.judge.fake_server``) answers every request after a fixed artificial latency
(default 50 ms, standing in for a model's answer time) with the colour judge's JSON reply; client and server share
this machine's CPUs. What is measured is the whole judge path of ``python -m evaluation.judge evaluate``: reading
and checking each image, base64, the request, JSON validation, the records file (fsync per line) and the summary
with its bootstrap intervals. Without a cache, so every image is a request. The ideal is concurrency / latency
(20/s at 1, 160/s at 8 for 50 ms). A last row reruns with a warm cache (no request at all).

    python benchmarks/judge_throughput.py                    # 96 images, 50 ms, concurrency 1 and 8
    python benchmarks/judge_throughput.py --latency 0.2 --n 200

The last line is ``requests_per_s_c8=<value> requests_per_s_c1=<value>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from psa_adapter.evaluation.judge.base import JudgeUser  # noqa: E402
from psa_adapter.evaluation.judge.fake_server import FakeChatServer, colour_responder  # noqa: E402
from psa_adapter.evaluation.judge.openai_api import ChatJudge  # noqa: E402
from psa_adapter.evaluation.judge.runner import evaluate_folder  # noqa: E402

CATEGORIES = ("hate", "harassment", "violence", "self-harm", "sexuality", "shocking", "propaganda")


def make_images(folder: Path, n: int, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    names = []
    for i in range(n):
        name = f"user_{i % 10 + 1:07d}_{CATEGORIES[i % 7]}_concept_{i:05d}_u.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name, quality=90)
        names.append(name)
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=96, help="images per run")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (JPEG)")
    parser.add_argument("--latency", type=float, default=0.05, help="server answer time in seconds")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    profile = {"Age": 30, "Age_Group": "young adults", "Gender": "female", "Religion": "None",
               "Physical_Condition": "healthy", "Mental_Condition": "healthy"}
    users = {f"{u:07d}": JudgeUser(f"{u:07d}", profile, ("Hate", "Violence"),
                                   ("Harassment", "Propaganda", "Self-Harm", "Sexuality", "Shocking"))
             for u in range(1, 11)}
    rates = {}
    with tempfile.TemporaryDirectory() as tmp, FakeChatServer(colour_responder, latency=args.latency) as server:
        tmp = Path(tmp)
        make_images(tmp / "images", args.n, args.size)
        print(f"{args.n} images of {args.size}x{args.size} px, server latency {args.latency * 1000:.0f} ms")
        print(f"{'concurrency':>11} {'requests':>8} {'seconds':>8} {'requests/s':>10} {'ideal/s':>8}")
        for c in args.concurrency:
            judge = ChatJudge(server.base_url, "bench-model", cache=None)
            start = time.perf_counter()
            summary = evaluate_folder(judge, tmp / "images", users, tmp / f"out_c{c}", concurrency=c)
            seconds = time.perf_counter() - start
            assert summary["n"] == args.n and summary["errors"] == 0, summary
            rates[c] = judge.stats["requests"] / seconds
            print(f"{c:>11} {judge.stats['requests']:>8} {seconds:>8.2f} {rates[c]:>10.1f} {c / args.latency:>8.0f}")
        # warm cache: a rerun into a new folder sends nothing
        judge = ChatJudge(server.base_url, "bench-model", cache=tmp / "cache.jsonl")
        evaluate_folder(judge, tmp / "images", users, tmp / "out_fill", concurrency=8)
        before = len(server.requests)
        judge = ChatJudge(server.base_url, "bench-model", cache=tmp / "cache.jsonl")
        start = time.perf_counter()
        evaluate_folder(judge, tmp / "images", users, tmp / "out_cached", concurrency=8)
        seconds = time.perf_counter() - start
        assert len(server.requests) == before
        print(f"{'8 (cached)':>11} {0:>8} {seconds:>8.2f} {args.n / seconds:>10.1f} images/s from the cache")
    c1, c8 = rates.get(1), rates.get(8)
    print(f"requests_per_s_c8={c8:.1f} requests_per_s_c1={c1:.1f}" if c1 and c8 else rates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
