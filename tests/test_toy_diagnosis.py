"""Issue 12's toy-world tools: more training users on the same evaluation users (--extra-train-users), the
ablation's diagnosis rows, and the diagnosis of a run (per user against the nearest training set, curves)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from psa_adapter.toyworld.demo import DemoError, DemoSettings, _check_same_evaluation
from psa_adapter.toyworld.diagnose import diagnose, format_diagnosis, jaccard, nearest_jaccard, training_curves
from psa_adapter.toyworld.sage import make_toyworld, split_users

REPO = Path(__file__).resolve().parents[1]


def _ids(users):
    return [p.user_id for p in users]


def test_extra_training_users_keep_every_evaluation_user():
    plain, _ = split_users(6, 2, 2, 3, seed=4)
    more, listed = split_users(6, 2, 2, 3, seed=4, extra_train=5)
    for split in ("val", "test_seen", "test_unseen"):
        assert _ids(more[split]) == _ids(plain[split])
        assert [p.banned for p in more[split]] == [p.banned for p in plain[split]]
    assert _ids(more["train"])[:6] == _ids(plain["train"]) and len(more["train"]) == 11
    extra = [int(u) for u in _ids(more["train"])[6:]]
    assert min(extra) > max(int(u) for u in _ids(plain["test_unseen"]))  # drawn after everyone else
    assert {p.user_id for p in listed} >= set(_ids(more["train"]))
    assert split_users(6, 2, 2, 3, seed=4, extra_train=0)[0]["train"] == plain["train"]  # default unchanged
    with pytest.raises(ValueError, match="extra_train"):
        split_users(6, 2, 2, 3, seed=4, extra_train=-1)


def test_a_world_with_more_training_users_has_the_same_evaluation_files(tmp_path):
    kw = dict(n_train=4, n_val=1, n_test_seen=2, n_test_unseen=2, n_benign=3, n_unsafe=7)
    make_toyworld(tmp_path / "plain", seed=1, **kw)
    make_toyworld(tmp_path / "more", seed=1, extra_train=3, **kw)
    make_toyworld(tmp_path / "other", seed=2, **kw)
    _check_same_evaluation(tmp_path / "more", tmp_path / "plain")
    train = json.loads((tmp_path / "more" / "train" / "summary.json").read_text())
    assert train["num_users"] == 7
    assert "extra_train" not in json.loads((tmp_path / "plain" / "manifest.json").read_text())
    with pytest.raises(DemoError, match="differs from"):
        _check_same_evaluation(tmp_path / "other", tmp_path / "plain")


def test_a_variant_world_follows_the_reused_demos_seed_not_the_training_seed(tmp_path):
    from psa_adapter.toyworld.demo import world_seed

    kw = dict(n_train=4, n_val=1, n_test_seen=2, n_test_unseen=2, n_benign=3, n_unsafe=7)
    make_toyworld(tmp_path / "demo" / "world", seed=0, **kw)
    s = DemoSettings(out=tmp_path / "variant", seed=2)
    assert world_seed(s) == 2  # a demo of its own: its seed draws the users
    s.reuse, s.extra_train_users = tmp_path / "demo", 3
    assert world_seed(s) == 0  # training seed 2, same evaluation users as the reused seed-0 demo
    make_toyworld(s.world_dir, seed=world_seed(s), extra_train=3, **kw)
    _check_same_evaluation(s.world_dir, tmp_path / "demo" / "world")
    s.reuse = tmp_path / "nothing"
    with pytest.raises(DemoError, match="manifest.json not found"):
        world_seed(s)


def test_demo_settings_and_cli_flag_default_to_the_demo():
    s = DemoSettings(out=Path("o"))
    assert s.extra_train_users == 0 and s.world_dir == Path("o/world")
    s.reuse = Path("d")
    assert s.world_dir == Path("d/world")  # a plain variant reuses the demo's world
    s.extra_train_users = 90
    assert s.world_dir == Path("o/world") and s.gen_dir("base") == Path("d/gen/base")  # own world, same baselines
    from psa_adapter.demo import main

    with pytest.raises(SystemExit):
        main(["--extra-train-users", "-3"])


def test_ablation_diagnosis_rows_change_only_what_they_name():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import toy_ablation
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    v = toy_ablation.VARIANTS
    demo_train, demo_flags = v["demo_setting"][1], v["demo_setting"][2]
    assert demo_flags == ["--psa-uncond", "off"]
    curves = ["--report_to", "tensorboard"]
    assert v["demo_oracle"][1] == demo_train + curves and v["demo_oracle"][2] == demo_flags + ["--encoder", "banned"]
    assert v["demo_users150"][2] == demo_flags + ["--extra-train-users", "90"]
    assert v["demo_users400"][2] == demo_flags + ["--extra-train-users", "340"]
    assert v["demo_steps2000"][1] == demo_train + ["--max_train_steps", "2000"] + curves
    assert v["demo_steps2000"][2] == demo_flags
    # The reference row is still the paper's design.
    assert next(iter(v)) == "faithful"


def test_nearest_jaccard():
    assert jaccard([], []) == 1.0 and jaccard(["Hate"], []) == 0.0
    assert jaccard(["Hate", "Violence"], ["Hate"]) == 0.5
    assert nearest_jaccard(["Hate", "Violence"], [["Hate"], ["Hate", "Violence", "Shocking"], []]) == 2 / 3
    assert nearest_jaccard(["Hate"], []) == 0.0


def test_diagnosis_of_a_run_folder(tmp_path):
    run = tmp_path / "run"
    make_toyworld(run / "world", seed=0, n_train=5, n_val=1, n_test_seen=1, n_test_unseen=3, n_benign=2,
                  n_unsafe=7)
    from psa_adapter.users import read_users_csv

    users = {p.user_id: p for p in read_users_csv(run / "world" / "users.csv")}
    manifest = json.loads((run / "world" / "manifest.json").read_text())
    unseen = manifest["users_per_split"]["test_unseen"]
    marks = {u: {"banned_marked": i, "banned": 4, "allowed_marked": 2, "allowed": 2} for i, u in enumerate(unseen)}
    results = {"psa": {"marks_by_user": marks, "banned_mark_rate_by_category": {"Hate": 0.25}},
               "settings": {"reuse": None}}
    (run / "results.json").write_text(json.dumps(results))
    (run / "logs").mkdir()
    bar = "".join(f"\rsteps:  {s}%|#| {s}/4 [00:0{s}<00:00,  3.39s/it, acc={s / 4:.2f}, loss={1.0 / s:.4f}]"
                  for s in range(1, 5))
    (run / "logs" / "train_psa.log").write_text("train.py ...\n" + bar)
    d = diagnose(run)
    train_sets = [set(users[u].banned) for u in manifest["users_per_split"]["train"]]
    assert [u["user"] for u in d["per_user"]] == sorted(unseen)
    for u in d["per_user"]:
        assert u["nearest_jaccard"] == nearest_jaccard(users[u["user"]].banned, train_sets)
        assert u["banned_mark_rate"] == marks[u["user"]]["banned_marked"] / 4
    assert d["train_users"] == 5
    share = d["per_category"]["Hate"]["train_share_banning"]
    assert share == sum("Hate" in s for s in train_sets) / 5
    cur = training_curves(run, every=2)
    assert cur["source"] == "progress bar" and cur["step"] == [2, 4]
    assert cur["implicit_acc"] == pytest.approx([0.375, 0.875])
    text = format_diagnosis(d)
    assert "| category |" in text and "Training curves (progress bar" in text


def test_win_rates_and_grid_rows_only_for_methods_that_have_images(tmp_path):
    from psa_adapter.toyworld.demo import DEFAULT_METHODS, METHODS, available_methods

    s = DemoSettings(out=tmp_path / "o")
    assert available_methods(s) == DEFAULT_METHODS  # the demo: its default rows
    s.methods = METHODS
    assert available_methods(s) == METHODS  # --methods all
    s.methods = ("base", "prompt", "psa")
    assert available_methods(s) == ("base", "prompt", "psa")
    s.methods, s.reuse = ("psa",), tmp_path / "demo"
    (tmp_path / "demo" / "gen" / "base").mkdir(parents=True)
    (tmp_path / "demo" / "gen" / "prompt").mkdir()
    assert available_methods(s) == ("base", "prompt", "psa")  # a reused demo still running: its image folders
    (tmp_path / "demo" / "results.json").write_text(json.dumps({"base": {}, "prompt": {}, "psa": {}, "settings": {}}))
    assert available_methods(s) == ("base", "prompt", "psa")


def test_goal_table_checks_every_goal_of_issue_12():
    from psa_adapter.toyworld.diagnose import GOALS, check_goals, format_goals, ideal_ip

    ideal = ideal_ip()
    assert [round(v, 3) for v in ideal.values()] == [1.0, 0.714, 0.429, 0.429, 0.286, 0.0]
    good = {"banned_mark_rate": 0.04, "allowed_mark_rate": 0.96, "safe_mark_rate": 0.0, "scene_accuracy": 0.995,
            "spurious_mark_rate": 0.01, "ip_by_level": {k: max(0.0, v - 0.01) for k, v in ideal.items()}}
    res = {"base": {"scene_accuracy": 1.0}, "psa": good}
    assert all(met for _, met in check_goals(res).values()) and list(check_goals(res)) == list(GOALS)
    bad = dict(good, banned_mark_rate=0.108, scene_accuracy=0.967,
               ip_by_level={"L0": 0.993, "L1": 0.629, "L2": 0.493, "L3": 0.629, "L4": 0.4, "L5": 0.064})
    got = check_goals({"base": {"scene_accuracy": 1.0}, "psa": bad})
    assert got[GOALS[0]] == ("0.108", False) and got[GOALS[1]][1] and not got[GOALS[3]][1]
    assert got[GOALS[5]] == ("L1 -0.085, L2 +0.064, L3 +0.200, L4 +0.114, L5 +0.064", False)
    assert got[GOALS[6]] == ("0.064", False) and got[GOALS[7]] == ("L2 -> L3 +0.136", False)
    missing = check_goals({"base": {}, "psa": {"banned_mark_rate": 0.0, "scene_accuracy": 1.0}})
    assert missing[GOALS[4]] == ("not measured", None) and missing[GOALS[3]][1] is False
    table = format_goals({"good": res, "bad": {"base": {"scene_accuracy": 1.0}, "psa": bad}})
    assert "| banned mark <= 0.05 | 0.040 yes | 0.108 no |" in table and "| goals met | 8 of 8 | 3 of 8 |" in table


def test_embedding_neighbours_use_the_standardised_cosine(tmp_path):
    from psa_adapter.toyworld.diagnose import embedding_neighbours
    from psa_adapter.users.store import EmbeddingStore

    # Dimension 0 carries a large offset shared by everyone (standardising removes it); dimension 1 separates.
    vectors = {"0000001": [100.0, 1.0, 0.0], "0000002": [101.0, -1.0, 0.0], "0000003": [99.0, 0.0, 1.0],
               "0000009": [100.5, 0.9, 0.1], "0000010": [99.6, -0.8, 0.0]}
    EmbeddingStore.from_arrays({k: np.array(v, dtype=np.float32) for k, v in vectors.items()}, {}).save(
        tmp_path / "users.safetensors")
    got = embedding_neighbours(tmp_path, ["0000001", "0000002", "0000003"], ["0000009", "0000010"])
    assert got == {"0000009": "0000001", "0000010": "0000002"}
    assert embedding_neighbours(tmp_path / "none", ["0000001"], ["0000009"]) == {}
