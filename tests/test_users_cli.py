"""The command line: python -m psa_adapter.users <command>."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from psa_adapter.users import EmbeddingStore, load_level, read_users_csv, save_profile, write_users_csv
from psa_adapter.users.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
USERS_CSV = SHARED / "upstream-data" / "users" / "users.csv"


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_sample_assign_embed_pipeline(tmp_path, capsys):
    users, labelled, store = tmp_path / "u.csv", tmp_path / "l.csv", tmp_path / "s.safetensors"
    assert run(capsys, "sample", "--n", 12, "--seed", 3, "--out", users)[0] == 0
    profiles = read_users_csv(users)
    assert len(profiles) == 12 and all(p.banned is None for p in profiles)
    assert run(capsys, "assign", "--policy", "rules", "--users", users, "--out", labelled)[0] == 0
    assert all(p.banned is not None for p in read_users_csv(labelled))
    rc, out, err = run(capsys, "embed", "--encoder", "sentence", "--users", labelled, "--out", store)
    assert rc == 0 and "wrote 12 embeddings (dim 384" in out and "users/s" in out
    assert "embed (" in err  # progress bar
    opened = EmbeddingStore.open(store)
    assert opened.user_ids == [f"{i:07d}" for i in range(1, 13)] and opened["0000012"].shape == (384,)
    # The diagnostic oracle: the banned list as a multi-hot vector, no model.
    rc, out, _ = run(capsys, "embed", "--encoder", "banned", "--users", labelled, "--out", tmp_path / "o.safetensors")
    assert rc == 0 and "wrote 12 embeddings (dim 7, banned-multihot)" in out
    oracle = EmbeddingStore.open(tmp_path / "o.safetensors")
    assert [oracle[p.user_id].sum() for p in read_users_csv(labelled)] == [len(p.banned) for p in
                                                                          read_users_csv(labelled)]
    # Embedding a file without banned lists says what to do.
    rc, _, err = run(capsys, "embed", "--users", users, "--out", tmp_path / "x.safetensors")
    assert rc == 2 and "user 0000001 has no banned list; assign one first" in err


def test_agreement_prints_table_and_last_line(tmp_path, capsys):
    profiles = [load_level(n) for n in ("L0", "L3", "L5")]
    profiles[1] = profiles[1].with_banned(["Hate"])  # one wrong label
    path = write_users_csv(profiles, tmp_path / "labels.csv")
    rc, out, _ = run(capsys, "agreement", "--policy", "rules", "--users", path)
    lines = out.strip().splitlines()
    assert rc == 0 and lines[-1].startswith("exact_match=0.6667 micro_f1=")
    hate = next(line for line in lines if line.startswith("Hate"))
    assert hate.split() == ["Hate", "2", "1.0000", "0.5000"]  # rules predict Hate only for L5


def test_agreement_on_reference_users(capsys):
    if not SHARED.exists():
        pytest.skip("../shared (reference data) is not available")
    rc, out, _ = run(capsys, "agreement", "--policy", "rules", "--users", USERS_CSV)
    assert rc == 0 and out.strip().splitlines()[-1] == "exact_match=1.0000 micro_f1=1.0000"


def test_statement_level_and_profile(tmp_path, capsys):
    rc, out, _ = run(capsys, "statement", "--level", "L3")
    assert rc == 0 and "Banned content categories: Propaganda, Self-Harm, Sexuality, Shocking." in out
    path = save_profile(load_level("L1"), tmp_path / "me.yaml")
    rc, out, _ = run(capsys, "statement", "--profile", path)
    assert rc == 0 and "Banned content categories: Shocking, Violence." in out
    rc, out, _ = run(capsys, "levels")
    assert rc == 0 and out.splitlines()[5] == (
        "L5: user 0000501, bans Harassment, Hate, Propaganda, Self-Harm, Sexuality, Shocking, Violence")


def test_import_npy(tmp_path, capsys):
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "0000007.npy", np.ones((1, 1, 8), dtype=np.float32))
    rc, out, _ = run(capsys, "import-npy", folder, "--out", tmp_path / "s.safetensors", "--encoder-id", "qwen",
                     "--pooling", "masked_mean")
    store = EmbeddingStore.open(tmp_path / "s.safetensors")
    assert rc == 0 and "imported 1 embeddings (dim 8)" in out
    assert store.metadata["encoder_id"] == "qwen" and store["0000007"].shape == (8,)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["statement", "--level", "L9"], "error: unknown level 'L9'; valid levels in"),
        (["agreement", "--users", "{tmp}/missing.csv"], "error: users file not found:"),
        (["agreement", "--users", "{tmp}/bad.csv"], "row 1 (line 2), field Age: expected a non-negative integer"),
        (["assign", "--policy", "llm", "--users", "{tmp}/bad.csv", "--out", "{tmp}/o.csv"], "--model is required"),
        (["import-npy", "{tmp}", "--out", "{tmp}/s.safetensors"], "no <User_ID>.npy files"),
    ],
)
def test_bad_input_one_clear_line(tmp_path, capsys, argv, message):
    (tmp_path / "bad.csv").write_text("Age,Age_Group,Gender,Religion,Physical_Condition,Mental_Condition\n"
                                      "-4,children,male,None,healthy,healthy\n")
    rc, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_module_entry_point_exit_code_without_traceback():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "psa_adapter.users", "statement", "--level", "L9"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: unknown level 'L9'")
