"""Shared pieces of the reliability suite: a tiny workspace (SD1.5-style model, SAGE split, embeddings), running the
real scripts as subprocesses (optionally SIGKILLed at a named point by ``killpoint.py``), and output checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KILLPOINT = Path(__file__).with_name("killpoint.py")
USERS = {"0000001": ["Violence"], "0000002": [], "0000003": ["Self-Harm"]}
#: A judge API key planted in the environment of every script the suite runs; it must never be written or printed.
PLANTED_KEY = "sk-PLANTED-reliability-7f3a9c2e51d84b06"


def env(**extra) -> dict:
    values = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                  TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OPENAI_API_KEY=PLANTED_KEY,
                  AZURE_OPENAI_API_KEY=PLANTED_KEY)
    values["PYTHONPATH"] = os.pathsep.join([str(REPO), values.get("PYTHONPATH", "")])
    values.update(extra)
    return values


def run_script(args, *, kill: list[str] | tuple[str, ...] = (), extra_env=None, timeout=300):
    """Run ``python ARGS`` from the repository root (under ``killpoint.py`` with the given kill points); returns
    the CompletedProcess (text output)."""
    prefix = [str(KILLPOINT), *kill, "--"] if kill else []
    return subprocess.run([sys.executable, *prefix, *map(str, args)], cwd=REPO, env=env(**(extra_env or {})),
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(script: str, args) -> tuple[int, str]:
    """``main(args)`` of ``train.py`` or ``infer.py`` in this process (no start-up cost): (exit status, output).
    Used for the runs that are not killed; killed runs need a process of their own."""
    import contextlib
    import io

    from corpus import cli_main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = cli_main(script.removesuffix(".py"))([str(a) for a in args])
    return code, buffer.getvalue()


@pytest.fixture
def fresh_accelerate():
    """train.py builds an Accelerator per run; accelerate's singletons must not leak between in-process runs."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset()
    yield reset
    torch.set_num_threads(threads)
    reset()


def killed(result) -> bool:
    return result.returncode == -9


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A tiny SD1.5-style pipeline, a SAGE ``train`` split of three users and their ``.npy`` embeddings (E = 16)."""
    from psa_adapter.data.synthetic import write_npy_embeddings, write_tiny_sage, write_users_csv
    from psa_adapter.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("workspace")
    write_tiny_sage(root / "sage", "train", USERS)
    write_npy_embeddings(root / "embeds", USERS, dim=16)
    write_users_csv(root / "users.csv", USERS)
    save_tiny_pipeline("sd15", root / "sd15")
    return root


def assert_key_nowhere(folders=(), texts=()) -> int:
    """The planted key is in no file under ``folders`` and in none of ``texts``; returns how many files were read."""
    count = 0
    for text in texts:
        assert PLANTED_KEY not in text
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                count += 1
                assert PLANTED_KEY.encode() not in path.read_bytes(), path
    return count
