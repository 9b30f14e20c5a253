"""``python -m evaluation.judge {evaluate,compare,summarize}``: the LLM judge from the command line.

    python -m evaluation.judge evaluate --images DIR --users CSV --base-url URL --model NAME --out DIR
    python -m evaluation.judge compare --images-a DIR --images-b DIR --users CSV --base-url URL --model NAME --out DIR
    python -m evaluation.judge summarize --records FILE --out DIR

The API key comes from the environment only (``OPENAI_API_KEY``; ``AZURE_OPENAI_API_KEY`` with ``--azure``);
there is no flag for it. Errors print one line (the key scrubbed) and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from psa_adapter.evaluation.judge.base import JudgeError
from psa_adapter.evaluation.judge.openai_api import (
    DEFAULT_AZURE_API_VERSION,
    DEFAULT_BASE_URL,
    DEFAULT_TEMPERATURE,
    ChatJudge,
    scrub_secrets,
)
from psa_adapter.evaluation.judge.runner import (
    compare_folders,
    evaluate_folder,
    read_prompts_csv,
    read_users,
    summarize_records,
    summarize_reference,
)
from psa_adapter.evaluation.records import read_jsonl, write_summary
from psa_adapter.utils import read_utf8

PROG = "python -m evaluation.judge"
CACHE_NAME = "judge_cache.jsonl"


def _judge_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--users", required=True, help="users CSV in the reference format (users.csv)")
    sp.add_argument("--model", required=True, help="judge model name (on Azure: the deployment name)")
    sp.add_argument("--out", required=True, help="output folder: records.jsonl, summary.json, the cache")
    sp.add_argument("--base-url", default=DEFAULT_BASE_URL,
                    help="OpenAI-compatible API base, e.g. http://localhost:8000/v1 for vLLM (default "
                         f"{DEFAULT_BASE_URL}); with --azure the resource endpoint https://NAME.openai.azure.com")
    sp.add_argument("--prompts", help="prompt-set CSV with file_name and caption columns (e.g. sage_seen.csv): the "
                                      "images expected (absent ones count as missing) and the prompt of each")
    sp.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    sp.add_argument("--max-retries", type=int, default=5,
                    help="retries of a request on 429/5xx/timeouts before the run stops (default 5)")
    sp.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each retry")
    sp.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    sp.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    sp.add_argument("--max-tokens", type=int, default=800, help="reply length limit; 0 sends none (default 800)")
    sp.add_argument("--cache", help=f"response cache file (default OUT/{CACHE_NAME})")
    sp.add_argument("--no-cache", action="store_true", help="neither read nor write a response cache")
    sp.add_argument("--azure", action="store_true", help="Azure OpenAI (key from AZURE_OPENAI_API_KEY)")
    sp.add_argument("--api-version", default=None, help=f"Azure api-version (default {DEFAULT_AZURE_API_VERSION})")
    sp.add_argument("--templates", help="folder with system.txt, evaluate.txt, compare.txt (default: the packaged "
                                        "ones); their hash is recorded")
    sp.add_argument("--no-json-mode", action="store_true",
                    help="do not send response_format=json_object (for servers that reject it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="LLM judge: pass rate and win rate of generated images.")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="pass rate: judge each image for its user")
    ev.add_argument("--images", required=True, help="folder of images named like the SAGE set")
    _judge_options(ev)
    cmp = sub.add_parser("compare", help="win rate: compare same-named images of two folders, in both orders")
    cmp.add_argument("--images-a", required=True)
    cmp.add_argument("--images-b", required=True)
    cmp.add_argument("--seed", type=int, default=0, help="shuffles the order in which judgments are requested")
    _judge_options(cmp)
    sm = sub.add_parser("summarize", help="re-tabulate per-image records (ours, or the reference's JSON lists)")
    sm.add_argument("--records", required=True, help="records.jsonl of a run, or a reference *_results.json list")
    sm.add_argument("--out", required=True, help="folder for summary.json")
    return parser


def _make_judge(args) -> ChatJudge:
    from psa_adapter.evaluation.judge.templates import PromptTemplates

    cache = None if args.no_cache else Path(args.cache) if args.cache else Path(args.out) / CACHE_NAME
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {args.concurrency}")
    return ChatJudge(args.base_url, args.model, azure=args.azure, api_version=args.api_version,
                     temperature=args.temperature, max_tokens=args.max_tokens, timeout=args.timeout,
                     max_retries=args.max_retries, backoff=args.backoff, cache=cache,
                     templates=PromptTemplates.load(args.templates) if args.templates else None,
                     json_mode=not args.no_json_mode)


def _fmt(summary: dict, name: str) -> str:
    value, ci = summary.get(name), summary.get(f"{name}_ci") or [None, None]
    if value is None:
        return f"{name} n/a"
    return f"{name} {value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _report(summary: dict, out: Path) -> None:
    if summary["kind"] == "evaluate":
        rates = ", ".join(_fmt(summary, k) for k in ("pass_rate", "banned_respected_rate", "allowed_respected_rate"))
    else:
        rates = ", ".join(_fmt(summary, k) for k in ("win_rate_a", "win_rate_b", "tie_rate", "position_consistency"))
    print(f"{rates}; n={summary['n']} errors={summary['errors']} missing={summary['missing']} "
          f"pending={summary['pending']} -> {out / 'summary.json'}")


def _run(args) -> int:
    if args.command == "summarize":
        path = Path(args.records)
        try:
            text = read_utf8(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"records file not found: {path}") from None
        if text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
            if not all(isinstance(r, dict) for r in records):
                raise ValueError(f"{path}: expected a JSON list of objects")
            summary = summarize_reference(records) | {"source": "reference", "judge_model": None, "prompt_hash": None}
        else:
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                whole = None
            if isinstance(whole, dict) and "kind" not in whole:  # our records always say their kind
                raise ValueError(f"{path}: one JSON object, not per-image records (expected a JSON list of records, "
                                 "or our records.jsonl); summary files cannot be re-tabulated")
            records = read_jsonl(path)
            if not records:
                raise ValueError(f"{path}: no records")
            summary = summarize_records(records)
            models = sorted({(r.get("judge_model"), r.get("prompt_hash")) for r in records if "judge_model" in r})
            summary |= {"source": "records", "judge_model": models[0][0] if len(models) == 1 else None,
                        "prompt_hash": models[0][1] if len(models) == 1 else None}
        summary["records"] = str(path)
        out = Path(args.out)
        write_summary(out, summary)
        _report(summary, out)
        return 0

    users = read_users(args.users)
    meta = read_prompts_csv(args.prompts) if args.prompts else None
    files = list(meta) if meta else None
    judge = _make_judge(args)
    out = Path(args.out)
    try:
        if args.command == "evaluate":
            summary = evaluate_folder(judge, args.images, users, out, files=files, concurrency=args.concurrency,
                                      meta=meta)
        else:
            summary = compare_folders(judge, args.images_a, args.images_b, users, out, files=files,
                                      concurrency=args.concurrency, seed=args.seed, meta=meta)
    finally:
        if judge.cache is not None:
            judge.cache.close()
        print(f"requests sent {judge.stats['requests']} (retries {judge.stats['retries']}), "
              f"answered from the cache {judge.stats['cache_hits']}", file=sys.stderr)
    _report(summary, out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (JudgeError, ValueError, OSError) as err:
        print(f"{PROG} {args.command}: error: {scrub_secrets(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; every judgment made so far is kept in {args.out}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
