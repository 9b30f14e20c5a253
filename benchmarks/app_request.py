"""Time of one request of the interactive page against the bare generation it does, measured side by side.

One request (``Engine.run``) generates 8 images: the base image, the PSA image and the strip L0..L5, plus the
user embedding (cached after the first request of a profile) and the toy judge's readings. The reference is the
same 8 images from ``Engine._generate`` alone (the page's one generation function: base 1, PSA 7, same
pipeline, steps and seed), so the ratio is the page's own overhead (embedding, judge, enlarging for display).
Runs alternate (ABBA) so that drifting machine load hits both.

    python benchmarks/app_request.py                # toy world, CPU
    python benchmarks/app_request.py --repeats 8

Last line: ``request_seconds=<median> bare_seconds=<median> request_over_bare=<median per-repeat ratio>
request_cpu_seconds=<median>`` (CPU time of the process: close to the wall time on an idle machine, where a shared
machine's wall times are longer).
Loading the models (once per server) is reported separately.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from psa_adapter.app.engine import AppSettings, Engine, Request  # noqa: E402

PROMPT = "a red square with nudity"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    t0 = time.perf_counter()
    engine = Engine.load(AppSettings(), log=lambda *_: None)
    load_seconds = time.perf_counter() - t0
    request = Request(prompt=PROMPT, seed=0, age=10, gender="female", religion="Islam")
    key, _ = engine.user_key(request)
    keys = [key, *engine.levels]
    s = engine.settings

    def bare() -> None:  # the generation alone, through the same function the page calls
        engine._generate(PROMPT, keys[:1], 0, 0.0)
        engine._generate(PROMPT, keys, 0, 1.0)

    def page() -> None:
        engine.run(request)

    page(), bare()  # warm-up
    times = {"request": [], "bare": []}
    cpu = {"request": [], "bare": []}  # CPU seconds of this process: what a request costs on an idle machine
    for r in range(args.repeats):
        order = [("request", page), ("bare", bare)] if r % 2 == 0 else [("bare", bare), ("request", page)]
        for name, fn in order:
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    ratios = [a / b for a, b in zip(times["request"], times["bare"])]
    print(f"model load (once): {load_seconds:.1f} s; {len(keys) + 1} images per request, {s.steps} steps, "
          f"torch threads {torch.get_num_threads()}")
    print("repeat  request_s  bare_s  ratio  request_cpu_s  bare_cpu_s")
    for i, (a, b, q, ca, cb) in enumerate(zip(times["request"], times["bare"], ratios, cpu["request"], cpu["bare"])):
        print(f"{i:6d}  {a:9.3f}  {b:6.3f}  {q:5.3f}  {ca:13.3f}  {cb:10.3f}")
    print(f"request_seconds={statistics.median(times['request']):.3f} "
          f"bare_seconds={statistics.median(times['bare']):.3f} request_over_bare={statistics.median(ratios):.3f} "
          f"request_cpu_seconds={statistics.median(cpu['request']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
