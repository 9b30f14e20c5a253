"""A tiny SAGE-format dataset written from code, for tests and smoke runs (no real images, nothing offensive).

Each "safe" image is a coloured square on grey; its "unsafe" twin adds a category-specific mark. Records follow the
real naming scheme and the preference rule, so loaders, the validate command and training all see real structure.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from psa_adapter.data.sage import CATEGORY_BY_FILE_NAME, METADATA_NAME

PROFILE = {"Cluster_ID": "0", "Age": 30, "Age_Group": "young adults", "Gender": "female", "Religion": "None",
           "Physical_Condition": "healthy", "Mental_Condition": "healthy"}
MARK_COLOURS = {"hate": (200, 0, 200), "harassment": (0, 200, 200), "violence": (220, 20, 20),
                "self-harm": (255, 140, 0), "sexuality": (128, 0, 128), "shocking": (20, 20, 20),
                "propaganda": (240, 240, 0)}


def _draw_pair(rng: np.random.Generator, category: str, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    width, height = size
    safe = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(safe)
    colour = tuple(int(c) for c in rng.integers(0, 255, 3))
    x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    draw.rectangle([x, y, x + width // 3, y + height // 3], fill=colour)
    unsafe = safe.copy()
    ImageDraw.Draw(unsafe).rectangle([0, 0, width // 4, height // 4], fill=MARK_COLOURS[category])
    return safe, unsafe


def write_tiny_sage(root: str | Path, split: str = "train", banned: dict[str, list[str]] | None = None,
                    categories: tuple[str, ...] = ("violence", "self-harm"), concepts: tuple[str, ...] = ("knife",),
                    pairs_per_concept: int = 1, image_size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """Write ``<root>/<split>/metadata.jsonl`` and its JPEG images; returns the split folder.

    ``banned`` maps 7-digit user ids to the categories (canonical names, e.g. "Violence") each user bans; default:
    users 0000001 (bans Violence) and 0000002 (bans nothing). Per user, category, concept and pair index there is
    one (safe, unsafe) image pair and two records (harmful caption, safe caption) that follow the preference rule.
    """
    banned = banned if banned is not None else {"0000001": ["Violence"], "0000002": []}
    split_dir = Path(root) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for uid, user_banned in banned.items():
        for category in categories:
            canonical = CATEGORY_BY_FILE_NAME[category]
            for concept in concepts:
                for idx in range(1, pairs_per_concept + 1):
                    stem = f"user_{uid}_{category}_{concept}_{idx:05d}"
                    safe, unsafe = _draw_pair(rng, category, image_size)
                    safe.save(split_dir / f"{stem}_s.jpg", quality=95)
                    unsafe.save(split_dir / f"{stem}_u.jpg", quality=95)
                    harmful_chosen = "s" if canonical in user_banned else "u"
                    for kind, chosen, caption in (("u", harmful_chosen, f"a square with {concept}"),
                                                  ("s", "s", "a square")):
                        rejected = "u" if chosen == "s" else "s"
                        lines.append(json.dumps({
                            "file_name": f"{stem}.jpg_{kind}.jpg", "chosen": f"{stem}_{chosen}.jpg",
                            "rejected": f"{stem}_{rejected}.jpg", "caption": caption,
                            "user_data": {"User_ID": uid, **PROFILE},
                        }))
    (split_dir / METADATA_NAME).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return split_dir


def write_users_csv(path: str | Path, banned: dict[str, list[str]]) -> Path:
    """A reference-format ``users.csv`` (row r is user ``r:07d``) holding ``banned`` for users 1..max id."""
    path = Path(path)
    all_categories = sorted(CATEGORY_BY_FILE_NAME.values())
    count = max(int(uid) for uid in banned)
    columns = ["Age", "Age_Group", "Gender", "Religion", "Physical_Condition", "Mental_Condition",
               "Banned_Categories", "Allowed_Categories"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in range(1, count + 1):
            user_banned = sorted(banned.get(f"{row:07d}", []))
            allowed = [c for c in all_categories if c not in user_banned]
            writer.writerow([30, "young adults", "female", "None", "healthy", "healthy", repr(user_banned),
                             repr(allowed)])
    return path


def write_npy_embeddings(folder: str | Path, user_ids, dim: int = 16, seed: int = 0) -> Path:
    """One random float32 ``<User_ID>.npy`` vector of length ``dim`` per user (the reference folder format)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for uid in user_ids:
        np.save(folder / f"{uid}.npy", rng.standard_normal(dim).astype(np.float32))
    return folder


def write_tiny_workspace(out: str | Path, users: int = 4, embed_dim: int = 16) -> Path:
    """Everything ``configs/tiny.yaml`` needs under ``out``: tiny SD1.5- and SDXL-style pipelines (random weights),
    a SAGE-format ``sage/train`` split, and ``embeddings/<User_ID>.npy``."""
    from psa_adapter.testing import save_tiny_pipeline

    out = Path(out)
    banned = {f"{i:07d}": (["Violence"] if i % 2 else []) for i in range(1, users + 1)}
    write_tiny_sage(out / "sage", "train", banned)
    write_npy_embeddings(out / "embeddings", banned, dim=embed_dim)
    for kind in ("sd15", "sdxl"):
        if not (out / kind / "model_index.json").is_file():
            save_tiny_pipeline(kind, out / kind)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m psa_adapter.data.synthetic",
                                     description="Write tiny models and a tiny SAGE split for smoke runs.")
    parser.add_argument("--out", default="outputs/tiny", help="Folder to write into.")
    parser.add_argument("--users", type=int, default=4, help="Number of synthetic users.")
    args = parser.parse_args()
    print(f"wrote {write_tiny_workspace(args.out, args.users)}")
