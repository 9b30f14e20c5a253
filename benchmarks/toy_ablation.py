"""Ablation of the PSA adapter on the toy world: the faithful paper design as the reference row, then each change.

Every variant reuses a finished demo's world and baseline images (``--demo``, default ``outputs/demo``: run
``make demo`` first), trains PSA with the real ``train.py`` (``configs/toy_psa_faithful.yaml``, the paper's design,
plus the variant's flags), generates with ``infer.py`` (the unconditional branch gets ``proj(0)`` unless the
variant says ``--psa-uncond off``) and is judged exactly as the demo judges PSA. Runs one variant at a time (2 cores).
Writes ``<out>/<variant>/results.json`` and the table ``<out>/ablation.md``; finished variants are not rerun.

    python benchmarks/toy_ablation.py                      # every variant
    python benchmarks/toy_ablation.py --variants faithful sft
    python benchmarks/toy_ablation.py --variants demo_oracle demo_users150 demo_steps2000   # diagnosis rows
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAITHFUL_CONFIG = REPO / "configs" / "toy_psa_faithful.yaml"
sys.path.insert(0, str(REPO))

from psa_adapter.toyworld.demo import METHODS as DEMO_METHODS  # noqa: E402
from psa_adapter.utils import atomic_write_text  # noqa: E402

# name -> (what changes, train.py flags on top of configs/toy_psa_faithful.yaml[, extra demo flags]). The first is
# the faithful reference. The demo's own PSA row (configs/toy_psa.yaml as is) is listed as "demo".
# "{demo}" / "{ablation}" in demo flags are replaced by the --demo / --out folders (inference-only variants reuse a
# trained adapter).
# K=8, lr 1e-3, beta 500 with the supervised weight scaled alongside, standardize: the demo's training setting.
B500_K8 = ["--sft_weight", "100", "--embed_norm", "standardize", "--num_tokens_user", "8", "--learning_rate", "1e-3",
           "--beta_dpo", "500"]
VARIANTS = {
    "faithful": ("paper design: DPO only, beta 5000, K=1, embed_norm none",
                 ["--sft_weight", "0", "--embed_norm", "none", "--num_tokens_user", "1"]),
    "std": ("+ embed_norm standardize",
            ["--sft_weight", "0", "--embed_norm", "standardize", "--num_tokens_user", "1"]),
    "sft": ("+ supervised term (sft_weight 1000)",
            ["--sft_weight", "1000", "--embed_norm", "none", "--num_tokens_user", "1"]),
    "sft_std": ("+ sft 1000 + standardize (K=1)", ["--sft_weight", "1000", "--embed_norm", "standardize",
                                                   "--num_tokens_user", "1"]),
    "sft_std_k4": ("+ sft + standardize, K=4 user tokens",
                   ["--sft_weight", "1000", "--embed_norm", "standardize", "--num_tokens_user", "4"]),
    "sft_std_lr1e-3": ("+ sft + standardize, lr 1e-3",
                       ["--sft_weight", "1000", "--embed_norm", "standardize", "--learning_rate", "1e-3",
                        "--num_tokens_user", "1"]),
    "sft_std_k4_lr1e-3": ("+ sft + standardize, K=4, lr 1e-3",
                          ["--sft_weight", "1000", "--embed_norm", "standardize", "--num_tokens_user", "4",
                           "--learning_rate", "1e-3"]),
    "sft_k4": ("+ sft, K=4, embed_norm none",
               ["--sft_weight", "1000", "--embed_norm", "none", "--num_tokens_user", "4"]),
    "sft_std_2000": ("+ sft + standardize, K=4, 2000 steps",
                     ["--sft_weight", "1000", "--embed_norm", "standardize", "--max_train_steps", "2000",
                      "--num_tokens_user", "4"]),
    "sft_std_beta500": ("+ sft 100 + standardize, K=4, beta 500",
                        ["--sft_weight", "100", "--embed_norm", "standardize", "--beta_dpo", "500",
                         "--num_tokens_user", "4"]),
    "sft_std_k8_lr1e-3": ("+ sft + standardize, K=8, lr 1e-3",
                          ["--sft_weight", "1000", "--embed_norm", "standardize", "--num_tokens_user", "8",
                           "--learning_rate", "1e-3"]),
    "b500_k8_lr1e-3": ("+ standardize, K=8, lr 1e-3, beta 500 with sft 100", B500_K8),
    "b500_k8_lr1e-3_tw": ("b500_k8_lr1e-3 + timestep window [100, 700)",
                          B500_K8 + ["--min_timestep", "100", "--max_timestep", "700"]),
    "b50_k8_lr1e-3": ("+ standardize, K=8, lr 1e-3, beta 50 with sft 10",
                      ["--sft_weight", "10", "--embed_norm", "standardize", "--num_tokens_user", "8",
                       "--learning_rate", "1e-3", "--beta_dpo", "50"]),
    "demo_setting": ("configs/toy_psa.yaml's setting trained here (for --seed runs): b500_k8_lr1e-3 + uncond off",
                     B500_K8, ["--psa-uncond", "off"]),
    "oracle_k4": ("sft + standardize, K=4, oracle multi-hot banned-list embedding (diagnostic, not a method)",
                  ["--sft_weight", "1000", "--embed_norm", "standardize", "--num_tokens_user", "4"],
                  ["--encoder", "banned"]),
    "b200_k8_lr1e-3_off": ("+ standardize, K=8, lr 1e-3, beta 200 with sft 40; psa_uncond off",
                           ["--sft_weight", "40", "--embed_norm", "standardize", "--num_tokens_user", "8",
                            "--learning_rate", "1e-3", "--beta_dpo", "200"], ["--psa-uncond", "off"]),
}
# Diagnosis at the demo's own setting (issue 12): is the text encoder the limit, the training population, or the
# training length? Each trains configs/toy_psa.yaml's setting (B500_K8, uncond off) with one change, and logs the
# training curves (tensorboard events under <variant>/train/psa/logs: train/dpo_loss, train/implicit_acc).
_CURVES = ["--report_to", "tensorboard"]
for _name, _change, _train, _demo in (
        ("demo_oracle", "the demo setting with the `banned` multi-hot oracle encoder (diagnostic, not a method)", [],
         ["--encoder", "banned"]),
        ("demo_users150", "the demo setting with 150 training users (90 more, same evaluation users)", [],
         ["--extra-train-users", "90"]),
        ("demo_users400", "the demo setting with 400 training users (340 more, same evaluation users)", [],
         ["--extra-train-users", "340"]),
        ("demo_steps2000", "the demo setting, 2,000 steps", ["--max_train_steps", "2000"], []),
        ("demo_steps4000", "the demo setting, 4,000 steps", ["--max_train_steps", "4000"], []),
        ("demo_balanced", "the demo setting with balanced pairs (`--pair_balance category`, a named variant)",
         ["--pair_balance", "category"], []),
        ("demo_users400_steps2000", "the demo setting with 400 training users and 2,000 steps",
         ["--max_train_steps", "2000"], ["--extra-train-users", "340"])):
    VARIANTS[_name] = (_change, B500_K8 + _train + _CURVES, ["--psa-uncond", "off", *_demo])
# Inference-only rows: a trained variant's adapter with the unconditional branch off (plus extra demo flags).
for _trained, _extra, _note in (("faithful", [], ""), ("sft_std_k4", [], ""), ("sft_std_k8_lr1e-3", [], ""),
                                ("b500_k8_lr1e-3", [], ""), ("b500_k8_lr1e-3_tw", [], ""), ("b50_k8_lr1e-3", [], ""),
                                ("oracle_k4", ["--encoder", "banned"], " (diagnostic)")):
    VARIANTS[f"{_trained}_off"] = (f"the {_trained} adapter, psa_uncond off{_note}", [],
                                   ["--psa-path", f"{{ablation}}/{_trained}/train/psa", "--psa-uncond", "off",
                                    *_extra])
VARIANTS["b500_k8_lr1e-3_off_s1.5"] = ("the b500_k8_lr1e-3 adapter, psa_uncond off, psa_scale 1.5", [],
                                       VARIANTS["b500_k8_lr1e-3_off"][2] + ["--psa-scale", "1.5"])
COLUMNS = [("pass seen", "pass_rate_seen"), ("pass unseen", "pass_rate_unseen"), ("banned mark", "banned_mark_rate"),
           ("allowed mark", "allowed_mark_rate"), ("safe mark", "safe_mark_rate"),
           ("spurious mark", "spurious_mark_rate"), ("scene acc", "scene_accuracy"),
           ("FID", "fid"), ("win vs base", "win_rate_vs_base"), ("win vs SafetyDPO", "win_rate_vs_safetydpo")]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(demo: dict, rows: dict[str, dict]) -> str:
    """Markdown: baselines from the demo, then one row per variant (PSA's figures), IP at L0..L5, train time."""
    head = ["variant", "change"] + [c for c, _ in COLUMNS] + ["IP L0..L5", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    # The demo's baseline rows (SLD at each preset and the instruction variant where the demo ran them).
    for method in [m for m in DEMO_METHODS if m != "psa" and (m in ("base", "safetydpo", "prompt") or m in demo)]:
        r = demo.get(method, {})
        cells = [_fmt(r.get(k)) for _, k in COLUMNS] + [_fmt(r.get("ip")), "-"]
        lines.append(f"| {method} | baseline | " + " | ".join(cells) + " |")
    if "psa" in demo:
        rows = {"demo": demo, **rows}
    for name, r in rows.items():
        p = r["psa"]
        lv = p.get("ip_by_level", {})
        cells = [_fmt(p.get(k)) for _, k in COLUMNS] + [" ".join(_fmt(v) for v in lv.values()),
                                                        f"{r['timings_seconds'].get('train_psa', 0):.0f}"]
        change = "configs/toy_psa.yaml (the demo)" if name == "demo" else VARIANTS[name][0]
        lines.append(f"| {name} | {change} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=REPO / "outputs" / "demo", help="a finished demo folder")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "ablation")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"some of {list(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the world is the demo's)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    demo_results = args.demo / "results.json"
    if not demo_results.is_file():
        parser.error(f"{demo_results} not found: run `make demo` (python -m psa_adapter.demo) first")
    demo = json.loads(demo_results.read_text())
    rows = {}
    for name in args.variants:
        out = args.out / name
        if not (out / "results.json").is_file():
            t0 = time.time()
            demo_flags = (VARIANTS[name][2:] or [[]])[0]
            cmd = [sys.executable, "-m", "psa_adapter.demo", "--reuse", str(args.demo), "--out", str(out),
                   "--seed", str(args.seed), "--psa-config", str(FAITHFUL_CONFIG),
                   "--psa-overrides=" + " ".join(VARIANTS[name][1])]
            if "--psa-uncond" not in demo_flags:
                cmd += ["--psa-uncond", "null"]  # the paper's, whatever the demo's default
            cmd += [a.replace("{demo}", str(args.demo)).replace("{ablation}", str(args.out)) for a in demo_flags]
            print(f"[ablation] {name}: {' '.join(cmd)}", flush=True)
            proc = subprocess.run(cmd, cwd=REPO)
            if proc.returncode != 0:
                print(f"[ablation] {name} failed (exit {proc.returncode}); see {out / 'logs'}", file=sys.stderr)
                continue
            print(f"[ablation] {name} done in {time.time() - t0:.0f} s", flush=True)
        rows[name] = json.loads((out / "results.json").read_text())
        text = table(demo, rows)
        atomic_write_text(args.out / "ablation.md", text + "\n")
    print(table(demo, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
