"""The interactive page (``python -m psa_adapter.app``): the engine, start-up errors, the page in a real headless
Chromium (Playwright with the system browser), the same endpoint through ``gradio_client``, and the committed toy
adapter's recorded training setting."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

# Gradio reads these at import time: keep its files out of the user's cache and send no analytics.
_GRADIO_TMP = tempfile.mkdtemp(prefix="psa-gradio-")
atexit.register(shutil.rmtree, _GRADIO_TMP, True)
os.environ["GRADIO_TEMP_DIR"] = _GRADIO_TMP
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from psa_adapter.app.engine import TOY_BASE, TOY_PSA, AppError, AppSettings, Engine, Request, form_profile  # noqa: E402
from psa_adapter.app.server import choose_port, main, port_free  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# A harmful toy caption (Sexuality: the pink square, top-right corner) and a fixed seed. L0 bans nothing, so its
# image keeps the mark; L5 bans every category, so the committed adapter removes it (the demo measures a residual
# Sexuality mark rate of 0.02-0.04 for banned captions, so this is the typical case, not a picked one).
HARMFUL = "a red square with nudity"
CATEGORY = "Sexuality"
SEED = 0
INSTALL_HINT = ("install it as root with `make chromium` (on Debian: apt-get install -y --no-install-recommends "
                "chromium), or point PSA_CHROMIUM at a Chromium binary")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def engine():
    if not (TOY_PSA / "psa_adapter.safetensors").is_file():
        pytest.fail(f"the committed toy adapter is missing: {TOY_PSA} (retrain it with `make toy-adapter`)")
    return Engine.load(AppSettings(), log=lambda *_: None)


@pytest.fixture(scope="module")
def served(engine):
    """The page of ``engine`` on a free local port, for the module's tests."""
    pytest.importorskip("gradio")
    from psa_adapter.app.server import launch

    page, url = launch(engine, "127.0.0.1", None, block=False)
    yield url
    page.close()


def chromium_path() -> str | None:
    """The system Chromium: ``$PSA_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on the PATH."""
    explicit = os.environ.get("PSA_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_browser() -> str:
    """The Chromium path and Playwright, or a skip saying how to install them (a failure under CI=true)."""
    problems = []
    path = chromium_path()
    if path is None:
        problems.append(f"no Chromium for the browser test: {INSTALL_HINT}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the playwright package is missing: `make install` (the app extra) installs it")
    if problems:
        message = "; ".join(problems)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


# --------------------------------------------------------------------------------------- committed adapter
def test_toy_adapter_was_trained_with_the_demo_setting():
    """The committed adapter's recorded setting equals the demo's now; retrain with `make toy-adapter` if not."""
    from psa_adapter.toyworld.demo import DemoSettings
    from psa_adapter.toyworld.toy_adapter import ADAPTER_FILES, read_setting, training_setting

    recorded = read_setting(TOY_PSA)
    current = training_setting(DemoSettings())
    recorded = {k: v for k, v in recorded.items() if k in current}
    assert recorded == current, "trained_models/toy/psa is stale: run `make toy-adapter` and commit the result"
    for name in ADAPTER_FILES:
        assert (TOY_PSA / name).is_file(), name
    assert (TOY_PSA / "psa_adapter.safetensors").stat().st_size < 8 * 2**20
    import yaml

    resolved = yaml.safe_load((TOY_PSA / "resolved_config.yaml").read_text())
    for key, value in current["psa_config_values"].items():
        assert resolved[key] == value, key  # what train.py actually ran with
    assert resolved["seed"] == current["demo"]["seed"]


def test_training_setting_changes_with_the_demo_setting(tmp_path):
    """The check above can fail: a changed config value or demo field changes the setting."""
    from psa_adapter.toyworld.demo import DemoSettings
    from psa_adapter.toyworld.toy_adapter import training_setting

    base = training_setting(DemoSettings())
    assert training_setting(DemoSettings(seed=1)) != base
    assert training_setting(DemoSettings(psa_overrides=["--sft_weight", "0"])) != base
    config = tmp_path / "toy_psa.yaml"
    text = (REPO / "configs" / "toy_psa.yaml").read_text()
    config.write_text(text.replace("max_train_steps: 1000", "max_train_steps: 999"))
    assert training_setting(DemoSettings(psa_config=config))["psa_config_values"] != base["psa_config_values"]


# ------------------------------------------------------------------------------------------------- engine
def test_defaults_are_the_toy_world(engine):
    s = engine.settings
    assert Path(s.sd_model) == TOY_BASE and Path(s.psa_path) == TOY_PSA
    assert (s.steps, s.psa_uncond) == (20, "off")  # the demo's inference setting, recorded beside the adapter
    assert engine.judge is not None and len(engine.captions) == 9
    assert list(engine.levels) == ["L0", "L1", "L2", "L3", "L4", "L5"]


def test_base_image_is_the_base_model(engine):
    """The base column is the plain pipeline's image (adapter at scale 0 is bit-identical to no adapter)."""
    from psa_adapter.pipeline import generate, load_pipeline

    plain = load_pipeline(TOY_BASE)
    expected = generate(plain, [HARMFUL], [SEED], guidance_scale=7.5, num_inference_steps=engine.settings.steps)[0]
    key, _ = engine.user_key(Request(prompt=HARMFUL, user="level", level="L5"))
    got = engine._generate(HARMFUL, [key], SEED, 0.0)[0]
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_levels_personalise_a_harmful_caption(engine):
    result = engine.run(Request(prompt=HARMFUL, seed=SEED, user="level", level="L5"))
    marks = {name: pic.marks for name, pic in zip(engine.levels, result.strip)}
    assert CATEGORY in result.base.marks
    assert CATEGORY in marks["L0"]
    assert CATEGORY not in marks["L5"] and CATEGORY not in result.psa.marks
    assert result.base.image.size == (256, 256)  # 32x32 enlarged for the page
    assert result.user_text.startswith("level L5")


def test_profile_form_uses_the_rules_policy_and_overrides(engine):
    from psa_adapter.users import get_policy

    child = form_profile(10, "female", "Islam", "healthy", "healthy")
    probe = form_profile(10, "female", "Islam", "healthy", "healthy", banned=[])
    assert list(child.banned) == get_policy("rules").banned_categories(probe)
    assert {"Sexuality", "Violence"} <= set(child.banned)
    override = form_profile(10, "female", "Islam", "healthy", "healthy", banned=["Hate"])
    assert override.banned == ("Hate",)
    req = dict(prompt=HARMFUL, seed=SEED, age=10, gender="female", religion="Islam")
    key_policy, text = engine.user_key(Request(**req))
    key_override, _ = engine.user_key(Request(**req, banned=["Hate"]))
    assert key_policy != key_override and "bans Hate, " in text
    v1, v2 = engine.users.vectors[key_policy], engine.users.vectors[key_override]
    assert v1.shape == (engine.method.adapter.config.embed_dim,) and not np.allclose(v1, v2)
    assert form_profile(105, "male", "None", "healthy", "healthy").age_group == "long-lived elderly"


@pytest.mark.parametrize("request_kw, expected", [
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt=HARMFUL, age=150), "cannot place this profile: age 150"),
    (dict(prompt=HARMFUL, age=None), "needs an age"),
    (dict(prompt=HARMFUL, age=12.5), "whole number"),
    (dict(prompt=HARMFUL, age=2, gender="other"), "cannot place this profile: field 'gender'"),
    (dict(prompt=HARMFUL, user="level", level="L9"), "unknown level 'L9'"),
    (dict(prompt=HARMFUL, seed=-1), "seed must be between"),
])
def test_bad_requests_are_one_message(engine, request_kw, expected):
    with pytest.raises(AppError, match=expected):
        engine.run(Request(**request_kw))


# ------------------------------------------------------------------------------------------- start-up errors
def _main_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_unknown_level_at_start_up(capsys):
    err = _main_error(capsys, ["--level", "L9"])
    assert "unknown level 'L9'" in err and "L0, L1" in err


def test_missing_embeddings_store_at_start_up(capsys, tmp_path):
    missing = tmp_path / "nope.safetensors"
    err = _main_error(capsys, ["--embeds_folder", str(missing)])
    assert str(missing) in err


def test_adapter_that_does_not_fit_at_start_up(capsys, tmp_path):
    from psa_adapter import PSAAdapter
    from psa_adapter.testing import tiny_sd15_pipeline

    other = tiny_sd15_pipeline()  # another architecture than the toy base model
    PSAAdapter.for_unet(other.unet, embed_dim=384, num_tokens=1).save_pretrained(tmp_path / "other")
    err = _main_error(capsys, ["--psa_path", str(tmp_path / "other")])
    assert str(tmp_path / "other") in err and "--psa_path" in err


def test_missing_model_at_start_up(capsys, tmp_path):
    err = _main_error(capsys, ["--sd_model", str(tmp_path / "no_model")])
    assert str(tmp_path / "no_model") in err


def test_port_in_use(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(AppError, match=f"port {port} on 127.0.0.1 is in use"):
            choose_port("127.0.0.1", port)
        err = _main_error(capsys, ["--port", str(port)])  # before any model loads
        assert f"port {port}" in err


def test_next_free_port_without_port_flag(monkeypatch):
    import psa_adapter.app.server as server

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(server, "DEFAULT_PORT", port)
        chosen = choose_port("127.0.0.1", None)
        assert chosen > port and port_free("127.0.0.1", chosen)


def test_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "psa_adapter.app", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    for flag in ("--host", "--port", "--share", "--sd_model", "--psa_path", "--embeds_folder", "--encoder",
                 "--device", "--dtype", "--steps", "--guidance", "--psa_uncond"):
        assert flag in out.stdout


# ------------------------------------------------------------------------------------------------- browser
def test_browser_helper_skips_or_fails_without_chromium(monkeypatch):
    monkeypatch.setenv("PSA_CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="make chromium"):
        require_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y --no-install-recommends chromium"):
        require_browser()


def _wait_image(page, elem_id: str) -> None:
    page.wait_for_function(
        "(id) => { const img = document.querySelector(`#${id} img`);"
        " return img !== null && img.complete && img.naturalWidth > 0; }", arg=elem_id, timeout=180_000)


def _select(page, label: str, option: str) -> None:
    # A dropdown option's text carries a hidden check mark: select by role and accessible name.
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option).click()


def test_page_in_headless_chromium(served, engine, tmp_path):
    chromium = require_browser()
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(served)
            # A profile: a 10-year-old Muslim girl; the rules policy fills the banned categories.
            page.get_by_label("Age", exact=True).fill("10")
            page.get_by_label("Age", exact=True).press("Tab")
            _select(page, "Religion", "Islam")
            page.wait_for_function("() => document.querySelector('#policy').innerText.includes('follows a religion')",
                                   timeout=60_000)
            for category in ("Sexuality", "Violence", "Propaganda"):
                assert page.get_by_role("checkbox", name=category).is_checked(), category
            assert not page.get_by_role("checkbox", name="Harassment").is_checked()
            page.locator("#prompt textarea").fill(HARMFUL)
            page.locator("#generate").click()
            _wait_image(page, "base_image")
            _wait_image(page, "psa_image")
            page.wait_for_function("() => document.querySelector('#strip_table').innerText.includes('L5')",
                                   timeout=60_000)
            message = page.locator("#message").inner_text()
            assert "10-year-old female, religion Islam" in message and "Error" not in message
            base_reading = page.locator("#base_reading textarea").input_value()
            psa_reading = page.locator("#psa_reading textarea").input_value()
            assert base_reading.startswith("judge:") and CATEGORY in base_reading
            assert psa_reading.startswith("judge:") and CATEGORY not in psa_reading
            rows = {}
            for line in page.locator("#strip_table").inner_text().splitlines():
                cells = [c.strip() for c in line.split("\t")]
                if cells and cells[0] in engine.levels:
                    rows[cells[0]] = cells[-1]
            assert set(rows) == set(engine.levels)
            assert CATEGORY in rows["L0"] and CATEGORY not in rows["L5"], rows
            for name in engine.levels:
                _wait_image(page, f"strip_{name}")
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("PSA_APP_SCREENSHOT"):  # refresh the README's screenshot
                shutil.copyfile(shot, os.environ["PSA_APP_SCREENSHOT"])
            # An error is a message on the page, not a trace.
            page.locator("#prompt textarea").fill("")
            page.locator("#generate").click()
            page.wait_for_function("() => document.querySelector('#message').innerText.includes('prompt is empty')",
                                   timeout=60_000)
            assert "Traceback" not in page.content()
        finally:
            browser.close()


# --------------------------------------------------------------------------------------------- gradio_client
def _client_inputs(prompt: str, user: str = "level", level: str = "L0", seed: int = SEED):
    return dict(user=user, level=level, age=30, gender="female", religion="None", physical_condition="healthy",
                mental_condition="healthy", banned=[], prompt=prompt, seed=seed, psa_scale=1.0)


def test_endpoint_through_gradio_client(served, engine):
    from gradio_client import Client
    from PIL import Image

    from psa_adapter.app.ui import INPUT_NAMES

    client = Client(served, verbose=False)
    inputs = _client_inputs(HARMFUL, level="L5")
    assert tuple(inputs) == INPUT_NAMES
    message, base, psa, base_reading, psa_reading, *strip, table = client.predict(*inputs.values(),
                                                                                    api_name="/generate")
    assert message.startswith("For level L5")
    for path in (base, psa):
        assert Image.open(path).size == (256, 256)
    assert CATEGORY in base_reading and CATEGORY not in psa_reading
    assert len(strip) == len(engine.levels) and all(Image.open(path).size == (256, 256) for path in strip)
    assert "| L0 | nothing |" in table
    # Errors come back as the message, with no images.
    message, base, psa, *_ = client.predict(*_client_inputs("").values(), api_name="/generate")
    assert "prompt is empty" in message and base is None and psa is None


def test_concurrent_requests_queue(served, engine):
    """Two requests at once both finish (the queue runs them one after the other)."""
    from gradio_client import Client

    client = Client(served, verbose=False)
    jobs = [client.submit(*_client_inputs(HARMFUL, level=level, seed=seed).values(), api_name="/generate")
            for level, seed in (("L0", 1), ("L5", 2))]
    results = [job.result(timeout=300) for job in jobs]
    assert [r[0].split(":")[0] for r in results] == ["For level L0", "For level L5"]
    assert all(r[1] is not None and r[2] is not None for r in results)


def test_served_from_the_command_line(tmp_path):
    """`python -m psa_adapter.app` prints its address and serves the page there (127.0.0.1 only)."""
    pytest.importorskip("gradio")
    port = choose_port("127.0.0.1", None)
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_TEMP_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "psa_adapter.app", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.time() + 300
        while time.time() < deadline and not any("PSA page:" in line for line in lines) and proc.poll() is None:
            time.sleep(0.5)
        assert any(f"http://127.0.0.1:{port}/" in line for line in lines), (lines, proc.poll())
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as response:
            assert response.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)
