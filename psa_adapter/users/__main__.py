"""Command line: python -m psa_adapter.users <command> (sample, assign, embed, statement, import-npy, agreement,
levels). Bad input ends with one line "error: ..." on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
import time


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _llm_kwargs(args) -> dict:
    if not args.model:
        raise ValueError("--model is required with --policy llm / --encoder llm (a local folder, cached hub id or "
                         ".gguf file)")
    kwargs = {"model": args.model, "device": args.device}
    if args.gguf_file:
        kwargs["gguf_file"] = args.gguf_file
    return kwargs


def _policy(args):
    from . import get_policy

    if args.policy == "llm":
        kwargs = _llm_kwargs(args)
        if args.template:
            kwargs["template"] = args.template
        return get_policy("llm", **kwargs)
    if args.model or args.template:
        raise ValueError("--model/--template only apply to --policy llm")
    return get_policy(args.policy)


def cmd_sample(args):
    from . import sample_profiles, write_users_csv

    profiles = sample_profiles(args.n, seed=args.seed, method=args.method)
    write_users_csv(profiles, args.out)
    print(f"wrote {len(profiles)} users (seed {args.seed}, method {args.method}) to {args.out}")


def cmd_assign(args):
    from . import assign_banned, read_users_csv, write_users_csv

    policy = _policy(args)
    profiles = assign_banned(policy, read_users_csv(args.users), progress=True)
    write_users_csv(profiles, args.out)
    print(f"wrote {len(profiles)} users with banned lists from the {policy.name} policy to {args.out}")


def cmd_embed(args):
    from . import build_store, get_encoder, read_users_csv

    profiles = read_users_csv(args.users)
    if args.encoder == "llm":
        kwargs = _llm_kwargs(args)
    elif args.gguf_file:
        raise ValueError("--gguf-file only applies to --encoder llm")
    elif args.encoder == "banned":
        if args.model or args.template:
            raise ValueError("--encoder banned uses no model and no template (it encodes the banned list itself)")
        kwargs = {}
    else:
        kwargs = {"device": args.device} | ({"model_dir": args.model} if args.model else {})
    if args.template:
        kwargs["template"] = args.template
    encoder = get_encoder(args.encoder, **kwargs)
    start = time.perf_counter()
    store = build_store(encoder, profiles, batch_size=args.batch_size, progress=True)
    seconds = time.perf_counter() - start
    store.save(args.out)
    print(f"wrote {len(store)} embeddings (dim {store.dim}, {encoder.info['encoder_id']}) to {args.out}; "
          f"{len(store) / seconds:.1f} users/s ({seconds:.2f} s, model load excluded)")


def cmd_statement(args):
    from . import load_level, load_profile, safety_statement
    from .encoders import load_statement_template

    profile = load_profile(args.profile) if args.profile else load_level(args.level, args.levels_file)
    print(safety_statement(profile, load_statement_template(args.template)))


def cmd_import_npy(args):
    from . import EmbeddingStore

    metadata = {k: v for k, v in (("encoder_id", args.encoder_id), ("pooling", args.pooling),
                                  ("template_hash", args.template_hash)) if v is not None}
    store = EmbeddingStore.open(args.folder, metadata=metadata)
    store.save(args.out)
    print(f"imported {len(store)} embeddings (dim {store.dim}) from {args.folder} to {args.out}")


def cmd_agreement(args):
    from . import CATEGORIES, agreement, read_users_csv

    result = agreement(_policy(args), read_users_csv(args.users), progress=args.policy == "llm")
    print(f"{'category':<12} {'support':>7} {'precision':>9} {'recall':>7}")
    for c in CATEGORIES:
        r = result["per_category"][c]
        print(f"{c:<12} {r['support']:>7} {_fmt(r['precision']):>9} {_fmt(r['recall']):>7}")
    micro = result["micro"]
    print(f"users={result['n_users']} mismatched={len(result['mismatched_users'])} "
          f"micro_precision={_fmt(micro['precision'])} micro_recall={_fmt(micro['recall'])}")
    print(f"exact_match={_fmt(result['exact_match'])} micro_f1={_fmt(micro['f1'])}")


def cmd_levels(args):
    from . import level_names, load_level

    for name in level_names(args.levels_file):
        p = load_level(name, args.levels_file)
        print(f"{name}: user {p.user_id}, bans {', '.join(p.banned) or 'nothing'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m psa_adapter.users", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def llm_options(p):
        p.add_argument("--model", help="llm only: local model folder, cached hub id, or .gguf file")
        p.add_argument("--gguf-file", help="llm only: GGUF file name inside --model's folder")
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")

    p = sub.add_parser("sample", help="draw synthetic users (SPEC section 3 sampler)")
    p.add_argument("--n", type=int, required=True, help="number of users")
    p.add_argument("--seed", type=int, default=2025, help="random seed (default 2025, as upstream)")
    p.add_argument("--method", choices=("spec", "reference"), default="spec",
                   help="spec: accepted marginals match the spec (default); reference: plain rejection as upstream")
    p.add_argument("--out", required=True, help="output users CSV")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("assign", help="assign banned lists with a policy")
    p.add_argument("--policy", choices=("rules", "llm"), default="rules")
    p.add_argument("--users", required=True, help="input users CSV")
    p.add_argument("--out", required=True, help="output users CSV with Banned/Allowed columns")
    p.add_argument("--template", help="llm only: prompt template (default: the packaged policy_prompt.txt)")
    llm_options(p)
    p.set_defaults(func=cmd_assign)

    p = sub.add_parser("embed", help="build an embedding store from a users CSV with banned lists")
    p.add_argument("--encoder", choices=("sentence", "llm", "banned"), default="sentence",
                   help="banned: diagnostic multi-hot oracle of the banned list (not the paper's encoder)")
    p.add_argument("--users", required=True, help="users CSV with Banned_Categories")
    p.add_argument("--out", required=True, help="output .safetensors store")
    p.add_argument("--batch-size", type=int, default=None, help="users per forward pass (encoder default)")
    p.add_argument("--template", help="safety-statement template (default: the packaged statement_template.txt)")
    llm_options(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("statement", help="print the safety statement that is embedded for a profile")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", help="a person's profile file (.yaml/.json) with a banned list")
    src.add_argument("--level", help="a named level, L0..L5")
    p.add_argument("--levels-file", help="levels YAML (default: the packaged levels.yaml)")
    p.add_argument("--template", help="safety-statement template (default: the packaged statement_template.txt)")
    p.set_defaults(func=cmd_statement)

    p = sub.add_parser("import-npy", help="convert a folder of reference <User_ID>.npy files to a store")
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="output .safetensors store")
    p.add_argument("--encoder-id", help="encoder that made the files (e.g. Qwen/Qwen2.5-7B-Instruct)")
    p.add_argument("--pooling", help="pooling used (e.g. masked_mean)")
    p.add_argument("--template-hash", help="hash of the statement template, if known")
    p.set_defaults(func=cmd_import_npy)

    p = sub.add_parser("agreement", help="compare a policy with the banned lists in a users CSV")
    p.add_argument("--policy", choices=("rules", "llm"), default="rules")
    p.add_argument("--users", required=True, help="users CSV with reference Banned_Categories")
    p.add_argument("--template", help="llm only: prompt template (default: the packaged policy_prompt.txt)")
    llm_options(p)
    p.set_defaults(func=cmd_agreement)

    p = sub.add_parser("levels", help="list the named strictness levels")
    p.add_argument("--levels-file", help="levels YAML (default: the packaged levels.yaml)")
    p.set_defaults(func=cmd_levels)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, OSError, ImportError) as e:
        # Our errors say what and where; a traceback would only bury that line.
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
