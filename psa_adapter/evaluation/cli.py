"""``python -m evaluation COMMAND ...``: one subcommand per module, each with its own ``main(argv) -> int``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> module whose main(argv) runs it
COMMANDS = {
    "prepare": "psa_adapter.evaluation.prepare",
    "generate": "psa_adapter.evaluation.generate",
    "metrics": "psa_adapter.evaluation.metrics.cli",
    "tables": "psa_adapter.evaluation.tables",
    "run": "psa_adapter.evaluation.run",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m evaluation {" + ",".join(COMMANDS) + "} ...\n"
              "       python -m evaluation.judge {evaluate,compare,summarize} ...", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"python -m evaluation: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:])
