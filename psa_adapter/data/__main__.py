"""``python -m psa_adapter.data validate --root ROOT --split val [--no-images] [--users users.csv] [--embeds DIR]``."""

from __future__ import annotations

import argparse
import sys

from psa_adapter.data.embeddings import open_embedding_store, store_user_ids
from psa_adapter.data.sage import SageFormatError, read_banned_lists, validate_split


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m psa_adapter.data", description="SAGE data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser(
        "validate", help="Check SAGE splits: record format, names, images, embeddings, the preference rule."
    )
    validate.add_argument("--root", required=True, help="SAGE root holding <split>/metadata.jsonl.")
    validate.add_argument("--split", nargs="+", default=["train"], help="Split(s) to check.")
    validate.add_argument("--no-images", dest="images", action="store_false",
                          help="Do not check that image files exist (metadata-only copies).")
    validate.add_argument("--users", help="Reference users.csv: check the preference rule against its banned lists.")
    validate.add_argument("--embeds", help="Embedding store or <User_ID>.npy folder: check every user has one.")
    validate.add_argument("--max-problems", type=int, default=20, help="Problems to print per split.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        banned = read_banned_lists(args.users) if args.users else None
    except (ValueError, FileNotFoundError) as err:  # the message names the file, row and field
        print(f"error: {err}", file=sys.stderr)
        return 1
    embedding_ids = None
    if args.embeds:
        embedding_ids = store_user_ids(open_embedding_store(args.embeds))
    ok = True
    for split in args.split:
        try:
            report = validate_split(args.root, split, check_images=args.images, banned=banned,
                                    embedding_ids=embedding_ids)
        except (SageFormatError, FileNotFoundError) as err:
            print(f"{split}: {err}\nFAILED", file=sys.stderr)
            ok = False
            continue
        print(report.format(args.max_problems))
        ok = ok and report.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
