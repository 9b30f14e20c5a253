"""Baselines by name (psa_adapter.baselines): SafetyDPO, SLD, ESD-u / UCE, prompt-based safety; tiny models, CPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from psa_adapter.infer_cli import main

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_SLD = {  # guidance scale / warm-up steps / threshold / momentum scale / momentum beta (SLD paper)
    "weak": (200, 15, 0.0, 0.0, 0.0), "medium": (1000, 10, 0.01, 0.3, 0.4),
    "strong": (2000, 7, 0.025, 0.5, 0.7), "max": (5000, 0, 1.0, 0.5, 0.7),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from psa_adapter.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("baselines")
    return {"root": root, "sd15": save_tiny_pipeline("sd15", root / "sd15")}


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _manifest(folder):
    return [json.loads(line) for line in (Path(folder) / "manifest.jsonl").read_text().splitlines()]


def _infer(assets, out, *flags, steps=4, prompt="a red cube with a knife"):
    code = main(["--sd_model", assets["sd15"], "--prompt", prompt, "--save_path", out, "--steps", str(steps), *flags])
    assert code == 0
    return _pixels(Path(out) / "00000.png")


def _error(capsys, argv, status=1):
    """Run infer.py in-process on bad input: the exit status and its one error line."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------------------ SLD
def test_sld_presets_are_the_published_ones():
    from psa_adapter.baselines.sld import DEFAULT_PRESET, SLD_PRESETS, diffusers_safe_pipeline_class

    assert {k: (p.guidance_scale, p.warmup_steps, p.threshold, p.momentum_scale, p.mom_beta)
            for k, p in SLD_PRESETS.items()} == PUBLISHED_SLD
    assert DEFAULT_PRESET == "medium"
    if diffusers_safe_pipeline_class() is None:
        return
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    # diffusers' own table agrees except for Weak's guidance scale (20 there, 200 in the paper).
    for name in ("medium", "strong", "max"):
        assert SLD_PRESETS[name].diffusers_kwargs() == getattr(SafetyConfig, name.upper())
    weak = dict(SafetyConfig.WEAK)
    assert weak.pop("sld_guidance_scale") == 20
    assert {k: v for k, v in SLD_PRESETS["weak"].diffusers_kwargs().items() if k != "sld_guidance_scale"} == weak


@pytest.mark.parametrize("preset", ["weak", "medium", "strong", "max"])
def test_our_guidance_equals_diffusers_safe_pipeline(preset):
    from psa_adapter.baselines.sld import (
        SLD_PRESETS,
        diffusers_safe_pipeline_class,
        generate_sld,
        generate_with_safe_pipeline,
        safe_pipeline_from,
    )
    from psa_adapter.pipeline import generate
    from psa_adapter.testing import tiny_sd15_pipeline

    if diffusers_safe_pipeline_class() is None:
        pytest.skip("the installed diffusers has no StableDiffusionPipelineSafe")
    pipe = tiny_sd15_pipeline()
    prompts, seeds, concept, p = ["a red cube", "a dog in the rain"], [3, 4], "violence, blood", SLD_PRESETS[preset]
    steps = 18  # past Weak's 15 warm-up steps
    common = dict(negative_prompt="blurry", guidance_scale=7.5, num_inference_steps=steps, output_type="np")
    ours = generate_sld(pipe, prompts, seeds, p, concept, **common)
    safe = safe_pipeline_from(pipe)
    safe.safety_concept = concept
    theirs = generate_with_safe_pipeline(safe, prompts, seeds, p, **common)
    base = generate(pipe, prompts, seeds, **common)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(ours - base).max() > 100 * np.abs(ours - theirs).max()  # the guidance did something


def test_our_guidance_runs_on_sdxl_and_needs_cfg():
    from psa_adapter.baselines.sld import SLD_PRESETS, generate_sld
    from psa_adapter.pipeline import generate
    from psa_adapter.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    common = dict(num_inference_steps=4, output_type="np")
    base = generate(pipe, ["a red cube"], [1], **common)
    sld = generate_sld(pipe, ["a red cube"], [1], SLD_PRESETS["max"], "violence", **common)
    assert sld.shape == base.shape and np.abs(sld - base).max() > 1e-3
    # Without classifier-free guidance SLD is off (diffusers' rule), and the hook is gone afterwards.
    off = generate_sld(pipe, ["a red cube"], [1], SLD_PRESETS["max"], "violence", guidance_scale=1.0, **common)
    assert np.array_equal(off, generate(pipe, ["a red cube"], [1], guidance_scale=1.0, **common))
    assert not pipe.unet._forward_hooks
    assert np.array_equal(generate(pipe, ["a red cube"], [1], **common), base)


@pytest.mark.slow
def test_each_sld_preset_through_infer_py_differs_from_base(assets, tmp_path):
    steps = {"weak": 50, "medium": 12, "strong": 12, "max": 12}  # Weak acts only after its 15 warm-up steps
    base = {n: _infer(assets, tmp_path / f"base{n}", steps=n) for n in set(steps.values())}
    for preset, n in steps.items():
        image = _infer(assets, tmp_path / preset, "--method", "sld", "--sld_preset", preset, steps=n)
        assert np.abs(image - base[n]).max() > 0, preset
        entry = _manifest(tmp_path / preset)[0]
        values = PUBLISHED_SLD[preset]
        assert entry["method"] == "sld" and entry["sld_preset"] == preset and entry["sld_impl"] == "diffusers"
        assert (entry["sld_guidance_scale"], entry["sld_warmup_steps"], entry["sld_threshold"],
                entry["sld_momentum_scale"], entry["sld_mom_beta"]) == values
        assert entry["sld_concept"] == "hate, harassment, violence, self-harm, sexuality, shocking, propaganda"
    ours = _infer(assets, tmp_path / "ours", "--method", "sld", "--sld_preset", "max", "--sld_impl", "ours",
                  "--sld_concept", "blood", steps=12)
    assert _manifest(tmp_path / "ours")[0]["sld_impl"] == "ours"
    assert _manifest(tmp_path / "ours")[0]["sld_concept"] == "blood"
    assert np.abs(ours - base[12]).max() > 0


# ------------------------------------------------------------------------------------------------------ SafetyDPO
@pytest.fixture(scope="module")
def safetydpo(assets):
    """A SafetyDPO LoRA trained by train.py's trainer on a tiny SAGE-format split."""
    pytest.importorskip("peft")
    import psa_adapter.training as training
    from psa_adapter.config import TrainConfig
    from psa_adapter.data.synthetic import write_tiny_sage
    from psa_adapter.testing import reset_accelerate_state

    root = assets["root"]
    write_tiny_sage(root / "sage", "train")
    out = root / "safetydpo"
    config = TrainConfig(sd_model=str(assets["sd15"]), train_data_dir=str(root / "sage"), output_dir=str(out),
                         mode="non_personalised", resolution=32, train_batch_size=2, gradient_accumulation_steps=1,
                         max_train_steps=2, learning_rate=1e-2, lr_warmup_steps=0, mixed_precision="no",
                         checkpointing_steps=100, report_to="none", seed=0)
    reset_accelerate_state()
    try:
        training.train(config)
    finally:
        reset_accelerate_state()
    return {"config": config, "out": out}


def test_safetydpo_loss_is_ln2_at_initialisation(assets, safetydpo):
    import psa_adapter.training as training
    from psa_adapter.data import SageDataset
    from psa_adapter.loss import dpo_loss

    config = safetydpo["config"]
    models = training.load_models(config, torch.device("cpu"), torch.float32)
    branch = training.build_branch(config, models.unet, None, None, None)
    assert isinstance(branch, training.LoRABranch)
    dataset = SageDataset(config.train_data_dir, non_personalised=True, resolution=32)
    torch.manual_seed(0)
    batch = torch.utils.data.default_collate([dataset[(0, i)] for i in range(4)])
    noisy, t, target, hidden, users, added = training.diffusion_inputs(batch, models, 32, torch.device("cpu"))
    policy, ref = training.DPOModel(models.unet, branch)(noisy, t, hidden, users, added)
    loss, metrics = dpo_loss(policy[:4], policy[4:], ref[:4], ref[4:], target)
    assert loss.item() == torch.tensor(math.log(2)).item()  # LoRA B = 0 at init: policy == reference exactly
    assert metrics["implicit_acc"].item() == 0.5


def test_safetydpo_saves_reloads_with_diffusers_and_changes_the_output(assets, safetydpo, tmp_path):
    from diffusers import StableDiffusionPipeline

    weights = safetydpo["out"] / "pytorch_lora_weights.safetensors"
    assert weights.is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(assets["sd15"]), safety_checker=None)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(latents, 500, hidden).sample
        pipe.load_lora_weights(str(safetydpo["out"]))  # diffusers' own loader
        after = pipe.unet(latents, 500, hidden).sample
    assert not torch.equal(before, after)
    # Through infer.py by name, from the folder and from the file; recorded in the manifest.
    base = _infer(assets, tmp_path / "base")
    tuned = _infer(assets, tmp_path / "dpo", "--method", "safetydpo", "--lora_path", safetydpo["out"])
    from_file = _infer(assets, tmp_path / "file", "--method", "safetydpo", "--lora_path", weights)
    assert np.abs(tuned - base).max() > 0 and np.array_equal(tuned, from_file)
    entry = _manifest(tmp_path / "dpo")[0]
    assert entry["method"] == "safetydpo" and entry["lora"] == str(safetydpo["out"])


@pytest.mark.slow
def test_a_lora_for_another_base_model_is_a_clear_error(assets, tmp_path, capsys):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from psa_adapter.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pipe.save_lora_weights(str(tmp_path / "sdxl_lora"), unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    message = _error(capsys, ["--sd_model", assets["sd15"], "--prompt", "x", "--save_path", tmp_path / "o",
                              "--method", "safetydpo", "--lora_path", tmp_path / "sdxl_lora", "--steps", "1"])
    assert str(tmp_path / "sdxl_lora") in message and "another base model" in message
    assert "do not match" in message and "unet." in message
    assert not list((tmp_path / "o").glob("*.png"))
    # Through a real process: exit status 1, one line, no traceback.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "infer.py"), "--sd_model", str(assets["sd15"]), "--prompt",
                             "x", "--save_path", str(tmp_path / "o2"), "--method", "safetydpo", "--lora_path",
                             str(tmp_path / "sdxl_lora")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "infer.py: error: the LoRA " + str(tmp_path / "sdxl_lora") in result.stderr


# ------------------------------------------------------------------------------------------------------ ESD / UCE
def _unet_state(assets):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(assets["sd15"], subfolder="unet").state_dict()


def test_strict_unet_loading_names_missing_unexpected_and_misshaped_keys(assets, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from psa_adapter.baselines.unet_weights import load_unet_weights
    from psa_adapter.methods import MethodError

    unet = UNet2DConditionModel.from_pretrained(assets["sd15"], subfolder="unet")
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    removed = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    missing = {k: v for k, v in state.items() if k != removed}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(MethodError) as info:
        load_unet_weights(unet, tmp_path / "missing.safetensors")
    assert "1 missing keys: " + removed in str(info.value) and str(tmp_path / "missing.safetensors") in str(info.value)
    shaped = dict(state)
    key = "mid_block.attentions.0.proj_in.weight"
    shaped[key] = torch.zeros(3, *state[key].shape[1:])
    torch.save(shaped, tmp_path / "shaped.bin")  # a legacy torch file, read with weights_only=True
    with pytest.raises(MethodError) as info:
        load_unet_weights(unet, tmp_path / "shaped.bin")
    assert f"1 wrongly shaped keys: {key} (file {(3, *state[key].shape[1:])}, model {tuple(state[key].shape)})" in \
        str(info.value)
    extra = {**state, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(MethodError, match="1 unexpected keys: model.diffusion_model.input_blocks.0.0.weight.*CompVis"):
        load_unet_weights(unet, tmp_path / "extra.safetensors")
    # Nothing was loaded by the failed attempts; a partial file is refused unless --unet_partial says so.
    assert all(torch.equal(unet.state_dict()[k], state[k]) for k in state)
    only = {removed: torch.ones_like(state[removed])}
    save_file(only, tmp_path / "only.safetensors")
    with pytest.raises(MethodError, match=f"{len(state) - 1} missing keys"):
        load_unet_weights(unet, tmp_path / "only.safetensors")
    assert load_unet_weights(unet, tmp_path / "only.safetensors", allow_missing=True) == 1
    assert torch.equal(unet.state_dict()[removed], torch.ones_like(state[removed]))


@pytest.mark.parametrize("method", ["esd", "uce"])
def test_esd_and_uce_generate_with_the_given_unet(assets, tmp_path, method, capsys):
    from safetensors.torch import save_file

    state = _unet_state(assets)
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    state[key] = state[key] * 3
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "erased.safetensors")
    base = _infer(assets, tmp_path / "base")
    erased = _infer(assets, tmp_path / method, "--method", method, "--unet_weights", tmp_path / "erased.safetensors")
    assert np.abs(erased - base).max() > 0
    entry = _manifest(tmp_path / method)[0]
    assert entry["method"] == method and entry["unet_weights"] == str(tmp_path / "erased.safetensors")
    # A file with one key removed, through infer.py: one line naming the file and the key.
    del state[key]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "bad.safetensors")
    message = _error(capsys, ["--sd_model", assets["sd15"], "--prompt", "x", "--save_path", tmp_path / "o",
                              "--method", method, "--unet_weights", tmp_path / "bad.safetensors"])
    assert str(tmp_path / "bad.safetensors") in message and f"1 missing keys: {key}" in message
    assert f"--method {method} needs --unet_weights" in _error(
        capsys, ["--sd_model", assets["sd15"], "--prompt", "x", "--save_path", tmp_path / "o", "--method", method])


# ------------------------------------------------------------------------------------------------ prompt-based
def test_prompt_based_safety_negative_and_instruction(assets, tmp_path):
    from psa_adapter.users import load_level

    base = _infer(assets, tmp_path / "base")
    neg = _infer(assets, tmp_path / "neg", "--method", "prompt", "--level", "L5")
    ins = _infer(assets, tmp_path / "ins", "--method", "prompt", "--prompt_mode", "instruction", "--level", "L5")
    assert np.abs(neg - base).max() > 0 and np.abs(ins - base).max() > 0 and np.abs(neg - ins).max() > 0
    entry = _manifest(tmp_path / "neg")[0]
    assert entry["method"] == "prompt" and entry["prompt_mode"] == "negative"
    assert entry["banned"] == list(load_level("L5").banned) and entry["user"] == "L5"
    assert entry["method_prompt"] == "a red cube with a knife"
    assert entry["method_negative_prompt"].startswith("hate, hate speech") and "nudity" in entry[
        "method_negative_prompt"]
    entry = _manifest(tmp_path / "ins")[0]
    assert entry["method_prompt"].startswith("a red cube with a knife, without hate, hate speech")
    assert entry["method_negative_prompt"] is None
    # L0 bans nothing: exactly the base image.
    assert np.array_equal(_infer(assets, tmp_path / "l0", "--method", "prompt", "--level", "L0"), base)


def test_prompt_based_safety_reads_users_from_a_users_csv_and_a_concept_file(assets, tmp_path, capsys):
    from psa_adapter.users import UserProfile, write_users_csv

    users = [UserProfile(user_id=f"{i:07d}", age=30, age_group="young adults", gender="male", religion="None",
                         physical_condition="healthy", mental_condition="healthy", banned=banned)
             for i, banned in ((1, ("Violence",)), (2, ()))]
    write_users_csv(users, tmp_path / "users.csv")
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"violence": ["blood", "gore"]}))
    csv_path = tmp_path / "prompts.csv"
    csv_path.write_text("caption,user_id\na red cube,1\na red cube,2\n")
    code = main(["--sd_model", assets["sd15"], "--prompts_csv", csv_path, "--save_path", tmp_path / "out",
                 "--steps", "2", "--method", "prompt", "--users_csv", tmp_path / "users.csv", "--prompt_concepts",
                 concepts, "--prompt_join", " ", "--negative_prompt", "blurry", "--batch_size", "2"])
    assert code == 0
    entries = _manifest(tmp_path / "out")
    assert [e["method_negative_prompt"] for e in entries] == ["blurry blood gore", "blurry"]
    assert [e["negative_prompt"] for e in entries] == ["blurry", "blurry"]
    assert "does not use users" not in capsys.readouterr().err
    out = ["--sd_model", assets["sd15"], "--save_path", tmp_path / "o", "--method", "prompt"]
    assert "user 0000001 needs its banned categories: pass --users_csv" in _error(
        capsys, [*out, "--prompt", "x", "--user_id", "1"])
    assert "user 0000009 is not in --users_csv" in _error(
        capsys, [*out, "--prompt", "x", "--user_id", "9", "--users_csv", tmp_path / "users.csv"])
    assert "prompt has no user" in _error(capsys, [*out, "--prompt", "x"])
    concepts.write_text(json.dumps({"violent": ["blood"]}))
    assert f"--prompt_concepts {concepts}: unknown category 'violent'" in _error(
        capsys, [*out, "--prompt", "x", "--level", "L1", "--prompt_concepts", concepts])


# -------------------------------------------------------------------------------------------------- bad input
def test_bad_method_input_gives_one_clear_line(assets, tmp_path, capsys):
    out = ["--sd_model", assets["sd15"], "--prompt", "x", "--save_path", tmp_path / "o"]
    message = _error(capsys, [*out, "--method", "sld", "--sld_preset", "extreme"])
    assert "unknown SLD preset 'extreme'; known presets: weak, medium, strong, max" in message
    assert "invalid choice: 'sld2'" in _error(capsys, [*out, "--method", "sld2"], status=2)
    assert "--method psa needs --psa_path" in _error(capsys, [*out, "--method", "psa"], status=2)
    assert "--sld_preset applies to --method sld, not --method base" in _error(capsys, [*out, "--sld_preset", "max"])
    assert "--method safetydpo needs --lora_path" in _error(capsys, [*out, "--method", "safetydpo"])
    assert "--lora_path not found: " + str(tmp_path / "nope") in _error(
        capsys, [*out, "--method", "safetydpo", "--lora_path", tmp_path / "nope"])
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))


def test_every_method_declares_its_flags_on_the_infer_parser():
    from psa_adapter.infer_cli import build_parser
    from psa_adapter.methods import METHODS

    assert {"base", "psa", "safetydpo", "sld", "esd", "uce", "prompt"} <= set(METHODS)
    dests = {a.dest for a in build_parser()._actions}
    for cls in METHODS.values():
        assert set(cls.flags) <= dests, cls.name


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_safetydpo_launchers_train_a_non_personalised_lora(fake_accelerate_env, kind):
    out = subprocess.run(["bash", str(REPO / "launchers" / f"train_safetydpo_{kind}.sh"), "--seed", "7"],
                         env=fake_accelerate_env, capture_output=True, text=True, check=True).stdout.split()
    assert out[:4] == ["launch", str(REPO / "train.py"), "--config", str(REPO / "configs" / f"{kind}.yaml")]
    assert out[4:] == ["--mode", "non_personalised", "--output_dir", f"outputs/safetydpo_{kind}", "--seed", "7"]


# ----------------------------------------------------------------------------------------------------- toy world
def test_toy_rows_use_the_methods_with_the_toy_words():
    from psa_adapter.baselines.prompt import concept_text
    from psa_adapter.toyworld.demo import (
        LABELS,
        METHODS,
        NON_PERSONALISED,
        PROMPT_ROWS,
        SLD_ROWS,
        negative_prompt_for,
        sld_concept,
    )
    from psa_adapter.toyworld.world import ToyWorld, WorldConfig
    from psa_adapter.users import load_level

    world = ToyWorld(WorldConfig())
    words = {c: world.concepts(c) for c in world.categories}
    for level in ("L0", "L1", "L3", "L5"):  # --method prompt gives the toy's former per-row negative prompts
        banned = load_level(level).banned
        assert concept_text(banned, words, " ") == negative_prompt_for(banned, world)
    assert sld_concept(world).split() == [world.concepts(c)[0] for c in world.categories]
    assert [m.removeprefix("sld_") for m in SLD_ROWS] == ["weak", "medium", "strong", "max"]
    assert set(SLD_ROWS) <= set(NON_PERSONALISED) and PROMPT_ROWS == {"prompt": "negative",
                                                                     "prompt_instruction": "instruction"}
    assert set(METHODS) <= set(LABELS) and LABELS["sld_medium"] == "SLD Medium"


def test_toy_table_has_the_new_rows_and_says_esd_uce_were_not_run():
    from psa_adapter.toyworld.demo import LABELS, METHODS, NOT_RUN, format_table

    figures = {"pass_rate_seen": 0.5, "ip": 0.25}
    table = format_table({m: dict(figures) for m in METHODS})
    for method in METHODS:
        assert f"| {LABELS[method]} | 0.500 |" in table
    assert NOT_RUN in table and "ESD-u, UCE: not run" in table


# ------------------------------------------------------------------------------------------- evaluation driver
@pytest.mark.slow
def test_the_evaluation_driver_generates_and_scores_every_baseline_by_name(tmp_path, monkeypatch):
    import csv

    import yaml
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from psa_adapter.evaluation.cli import main as eval_main
    from psa_adapter.evaluation.tiny import write_tiny_eval_workspace
    from psa_adapter.testing import tiny_sd15_pipeline

    monkeypatch.chdir(tmp_path)
    ws = write_tiny_eval_workspace(tmp_path / "outputs" / "eval_tiny")
    pipe = tiny_sd15_pipeline()  # the same seed-0 weights as the workspace's model
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"]))
    pipe.save_lora_weights(str(tmp_path / "lora"), unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    state = UNet2DConditionModel.from_pretrained(ws / "sd15", subfolder="unet").state_dict()
    key = next(k for k in state if k.endswith("attn2.to_v.weight"))
    state[key] = state[key] * 3
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "erased.safetensors")
    data = yaml.safe_load((REPO / "configs" / "eval_tiny.yaml").read_text())
    users_csv = str(ws / "users.csv")
    data["methods"] = {
        "base": {}, "safetydpo": {"lora_path": "lora"}, "sld_max": {"method": "sld", "sld_preset": "max"},
        "esd": {"unet_weights": "erased.safetensors"}, "uce": {"unet_weights": "erased.safetensors"},
        "prompt_negative": {"method": "prompt", "prompt_mode": "negative", "users_csv": users_csv},
        "prompt_instruction": {"method": "prompt", "prompt_mode": "instruction", "users_csv": users_csv},
    }
    data["sets"]["tiny6"].update(levels=["user", "L5"], metrics=["inpro", "pass_rate"])
    data["judge"]["compare"] = []
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(data))
    assert eval_main(["run", "--config", "eval.yaml"]) == 0
    out = tmp_path / "outputs" / "eval_tiny" / "run"
    rows = list(csv.DictReader((out / "tables" / "summary.csv").open()))
    cells = {(r["method"], r["level"], r["metric"]): r for r in rows}
    levels = {"prompt_negative": ["user", "L5"], "prompt_instruction": ["user", "L5"]}
    for method in data["methods"]:
        for level in levels.get(method, ["none"]):
            for metric in ("inpro", "pass_rate"):
                r = cells[(method, level, metric)]
                assert (r["n"], r["missing"]) == ("6", "0"), r
    images = out / "images" / "tiny6" / "sd15"
    base = _pixels(images / "base" / "none" / "tiny_00.png")
    for folder in ("safetydpo/none", "sld_max/none", "esd/none", "uce/none", "prompt_negative/L5",
                   "prompt_instruction/L5"):
        assert np.abs(_pixels(images / folder / "tiny_00.png") - base).max() > 0, folder
        entry = _manifest(images / folder)[0]
        assert entry["method"] == folder.split("/")[0].removesuffix("_max").split("_")[0], entry
    assert _manifest(images / "sld_max" / "none")[0]["sld_preset"] == "max"
