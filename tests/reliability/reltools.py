"""Helpers of the reliability suite: running the real scripts as subprocesses (optionally SIGKILLed at a named point
by ``killpoint.py``) or in-process, the planted API key and the check that it is nowhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def killed(result) -> bool:
    return result.returncode == -9


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
