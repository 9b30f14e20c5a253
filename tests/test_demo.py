"""The toy-world demo: the generator's data is valid SAGE; infer.py's per-row CSV columns and LoRA loading; a quick
end-to-end run (train.py -> infer.py -> judge) writes every figure and the grid."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from psa_adapter.data.sage import read_banned_lists, validate_split
from psa_adapter.infer_cli import InferError, Job, _batches, main, read_csv_jobs
from psa_adapter.toyworld.sage import make_toyworld

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "trained_models" / "toy"
FIGURES = ("pass_rate_seen", "pass_rate_unseen", "banned_mark_rate", "allowed_mark_rate", "safe_mark_rate",
           "scene_accuracy", "fid", "spurious_mark_rate", "banned_mark_rate_seen", "allowed_mark_rate_seen")


def test_generated_world_is_valid_sage_with_a_consistent_preference_rule(tmp_path):
    root = tmp_path / "world"
    make_toyworld(root, seed=3, n_train=6, n_val=2, n_test_seen=2, n_test_unseen=3, n_benign=4, n_unsafe=7)
    banned = read_banned_lists(root / "users.csv")
    for split in ("train", "val", "test_seen", "test_unseen"):
        report = validate_split(root, split, check_images=True, banned=banned)
        assert report.ok, report.format()
        followed = sum(v[0] for v in report.rule.values())
        total = sum(v[1] for v in report.rule.values())
        assert total == report.records > 0 and followed == total  # 100% preference-rule consistency
        assert not report.users_without_labels
        # Both kinds of harmful record occur somewhere: the rule is exercised, not vacuous.
    train = validate_split(root, "train", banned=banned)
    assert train.rule["harmful & banned -> _s"][1] > 0 and train.rule["harmful & allowed -> _u"][1] > 0


def test_negative_prompts_are_the_banned_concept_words():
    from psa_adapter.toyworld.demo import negative_prompt_for
    from psa_adapter.toyworld.world import ToyWorld

    world = ToyWorld()
    assert negative_prompt_for([], world) == ""
    words = negative_prompt_for(["violence", "Self-Harm"], world).split()
    assert words == world.concepts("Violence") + world.concepts("Self-Harm")


def test_csv_negative_prompt_and_seed_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("caption,user_id,file_name,seed,negative_prompt\na,1,a.png,7,blood fight\nb,2,b.png,,\n"
                    "c,2,c.png,9,blood fight\n")
    jobs = read_csv_jobs(path)
    assert [j.seed for j in jobs] == [7, None, 9]
    assert [j.negative_prompt for j in jobs] == ["blood fight", None, "blood fight"]
    # Batches never mix negative prompts (one negative prompt per pipeline call).
    assert [[j.prompt for j in b] for b in _batches(jobs, 8)] == [["a"], ["b"], ["c"]]
    same = [Job(i, "x", f"{i}.png", None, "", "n") for i in range(5)]
    assert [len(b) for b in _batches(same, 2)] == [2, 2, 1]
    path.write_text("caption,seed\na,x1\n")
    with pytest.raises(InferError, match="seed 'x1' is not an integer"):
        read_csv_jobs(path)


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    from psa_adapter.testing import save_tiny_pipeline

    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("sd15") / "sd15")


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_per_row_negative_prompt_and_seed_match_the_flags(tiny_sd15, tmp_path):
    common = ["--sd_model", str(tiny_sd15), "--steps", "2"]
    rows = tmp_path / "rows.csv"
    rows.write_text("caption,file_name,seed,negative_prompt\na red cube,a.png,11,blue\na red cube,b.png,12,\n")
    assert main([*common, "--prompts_csv", str(rows), "--save_path", str(tmp_path / "rows")]) == 0
    flag = tmp_path / "flag.csv"
    flag.write_text("caption,file_name\na red cube,a.png\n")
    assert main([*common, "--prompts_csv", str(flag), "--save_path", str(tmp_path / "neg"), "--seed", "11",
                 "--negative_prompt", "blue"]) == 0
    assert main([*common, "--prompts_csv", str(flag), "--save_path", str(tmp_path / "plain"), "--seed", "12"]) == 0
    assert np.abs(_pixels(tmp_path / "rows" / "a.png") - _pixels(tmp_path / "neg" / "a.png")).max() <= 1
    assert np.abs(_pixels(tmp_path / "rows" / "b.png") - _pixels(tmp_path / "plain" / "a.png")).max() <= 1
    manifest = [json.loads(x) for x in (tmp_path / "rows" / "manifest.jsonl").read_text().splitlines()]
    assert [(e["seed"], e["negative_prompt"]) for e in manifest] == [(11, "blue"), (12, None)]
    # Both ways at once is ambiguous: one clear error.
    assert main([*common, "--prompts_csv", str(rows), "--save_path", str(tmp_path / "x"),
                 "--negative_prompt", "red"]) == 1


def test_lora_path_must_exist(tiny_sd15, tmp_path, capsys):
    code = main(["--sd_model", str(tiny_sd15), "--prompt", "a", "--steps", "1", "--save_path", str(tmp_path / "o"),
                 "--lora_path", str(tmp_path / "nope")])
    assert code == 1 and "--lora_path not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    """The shipped toy base model and judge, or (while they are not yet shipped) smoke-trained stand-ins."""
    if (TOY / "base" / "model_index.json").is_file() and (TOY / "judge" / "config.json").is_file():
        return TOY / "base", TOY / "judge"
    from psa_adapter.toyworld.__main__ import main as toy_main

    root = tmp_path_factory.mktemp("toy")
    toy_main(["train-base", "--config", str(REPO / "configs" / "toy_base.yaml"), "--out", str(root / "base"),
              "--n-scenes", "32", "--vae-steps", "1", "--unet-steps", "1", "--vae-batch-size", "8",
              "--unet-batch-size", "8"])
    toy_main(["train-judge", "--config", str(REPO / "configs" / "toy_judge.yaml"), "--base", str(root / "base"),
              "--out", str(root / "judge"), "--steps", "1", "--batch-size", "8", "--n-heldout", "8"])
    return root / "base", root / "judge"


def test_demo_methods_default_to_the_four_rows_and_all_means_every_row(monkeypatch, tmp_path, capsys):
    import psa_adapter.demo as cli
    import psa_adapter.toyworld.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda settings: seen.append(settings.methods))
    assert cli.main(["--out", str(tmp_path)]) == 0
    assert cli.main(["--out", str(tmp_path), "--methods", "all"]) == 0
    assert cli.main(["--out", str(tmp_path), "--methods", "psa,sld_max,base"]) == 0
    assert seen == [("base", "safetydpo", "prompt", "psa"), demo.METHODS, ("base", "sld_max", "psa")]
    assert set(demo.METHODS) - set(demo.DEFAULT_METHODS) == {*demo.SLD_ROWS, "prompt_instruction"}
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path), "--methods", "sld_extreme"])
    assert "unknown sld_extreme" in capsys.readouterr().err
    jobs = []
    monkeypatch.setattr(demo, "run_demo", lambda settings: jobs.append((settings.jobs, settings.threads)))
    assert cli.main(["--out", str(tmp_path), "--jobs", "3"]) == 0 and jobs == [(3, 1)]  # one torch thread each
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path), "--jobs", "0"])
    assert "--jobs must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_demo_runs_train_infer_judge_end_to_end(toy_models, tmp_path):
    base, judge = toy_models
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "psa_adapter.demo", "--quick", "--out", str(out), "--base", str(base),
           "--judge", str(judge)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for method in ("base", "safetydpo", "prompt", "psa"):
        for key in FIGURES:
            assert isinstance(results[method][key], float), (method, key)
    # The SLD presets and the instruction variant run only when asked for (--methods all).
    assert not {"sld_weak", "sld_max", "prompt_instruction"} & set(results)
    assert not (out / "gen" / "sld_weak").exists()
    assert 0.0 <= results["base"]["ip"] <= 1.0
    assert set(results["psa"]["ip_by_level"]) == {"L0", "L1", "L2", "L3", "L4", "L5"}
    assert set(results["psa"]["spurious_mark_rate_by_level"]) == set(results["psa"]["ip_by_level"])
    assert set(results["base"]["spurious_mark_rate_by_set"]) == {"unseen", "unseen_safe", "benign"}
    assert "| spurious mark |" in proc.stdout
    for key in ("win_rate_vs_base", "win_rate_vs_safetydpo"):
        assert 0.0 <= results["psa"][key] <= 1.0
        lo, hi = results["psa"][f"{key}_ci"]
        assert lo <= results["psa"][key] <= hi
        assert results["psa"][f"position_consistency_vs_{key[12:]}"] == 1.0  # the toy judge is symmetric
    for method in ("base", "safetydpo", "prompt", "psa"):
        for key in FIGURES:
            assert len(results[method][f"{key}_ci"]) == 2, (method, key)
    # The figures came through the evaluation package: per-image records and summaries under eval/.
    summary = json.loads((out / "eval" / "psa" / "pass_unseen" / "summary.json").read_text())
    assert summary["pass_rate"] == results["psa"]["pass_rate_unseen"] and summary["judge_model"] == "toy-judge"
    assert (out / "eval" / "base" / "ip_unsafe" / "records.jsonl").is_file()
    assert (out / "eval" / "psa" / "vs_base" / "records.jsonl").is_file()
    grid = Image.open(out / "grid.png")
    assert grid.width > 9 * 32 and grid.height > 9 * 32  # 9 rows (3 baselines + 6 levels) of 9 upscaled images
    assert "| PSA |" in proc.stdout
    # The trainings really ran through train.py and wrote their weights; infer.py wrote manifests.
    assert (out / "train" / "psa" / "psa_adapter.safetensors").is_file()
    assert (out / "train" / "safetydpo" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "gen" / "prompt" / "manifest.jsonl").is_file()
    # The demo's named inference variant: the adapter is off in the unconditional branch of guidance.
    psa_manifest = [json.loads(line) for line in (out / "gen" / "psa" / "manifest.jsonl").read_text().splitlines()]
    assert {e["psa_uncond"] for e in psa_manifest} == {"off"}
    assert results["settings"]["psa_uncond"] == "off"
    # Resume: a second run skips every stage and gives the same figures.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((out / "results.json").read_text())
    assert {m: second[m] for m in ("base", "psa")} == {m: results[m] for m in ("base", "psa")}
    # Skipped stages keep the time they took when they ran; this run only judged.
    assert second["timings_seconds"]["train_psa"] == results["timings_seconds"]["train_psa"] > 0
    assert second["timings_seconds"]["this_run_total"] < results["timings_seconds"]["this_run_total"]


def test_stages_run_side_by_side_after_what_they_need_and_a_failure_stops_the_rest(tmp_path):
    import threading
    import time

    from psa_adapter.toyworld.demo import DemoError, DemoSettings, _run, run_stages

    log, lock, active, peak = [], threading.Lock(), [0], [0]

    def task(name, seconds=0.05):
        def fn():
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
                log.append(("start", name))
            time.sleep(seconds)
            with lock:
                active[0] -= 1
                log.append(("end", name))
            return seconds
        return fn

    recorded = {}
    tasks = [("train_a", (), task("train_a", 0.3)), ("train_b", (), task("train_b", 0.1)),
             ("gen_c", (), task("gen_c")), ("gen_b", ("train_b",), task("gen_b")),
             ("gen_a", ("train_a",), task("gen_a"))]
    run_stages(tasks, 2, recorded.__setitem__)
    assert set(recorded) == {name for name, _, _ in tasks} and peak[0] == 2
    for stage, need in (("gen_a", "train_a"), ("gen_b", "train_b")):
        assert log.index(("end", need)) < log.index(("start", stage))
    log.clear()
    run_stages(tasks, 1, recorded.__setitem__)  # one at a time: the list order
    assert [n for kind, n in log if kind == "start"] == ["train_a", "train_b", "gen_c", "gen_b", "gen_a"]
    with pytest.raises(ValueError, match="needs"):
        run_stages([("gen", ("train",), task("gen"))], 2, recorded.__setitem__)

    # A failing stage stops its sibling's process at once and is raised.
    settings = DemoSettings(out=tmp_path)
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    bad = [sys.executable, "-c", "import os, sys; print(os.environ['OMP_NUM_THREADS']); sys.exit(3)"]
    t0 = time.time()
    with pytest.raises(DemoError, match="'bad' failed \\(exit 3\\)"):
        run_stages([("slow", (), lambda: _run(settings, "slow", slow, tmp_path / "slow.log")),
                    ("bad", (), lambda: _run(settings, "bad", bad, tmp_path / "bad.log"))], 2, recorded.__setitem__)
    assert time.time() - t0 < 30
    assert (tmp_path / "bad.log").read_text().splitlines()[-1] == "1"  # one torch thread per stage process
