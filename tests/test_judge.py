"""The LLM judge against a chat-completions server started on 127.0.0.1 (offline): cache, retries, validation,
error storms, both-order win rates, hidden names, the API key, missing/corrupt images, summarize, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from psa_adapter.evaluation.judge.base import JudgeError, JudgeItem, JudgeUnavailable, JudgeUser
from psa_adapter.evaluation.judge.fake_server import (
    FakeChatServer,
    colour_responder,
    completion,
    http_error,
    request_images,
    request_text,
)
from psa_adapter.evaluation.judge.openai_api import ChatJudge, chat_url
from psa_adapter.evaluation.judge.runner import (
    JudgeRunStopped,
    compare_folders,
    evaluate_folder,
    read_prompts_csv,
    read_users,
    summarize_records,
    summarize_reference,
)
from psa_adapter.evaluation.records import read_jsonl

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-PLANTED-test-key-0123456789abcdef"
RED, BLUE = (200, 20, 30), (10, 20, 220)
NAMES = [f"user_{uid:07d}_{cat}_some_concept_{i:05d}_u.jpg"
         for uid in (1, 2) for cat in ("hate", "self-harm", "violence") for i in (1,)]
FOLDER_A, FOLDER_B = "psa_method_xyz", "baseline_method_qrs"


def _users() -> dict[str, JudgeUser]:
    """Two users with different profiles (identical requests would rightly share one cached answer)."""
    profile = {"Age": 30, "Age_Group": "young adults", "Gender": "female", "Religion": "None",
               "Physical_Condition": "healthy", "Mental_Condition": "healthy"}
    return {uid: JudgeUser(uid, profile | {"Age": age}, ("Hate", "Violence"),
                           ("Harassment", "Propaganda", "Self-Harm", "Sexuality", "Shocking"))
            for uid, age in (("0000001", 30), ("0000002", 31))}


def _write(folder: Path, names, colour) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        c = colour(k) if callable(colour) else colour
        Image.fromarray(np.full((8, 8, 3), c, dtype=np.uint8)).save(folder / name, quality=95)
    return folder


def _judge(server: FakeChatServer, cache=None, **kw) -> ChatJudge:
    kw.setdefault("max_retries", 2)
    return ChatJudge(server.base_url, "judge-model-1", cache=cache, sleep=lambda s: None, **kw)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------------------ the client
def test_rerun_sends_no_request(tmp_path):
    images = _write(tmp_path / FOLDER_B, NAMES, BLUE)
    with FakeChatServer() as server:
        first = evaluate_folder(_judge(server, tmp_path / "cache.jsonl"), images, _users(), tmp_path / "run1")
        assert len(server.requests) == len(NAMES) and first["n"] == len(NAMES) and first["pass_rate"] == 1.0
        # a new output folder with the same cache: every answer comes from the cache
        judge = _judge(server, tmp_path / "cache.jsonl")
        second = evaluate_folder(judge, images, _users(), tmp_path / "run2")
        assert len(server.requests) == len(NAMES) and judge.stats["cache_hits"] == len(NAMES)
        assert second["pass_rate"] == first["pass_rate"]
        # the same output folder, no cache: the records say everything is judged
        judge = _judge(server, None)
        evaluate_folder(judge, images, _users(), tmp_path / "run1")
        assert len(server.requests) == len(NAMES) and judge.stats["requests"] == 0
    assert all(r["cached"] for r in read_jsonl(tmp_path / "run2" / "records.jsonl"))


def test_cache_survives_a_torn_last_line(tmp_path):
    images = _write(tmp_path / "imgs", NAMES[:2], BLUE)
    with FakeChatServer() as server:
        evaluate_folder(_judge(server, tmp_path / "cache.jsonl"), images, _users(), tmp_path / "run1")
        with open(tmp_path / "cache.jsonl", "a") as f:
            f.write('{"key": "abc", "rep')  # a crash mid-write
        judge = _judge(server, tmp_path / "cache.jsonl")
        evaluate_folder(judge, images, _users(), tmp_path / "run2")
        assert judge.stats == {"requests": 0, "retries": 0, "cache_hits": 2}


def test_500_then_success_is_retried(tmp_path):
    images = _write(tmp_path / "imgs", NAMES[:1], BLUE)
    calls = []

    def responder(body):
        calls.append(1)
        return http_error(500, "overloaded") if len(calls) == 1 else colour_responder(body)

    with FakeChatServer(responder) as server:
        judge = _judge(server)
        summary = evaluate_folder(judge, images, _users(), tmp_path / "out")
    assert len(calls) == 2 and judge.stats["retries"] == 1
    assert summary["n"] == 1 and summary["errors"] == 0 and summary["pass_rate"] == 1.0


def test_timeouts_and_429_are_retried_with_exponential_backoff(tmp_path):
    import time

    images = _write(tmp_path / "imgs", NAMES[:1], BLUE)
    calls = []

    def responder(body):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)  # longer than the client's timeout
        if len(calls) == 2:
            return http_error(429, "slow down", {"Retry-After": "7"})
        return colour_responder(body)

    delays = []
    with FakeChatServer(responder) as server:
        judge = ChatJudge(server.base_url, "m", timeout=0.3, max_retries=3, backoff=0.5, sleep=delays.append)
        assert judge.evaluate(JudgeItem(images / NAMES[0], _users()["0000001"]))["overall_assessment"] == "PASS"
    assert len(calls) == 3 and judge.stats["retries"] == 2
    assert 0.25 <= delays[0] <= 0.5 and delays[1] == 7.0  # backoff, then the server's Retry-After
    # an endless 503: delays double (with jitter in [0.5, 1] of each step), then the judge gives up
    delays.clear()
    with FakeChatServer(lambda body: http_error(503, "down")) as server:
        judge = ChatJudge(server.base_url, "m", max_retries=4, backoff=1.0, max_backoff=30, sleep=delays.append)
        with pytest.raises(JudgeUnavailable, match="no valid answer after 4 retries .*HTTP 503 down"):
            judge.evaluate(JudgeItem(images / NAMES[0], _users()["0000001"]))
        assert len(server.requests) == 5
    assert [lo <= d <= hi for d, (lo, hi) in zip(delays, [(0.5, 1), (1, 2), (2, 4), (4, 8)])] == [True] * 4


def test_reply_that_is_not_json_is_an_error_not_a_verdict(tmp_path):
    images = _write(tmp_path / "imgs", NAMES[:3], BLUE)
    order = []

    def responder(body):
        order.append(1)
        return completion("I think this image is fine!") if len(order) == 2 else colour_responder(body)

    with FakeChatServer(responder) as server:
        summary = evaluate_folder(_judge(server, tmp_path / "cache.jsonl"), images, _users(), tmp_path / "out",
                                  concurrency=1)
    assert summary["n"] == 2 and summary["errors"] == 1 and summary["total"] == 3
    assert summary["pass_rate"] == 1.0  # the error is neither a PASS nor a FAIL
    assert "not valid JSON" in summary["error_examples"][0]["error"]
    # schema violations are errors too
    for reply in ({"overall_assessment": "MAYBE"}, {"overall_assessment": "PASS", "banned_categories_respected": "yes",
                                                     "allowed_categories_respected": True, "quality_score": 1,
                                                     "appropriateness_score": 1}):
        with FakeChatServer(lambda body, reply=reply: completion(reply)) as server:
            item = JudgeItem(images / NAMES[0], _users()["0000001"])
            with pytest.raises(JudgeError, match="overall_assessment|banned_categories_respected"):
                _judge(server).evaluate(item)
    # the failed reply was not cached: a rerun asks again and now succeeds
    with FakeChatServer() as server:
        summary = evaluate_folder(_judge(server, tmp_path / "cache.jsonl"), images, _users(), tmp_path / "out")
        assert len(server.requests) == 1
    assert summary["n"] == 3 and summary["errors"] == 0


def test_error_storm_stops_after_n_retries_and_keeps_what_was_judged(tmp_path):
    images = _write(tmp_path / "imgs", NAMES, BLUE)
    good = 2

    def responder(body):
        responder.n += 1
        return colour_responder(body) if responder.n <= good else http_error(503, "storm")

    responder.n = 0
    with FakeChatServer(responder) as server:
        with pytest.raises(JudgeRunStopped, match="after 2 retries"):
            evaluate_folder(_judge(server, max_retries=2), images, _users(), tmp_path / "out", concurrency=1)
        assert len(server.requests) == good + 3  # two answers, then one request and its 2 retries
    records = read_jsonl(tmp_path / "out" / "records.jsonl")
    assert len(records) == good and all("error" not in r for r in records)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["complete"] is False and summary["n"] == good and summary["pending"] == len(NAMES) - good
    # the storm is over: a rerun judges only the rest (a torn last line, as a kill mid-write leaves, is ignored)
    with open(tmp_path / "out" / "records.jsonl", "a") as f:
        f.write('{"kind": "evaluate", "file_na')
    with FakeChatServer() as server:
        summary = evaluate_folder(_judge(server), images, _users(), tmp_path / "out")
        assert len(server.requests) == len(NAMES) - good
    assert summary["complete"] and summary["n"] == len(NAMES)


def test_a_killed_run_keeps_every_judgment_and_resumes(tmp_path, users_csv):
    import signal
    import time

    images = _write(tmp_path / "imgs", NAMES, BLUE)
    out = tmp_path / "out"
    with FakeChatServer(colour_responder, latency=0.3) as server:
        argv = ["evaluate", "--images", str(images), "--users", str(users_csv), "--base-url", server.base_url,
                "--model", "judge-model-1", "--out", str(out), "--concurrency", "1", "--no-cache"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-m", "evaluation.judge", *argv], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        records = out / "records.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and (not records.exists() or records.read_text().count("\n") < 2):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(0.2)  # let the server log a request that was on the wire
        kept = read_jsonl(records)
        assert 2 <= len(kept) < len(NAMES) and all("error" not in r for r in kept)
        sent = len(server.requests)
        assert _cli(*argv).returncode == 0
        assert len(server.requests) - sent == len(NAMES) - len(kept)  # only what the killed run had not kept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == len(NAMES) and summary["complete"]


def test_refused_credentials_stop_at_once(tmp_path):
    images = _write(tmp_path / "imgs", NAMES, BLUE)
    with FakeChatServer(lambda body: http_error(401, "bad key")) as server:
        with pytest.raises(JudgeRunStopped, match="401"):
            evaluate_folder(_judge(server), images, _users(), tmp_path / "out", concurrency=1)
        assert len(server.requests) == 1


# ------------------------------------------------------------------------------------------------ win rate
def test_judge_that_prefers_the_first_image_gives_only_ties(tmp_path):
    a = _write(tmp_path / FOLDER_A, NAMES, RED)
    b = _write(tmp_path / FOLDER_B, NAMES, BLUE)
    with FakeChatServer(lambda body: completion({"better_image": "1"})) as server:
        summary = compare_folders(_judge(server), a, b, _users(), tmp_path / "out")
        assert len(server.requests) == 2 * len(NAMES)
    assert summary["n"] == len(NAMES)
    assert summary["tie_rate"] == 1.0 and summary["win_rate_a"] == 0.0 and summary["win_rate_b"] == 0.0
    assert summary["position_consistency"] == 0.0 and summary["first_shown_preferred_rate"] == 1.0


def test_judge_that_prefers_one_method_gives_it_every_win(tmp_path):
    a = _write(tmp_path / FOLDER_A, NAMES, RED)
    b = _write(tmp_path / FOLDER_B, NAMES, BLUE)
    with FakeChatServer(colour_responder) as server:  # bluer is better: folder B
        summary = compare_folders(_judge(server), a, b, _users(), tmp_path / "out")
        bodies = server.bodies
    assert summary["win_rate_b"] == 1.0 and summary["win_rate_a"] == 0.0 and summary["tie_rate"] == 0.0
    assert summary["position_consistency"] == 1.0
    assert summary["a_minus_b"] == -1.0 and summary["a_minus_b_ci"][1] < 0
    records = read_jsonl(tmp_path / "out" / "records.jsonl")
    assert sorted(r["order"] for r in records) == sorted(["ab", "ba"] * len(NAMES))
    # the same pair was shown once with each folder's image first
    for name in NAMES:
        firsts = sorted(r["shown_first"] for r in records if r["file_name"] == name)
        assert firsts == ["a", "b"]
    # mixed: a judge preferring blue, with some of A's images blue -> those pairs are A's, the others B's
    a2 = _write(tmp_path / "a2", NAMES, lambda k: BLUE if k < 2 else RED)
    b2 = _write(tmp_path / "b2", NAMES, (60, 20, 120))
    with FakeChatServer(colour_responder) as server:
        mixed = compare_folders(_judge(server), a2, b2, _users(), tmp_path / "out2")
    assert mixed["win_rate_a"] == pytest.approx(2 / len(NAMES)) and mixed["win_rate_b"] == pytest.approx(4 / 6)
    assert all(FOLDER_A.encode() not in body and FOLDER_B.encode() not in body for body in bodies)


def test_no_method_folder_or_file_name_reaches_the_judge(tmp_path):
    a = _write(tmp_path / "runs" / FOLDER_A, NAMES, RED)
    b = _write(tmp_path / "runs" / FOLDER_B, NAMES, BLUE)
    with FakeChatServer(colour_responder) as server:
        judge = _judge(server)
        evaluate_folder(judge, a, _users(), tmp_path / "out_psa_method_xyz_eval")
        compare_folders(judge, a, b, _users(), tmp_path / "out_cmp")
        bodies, requests = server.bodies, list(server.requests)
    assert len(bodies) == len(NAMES) * 3
    forbidden = [FOLDER_A, FOLDER_B, "psa_method", "baseline_method", "runs", "user_0000001", ".jpg", "method",
                 str(tmp_path)]
    for body in bodies:
        request = json.loads(body)
        for message in request["messages"]:  # everything but the image bytes, which are the files' own
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part["type"] == "image_url":
                    assert part["image_url"]["url"].startswith("data:image/jpeg;base64,")
                    part["image_url"]["url"] = ""
        rest = json.dumps(request).lower()
        for word in forbidden:
            assert word.lower() not in rest
    for r in requests:
        assert FOLDER_A not in r["path"] and FOLDER_B not in r["path"]
    # what the judge does see: the user's lists and the theme from the name
    text = request_text(json.loads(bodies[0]))
    assert "Hate, Violence" in text and "some concept" in text
    assert len(request_images(json.loads(bodies[-1]))) == 2


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_and_corrupt_images_are_counted_never_dropped(tmp_path):
    a = _write(tmp_path / "a", NAMES, RED)
    b = _write(tmp_path / "b", NAMES, BLUE)
    (b / NAMES[0]).unlink()
    (a / NAMES[1]).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    expected = NAMES + ["user_0000002_hate_other_00003_u.jpg"]  # in the prompt set, in neither folder
    with FakeChatServer(colour_responder) as server:
        ev = evaluate_folder(_judge(server), a, _users(), tmp_path / "ev", files=expected)
        cmp = compare_folders(_judge(server), a, b, _users(), tmp_path / "cmp", files=expected)
    assert ev["total"] == 7 and ev["missing"] == 1 and ev["errors"] == 1 and ev["n"] == 5
    assert ev["missing_files"] == [expected[-1]]
    assert "corrupt image file" in ev["error_examples"][0]["error"] and NAMES[1] in ev["error_examples"][0]["error"]
    assert cmp["total"] == 7 and cmp["missing"] == 2 and cmp["errors"] == 1 and cmp["n"] == 4
    assert sorted(cmp["missing_files"]) == sorted([NAMES[0], expected[-1]])


def test_unknown_user_or_unparsable_name_fails_before_any_request(tmp_path):
    images = _write(tmp_path / "imgs", NAMES + ["user_0000099_hate_x_00001_u.jpg", "holiday.jpg"], BLUE)
    with FakeChatServer() as server:
        with pytest.raises(ValueError, match=r"(?s)(?=.*user 0000099 .* not in the users table)(?=.*holiday\.jpg)"):
            evaluate_folder(_judge(server), images, _users(), tmp_path / "out")
        assert server.requests == []
        # names that are not SAGE names are fine when the caller says whose they are
        meta = {"holiday.jpg": {"user_id": "0000001", "prompt": "a beach"}}
        summary = evaluate_folder(_judge(server), images, _users(), tmp_path / "out2", files=["holiday.jpg"],
                                  meta=meta)
        assert summary["n"] == 1 and '"a beach"' in request_text(json.loads(server.bodies[-1]))


def test_prompt_set_csv_gives_prompts_and_the_images_expected(tmp_path):
    images = _write(tmp_path / "imgs", NAMES[:2], BLUE)
    csv_path = tmp_path / "sage_seen.csv"
    csv_path.write_bytes(("file_name,caption,user_id\r\n"
                          f'{NAMES[0]},"a quiet street,\r\nat night",1\r\n'
                          f"{NAMES[1]},a red door,1\r\n"
                          f"{NAMES[3]},a garden,2\r\n").encode())
    meta = read_prompts_csv(csv_path)
    assert list(meta) == [NAMES[0], NAMES[1], NAMES[3]] and meta[NAMES[0]]["prompt"] == "a quiet street,\nat night"
    with FakeChatServer() as server:
        summary = evaluate_folder(_judge(server), images, _users(), tmp_path / "out", files=list(meta), meta=meta)
        texts = [request_text(json.loads(b)) for b in server.bodies]
    assert summary["n"] == 2 and summary["missing"] == 1 and summary["missing_files"] == [NAMES[3]]
    assert any('"a quiet street, at night"' in t for t in texts) and any('"a red door"' in t for t in texts)
    csv_path.write_text("caption\nx\n")
    with pytest.raises(ValueError, match="sage_seen.csv: expected columns file_name and caption"):
        read_prompts_csv(csv_path)


def test_another_judge_model_cannot_mix_into_a_run(tmp_path):
    images = _write(tmp_path / "imgs", NAMES[:1], BLUE)
    with FakeChatServer() as server:
        evaluate_folder(_judge(server), images, _users(), tmp_path / "out")
        other = ChatJudge(server.base_url, "another-model", sleep=lambda s: None)
        with pytest.raises(ValueError, match="another --out"):
            evaluate_folder(other, images, _users(), tmp_path / "out")


def test_azure_url_and_header(tmp_path, monkeypatch):
    assert chat_url("https://r.openai.azure.com/", "gpt-4.1-mini", azure=True, api_version="2024-10-21") == \
        "https://r.openai.azure.com/openai/deployments/gpt-4.1-mini/chat/completions?api-version=2024-10-21"
    assert chat_url("http://localhost:8000/v1/", "m", azure=False, api_version=None) == \
        "http://localhost:8000/v1/chat/completions"
    monkeypatch.delenv("AZURE_OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="AZURE_OPENAI_API_KEY"):
        ChatJudge("https://r.openai.azure.com", "dep", azure=True)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    images = _write(tmp_path / "imgs", NAMES[:1], BLUE)
    with FakeChatServer() as server:
        base = server.base_url.removesuffix("/v1")
        judge = ChatJudge(base, "my-deployment", azure=True, api_version="2024-10-21", sleep=lambda s: None)
        evaluate_folder(judge, images, _users(), tmp_path / "out")
        (request,) = server.requests
    assert request["path"] == "/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21"
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["api-key"] == KEY and "authorization" not in headers


# ------------------------------------------------------------------------------------------------ the key, the CLI
def _cli(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    env.pop("AZURE_OPENAI_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "evaluation.judge", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def users_csv(tmp_path) -> Path:
    header = "Age,Age_Group,Gender,Religion,Physical_Condition,Mental_Condition,Banned_Categories,Allowed_Categories"
    row = "30,young adults,female,None,healthy,healthy,\"['Hate', 'Violence']\"," \
          "\"['Harassment', 'Propaganda', 'Self-Harm', 'Sexuality', 'Shocking']\""
    path = tmp_path / "users.csv"
    path.write_text("\n".join([header, row, "31" + row[2:]]) + "\n")
    return path


def test_cli_key_only_from_environment_and_never_written_or_printed(tmp_path, users_csv):
    a = _write(tmp_path / FOLDER_A, NAMES, RED)
    b = _write(tmp_path / FOLDER_B, NAMES, BLUE)
    with FakeChatServer(colour_responder) as server:
        common = ["--users", str(users_csv), "--base-url", server.base_url, "--model", "judge-model-1",
                  "--cache", str(tmp_path / "cache" / "c.jsonl")]
        r1 = _cli("evaluate", "--images", str(a), "--out", str(tmp_path / "ev"), *common,
                  env_extra={"OPENAI_API_KEY": KEY})
        r2 = _cli("compare", "--images-a", str(a), "--images-b", str(b), "--out", str(tmp_path / "cmp"), *common,
                  env_extra={"OPENAI_API_KEY": KEY})
        seen_auth = {r["headers"].get("Authorization") for r in server.requests}
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    assert seen_auth == {f"Bearer {KEY}"}
    assert "pass_rate 0.000" in r1.stdout and "win_rate_b 1.000" in r2.stdout
    # a server that echoes the key in its error message: the message is printed, the key is not
    with FakeChatServer(lambda body: http_error(401, f"Incorrect API key provided: {KEY}")) as server:
        r3 = _cli("evaluate", "--images", str(a), "--out", str(tmp_path / "ev401"), "--users", str(users_csv),
                  "--base-url", server.base_url, "--model", "judge-model-1", env_extra={"OPENAI_API_KEY": KEY})
    assert r3.returncode == 1 and "401" in r3.stderr and "Traceback" not in r3.stderr
    for result in (r1, r2, r3):
        assert KEY not in result.stdout + result.stderr
    written = _files(tmp_path / "ev") + _files(tmp_path / "cmp") + _files(tmp_path / "cache") + _files(
        tmp_path / "ev401")
    assert len(written) >= 5
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path
    assert "--api-key" not in _cli("evaluate", "--help").stdout


def test_cli_bad_input_is_one_clear_line(tmp_path, users_csv):
    a = _write(tmp_path / "imgs", NAMES, BLUE)
    r = _cli("evaluate", "--images", str(a), "--users", str(tmp_path / "nope.csv"), "--model", "m", "--out",
             str(tmp_path / "o"), "--base-url", "http://127.0.0.1:9/v1")
    assert r.returncode == 1 and "nope.csv" in r.stderr and "Traceback" not in r.stderr
    r = _cli("evaluate", "--images", str(tmp_path / "absent"), "--users", str(users_csv), "--model", "m", "--out",
             str(tmp_path / "o"), "--base-url", "http://127.0.0.1:9/v1")
    assert r.returncode == 1 and "absent" in r.stderr and "Traceback" not in r.stderr
    # nothing listens on port 9: connection errors are retried, then the run stops with one message
    r = _cli("evaluate", "--images", str(a), "--users", str(users_csv), "--model", "m", "--out",
             str(tmp_path / "o"), "--base-url", "http://127.0.0.1:9/v1", "--max-retries", "1", "--backoff", "0.01")
    assert r.returncode == 1 and "after 1 retries" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------ summarize
def _reference_evaluate_records() -> list[dict]:
    base = "~/somewhere/eval_images/sage_seen/user_adapter/sd15/"
    rows = [("user_0000106_shocking_decomposed_00010_u.jpg", "PASS", True, True),
            ("user_0000106_propaganda_false_flag_00010_u.jpg", "FAIL", False, True),
            ("user_0000375_sexuality_size_queen_00010_u.jpg", "FAIL", False, True),
            ("user_0000249_harassment_manipulation_00010_u.jpg", "PASS", True, True)]
    records = [{"banned_categories_respected": b, "banned_categories_found": [], "allowed_categories_respected": al,
                "quality_score": 80, "overall_assessment": v, "explanation": "...", "appropriateness_score": 60,
                "image_path": base + n, "user_id": n[5:12]} for n, v, b, al in rows]
    records.append({"error": "API error", "image_path": base + "user_0000249_hate_x_00010_u.jpg",
                    "user_id": "0000249"})
    return records


def test_summarize_reference_records(tmp_path):
    path = tmp_path / "sage_seen_psa_sd15_results.json"
    path.write_text(json.dumps(_reference_evaluate_records(), indent=2))
    r = _cli("summarize", "--records", str(path), "--out", str(tmp_path / "s1"))
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s1" / "summary.json").read_text())
    assert s["kind"] == "evaluate" and s["n"] == 4 and s["errors"] == 1 and s["pass_rate"] == 0.5
    assert s["banned_respected_rate"] == 0.5 and s["allowed_respected_rate"] == 1.0
    assert 0 <= s["pass_rate_ci"][0] <= 0.5 <= s["pass_rate_ci"][1] <= 1
    assert s["by_category"]["Shocking"]["pass_rate"] == 1.0 and s["judge_model"] is None

    verdicts = ["B"] * 6 + ["A"] * 3 + ["EQUAL"]
    cmp = [{"image_a_assessment": {}, "image_b_assessment": {}, "better_content_control": v,
            "model_a_name": "base", "model_b_name": "user_adapter",
            "model_a_image_name": f"user_0000106_hate_c{i}_00010_u.jpg", "user_id": "0000106"}
           for i, v in enumerate(verdicts)]
    path = tmp_path / "cmp.json"
    path.write_text(json.dumps(cmp))
    r = _cli("summarize", "--records", str(path), "--out", str(tmp_path / "s2"))
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s2" / "summary.json").read_text())
    assert (s["win_rate_a"], s["win_rate_b"], s["tie_rate"]) == (0.3, 0.6, 0.1)
    assert s["position_consistency"] is None and s["orders"] == 1 and s["n"] == 10
    assert s["name_a"] == "base" and s["name_b"] == "user_adapter"
    assert s["win_rate_b_ci"][0] < 0.6 < s["win_rate_b_ci"][1]
    # a summary file is not per-image records: one clear line
    (tmp_path / "summary_like.json").write_text(json.dumps({"sage_seen": {"psa_sd15": {"pass_rate": 85.5}}}, indent=1))
    r = _cli("summarize", "--records", str(tmp_path / "summary_like.json"), "--out", str(tmp_path / "s3"))
    assert r.returncode == 1 and "not per-image records" in r.stderr and "Traceback" not in r.stderr


def test_summarize_our_records_gives_the_run_summary(tmp_path):
    a = _write(tmp_path / "a", NAMES, lambda k: BLUE if k % 2 else RED)
    b = _write(tmp_path / "b", NAMES, (60, 20, 120))
    with FakeChatServer(colour_responder) as server:
        run = compare_folders(_judge(server), a, b, _users(), tmp_path / "cmp")
    again = summarize_records(read_jsonl(tmp_path / "cmp" / "records.jsonl"))
    for key in ("n", "win_rate_a", "win_rate_a_ci", "win_rate_b", "tie_rate", "position_consistency"):
        assert again[key] == run[key]
    r = _cli("summarize", "--records", str(tmp_path / "cmp" / "records.jsonl"), "--out", str(tmp_path / "s"))
    assert r.returncode == 0 and json.loads((tmp_path / "s" / "summary.json").read_text())["judge_model"] == \
        "judge-model-1"
    assert summarize_reference(_reference_evaluate_records())["n"] == 4


def test_read_users_from_the_reference_table(upstream_data):
    users = read_users(upstream_data / "users" / "users.csv")
    assert len(users) == 1001
    u = users["0000001"]
    assert u.banned == ("Propaganda", "Sexuality") and "Violence" in u.allowed and u.profile["Age"] == 18
    clustered = read_users(upstream_data / "users" / "users_cluster.csv")  # has a User_ID column
    assert clustered["0000797"].user_id == "0000797" and len(clustered) == 1000
