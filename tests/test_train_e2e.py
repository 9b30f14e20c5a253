"""The real scripts end to end: train.py (SD1.5- and SDXL-style), infer.py on its output, two processes, tiny.yaml."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from psa_adapter.data.synthetic import write_npy_embeddings, write_tiny_sage, write_tiny_workspace
from psa_adapter.testing import save_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
USERS = {"0000001": ["Violence"], "0000002": [], "0000003": ["Self-Harm"], "0000004": []}
pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _run(args, cwd=REPO):
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    write_tiny_sage(root / "sage", "train", USERS)
    write_npy_embeddings(root / "embeds", USERS, dim=16)
    return root


def _train_args(data, model, out, *extra):
    return [sys.executable, "train.py", "--sd_model", str(model), "--train_data_dir", str(data / "sage"),
            "--embeds_folder", str(data / "embeds"), "--output_dir", str(out), "--resolution", "32",
            "--max_train_steps", "3", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--mixed_precision", "no",
            "--checkpointing_steps", "2", "--seed", "0", *extra]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_train_py_end_to_end_then_infer_py_loads_the_adapter(data, tmp_path, kind):
    model = save_tiny_pipeline(kind, tmp_path / kind)
    out = tmp_path / "out"
    args = _train_args(data, model, out, "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
                       "--validation_steps", "3", "--validation_num_inference_steps", "2",
                       *(["--sdxl", "--use_adafactor", "--gradient_checkpointing"] if kind == "sdxl" else []))
    _run(args)
    assert (out / "psa_adapter.safetensors").is_file() and (out / "resolved_config.yaml").is_file()
    assert (out / "checkpoint-2" / "trainable" / "config.json").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    assert (out / "validation" / "step-000003.png").is_file()
    weights = load_file(str(out / "psa_adapter.safetensors"))
    assert any(v.abs().max() > 0 for k, v in weights.items() if "to_v_user" in k)
    # The trained adapter generates through infer.py.
    images = tmp_path / "images"
    _run([sys.executable, "infer.py", "--sd_model", str(model), "--psa_path", str(out), "--embeds_folder",
          str(data / "embeds"), "--prompt", "a square with knife", "--user_id", "0000001", "--steps", "2",
          "--height", "32", "--width", "32", "--save_path", str(images)])
    assert list(images.glob("*.png")) or list(images.glob("*.jpg"))


def test_two_processes_equal_one_process_with_the_same_global_batch(data, tmp_path):
    model = save_tiny_pipeline("sd15", tmp_path / "sd15")
    one = tmp_path / "one"
    result = _run(_train_args(data, model, one, "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
                              "--report_to", "none"))
    assert "4 pairs per optimizer step" in result.stdout
    two = tmp_path / "two"
    # accelerate 1.15 runs `launch --cpu --num_processes 2` as ONE process; --multi_gpu starts two (torchrun) and
    # train.py switches accelerate to CPU (gloo) when there is no GPU.
    result = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()),
                   *_train_args(data, model, two, "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
                                "--report_to", "none")[1:]])
    assert "4 pairs per optimizer step" in result.stdout  # two processes x 1 pair x 2 accumulation
    a, b = load_file(str(one / "psa_adapter.safetensors")), load_file(str(two / "psa_adapter.safetensors"))
    assert any(v.abs().max() > 1e-4 for k, v in a.items() if "to_v_user" in k)  # it trained
    # Adam divides by sqrt(v): summation-order noise in near-zero gradients moves a weight by a small fraction of
    # one step (lr 1e-3); a different batch moves it by whole steps (the control below).
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=5e-5, rtol=0)
    # Control: half the global batch gives a visibly different adapter, so the comparison above can fail.
    half = tmp_path / "half"
    _run(_train_args(data, model, half, "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
                     "--report_to", "none"))
    c = load_file(str(half / "psa_adapter.safetensors"))
    assert max((c[k] - a[k]).abs().max().item() for k in a) > 5e-4


def test_tiny_config_command_runs(tmp_path):
    write_tiny_workspace(tmp_path / "outputs" / "tiny")
    _run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml")], cwd=tmp_path)
    assert (tmp_path / "outputs" / "tiny" / "psa" / "psa_adapter.safetensors").is_file()
