"""Diagnosis of finished toy PSA runs (``make demo`` or ``benchmarks/toy_ablation.py`` folders): per unseen user
the banned-mark rate against the nearest training user's banned set (Jaccard), per category against how many
training users ban it, and the training curves (DPO loss, preference accuracy). Logic: psa_adapter.toyworld.diagnose.

    python benchmarks/toy_diagnose.py outputs/demo outputs/ablation/demo_oracle --out outputs/diagnosis.md
    python benchmarks/toy_diagnose.py --goals "seed 0=outputs/demo" "seed 1=outputs/ablation_seed1/demo_setting"

``--goals``: only the table of issue 12's goals, one column per run (``label=folder``, or a folder), each figure
with whether it meets the goal (base's scene accuracy from the run, else from the demo it reused).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from psa_adapter.toyworld.diagnose import diagnose, format_diagnosis, format_goals  # noqa: E402
from psa_adapter.utils import atomic_write_text  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished demo / ablation variant folders ([label=]folder)")
    parser.add_argument("--goals", action="store_true", help="print the goal table only")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here (and a .json beside it)")
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        if (label or folder) in runs:
            parser.error(f"two runs are labelled {label or folder!r}: labels must differ")
        runs[label or folder] = Path(folder)
    missing = [str(r) for r in runs.values() if not (r / "results.json").is_file()]
    if missing:
        parser.error(f"no results.json in {missing}: finish those runs first")
    if args.goals:
        columns = {}
        for label, run in runs.items():
            res = json.loads((run / "results.json").read_text())
            reuse = res.get("settings", {}).get("reuse")
            if "base" not in res and reuse:
                res["base"] = json.loads((Path(reuse) / "results.json").read_text())["base"]
            columns[label] = res
        text = format_goals(columns)
    else:
        text = "\n\n".join(format_diagnosis(diagnose(r)) for r in runs.values())
    if args.out is not None:
        atomic_write_text(args.out, text + "\n")
        if not args.goals:
            atomic_write_text(args.out.with_suffix(".json"),
                              json.dumps([diagnose(r) for r in runs.values()], indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
