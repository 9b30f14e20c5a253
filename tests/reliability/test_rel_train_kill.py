"""train.py SIGKILLed at named points (killpoint.py) always resumes from the last complete checkpoint and ends with
the adapter of an uninterrupted run; broken checkpoints are skipped naming them; two runs are bit-identical."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from reltools import PLANTED_KEY, assert_key_nowhere, killed, run_in_process, run_script
from safetensors.torch import load_file

from psa_adapter.training import CheckpointError, list_checkpoints, verify_checkpoint

pytestmark = pytest.mark.slow
STEPS = 6


def _args(ws: Path, out: Path, *extra):
    return ["train.py", "--sd_model", ws / "sd15", "--train_data_dir", ws / "sage", "--embeds_folder", ws / "embeds",
            "--output_dir", out, "--resolution", "32", "--train_batch_size", "2", "--gradient_accumulation_steps",
            "1", "--max_train_steps", str(STEPS), "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
            "--mixed_precision", "no", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--seed", "0",
            *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "psa_adapter.safetensors"))


def _complete_checkpoints(out: Path) -> list[int]:
    """Steps of the checkpoint-<n> folders; every one of them must verify (none is ever left half-written)."""
    steps = []
    for checkpoint in list_checkpoints(out):
        verify_checkpoint(checkpoint)
        steps.append(int(checkpoint.name.split("-")[1]))
    return steps


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    """An uninterrupted run, in a process of its own."""
    out = tmp_path_factory.mktemp("train") / "uninterrupted"
    result = run_script(_args(workspace, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _train_in_process(args) -> str:
    code, log = run_in_process("train.py", args[1:])
    assert code == 0, log[-3000:]
    return log


# (name, kill point, checkpoint the killed run resumed from, checkpoints whole after the kill)
KILLS = [
    ("early: first loss of the first step", "call:psa_adapter.training:dpo_loss:1", None, []),
    ("mid-run: inside step 3, after checkpoint-2", "call:psa_adapter.training:dpo_loss:3", None, [2]),
    ("during the write of checkpoint-4 (optimizer.bin half written)",
     "torn:torch:save:.tmp-checkpoint-4/optimizer.bin", 2, [2]),
    ("right after checkpoint-4 was written", "return:psa_adapter.training:save_checkpoint:1", 2, [2, 4]),
    ("in rotation after checkpoint-6: checkpoint-2 renamed, not yet deleted", "call:shutil:rmtree:1", 4, [4, 6]),
    ("during the final save (psa_adapter.safetensors half written)",
     "torn:safetensors.torch:save_file:psa_adapter.safetensors", 6, [4, 6]),
]


def test_killed_at_six_points_resumes_each_time_and_ends_equal_to_an_uninterrupted_run(workspace, reference,
                                                                                       tmp_path, fresh_accelerate):
    out = tmp_path / "killed"
    for name, point, resumed_from, whole_after in KILLS:
        result = run_script(_args(workspace, out, "--resume_from_checkpoint", "latest"), kill=[point])
        log = result.stdout + result.stderr
        assert killed(result), f"{name}: not killed (exit {result.returncode})\n{log[-3000:]}"
        if resumed_from is None:
            assert "resuming from" not in log, name
        else:
            assert f"resuming from {out / f'checkpoint-{resumed_from}'} (step {resumed_from})" in log, name
        assert _complete_checkpoints(out) == whole_after, name
        assert not (out / "psa_adapter.safetensors").exists(), f"{name}: a final adapter before the end"
    log = _train_in_process(_args(workspace, out, "--resume_from_checkpoint", "latest"))
    assert f"resuming from {out / 'checkpoint-6'} (step 6)" in log
    assert _complete_checkpoints(out) == [4, 6]
    assert not [p.name for p in out.glob(".*")]  # no half-built, half-deleted or temporary leftovers
    full, resumed = _weights(reference), _weights(out)
    assert set(full) == set(resumed)
    assert any(v.abs().max() > 0 for k, v in full.items() if "to_v_user" in k)  # it trained
    for key, value in full.items():
        assert (value - resumed[key]).abs().max().item() <= 1e-6, key
    assert_key_nowhere([out], [log])


def _copy_run(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference, dest)
    (dest / "psa_adapter.safetensors").unlink()
    return dest


@pytest.mark.parametrize("damage", ["truncate optimizer.bin", "truncate adapter weights", "flip a byte",
                                    "delete the scheduler state", "garbage state record"])
def test_a_broken_latest_checkpoint_is_skipped_naming_it(reference, tmp_path, damage):
    out = _copy_run(reference, tmp_path / "run")
    latest = out / "checkpoint-6"
    target = {"truncate optimizer.bin": latest / "optimizer.bin",
              "truncate adapter weights": latest / "trainable" / "psa_adapter.safetensors",
              "flip a byte": latest / "trainable" / "psa_adapter.safetensors",
              "delete the scheduler state": latest / "custom_checkpoint_0.pkl",
              "garbage state record": latest / "training_state.json"}[damage]
    data = target.read_bytes()
    if damage.startswith("truncate"):
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage.startswith("delete"):
        target.unlink()
    else:
        target.write_bytes(b"{\"global_st")
    with pytest.raises(CheckpointError, match="checkpoint-6"):
        verify_checkpoint(latest)
    from psa_adapter.training import resolve_resume

    assert resolve_resume(out, "latest") == out / "checkpoint-4"


def test_skipped_checkpoint_is_named_and_the_run_still_equals_an_uninterrupted_one(workspace, reference,
                                                                                    tmp_path, fresh_accelerate,
                                                                                    caplog):
    out = _copy_run(reference, tmp_path / "run")
    optimizer = out / "checkpoint-6" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    log = _train_in_process(_args(workspace, out, "--resume_from_checkpoint", "latest")) + caplog.text
    assert "skipping a broken checkpoint" in log and "checkpoint-6: optimizer.bin has 100 bytes" in log
    assert f"resuming from {out / 'checkpoint-4'} (step 4)" in log
    for key, value in _weights(reference).items():
        assert (value - _weights(out)[key]).abs().max().item() <= 1e-6, key
    # named explicitly, a broken checkpoint is an error with one line, and nothing already written is touched
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    broken = out / "checkpoint-6"
    broken.joinpath("optimizer.bin").write_bytes(b"")
    fresh_accelerate()
    code, log = run_in_process("train.py", _args(workspace, out, "--resume_from_checkpoint", broken)[1:])
    assert code == 1 and "Traceback" not in log
    assert log.strip().splitlines()[-1].startswith(f"error: {broken}: optimizer.bin has 0 bytes")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


def test_same_seed_and_config_give_a_bit_identical_adapter(workspace, reference, tmp_path, fresh_accelerate):
    out = tmp_path / "again"  # the second run in this process, the first (reference) in its own
    log = _train_in_process(_args(workspace, out))
    assert PLANTED_KEY not in log
    first, second = _weights(reference), _weights(out)
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert (reference / "psa_adapter.safetensors").read_bytes() == (out / "psa_adapter.safetensors").read_bytes()
