"""Training: what changes and what must not, resume, bad input, the cache, the config. In-process, tiny models."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import psa_adapter.training as training
from psa_adapter.adapter import AdapterMismatchError
from psa_adapter.config import ConfigError, TrainConfig, load_yaml_config, parse_train_args
from psa_adapter.data import MissingEmbeddingError, SageDataset, open_embedding_store
from psa_adapter.data.synthetic import write_npy_embeddings, write_tiny_sage
from psa_adapter.loss import dpo_loss
from psa_adapter.testing import save_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
USERS = {"0000001": ["Violence"], "0000002": []}


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_accelerate(fresh_accelerate):
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_sage(root / "sage", "train", USERS)
    write_npy_embeddings(root / "embeds", USERS, dim=16)
    return {"root": root, "sd15": save_tiny_pipeline("sd15", root / "sd15"), "sage": root / "sage",
            "embeds": root / "embeds"}


def _config(tiny, out, **overrides) -> TrainConfig:
    values = dict(sd_model=str(tiny["sd15"]), train_data_dir=str(tiny["sage"]), embeds_folder=str(tiny["embeds"]),
                  output_dir=str(out), resolution=32, train_batch_size=2, gradient_accumulation_steps=1,
                  max_train_steps=3, learning_rate=1e-3, lr_warmup_steps=0, mixed_precision="no",
                  checkpointing_steps=100, report_to="none", seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def _train_steps(models, branch, dataset, steps, lr=1e-3):
    model = training.DPOModel(models.unet, branch)
    optimizer = torch.optim.AdamW(branch.trainable_parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        batch = torch.utils.data.default_collate([dataset[(step, i)] for i in range(4)])
        noisy, t, target, hidden, users, added = training.diffusion_inputs(batch, models, 32, torch.device("cpu"))
        policy, ref = model(noisy, t, hidden, users, added)
        loss, _ = dpo_loss(policy[:4], policy[4:], ref[:4], ref[4:], target)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses


@pytest.mark.parametrize("num_tokens", [1, 2])
def test_every_trainable_parameter_changes_and_every_frozen_one_is_bit_identical(tiny, tmp_path, num_tokens):
    config = _config(tiny, tmp_path, num_tokens_user=num_tokens, proportion_empty_prompts=0.0)
    models = training.load_models(config, torch.device("cpu"), torch.float32)
    dataset = SageDataset(config.train_data_dir, embeddings=open_embedding_store(config.embeds_folder),
                          resolution=32)
    frozen = {k: v.clone() for k, v in models.unet.state_dict().items()}
    frozen.update({f"vae.{k}": v.clone() for k, v in models.vae.state_dict().items()})
    frozen.update({f"text.{k}": v.clone() for k, v in models.pipe.text_encoder.state_dict().items()})
    branch = training.build_branch(config, models.unet, 16, None, None)
    before = {k: v.clone() for k, v in branch.adapter.named_parameters()}
    losses = _train_steps(models, branch, dataset, steps=3)
    assert losses[0] == torch.tensor(math.log(2)).item()  # zero-init adapter == reference, exactly
    trainable = {id(p) for p in branch.trainable_parameters()}
    for name, p in branch.adapter.named_parameters():
        if "to_k_user" in name and num_tokens == 1:
            assert id(p) not in trainable and torch.equal(p, before[name]), name  # no gradient can reach it
        else:
            assert id(p) in trainable and not torch.equal(p, before[name]), f"{name} did not change"
    # While attached, the adapter's branches show in the UNet's state dict (processors are modules); nothing else
    # was added to it.
    after = dict(models.unet.state_dict())
    attached = sorted(k for k in after if ".processor.branch." in k)
    assert len(attached) == 2 * len(branch.adapter.config.layers)
    after = {k: v for k, v in after.items() if k not in attached}
    after.update({f"vae.{k}": v for k, v in models.vae.state_dict().items()})
    after.update({f"text.{k}": v for k, v in models.pipe.text_encoder.state_dict().items()})
    assert set(after) == set(frozen)
    for name, value in frozen.items():
        assert torch.equal(after[name], value), f"frozen {name} changed"


def test_train_runs_checkpoints_rotates_and_saves_the_final_adapter(tiny, tmp_path):
    out = tmp_path / "run"
    config = _config(tiny, out, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2,
                     gradient_accumulation_steps=2, validation_steps=4, validation_num_inference_steps=2)
    assert training.train(config) == out
    assert [p.name for p in training.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))
    from psa_adapter.adapter import PSAAdapter

    adapter = PSAAdapter.from_pretrained(out)
    assert adapter.config.embed_dim == 16
    assert yaml.safe_load((out / "resolved_config.yaml").read_text())["max_train_steps"] == 4
    state = json.loads((out / "checkpoint-4" / "training_state.json").read_text())
    assert state["global_step"] == 4
    grid = out / "validation" / "step-000004.png"
    assert grid.is_file()
    labels = json.loads(grid.with_suffix(".json").read_text())
    assert labels["columns"] == ["base", "0000001", "0000002"]


def _adapter_weights(folder):
    return load_file(str(Path(folder) / "psa_adapter.safetensors"))


def test_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    common = dict(max_train_steps=4, checkpointing_steps=2, gradient_accumulation_steps=2)
    training.train(_config(tiny, tmp_path / "full", **common))
    interrupted = _config(tiny, tmp_path / "resumed", stop_after_steps=2, **common)
    assert training.train(interrupted) is None  # stopped as if killed after step 2
    assert not (tmp_path / "resumed" / "psa_adapter.safetensors").exists()
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir()
    training.train(_config(tiny, tmp_path / "resumed", resume_from_checkpoint="latest", **common))
    full, resumed = _adapter_weights(tmp_path / "full"), _adapter_weights(tmp_path / "resumed")
    assert any(v.abs().max() > 0 for k, v in full.items() if "to_v_user" in k)  # it trained
    for key, value in full.items():
        assert (value - resumed[key]).abs().max().item() <= 1e-6, key


def test_nan_loss_stops_with_the_step_and_last_checkpoint(tiny, tmp_path, monkeypatch):
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = dpo_loss(*args, **kwargs)
        return (loss * float("nan"), metrics) if calls["n"] == 3 else (loss, metrics)

    monkeypatch.setattr(training, "dpo_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(training.NonFiniteLossError, match=r"step 3 .*checkpoint-2"):
        training.train(_config(tiny, out, max_train_steps=5, checkpointing_steps=1))
    assert [p.name for p in training.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert (out / "checkpoint-2" / "trainable" / "psa_adapter.safetensors").is_file()
    assert not (out / "psa_adapter.safetensors").exists()


def test_resume_with_a_different_adapter_is_a_clear_error(tiny, tmp_path):
    out = tmp_path / "mismatch"
    training.train(_config(tiny, out, max_train_steps=1, checkpointing_steps=1))
    with pytest.raises(AdapterMismatchError, match="num_tokens: checkpoint 1, this run 2"):
        training.train(_config(tiny, out, max_train_steps=2, num_tokens_user=2, resume_from_checkpoint="latest"))
    assert (out / "checkpoint-1" / "trainable" / "psa_adapter.safetensors").is_file()  # nothing lost
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        training.train(_config(tiny, out, resume_from_checkpoint=str(tmp_path / "nowhere")))


def test_resume_refuses_a_checkpoint_of_another_data_order(tiny, tmp_path, caplog):
    out = tmp_path / "order"
    training.train(_config(tiny, out, max_train_steps=1, checkpointing_steps=1))
    state_file = out / "checkpoint-1" / training.STATE_NAME
    state = json.loads(state_file.read_text())
    assert state["run"]["train_batch_size"] == 2 and state["run"]["data"]["records"] == 8

    def resume(**overrides):
        values = dict(max_train_steps=2, checkpointing_steps=100, resume_from_checkpoint="latest")
        return training.train(_config(tiny, out, **{**values, **overrides}))

    cases = [
        (dict(train_batch_size=1), "train_batch_size: checkpoint 2, this run 1"),
        (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps: checkpoint 1, this run 2"),
        (dict(seed=1), "seed: checkpoint 0, this run 1"),
        (dict(max_train_samples=6), r"data set: checkpoint .*metadata.jsonl \(8 records.*this run .*\(6 records"),
        (dict(pair_balance="category"), "pair_balance: checkpoint 'none', this run 'category'"),
    ]
    resolved = (out / training.CONFIG_NAME).read_text()
    for overrides, message in cases:
        with pytest.raises(training.ResumeMismatchError, match=message):
            resume(**overrides)
        assert (out / training.CONFIG_NAME).read_text() == resolved  # a refused resume writes nothing
    # Same records, other content (one caption edited): another data set.
    edited = tmp_path / "edited"
    shutil.copytree(tiny["sage"], edited)
    metadata = edited / "train" / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace('"caption": "', '"caption": "x', 1))
    with pytest.raises(training.ResumeMismatchError, match=r"data set: .*\(8 records, sha256 \w+\), this run "
                                                           r".*edited.*\(8 records"):
        resume(train_data_dir=str(edited))
    # A process count cannot change in one process; a checkpoint that says 2 stands for a two-process run.
    state_file.write_text(json.dumps({**state, "run": {**state["run"], "num_processes": 2}}))
    with pytest.raises(training.ResumeMismatchError, match="num_processes: checkpoint 2, this run 1"):
        resume()
    assert (out / "checkpoint-1" / "trainable" / "psa_adapter.safetensors").is_file()  # nothing lost
    # A checkpoint of an older version has no record: it resumes with a warning. The split folder itself as
    # train_data_dir (the reference's form) is the same data set as the SAGE root.
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "run"}))
    with caplog.at_level("WARNING", logger="psa_adapter.training"):
        assert resume(train_data_dir=str(tiny["sage"] / "train")) == out
    assert "records no batch size, accumulation, process count, seed or data set" in caplog.text
    assert json.loads((out / "checkpoint-1" / training.STATE_NAME).read_text()).get("run") is None


def test_resume_accepts_the_same_data_set_in_the_split_folder_form(tiny, tmp_path):
    out = tmp_path / "forms"
    training.train(_config(tiny, out, max_train_steps=1, checkpointing_steps=1))
    assert training.train(_config(tiny, out, max_train_steps=2, checkpointing_steps=1,
                                  train_data_dir=str(tiny["sage"] / "train"), resume_from_checkpoint="latest")) == out
    state = json.loads((out / "checkpoint-2" / training.STATE_NAME).read_text())
    assert state["global_step"] == 2 and state["run"]["data"]["metadata"].endswith("train/metadata.jsonl")


def test_train_py_turns_bad_input_into_one_clear_message(tiny, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--sd_model", str(tiny["sd15"]), "--train_data_dir", str(tiny["sage"]), "--embeds_folder",
            str(tiny["embeds"]), "--output_dir", str(tmp_path), "--report_to", "none", "--mixed_precision", "no"]
    assert script.main([*args, "--sdxl"]) == 1
    assert "error: --sdxl True contradicts the model" in capsys.readouterr().err
    assert script.main([*args, "--sd_model", str(tmp_path / "no_model")]) == 1
    assert "model folder not found" in capsys.readouterr().err


def test_missing_user_embedding_fails_before_training(tiny, tmp_path):
    embeds = write_npy_embeddings(tmp_path / "partial", ["0000001"], dim=16)
    with pytest.raises(MissingEmbeddingError, match="no embedding for user 0000002"):
        training.train(_config(tiny, tmp_path / "out", embeds_folder=str(embeds)))
    # Validation columns are checked up front too; level L0 is the fixed user 0001001, absent from this store.
    with pytest.raises(MissingEmbeddingError, match="user 0001001 .*validation"):
        training.train(_config(tiny, tmp_path / "out", validation_steps=1, validation_users=["0000001", "L0"]))


def test_reference_pass_is_exactly_a_separate_frozen_unet(tiny, tmp_path):
    import copy

    config = _config(tiny, tmp_path)
    models = training.load_models(config, torch.device("cpu"), torch.float32)
    base_unet = copy.deepcopy(models.unet)  # what a two-UNet design would keep
    branch = training.build_branch(config, models.unet, 16, None, None)
    with torch.no_grad():
        for p in branch.adapter.parameters():
            p.normal_(0, 0.5)  # a trained-looking adapter: the policy now differs from the base
    model = training.DPOModel(models.unet, branch)
    g = torch.Generator().manual_seed(0)
    noisy, hidden, users = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g), \
        torch.randn(2, 16, generator=g)
    t = torch.tensor([10, 900])
    policy, ref = model(noisy, t, hidden, users)
    with torch.no_grad():
        expected = base_unet(noisy, t, hidden).sample
    assert torch.equal(ref, expected)
    assert not torch.allclose(policy, expected)


def test_cached_conditioning_gives_the_same_inputs_and_training(tiny, tmp_path):
    from psa_adapter.data.cache import build_conditioning_cache

    config = _config(tiny, tmp_path, proportion_empty_prompts=0.5)
    models = training.load_models(config, torch.device("cpu"), torch.float32)
    store = open_embedding_store(config.embeds_folder)
    plain = SageDataset(config.train_data_dir, embeddings=store, resolution=32, proportion_empty_prompts=0.5)
    cached = SageDataset(config.train_data_dir, embeddings=store, resolution=32, proportion_empty_prompts=0.5)
    cached.cache = build_conditioning_cache(tmp_path / "c", cached, models.vae, models.conditioner, model="m",
                                            dtype=torch.float32, show_progress=False)
    keys = [(e, i) for e in range(2) for i in range(len(plain))]
    collate = torch.utils.data.default_collate
    a = training.diffusion_inputs(collate([plain[k] for k in keys]), models, 32, torch.device("cpu"))
    b = training.diffusion_inputs(collate([cached[k] for k in keys]), models, 32, torch.device("cpu"))
    for x, y in zip(a[:5], b[:5]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    # The full range is the default; a window restricts the draws; a window outside the scheduler is an error.
    full = training.diffusion_inputs(collate([cached[k] for k in keys]), models, 32, torch.device("cpu"), (0, None))
    assert torch.equal(full[1], b[1])
    window = training.diffusion_inputs(collate([cached[k] for k in keys]), models, 32, torch.device("cpu"),
                                       (100, 110))
    assert ((window[1] >= 100) & (window[1] < 110)).all()
    with pytest.raises(ValueError, match=r"timestep range \[0, 5000\) is not inside"):
        training.diffusion_inputs(collate([cached[k] for k in keys]), models, 32, torch.device("cpu"), (0, 5000))

    training.train(_config(tiny, tmp_path / "plain", max_train_steps=2))
    training.train(_config(tiny, tmp_path / "cached", max_train_steps=2, cache_conditioning=True))
    caches = list((tmp_path / "cached" / "cache").glob("*/cache_info.json"))
    assert len(caches) == 1
    plain, cached = _adapter_weights(tmp_path / "plain"), _adapter_weights(tmp_path / "cached")
    for key, value in plain.items():
        # Adam turns tiny numerical differences into differences well below one step (lr 1e-3).
        torch.testing.assert_close(cached[key], value, atol=1e-4, rtol=0)
    # A second run reuses the cache instead of rebuilding it.
    mtime = caches[0].stat().st_mtime_ns
    training.train(_config(tiny, tmp_path / "cached2", max_train_steps=1, cache_conditioning=True,
                           cache_dir=str(tmp_path / "cached" / "cache")))
    assert caches[0].stat().st_mtime_ns == mtime


def test_non_personalised_lora_baseline_trains_and_loads_with_diffusers(tiny, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    config = _config(tiny, out, mode="non_personalised", embeds_folder=None, max_train_steps=2,
                     checkpointing_steps=1, learning_rate=1e-2)
    training.train(config)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny["sd15"]), safety_checker=None)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(latents, 500, hidden).sample
        pipe.load_lora_weights(str(out))
        tuned = pipe.unet(latents, 500, hidden).sample
    assert not torch.equal(base, tuned)
    # Resuming a LoRA run restores its weights.
    training.train(_config(tiny, out, mode="non_personalised", embeds_folder=None, max_train_steps=3,
                           resume_from_checkpoint="latest"))


# ---------------------------------------------------------------------------------------------------- config
def test_yaml_then_flags_precedence_and_numbers_like_5e_6(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sd_model: m\ntrain_data_dir: d\nembeds_folder: e\nlearning_rate: 5e-6\ntrain_batch_size: 3\n")
    config = parse_train_args(["--config", str(path), "--train_batch_size", "5", "--gradient_checkpointing"])
    assert config.learning_rate == 5e-6 and config.train_batch_size == 5 and config.gradient_checkpointing
    assert config.beta_dpo == 5000.0  # untouched default
    config.save_yaml(tmp_path / "resolved.yaml")
    assert TrainConfig.from_yaml(tmp_path / "resolved.yaml") == config


@pytest.mark.parametrize("text,message", [
    ("sd_model: m\ntrain_data_dir: d\nembeds_folder: e\nlerning_rate: 1\n", "unknown config keys .*lerning_rate"),
    ("sd_model: m\ntrain_data_dir: d\nembeds_folder: e\nmixed_precision: fp8\n", "mixed_precision must be one of"),
    ("sd_model: m\ntrain_data_dir: d\nproportion_empty_prompts: 1.5\n", "embeds_folder is required.*proportion"),
    ("sd_model: m\ntrain_data_dir: d\nembeds_folder: e\ntrain_batch_size: two\n", "train_batch_size must be int"),
    ("sd_model: m\ntrain_data_dir: d\nembeds_folder: e\nmin_timestep: 700\nmax_timestep: 100\n",
     "need 0 <= min_timestep < max_timestep, got 700 and 100"),
    ("sd_model: m\ntrain_data_dir: d\nembeds_folder: e\npair_balance: uniform\n",
     "pair_balance must be one of \\('none', 'category'\\), got 'uniform'"),
])
def test_bad_configs_name_the_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_train_args(["--config", str(path)])


def test_shipped_configs_parse_and_carry_the_reference_hyperparameters():
    sd15 = load_yaml_config(REPO / "configs" / "sd15.yaml")
    sdxl = load_yaml_config(REPO / "configs" / "sdxl.yaml")
    assert (sd15["learning_rate"], sd15["beta_dpo"], sd15["train_batch_size"], sd15["gradient_accumulation_steps"],
            sd15["resolution"], sd15["lr_warmup_steps"], sd15["max_train_steps"]) == (5e-6, 5000, 6, 8, 512, 500, 5000)
    assert sdxl["use_adafactor"] and sdxl["gradient_checkpointing"] and sdxl["resolution"] == 1024
    assert (sdxl["train_batch_size"], sdxl["gradient_accumulation_steps"]) == (2, 16)
    for name in ("sd15", "sdxl", "tiny"):
        TrainConfig(**{"sd_model": "m", "train_data_dir": "d", "embeds_folder": "e",
                       **load_yaml_config(REPO / "configs" / f"{name}.yaml")})


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_launchers_run_one_accelerate_line_with_their_config_and_extra_flags(fake_accelerate_env, kind):
    import subprocess

    out = subprocess.run(["bash", str(REPO / "launchers" / f"train_psa_{kind}.sh"), "--seed", "7", "--x", "a b"],
                         env=fake_accelerate_env, capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["launch", str(REPO / "train.py")]
    assert out[2:6] == ["--config", str(REPO / "configs" / f"{kind}.yaml"), "--seed", "7"]


def test_balanced_pairs_variant_draws_every_cell_equally_and_resumes_exactly(tiny, tmp_path):
    assert TrainConfig(sd_model="m", train_data_dir="d", embeds_folder="e").pair_balance == "none"  # the paper's
    dataset = SageDataset(tiny["sage"], embeddings=open_embedding_store(tiny["embeds"]), resolution=32)
    groups = dataset.pair_groups()
    assert groups.count(("Violence", "harmful, safe chosen")) == 1  # user 1 bans Violence
    assert groups.count(("Violence", "harmful, unsafe chosen")) == 1 and groups.count(("Self-Harm",
                                                                                       "safe caption")) == 2
    common = dict(max_train_steps=4, checkpointing_steps=2, gradient_accumulation_steps=2)
    training.train(_config(tiny, tmp_path / "uniform", **common))
    training.train(_config(tiny, tmp_path / "full", pair_balance="category", **common))
    assert training.train(_config(tiny, tmp_path / "resumed", pair_balance="category", stop_after_steps=2,
                                  **common)) is None
    training.train(_config(tiny, tmp_path / "resumed", pair_balance="category", resume_from_checkpoint="latest",
                           **common))
    uniform, full = _adapter_weights(tmp_path / "uniform"), _adapter_weights(tmp_path / "full")
    resumed = _adapter_weights(tmp_path / "resumed")
    assert all((full[k] - resumed[k]).abs().max().item() <= 1e-6 for k in full)
    assert any((full[k] - uniform[k]).abs().max().item() > 1e-6 for k in full)  # another data order
