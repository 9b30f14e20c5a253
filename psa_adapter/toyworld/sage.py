"""Export the toy world in exact SAGE format (SPEC section 4), plus prompt sets shaped like the reference's.

Layout written under ``root``::

    <split>/metadata.jsonl, <split>/summary.json, <split>/user_<uid>_<category>_<concept>_<idx>_<s|u>.jpg
    users.csv                  every user of every split, reference format (Banned/Allowed lists)
    world.yaml, manifest.json  the world and the settings that made this data set
    eval_data/sage_seen.csv    file_name,caption,user_id   (harmful captions of test_seen users)
    eval_data/sage_unseen.csv  file_name,caption,user_id   (harmful captions of test_unseen users)
    eval_data/benign.csv       caption,file_name           (the COCO role; images in eval_data/benign/)
    eval_data/unsafe.csv       file_name,caption,categories (the I2P role)

Per user: every category x every concept word gives one (safe, unsafe) pair of the *same* scene, and two
records: the harmful caption (``file_name`` ``<stem>.jpg_u.jpg``; chosen ``_s`` if the user bans the category,
else ``_u``) and the safe caption (``<stem>.jpg_s.jpg``; chosen always ``_s``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from psa_adapter.toyworld.world import ToyWorld, WorldConfig, category_slug
from psa_adapter.utils import atomic_write_text

SPLITS = ("train", "val", "test_seen", "test_unseen")
_SPLIT_STREAM = {s: 100 + i for i, s in enumerate(SPLITS)}  # scene streams: disjoint from models' streams
BENIGN_STREAM, UNSAFE_STREAM = 200, 201
JPEG_QUALITY = 95  # with 4:4:4 chroma, the largest pixel error is about 24/255: every mark survives


def encode_image(img: np.ndarray, fmt: str = "jpg") -> bytes:
    """uint8 ``(32, 32, 3)`` -> file bytes: JPEG q95 without chroma subsampling, or PNG (lossless)."""
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(img).save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    elif fmt == "png":
        Image.fromarray(img).save(buf, "PNG")
    else:
        raise ValueError(f"image format: expected 'jpg' or 'png', got {fmt!r}")
    return buf.getvalue()


def user_data(profile) -> dict:
    """SAGE ``user_data`` of a profile (``Cluster_ID`` is unused upstream; the toy world writes ``"0"``)."""
    return {
        "User_ID": profile.user_id,
        "Cluster_ID": "0",
        "Age": profile.age,
        "Age_Group": profile.age_group,
        "Gender": profile.gender,
        "Religion": profile.religion,
        "Physical_Condition": profile.physical_condition,
        "Mental_Condition": profile.mental_condition,
    }


def pair_records(stem: str, safe_caption: str, harmful_caption: str, banned: bool, profile) -> list[dict]:
    """The two SAGE records of one (safe, unsafe) image pair, following the preference rule."""
    s, u = f"{stem}_s.jpg", f"{stem}_u.jpg"
    data = user_data(profile)
    harmful_chosen, harmful_rejected = (s, u) if banned else (u, s)
    return [
        {"file_name": f"{stem}.jpg_u.jpg", "chosen": harmful_chosen, "rejected": harmful_rejected,
         "caption": harmful_caption, "user_data": data},
        {"file_name": f"{stem}.jpg_s.jpg", "chosen": s, "rejected": u, "caption": safe_caption, "user_data": data},
    ]


def _write_split(world: ToyWorld, split_dir: Path, split: str, profiles: Sequence, image_format: str) -> dict:
    """Write one split into ``split_dir`` (which must be new). Returns counts."""
    split_dir.mkdir(parents=True)
    lines, seen_users = [], []
    for profile in profiles:
        if profile.banned is None:
            raise ValueError(
                f"write_sage: user {profile.user_id} in split {split!r} has no banned list; assign one first "
                "(psa_adapter.users.assign_banned(get_policy('rules'), profiles))"
            )
        if profile.user_id in seen_users:
            raise ValueError(f"write_sage: user {profile.user_id} appears twice in split {split!r}")
        seen_users.append(profile.user_id)
        banned = set(profile.banned)
        idx = 0
        for category in world.categories:
            for concept in world.concepts(category):
                idx += 1
                # One scene per (split, user, pair): test_seen users get scenes they never saw in train.
                scene = world.scene(int(profile.user_id) * 1000 + idx, stream=_SPLIT_STREAM[split])
                stem = f"user_{profile.user_id}_{category_slug(category)}_{concept}_{idx:05d}"
                (split_dir / f"{stem}_s.jpg").write_bytes(encode_image(world.render(scene), image_format))
                (split_dir / f"{stem}_u.jpg").write_bytes(encode_image(world.render(scene, [category]), image_format))
                recs = pair_records(stem, world.caption(scene), world.caption(scene, concept),
                                    category in banned, profile)
                lines.extend(json.dumps(r, ensure_ascii=False) for r in recs)
    (split_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {"num_entries": len(lines), "num_users": len(seen_users), "user_ids": seen_users}
    (split_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return {"records": len(lines), "users": len(seen_users)}


def write_sage(root: str | os.PathLike, users_by_split: dict[str, Sequence], world: ToyWorld | None = None, *,
               image_format: str = "jpg", all_users: Sequence | None = None) -> dict:
    """Write every split of ``users_by_split`` (split name -> profiles with banned lists) under ``root``.

    Each split is assembled in a hidden folder and moved into place when complete. Also writes ``users.csv``
    (``all_users``, default every split's users, sorted by id) and ``world.yaml``.
    Returns ``{split: {"records", "users"}}``.
    ``image_format="png"`` stores lossless PNG bytes under the same ``.jpg`` names (not needed at q95).
    """
    from psa_adapter.users import write_users_csv

    world = world or ToyWorld()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(users_by_split) - set(SPLITS))
    if unknown:
        raise ValueError(f"write_sage: unknown split(s) {unknown}; expected some of {list(SPLITS)}")
    counts = {}
    for split, profiles in users_by_split.items():
        tmp = root / f".{split}.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        counts[split] = _write_split(world, tmp, split, list(profiles), image_format)
        final = root / split
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    everyone = {p.user_id: p for profiles in users_by_split.values() for p in profiles}
    listed = {p.user_id: p for p in all_users} if all_users is not None else everyone
    missing = sorted(set(everyone) - set(listed))
    if missing:
        raise ValueError(f"write_sage: all_users lacks split users {missing[:5]} (of {len(missing)})")
    everyone = listed
    write_users_csv([everyone[k] for k in sorted(everyone)], root / "users.csv")
    world.config.save_yaml(root / "world.yaml")
    return counts


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_prompt_sets(root: str | os.PathLike, world: ToyWorld | None = None, *, n_benign: int = 300,
                      n_unsafe: int = 300, image_format: str = "jpg") -> dict:
    """Write ``eval_data/`` CSVs: sage_seen/sage_unseen (from the written test splits), benign, unsafe.

    The benign set's images (fresh world scenes, no marks) are written to ``eval_data/benign/``: they are the
    real-image reference for the judge's Frechet distance, as COCO images are for FID.
    """
    world = world or ToyWorld()
    root = Path(root)
    out = root / "eval_data"
    counts = {}
    for split, name in (("test_seen", "sage_seen.csv"), ("test_unseen", "sage_unseen.csv")):
        meta = root / split / "metadata.jsonl"
        if not meta.is_file():
            continue
        rows = []
        for line in meta.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec["file_name"].endswith(".jpg_u.jpg"):
                stem = rec["file_name"][: -len(".jpg_u.jpg")]
                rows.append([f"{stem}_u.jpg", rec["caption"], int(rec["user_data"]["User_ID"])])
        _write_csv(out / name, ["file_name", "caption", "user_id"], rows)
        counts[name] = len(rows)
    benign_dir = out / "benign"
    benign_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_benign):
        scene = world.scene(i, stream=BENIGN_STREAM)
        name = f"toy_benign_{i:06d}.jpg"
        (benign_dir / name).write_bytes(encode_image(world.render(scene), image_format))
        rows.append([world.caption(scene), name])
    _write_csv(out / "benign.csv", ["caption", "file_name"], rows)
    counts["benign.csv"] = n_benign
    rows = []
    for i, item in enumerate(world.sample_pairs(n_unsafe, stream=UNSAFE_STREAM)):
        rows.append([f"{i:07d}.jpg", item["harmful_caption"], category_slug(item["category"])])
    _write_csv(out / "unsafe.csv", ["file_name", "caption", "categories"], rows)
    counts["unsafe.csv"] = n_unsafe
    return counts


def split_users(n_train: int, n_val: int, n_test_seen: int, n_test_unseen: int, seed: int,
                unseen: str = "new-users", extra_train: int = 0) -> tuple[dict[str, list], list]:
    """Sample users (``psa_adapter.users.sample_profiles``), assign banned lists (rules policy), split them.

    train, val and test_unseen are disjoint; test_seen is a subset of train (as in SAGE). ``unseen``:
    ``"new-users"`` (SAGE: simply other users) or ``"novel-sets"`` (test_unseen users whose banned set no
    training user has: the stricter generalisation test of the feasibility study).
    Returns ``(splits, listed)``: ``listed`` holds every sampled user up to the largest id used, so that a
    ``users.csv`` of them has ids 1..N in row order (as the reference's, where row r is user r).
    ``extra_train``: that many more training users, drawn after everyone else (a longer draw extends a shorter
    one), so that val, test_seen and (with ``"new-users"``) test_unseen are exactly those of ``extra_train=0``:
    a larger training population measured on the same evaluation users.
    """
    from psa_adapter.users import assign_banned, get_policy, sample_profiles

    if unseen not in ("new-users", "novel-sets"):
        raise ValueError(f"unseen: expected 'new-users' or 'novel-sets', got {unseen!r}")
    if n_test_seen > n_train:
        raise ValueError(f"n_test_seen ({n_test_seen}) must not exceed n_train ({n_train}): they are train users")
    if isinstance(extra_train, bool) or not isinstance(extra_train, int) or extra_train < 0:
        raise ValueError(f"extra_train must be a non-negative integer, got {extra_train!r}")
    n_first = n_train + n_val
    pool_size = n_first + (n_test_unseen if unseen == "new-users" else max(50 * n_test_unseen, 2000))
    pool = assign_banned(get_policy("rules"), sample_profiles(pool_size + extra_train, seed=seed))
    train, val = pool[:n_train] + pool[pool_size:], pool[n_train:n_first]
    rest = pool[n_first:pool_size]
    if unseen == "novel-sets":
        train_sets = {p.banned for p in train}
        rest = [p for p in rest if p.banned not in train_sets]
        if len(rest) < n_test_unseen:
            raise ValueError(f"novel-sets: only {len(rest)} of {pool_size} sampled users have a banned set that no "
                             f"training user has; asked for {n_test_unseen}. Use fewer training users.")
    rng = np.random.default_rng([seed, 5])
    seen_idx = sorted(rng.choice(n_train, size=n_test_seen, replace=False).tolist()) if n_test_seen else []
    splits = {"train": train, "val": val, "test_seen": [train[i] for i in seen_idx],
              "test_unseen": rest[:n_test_unseen]}
    last = max(int(p.user_id) for ps in splits.values() for p in ps) if pool else 0
    return splits, [p for p in pool if int(p.user_id) <= last]


def make_toyworld(out: str | os.PathLike, seed: int = 0, world: WorldConfig | None = None, *, n_train: int = 100,
                  n_val: int = 10, n_test_seen: int = 10, n_test_unseen: int = 20, unseen: str = "new-users",
                  n_benign: int = 300, n_unsafe: int = 300, image_format: str = "jpg", extra_train: int = 0) -> dict:
    """Write a whole toy SAGE data set (splits, users.csv, prompt sets) deterministically from ``seed``.

    The world's own seed is the world config's; ``seed`` drives the users and their split. Returns a manifest.
    """
    world_obj = ToyWorld(world or WorldConfig())
    users, listed = split_users(n_train, n_val, n_test_seen, n_test_unseen, seed, unseen, extra_train)
    counts = write_sage(out, users, world_obj, image_format=image_format, all_users=listed)
    prompt_counts = write_prompt_sets(out, world_obj, n_benign=n_benign, n_unsafe=n_unsafe,
                                      image_format=image_format)
    manifest = {
        "generator": "psa_adapter.toyworld",
        "seed": seed,
        "unseen": unseen,
        "image_format": image_format,
        "splits": counts,
        "prompt_sets": prompt_counts,
        "users_per_split": {k: [p.user_id for p in v] for k, v in users.items()},
    }
    if extra_train:
        manifest["extra_train"] = extra_train
    atomic_write_text(Path(out) / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def add_make_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (the SAGE root)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the users and their split")
    parser.add_argument("--world", default=None, help="world YAML (default: the built-in world)")
    parser.add_argument("--n-train-users", type=int, default=100)
    parser.add_argument("--n-val-users", type=int, default=10)
    parser.add_argument("--n-test-seen-users", type=int, default=10, help="drawn from the training users")
    parser.add_argument("--n-test-unseen-users", type=int, default=20)
    parser.add_argument("--unseen", choices=["new-users", "novel-sets"], default="new-users",
                        help="new-users: SAGE's definition; novel-sets: banned sets absent from training")
    parser.add_argument("--n-benign", type=int, default=300, help="benign prompts (COCO role)")
    parser.add_argument("--n-unsafe", type=int, default=300, help="unsafe prompts (I2P role)")
    parser.add_argument("--image-format", choices=["jpg", "png"], default="jpg",
                        help="bytes stored under the .jpg names (JPEG q95 keeps every mark)")


def make_data_from_args(args: argparse.Namespace) -> dict:
    world = WorldConfig.from_yaml(args.world) if args.world else None
    manifest = make_toyworld(
        args.out, args.seed, world, n_train=args.n_train_users, n_val=args.n_val_users,
        n_test_seen=args.n_test_seen_users, n_test_unseen=args.n_test_unseen_users, unseen=args.unseen,
        n_benign=args.n_benign, n_unsafe=args.n_unsafe, image_format=args.image_format,
    )
    print(json.dumps({k: manifest[k] for k in ("seed", "splits", "prompt_sets")}, indent=2))
    return manifest
