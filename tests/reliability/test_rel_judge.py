"""The LLM judge killed mid-run (SIGKILL from the server while a request is in flight, and half-way through writing
a record): no answered request is paid for twice, the cache and the records survive a torn last line, the run
completes; the planted API key is sent to the server and written or printed nowhere."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reltools import PLANTED_KEY, REPO, assert_key_nowhere, env, killed, run_script

from psa_adapter.evaluation.judge.fake_server import FakeChatServer, colour_responder, http_error

pytestmark = pytest.mark.slow
NAMES = [f"user_{uid:07d}_{cat}_concept_{i:05d}_u.jpg" for uid in (1, 2, 3) for cat in ("violence", "hate")
         for i in (1,)]


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for k, name in enumerate(NAMES):  # every image different, so every request is different
        Image.fromarray(np.full((8, 8, 3), (20 * k, 10, 200 - 20 * k), dtype=np.uint8)).save(folder / name)
    return folder


def _argv(images: Path, users: Path, server: FakeChatServer, out: Path) -> list[str]:
    return ["evaluate", "--images", str(images), "--users", str(users), "--base-url", server.base_url, "--model",
            "judge-1", "--out", str(out), "--concurrency", "1", "--max-retries", "0"]


def _main_in_process(argv, monkeypatch) -> tuple[int, str]:
    from psa_adapter.evaluation.judge.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", PLANTED_KEY)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = main(argv)
    return code, buffer.getvalue()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_killed_while_a_request_is_in_flight_pays_no_answered_request_twice(workspace, images, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "out"
    proc: dict = {}

    def killer(body):  # the server kills the judge when the 3rd request arrives: 2 answered, 1 in flight
        if len(server.requests) == 3:
            os.kill(proc["pid"], signal.SIGKILL)
        return colour_responder(body)

    with FakeChatServer(killer) as server:
        child = subprocess.Popen([sys.executable, "-m", "evaluation.judge", *_argv(images, workspace / "users.csv",
                                                                                   server, out)],
                                 cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        proc["pid"] = child.pid
        first_log, _ = child.communicate(timeout=300)
        assert child.returncode == -9, first_log[-2000:]
        answered = [r["body"] for r in server.requests[:2]]
        # both answers are in the cache; the second record may not be written yet (records are written by the
        # main thread, requests sent by a worker)
        assert len(_lines(out / "judge_cache.jsonl")) == 2 and 1 <= len(_lines(out / "records.jsonl")) <= 2
        server.responder = colour_responder
        code, log = _main_in_process(_argv(images, workspace / "users.csv", server, out), monkeypatch)
        assert code == 0, log
        rerun = [r["body"] for r in server.requests[3:]]
    assert len(rerun) == len(NAMES) - 2  # the one in flight is asked again; the two answered ones are not
    assert not set(answered) & set(rerun)
    assert {r["headers"].get("Authorization") for r in server.requests} == {f"Bearer {PLANTED_KEY}"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == len(NAMES) and summary["complete"]
    assert assert_key_nowhere([out], [first_log, log]) >= 3


def test_killed_half_way_through_a_record_keeps_the_cached_answer(workspace, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with FakeChatServer(colour_responder) as server:
        # the 2nd record is written half-way, then SIGKILL; its answer is already in the cache
        result = run_script(["-m", "evaluation.judge", *_argv(images, workspace / "users.csv", server, out)],
                            kill=["torn:psa_adapter.evaluation.records:JsonlAppender.write:records.jsonl#2"])
        assert killed(result), result.stdout + result.stderr
        records = (out / "records.jsonl").read_text()
        assert records.count("\n") == 1 and not records.endswith("\n")  # a torn last line
        cached = len(_lines(out / "judge_cache.jsonl"))  # 2, or 3 if the worker got one more answer meanwhile
        sent = len(server.requests)
        assert cached >= 2 and cached <= sent <= cached + 1  # at most one request in flight, unanswered
        code, log = _main_in_process(_argv(images, workspace / "users.csv", server, out), monkeypatch)
        assert code == 0, log
        # image 2's answer is in the cache though its record was torn: no cached answer is paid for again
        assert len(server.requests) - sent == len(NAMES) - cached
        assert not {r["body"] for r in server.requests[:cached]} & {r["body"] for r in server.requests[sent:]}
    lines = _lines(out / "records.jsonl")
    assert len(lines) == len(NAMES) and all(json.loads(line) for line in lines)  # the torn line was cut
    assert len(_lines(out / "judge_cache.jsonl")) == len(NAMES)
    assert_key_nowhere([out], [result.stdout, result.stderr, log])


def test_a_server_that_echoes_the_key_in_an_error_does_not_get_it_printed(workspace, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with FakeChatServer(lambda body: http_error(401, f"Incorrect API key provided: {PLANTED_KEY}")) as server:
        code, log = _main_in_process(_argv(images, workspace / "users.csv", server, out), monkeypatch)
    assert code == 1 and "401" in log and "Traceback" not in log
    assert_key_nowhere([out], [log])




DRIVER_CONFIG = """out: {out}
prompts_dir: {ws}
generation: {{seed: 2025, steps: 1, height: 32, width: 32}}
backbones:
  sd15: {ws}/sd15
methods:
  base: {{}}
  psa: {{psa_path: {ws}/psa, embeds_folder: {ws}/embeddings}}
sets:
  tiny6:
    file: {ws}/tiny6.csv
    users: true
    rows: 6
    levels: [user]
    metrics: [pass_rate, win_rate]
judge:
  backend: openai
  options: {{base_url: "{url}", model: judge-1, max_retries: 0}}
  users: {ws}/users.csv
  concurrency: 1
  compare: [[psa, base]]
"""


def test_the_evaluation_driver_sends_the_key_and_writes_or_prints_it_nowhere(tmp_path, monkeypatch):
    from psa_adapter.evaluation.cli import main
    from psa_adapter.evaluation.tiny import write_tiny_eval_workspace

    ws = write_tiny_eval_workspace(tmp_path / "ws")
    out = tmp_path / "run"
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED_KEY)
    with FakeChatServer(colour_responder) as server:
        config = tmp_path / "eval.yaml"
        config.write_text(DRIVER_CONFIG.format(out=out, ws=ws, url=server.base_url))
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            code = main(["run", "--config", str(config)])
        log = buffer.getvalue()
    assert code == 0, log[-3000:]
    assert len(server.requests) == 2 * 6 + 2 * 6  # pass rate: 2 methods x 6 images; win rate: 6 pairs, both orders
    assert {r["headers"].get("Authorization") for r in server.requests} == {f"Bearer {PLANTED_KEY}"}
    assert assert_key_nowhere([out, tmp_path / "ws"], [log]) >= 10
