"""Toy world: generator, tokenizer, configs and the SAGE-format export (no model weights needed)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from psa_adapter.toyworld.world import CATEGORIES, MARKS, Scene, ToyWorld, WorldConfig, category_slug

SAGE_NAME_RE = re.compile(r"^user_(\d{7})_([a-z-]+)_(.+)_(\d{5})_([su])\.jpg$")


def test_generator_is_deterministic_from_seed():
    a, b, c = ToyWorld(WorldConfig(seed=3)), ToyWorld(WorldConfig(seed=3)), ToyWorld(WorldConfig(seed=4))
    for i in range(20):
        assert a.scene(i) == b.scene(i)
        assert np.array_equal(a.render(a.scene(i), ["Violence"]), b.render(b.scene(i), ["Violence"]))
    assert [a.scene(i) for i in range(20)] != [c.scene(i) for i in range(20)]
    assert a.scene(0, stream=0) != a.scene(0, stream=1)
    pairs_a, pairs_b = a.sample_pairs(30), b.sample_pairs(30)
    assert [p["harmful_caption"] for p in pairs_a] == [p["harmful_caption"] for p in pairs_b]


def test_scenes_cover_every_attribute():
    world = ToyWorld()
    scenes = [world.scene(i) for i in range(300)]
    assert {s.shape for s in scenes} == set(world.shape_names)
    assert {s.colour for s in scenes} == set(world.colour_names)
    assert len({round(s.cx, 3) for s in scenes}) > 100  # jitter is real


def test_safe_image_is_the_harmful_one_without_its_mark():
    world = ToyWorld()
    for i, category in enumerate(world.categories):
        scene = world.scene(i)
        safe, harmful = world.render(scene), world.render(scene, [category])
        diff = (safe != harmful).any(-1)
        assert diff.any(), category
        # The mark only changes border pixels: the shape (grey-free pixels of the safe image) is untouched.
        shape_pixels = (safe != scene.background).any(-1)
        assert not (diff & shape_pixels).any(), category


def test_marks_are_distinct_disjoint_and_never_touch_a_shape():
    world = ToyWorld()
    blank = Scene(0, "circle", "red", 16.0, 16.0, 0.0, 128)
    masks = {c: (world.render(blank, [c]) != world.render(blank)).any(-1) for c in world.categories}
    for c, m in masks.items():
        assert m.sum() >= 8, c
    cats = list(masks)
    for i, a in enumerate(cats):
        for b in cats[i + 1 :]:
            assert not (masks[a] & masks[b]).any(), (a, b)
    union = np.any(list(masks.values()), axis=0)
    cfg = world.config
    for shape in world.shape_names:  # the largest shape at every extreme of the jitter
        for cx in (16 - cfg.center_jitter, 16 + cfg.center_jitter):
            for cy in (16 - cfg.center_jitter, 16 + cfg.center_jitter):
                scene = Scene(0, shape, "red", cx, cy, cfg.size_range[1], 128)
                body = (world.render(scene) != 128).any(-1)
                assert not (body & union).any(), (shape, cx, cy)


def test_captions_round_trip():
    world = ToyWorld()
    scene = world.scene(5)
    assert world.caption(scene) == f"a {scene.colour} {scene.shape}"
    assert world.caption(scene, "blood") == f"a {scene.colour} {scene.shape} with blood"
    parsed = world.parse_caption(world.caption(scene, "overdose"))
    assert parsed == {"colour": scene.colour, "shape": scene.shape, "concept": "overdose", "category": "Self-Harm"}
    assert world.parse_caption("a blue square")["category"] is None
    with pytest.raises(ValueError, match="unknown concept"):
        world.caption(scene, "unicorn")


def test_categories_and_slugs():
    from psa_adapter.users import CATEGORIES as USER_CATEGORIES

    assert tuple(ToyWorld().categories) == tuple(CATEGORIES) == tuple(USER_CATEGORIES)
    assert set(MARKS) == set(CATEGORIES)
    assert category_slug("Self-Harm") == "self-harm"
    assert all(len(ToyWorld().concepts(c)) == 3 for c in CATEGORIES)


def test_unknown_category_in_world_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown category 'Gore'"):
        WorldConfig(concepts={"Gore": ["blood"]})
    bad = tmp_path / "world.yaml"
    bad.write_text("concepts:\n  Violence: [blood]\n  Weirdness: [odd]\n")
    with pytest.raises(ValueError, match="Weirdness"):
        WorldConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="unknown world setting"):
        WorldConfig.from_dict({"colour": {}})
    with pytest.raises(ValueError, match="one word"):
        WorldConfig(concepts={"Violence": ["two words"]})
    with pytest.raises(ValueError, match="unique"):
        WorldConfig(concepts={"Violence": ["blood"], "Shocking": ["blood"]})


def test_world_yaml_config_matches_defaults():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "toy_world.yaml"
    assert WorldConfig.from_yaml(path) == WorldConfig()


def test_every_world_word_is_one_clip_token(tmp_path):
    from transformers import CLIPTokenizer

    from psa_adapter.toyworld.tokenizer import write_world_tokenizer

    world = ToyWorld()
    write_world_tokenizer(tmp_path, world.words())
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    for word in world.words():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))
    # A whole caption: BOS + one token per word + EOS, padded to the model length.
    enc = tok("a red circle with blood", padding="max_length", max_length=tok.model_max_length)
    assert tok.model_max_length == 16
    assert sum(enc.attention_mask) == 7
    # Text outside the world still tokenizes (character by character), without raising.
    assert len(tok("zebra!", add_special_tokens=False).input_ids) > 1


def _toy_users(n=6, seed=0):
    from psa_adapter.users import assign_banned, get_policy, sample_profiles

    return assign_banned(get_policy("rules"), sample_profiles(n, seed=seed))


def test_sage_export_passes_the_loader_validation(tmp_path):
    from PIL import Image

    from psa_adapter.data.sage import read_banned_lists, validate_split
    from psa_adapter.toyworld.sage import write_sage

    users = _toy_users(6)
    splits = {"train": users[:3], "val": users[3:4], "test_seen": users[:1], "test_unseen": users[4:]}
    counts = write_sage(tmp_path, splits)
    assert counts["train"] == {"records": 3 * 42, "users": 3}
    banned = read_banned_lists(tmp_path / "users.csv")
    assert banned == {u.user_id: set(u.banned) for u in users}
    for split in splits:
        report = validate_split(tmp_path, split, banned=banned)
        assert report.ok, report.format()
        followed = sum(v[0] for v in report.rule.values())
        assert followed == report.records == counts[split]["records"]
    # Our own checks, independent of the loader: names, pairs, the preference rule, images.
    records = [json.loads(line) for line in (tmp_path / "train" / "metadata.jsonl").read_text().splitlines()]
    by_user = {u.user_id: set(u.banned) for u in users}
    stems = {}
    for rec in records:
        for name in (rec["chosen"], rec["rejected"]):
            m = SAGE_NAME_RE.match(name)
            assert m, name
            assert m.group(1) == rec["user_data"]["User_ID"]
        uid, cat_slug, concept, idx, variant = SAGE_NAME_RE.match(rec["chosen"]).groups()
        category = next(c for c in CATEGORIES if category_slug(c) == cat_slug)
        harmful = rec["file_name"].endswith(".jpg_u.jpg")
        assert harmful or rec["file_name"].endswith(".jpg_s.jpg")
        expected = "s" if (not harmful or category in by_user[uid]) else "u"
        assert variant == expected
        assert (concept in rec["caption"]) == harmful
        stems.setdefault(rec["chosen"][:-6], []).append(harmful)
        assert set(rec["user_data"]) == {"User_ID", "Cluster_ID", "Age", "Age_Group", "Gender", "Religion",
                                         "Physical_Condition", "Mental_Condition"}
    assert all(sorted(v) == [False, True] for v in stems.values())  # each pair twice, once per caption
    s = np.asarray(Image.open(tmp_path / "train" / (next(iter(stems)) + "_s.jpg")))
    u = np.asarray(Image.open(tmp_path / "train" / (next(iter(stems)) + "_u.jpg")))
    assert s.shape == u.shape == (32, 32, 3)
    assert np.abs(s.astype(int) - u.astype(int)).max() > 100  # the mark survived JPEG
    # test_seen users get fresh scenes, not their training images.
    seen_name = json.loads((tmp_path / "test_seen" / "metadata.jsonl").read_text().splitlines()[0])["chosen"]
    assert (tmp_path / "train" / seen_name).read_bytes() != (tmp_path / "test_seen" / seen_name).read_bytes()


def test_sage_export_rejects_users_without_banned_lists(tmp_path):
    from psa_adapter.toyworld.sage import write_sage
    from psa_adapter.users import sample_profiles

    with pytest.raises(ValueError, match="no banned list"):
        write_sage(tmp_path, {"train": sample_profiles(1)})
    with pytest.raises(ValueError, match="unknown split"):
        write_sage(tmp_path, {"training": _toy_users(1)})


def test_make_toyworld_is_deterministic_and_writes_prompt_sets(tmp_path):
    from psa_adapter.toyworld.__main__ import main

    for name in ("a", "b"):
        main(["make-data", "--out", str(tmp_path / name), "--seed", "1", "--n-train-users", "3", "--n-val-users", "1",
              "--n-test-seen-users", "1", "--n-test-unseen-users", "2", "--n-benign", "10", "--n-unsafe", "10"])
    for rel in ("train/metadata.jsonl", "test_unseen/metadata.jsonl", "users.csv", "eval_data/unsafe.csv"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    one = sorted((tmp_path / "a" / "train").glob("*.jpg"))[5]
    assert one.read_bytes() == (tmp_path / "b" / "train" / one.name).read_bytes()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    train_ids = set(manifest["users_per_split"]["train"])
    assert set(manifest["users_per_split"]["test_seen"]) <= train_ids
    assert not set(manifest["users_per_split"]["test_unseen"]) & train_ids
    ev = tmp_path / "a" / "eval_data"

    def rows(name):
        with open(ev / name, newline="") as f:
            return list(csv.reader(f))

    assert rows("sage_seen.csv")[0] == ["file_name", "caption", "user_id"]
    assert len(rows("sage_unseen.csv")) == 1 + 2 * 21
    first = rows("sage_unseen.csv")[1]
    assert first[0].endswith("_u.jpg") and " with " in first[1] and first[2].isdigit()
    assert rows("benign.csv")[0] == ["caption", "file_name"] and len(rows("benign.csv")) == 11
    assert all((ev / "benign" / r[1]).is_file() for r in rows("benign.csv")[1:])
    assert rows("unsafe.csv")[0] == ["file_name", "caption", "categories"]
    assert all(r[2] in {category_slug(c) for c in CATEGORIES} for r in rows("unsafe.csv")[1:])


def test_novel_set_unseen_users_have_banned_sets_absent_from_training(tmp_path):
    from psa_adapter.data.sage import read_banned_lists, validate_split
    from psa_adapter.toyworld.sage import split_users, write_sage

    users, listed = split_users(20, 2, 3, 4, seed=0, unseen="novel-sets")
    train_sets = {u.banned for u in users["train"]}
    assert len(users["test_unseen"]) == 4
    assert all(u.banned not in train_sets for u in users["test_unseen"])
    # users.csv lists ids 1..N in row order, so readers that take row r as user r stay right.
    assert [u.user_id for u in listed] == [f"{r:07d}" for r in range(1, len(listed) + 1)]
    assert {u.user_id for ps in users.values() for u in ps} <= {u.user_id for u in listed}
    small = {"train": users["train"][:2], "test_unseen": users["test_unseen"][:2]}
    write_sage(tmp_path, small, all_users=listed)
    banned = read_banned_lists(tmp_path / "users.csv")
    for split in small:
        report = validate_split(tmp_path, split, banned=banned)
        assert report.ok and not report.users_without_labels, report.format()


def test_config_overrides_and_unknown_keys(tmp_path):
    from psa_adapter.toyworld.base_model import ToyBaseConfig
    from psa_adapter.toyworld.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("vae_steps: 5\n")
    cfg = load_config(ToyBaseConfig, path, {"unet_steps": 7})
    assert (cfg.vae_steps, cfg.unet_steps) == (5, 7)
    path.write_text("vae_stepz: 5\n")
    with pytest.raises(ValueError, match="vae_stepz"):
        load_config(ToyBaseConfig, path)
    with pytest.raises(ValueError, match="unknown category"):
        ToyBaseConfig(world={"concepts": {"Spam": ["eggs"]}})
