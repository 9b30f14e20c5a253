"""Diagnosis of finished toy PSA runs (``make demo`` or ``benchmarks/toy_ablation.py`` folders): per unseen user
the banned-mark rate against the nearest training user's banned set (Jaccard), per category against how many
training users ban it, and the training curves (DPO loss, preference accuracy). Logic: psa_adapter.toyworld.diagnose.

    python benchmarks/toy_diagnose.py outputs/demo outputs/ablation/demo_oracle --out outputs/diagnosis.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from psa_adapter.toyworld.diagnose import diagnose, format_diagnosis  # noqa: E402
from psa_adapter.utils import atomic_write_text  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished demo / ablation variant folders")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here (and a .json beside it)")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "results.json").is_file()]
    if missing:
        parser.error(f"no results.json in {missing}: finish those runs first")
    found = [diagnose(r) for r in args.runs]
    text = "\n\n".join(format_diagnosis(d) for d in found)
    if args.out is not None:
        atomic_write_text(args.out, text + "\n")
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(found, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
