"""SAGE reading, validation, the pair dataset and process-count-independent sampling."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from psa_adapter.data import (
    MissingEmbeddingError,
    SageDataset,
    SageFormatError,
    ShardedBatchSampler,
    open_embedding_store,
    parse_image_name,
    read_banned_lists,
    read_metadata,
    validate_split,
)
from psa_adapter.data.__main__ import main as data_main
from psa_adapter.data.sampling import epoch_permutation
from psa_adapter.data.synthetic import write_npy_embeddings, write_tiny_sage, write_users_csv
from psa_adapter.data.transforms import resize_center_crop

BANNED = {"0000001": ["Violence"], "0000002": []}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "upstream-data"


@pytest.fixture
def sage(tmp_path):
    split_dir = write_tiny_sage(tmp_path / "sage", "train", BANNED, categories=("violence", "self-harm"),
                                concepts=("knife", "rope_x"), image_size=(40, 48))
    embeds = write_npy_embeddings(tmp_path / "embeds", BANNED, dim=16)
    return split_dir, embeds


def _rewrite(split_dir, edit):
    path = split_dir / "metadata.jsonl"
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")


def test_image_names_parse_with_hyphens_and_underscores():
    parsed = parse_image_name("user_0000033_self-harm_cherry-picking_x_00010_u.jpg")
    assert (parsed.user_id, parsed.category, parsed.concept, parsed.index, parsed.variant) == (
        "0000033", "Self-Harm", "cherry-picking_x", "00010", "u")
    assert parse_image_name("user_0000033_unknown_x_00010_u.jpg") is None
    assert parse_image_name("not_a_sage_name.jpg") is None


def test_synthetic_split_validates_and_follows_the_preference_rule(sage, tmp_path):
    split_dir, embeds = sage
    users_csv = write_users_csv(tmp_path / "users.csv", BANNED)
    report = validate_split(split_dir.parent, "train", banned=read_banned_lists(users_csv),
                            embedding_ids=set(BANNED))
    assert report.ok, report.format()
    assert report.records == 2 * 2 * 2 * 2  # users x categories x concepts x captions
    assert report.caption_kinds == {"harmful": 8, "safe": 8}
    assert report.rule["harmful & banned -> _s"] == [2, 2]  # user 1 bans violence: 2 concepts
    assert sum(v[1] for v in report.rule.values()) == 16
    # The CLI agrees and exits 0.
    assert data_main(["validate", "--root", str(split_dir.parent), "--split", "train", "--users", str(users_csv),
                      "--embeds", str(embeds)]) == 0


def test_validate_reports_rule_exceptions_and_missing_images(sage, tmp_path):
    split_dir, _ = sage
    # User 0000002 is said to ban Violence in this users file, so its harmful violence records break the rule.
    users_csv = write_users_csv(tmp_path / "users.csv", {"0000001": ["Violence"], "0000002": ["Violence"]})
    next(split_dir.glob("*_s.jpg")).unlink()
    report = validate_split(split_dir.parent, "train", banned=read_banned_lists(users_csv))
    assert len(report.rule_exceptions) == 2 and "0000002" in report.rule_exceptions[0]
    assert report.missing_images == 1 and not report.ok
    assert data_main(["validate", "--root", str(split_dir.parent), "--split", "train", "--users",
                      str(users_csv)]) == 1
    # Without image checks the missing file is not a problem.
    assert validate_split(split_dir.parent, "train", check_images=False).ok


def test_banned_lists_follow_a_user_id_column(tmp_path):
    # Without User_ID, data row r is user r (the reference); with it, the column decides (ids with gaps).
    plain = tmp_path / "plain.csv"
    plain.write_text('Banned_Categories\n"[\'Hate\']"\n"[]"\n')
    assert read_banned_lists(plain) == {"0000001": {"Hate"}, "0000002": set()}
    with_ids = tmp_path / "ids.csv"
    with_ids.write_text('User_ID,Banned_Categories\n0000007,"[\'Hate\']"\n0000003,"[\'Violence\']"\n')
    assert read_banned_lists(with_ids) == {"0000007": {"Hate"}, "0000003": {"Violence"}}
    twice = tmp_path / "twice.csv"
    twice.write_text('User_ID,Banned_Categories\n0000007,"[]"\n0000007,"[]"\n')
    with pytest.raises(ValueError, match=r"twice.csv row 2 \(line 3\), field User_ID: user 0000007 already appears "
                                         r"in row 1"):
        read_banned_lists(twice)
    bad = tmp_path / "bad.csv"
    bad.write_text('Banned_Categories\n"[\'Hate\']"\n"[\'Gore\']"\n')
    with pytest.raises(ValueError, match=r"bad.csv row 2 \(line 3\), field Banned_Categories: unknown category"):
        read_banned_lists(bad)
    ids_only = tmp_path / "ids_only.csv"
    ids_only.write_text("User_ID\n0000001\n")
    with pytest.raises(ValueError, match=r"ids_only.csv: missing column\(s\) \['Banned_Categories'\]"):
        read_banned_lists(ids_only)


def test_banned_lists_and_profiles_come_from_one_users_reader(tmp_path):
    from psa_adapter.users import read_users_csv

    # A full users file: both readers agree on ids and lists (User_ID column with gaps, a byte-order mark).
    path = tmp_path / "users.csv"
    path.write_text("\ufeffUser_ID,Age,Age_Group,Gender,Religion,Physical_Condition,Mental_Condition,"
                    "Banned_Categories\n0000009,30,young adults,male,None,healthy,healthy,\"['Violence', 'Hate']\"\n"
                    "0000004,70,young elderly,female,Islam,healthy,anxiety,[]\n", encoding="utf-8")
    profiles = {p.user_id: set(p.banned) for p in read_users_csv(path)}
    assert read_banned_lists(path) == profiles == {"0000009": {"Hate", "Violence"}, "0000004": set()}
    # Banned lists alone are enough for validation; the profile reader needs the profile columns.
    lists_only = tmp_path / "lists.csv"
    lists_only.write_text('Banned_Categories\n"[\'Hate\']"\n')
    assert read_banned_lists(lists_only) == {"0000001": {"Hate"}}
    with pytest.raises(ValueError, match=r"lists.csv: missing column\(s\) \['Age'"):
        read_users_csv(lists_only)


def test_malformed_json_names_file_and_line(sage):
    split_dir, _ = sage
    _rewrite(split_dir, lambda lines: lines.__setitem__(2, lines[2][:-5]))
    with pytest.raises(SageFormatError, match=r"metadata\.jsonl:3: malformed JSON"):
        read_metadata(split_dir / "metadata.jsonl")


@pytest.mark.parametrize("field,value,message", [
    ("caption", None, "field 'caption' must be str"),
    ("chosen", "../../etc/passwd", "escapes the split folder"),
    ("rejected", "/abs/x_u.jpg", "escapes the split folder"),
])
def test_bad_records_name_file_line_and_field(sage, field, value, message):
    split_dir, _ = sage

    def edit(lines):
        record = json.loads(lines[4])
        record[field] = value
        lines[4] = json.dumps(record)

    _rewrite(split_dir, edit)
    with pytest.raises(SageFormatError, match=rf"metadata\.jsonl:5: .*{message}"):
        read_metadata(split_dir / "metadata.jsonl")


def test_missing_field_and_bad_user_id(sage):
    split_dir, _ = sage

    def edit(lines):
        record = json.loads(lines[0])
        del record["rejected"]
        lines[0] = json.dumps(record)

    _rewrite(split_dir, edit)
    with pytest.raises(SageFormatError, match=r":1: missing field 'rejected'"):
        read_metadata(split_dir / "metadata.jsonl")


def test_dataset_items_have_the_documented_shapes(sage):
    split_dir, embeds = sage
    dataset = SageDataset(split_dir.parent, "train", embeddings=open_embedding_store(embeds), resolution=32,
                          proportion_empty_prompts=0.0, seed=0)
    assert len(dataset) == 16 and dataset.embed_dim == 16
    item = dataset[(0, 3)]
    assert item["pixel_values_w"].shape == (3, 32, 32) and item["pixel_values_l"].shape == (3, 32, 32)
    assert item["pixel_values_w"].min() >= -1 and item["pixel_values_w"].max() <= 1
    assert item["user_embeds"].shape == (16,) and item["user_embeds"].dtype == torch.float32
    expected = np.load(embeds / f"{dataset.records[3].user_id}.npy")
    assert np.array_equal(item["user_embeds"].numpy(), expected)
    # Same key, same item; another epoch may differ only through its random draws.
    again = dataset[(0, 3)]
    assert torch.equal(item["pixel_values_w"], again["pixel_values_w"]) and item["noise_seed"] == again["noise_seed"]
    assert dataset[(1, 3)]["noise_seed"] != item["noise_seed"]


def test_caption_dropout_rate_and_flips_are_per_sample(sage):
    split_dir, embeds = sage
    dataset = SageDataset(split_dir.parent, "train", embeddings=open_embedding_store(embeds), resolution=16,
                          proportion_empty_prompts=0.2, seed=5)
    items = [dataset[(epoch, i)] for epoch in range(40) for i in range(len(dataset))]
    dropped = np.mean([it["caption"] == "" for it in items])
    assert 0.16 < dropped < 0.24  # applied once: about 20%, not the reference SDXL's 36%
    flipped = [not torch.equal(it["pixel_values_w"], dataset[(0, it["index"])]["pixel_values_w"]) for it in items]
    assert 0.3 < np.mean(flipped) < 0.7


def test_missing_embedding_and_missing_image_fail_at_construction(sage, tmp_path):
    split_dir, embeds = sage
    (embeds / "0000002.npy").unlink()
    with pytest.raises(MissingEmbeddingError, match=r"no embedding for user 0000002 .*metadata\.jsonl:\d+"):
        SageDataset(split_dir.parent, "train", embeddings=open_embedding_store(embeds))
    write_npy_embeddings(embeds, ["0000002"], dim=16)
    next(split_dir.glob("*_u.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl:\d+: image not found"):
        SageDataset(split_dir.parent, "train", embeddings=open_embedding_store(embeds))


def test_dataset_reads_the_split_folder_or_the_sage_root(sage, tmp_path):
    split_dir, embeds = sage
    store = open_embedding_store(embeds)
    by_root = SageDataset(split_dir.parent, "train", embeddings=store, check_images=False)
    # The reference's form: --train_data_dir ./data/sage/train, the folder that holds metadata.jsonl.
    by_split = SageDataset(split_dir, "train", embeddings=store, check_images=False)
    assert by_root.split_dir == by_split.split_dir == split_dir
    assert by_root.records == by_split.records and by_root.identity() == by_split.identity()
    assert by_root.identity()["records"] == 16 and len(by_root.identity()["sha256"]) == 64
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        SageDataset(nowhere, "train", embeddings=store)
    assert f"neither {nowhere / 'metadata.jsonl'} " in str(err.value)
    assert f"nor {nowhere / 'train' / 'metadata.jsonl'} " in str(err.value)


def test_non_personalised_pairs_always_prefer_the_safe_image(sage):
    split_dir, _ = sage
    dataset = SageDataset(split_dir.parent, "train", non_personalised=True, check_images=False)
    assert all(w.endswith("_s.jpg") and lose.endswith("_u.jpg") for w, lose in dataset.pairs)
    assert "user_embeds" not in dataset[(0, 0)]


def test_resize_center_crop_keeps_the_middle():
    from PIL import Image

    image = Image.new("RGB", (60, 30), (0, 0, 0))
    image.paste((255, 255, 255), (20, 0, 40, 30))  # white middle third
    out = np.asarray(resize_center_crop(image, 16))
    assert out.shape == (16, 16, 3)
    assert out[:, 4:12].mean() > 200 and out[:, 0].mean() < 60 and out[:, -1].mean() < 60


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_sampler_global_batches_do_not_depend_on_process_count(processes):
    per_process = 6 // processes
    samplers = [iter(ShardedBatchSampler(20, per_process, processes, p, seed=3)) for p in range(processes)]
    single = iter(ShardedBatchSampler(20, 6, 1, 0, seed=3))
    for _ in range(7):  # crosses epoch boundaries (3 global batches per epoch)
        merged = [key for s in samplers for key in next(s)]
        assert merged == next(single)


def test_sampler_resumes_mid_epoch():
    full = iter(ShardedBatchSampler(20, 4, seed=1))
    batches = [next(full) for _ in range(8)]
    resumed = iter(ShardedBatchSampler(20, 4, seed=1, start_batch=5))
    assert [next(resumed) for _ in range(3)] == batches[5:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatchSampler(3, 2, num_processes=2)


def test_real_sage_metadata_follows_the_preference_rule():
    if not SHARED.exists():
        pytest.skip("../shared/upstream-data is not available")
    banned = read_banned_lists(SHARED / "users" / "users.csv")
    for split in ("val", "test_seen", "test_unseen"):
        report = validate_split(SHARED / "sage", split, check_images=False, banned=banned)
        assert report.records == 2100 and len(report.users) == 50
        assert report.ok, report.format()
        assert sum(v[0] for v in report.rule.values()) == 2100


def test_validate_script_runs_without_installing(sage, tmp_path):
    import subprocess
    import sys

    split_dir, _ = sage
    script = Path(__file__).resolve().parents[1] / "dataset" / "validate_sage.py"
    result = subprocess.run([sys.executable, str(script), "--root", str(split_dir.parent), "--split", "train"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr


def test_weighted_sampler_draws_groups_equally_deterministically_and_resumes():
    from psa_adapter.data.sampling import balanced_weights

    groups = ["rare"] * 5 + ["common"] * 95
    weights = balanced_weights(groups)
    assert abs(float(weights[:5].sum()) - float(weights[5:].sum())) < 1e-12
    sampler = ShardedBatchSampler(100, 10, seed=3, weights=weights)
    stream = iter(sampler)
    keys = [k for _ in range(50) for k in next(stream)]  # 5 epochs of 10 batches
    assert keys == [k for _, b in zip(range(50), iter(ShardedBatchSampler(100, 10, seed=3, weights=weights)))
                    for k in b]  # deterministic
    share = sum(groups[i] == "rare" for _, i in keys) / len(keys)
    assert 0.4 < share < 0.6  # uniform sampling would give 0.05
    resumed = iter(ShardedBatchSampler(100, 10, seed=3, weights=weights, start_batch=23))
    assert [k for _ in range(27) for k in next(resumed)] == keys[230:]
    plain = next(iter(ShardedBatchSampler(100, 10, seed=3)))
    assert plain == [(0, i) for i in epoch_permutation(100, 3, 0)[:10]]  # no weights: the permutation, unchanged
    for bad in (torch.ones(99), -torch.ones(100), torch.zeros(100)):
        with pytest.raises(ValueError, match="non-negative weights"):
            ShardedBatchSampler(100, 10, weights=bad)
