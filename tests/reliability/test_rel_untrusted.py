"""Untrusted files: a pickled callable in a legacy .bin, a checkpoint, or a .npy is refused and never runs; no code
path uses trust_remote_code=True, eval/exec, unrestricted torch.load / pickle / yaml.load or allow_pickle=True."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import run_case
from reltools import REPO


class Planted:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears only if the callable ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _adapter(workspace, folder: Path) -> Path:
    from psa_adapter.adapter import PSAAdapter
    from psa_adapter.pipeline import load_pipeline

    pipe = load_pipeline(str(workspace / "sd15"), torch.device("cpu"), torch.float32)
    PSAAdapter.for_unet(pipe.unet, embed_dim=16, num_tokens=1).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("where", ["top level", "inside user_proj"])
def test_a_legacy_bin_with_a_pickled_callable_is_refused_and_never_runs(workspace, tmp_path, where):
    from psa_adapter.adapter import PSAAdapter
    from psa_adapter.reference import reference_state_dict

    marker = tmp_path / "the_callable_ran"
    state = reference_state_dict(PSAAdapter.from_pretrained(_adapter(workspace, tmp_path / "good")))
    if where == "top level":
        state["payload"] = Planted(marker)
    else:
        state["user_proj"]["proj.weight"] = Planted(marker)
    evil = tmp_path / "psa_adapter.bin"
    torch.save(state, evil)
    outcome = run_case("infer", ["--sd_model", workspace / "sd15", "--prompt", "a cat", "--psa_path", evil,
                                 "--embeds_folder", workspace / "embeds", "--user_id", "1", "--save_path",
                                 tmp_path / "out", "--steps", "1", "--height", "32", "--width", "32"])
    assert outcome.raised is None and outcome.code == 1
    assert str(evil) in outcome.message and "refused unread" in outcome.message
    assert not marker.exists(), "the pickled callable ran"
    assert not list((tmp_path / "out").glob("*.png"))


def test_a_checkpoint_with_a_pickled_callable_is_refused_before_accelerate_unpickles_it(workspace, tmp_path):
    """accelerate loads registered objects (here the lr scheduler) with weights_only=False; resume checks first."""
    from corpus import _train_main

    out = tmp_path / "run"
    argv = ["--sd_model", workspace / "sd15", "--train_data_dir", workspace / "sage", "--embeds_folder",
            workspace / "embeds", "--output_dir", out, "--resolution", "32", "--max_train_steps", "2",
            "--checkpointing_steps", "1", "--mixed_precision", "no", "--train_batch_size", "1", "--seed", "0"]
    from psa_adapter.testing import reset_accelerate_state

    reset_accelerate_state()
    assert _train_main()([str(a) for a in argv]) == 0
    marker = tmp_path / "the_callable_ran"
    checkpoint = out / "checkpoint-2"
    target = checkpoint / "custom_checkpoint_0.pkl"
    torch.save({"lr_lambdas": [Planted(marker)], "base_lrs": [1e-3]}, target)
    # a careful attacker also rewrites the checkpoint's record of sizes and hashes
    from psa_adapter.training import checkpoint_files

    state = json.loads((checkpoint / "training_state.json").read_text())
    state["files"] = checkpoint_files(checkpoint)
    (checkpoint / "training_state.json").write_text(json.dumps(state))
    shutil.rmtree(out / "checkpoint-1")
    reset_accelerate_state()
    outcome = run_case("train", [*argv, "--resume_from_checkpoint", checkpoint, "--max_train_steps", "3"])
    assert outcome.raised is None and outcome.code == 1, outcome.stderr[-2000:]
    assert f"{checkpoint}: custom_checkpoint_0.pkl cannot be read safely: it holds a Python object" in outcome.message
    assert not marker.exists(), "the pickled callable ran"
    reset_accelerate_state()


def test_an_npy_with_a_pickled_callable_is_refused_and_never_runs(workspace, tmp_path):
    marker = tmp_path / "the_callable_ran"
    folder = tmp_path / "embeds"
    shutil.copytree(workspace / "embeds", folder)
    np.save(folder / "0000001.npy", np.array([Planted(marker)], dtype=object), allow_pickle=True)
    outcome = run_case("users", ["import-npy", folder, "--out", tmp_path / "store.safetensors"])
    assert outcome.code != 0 and "0000001.npy" in outcome.message
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- what the code may call
SOURCES = ["psa_adapter", "evaluation", "dataset", "benchmarks", "train.py", "infer.py", "launchers"]


def _python_files() -> list[Path]:
    files = []
    for name in SOURCES:
        path = REPO / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py")) if path.is_dir() else []
    return files


def test_the_package_never_evaluates_file_content_or_unpickles_freely():
    files = _python_files()
    assert len(files) > 50
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO)
        for node in ast.walk(ast.parse(text, str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{rel}:{node.lineno}"
            if isinstance(func, ast.Name) and name in ("eval", "exec"):
                problems.append(f"{where}: {name}()")
            literal = all(isinstance(a, ast.Constant) for a in node.args)
            if isinstance(func, ast.Name) and name in ("compile", "__import__") and not literal:
                problems.append(f"{where}: {name}() of a computed value")
            if owner in ("pickle", "cPickle", "dill", "marshal", "shelve") and name in ("load", "loads", "open"):
                problems.append(f"{where}: {owner}.{name}()")
            if owner == "torch" and name == "load":
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                problems.append(f"{where}: yaml.{name}() (use yaml.safe_load)")
            for key in ("trust_remote_code", "allow_pickle"):
                value = keywords.get(key)
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    problems.append(f"{where}: {key}={ast.unparse(value)}")
        if re.search(r"trust_remote_code\s*[=:]\s*True", text):
            problems.append(f"{rel}: trust_remote_code=True")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("payload", ["callable", "array holding a callable"])
def test_a_q16_prompts_p_with_a_pickled_callable_is_refused_and_never_runs(workspace, tmp_path, payload):
    import pickle

    marker = tmp_path / "the_callable_ran"
    evil = tmp_path / "prompts.p"
    obj = Planted(marker) if payload == "callable" else np.array([Planted(marker), 1.0], dtype=object)
    evil.write_bytes(pickle.dumps(obj))
    images = tmp_path / "imgs"
    images.mkdir()
    shutil.copy(next((workspace / "sage" / "train").glob("*_u.jpg")), images / "a.jpg")
    outcome = run_case("eval", ["metrics", "--metric", "inpro", "--images", images, "--out", tmp_path / "out",
                                "--q16-prompts", evil, "--detectors", "q16", "--device", "cpu"])
    assert outcome.raised is None and outcome.code == 1
    assert str(evil) in outcome.message and "refused" in outcome.message
    assert not marker.exists(), "the pickled callable ran"
    from psa_adapter.evaluation.metrics.backends import load_q16_prompts
    from psa_adapter.evaluation.metrics.compute import MetricInputError

    with pytest.raises(MetricInputError, match="prompts.p"):
        load_q16_prompts(evil, cache_dir=tmp_path / "cache")
    assert not marker.exists()


def test_a_legacy_unet_weights_file_with_a_pickled_callable_is_refused_and_never_runs(workspace, tmp_path):
    from corpus import _needs_unet_weights_flag

    _needs_unet_weights_flag()
    marker = tmp_path / "the_callable_ran"
    evil = tmp_path / "esd_unet.bin"
    torch.save({"state_dict": {"conv_in.weight": Planted(marker)}}, evil)
    outcome = run_case("infer", ["--sd_model", workspace / "sd15", "--prompt", "a cat", "--method", "esd",
                                 "--unet_weights", evil, "--save_path", tmp_path / "out", "--steps", "1",
                                 "--height", "32", "--width", "32"])
    assert outcome.raised is None and outcome.code == 1
    assert str(evil) in outcome.message
    assert "refused" in outcome.message and "weights_only=False" not in outcome.message, outcome.message
    assert not marker.exists(), "the pickled callable ran"
