"""SAGE preference pairs as a torch Dataset, with the reference augmentation and caption dropout applied once.

Items are addressed by ``(epoch, index)`` keys (see ``sampling.ShardedBatchSampler``) so that every random choice
about a sample comes from a generator seeded by the run seed and the sample's position, never from global state.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from psa_adapter.data.embeddings import MissingEmbeddingError
from psa_adapter.data.sage import (
    METADATA_NAME,
    SageFormatError,
    SageRecord,
    parse_image_name,
    read_metadata,
    resolve_split_dir,
)
from psa_adapter.data.sampling import STREAM_AUGMENT, STREAM_NOISE, derive_seed, sample_generator
from psa_adapter.data.transforms import hflip, preprocess_image


class SageDataset(torch.utils.data.Dataset):
    """Chosen/rejected image pairs of one SAGE split with their caption and user embedding.

    Args:
        root, split: the split folder holding ``metadata.jsonl`` and the images, or a SAGE root holding
            ``<split>/metadata.jsonl`` (``sage.resolve_split_dir``).
        embeddings: a store with ``store[user_id] -> (E,)`` (required unless ``non_personalised``). Every user of
            the split must have an embedding; a missing one raises at construction, naming the user and line.
        resolution: output size of the square center crop.
        random_flip: flip each image independently with probability 1/2 (the reference's augmentation).
        proportion_empty_prompts: probability that a pair's caption becomes ``""`` (drawn once per sample).
        seed: run seed from which every per-sample random choice is derived.
        non_personalised: SafetyDPO-style pairs: the safe image (``_s``) is always chosen; no user embedding.
        max_samples: keep only the first N records.
        cache: a ``ConditioningCache``; items then carry cached VAE moments and text embeddings instead of pixels.

    An item (``dataset[(epoch, index)]``) is a dict with ``index``, ``epoch``, ``caption`` (after dropout),
    ``noise_seed`` (for the trainer's noise/timestep generator), ``user_embeds`` (E,) in personalised mode, and
    either ``pixel_values_w``/``pixel_values_l`` (3, R, R) in [-1, 1], or, with a cache, ``moments_w``/``moments_l``
    (2C, R/8, R/8) and ``encoder_hidden_states`` (S, D) (+ ``pooled_text_embeds`` (P,) for SDXL).
    """

    def __init__(self, root: str | Path, split: str = "train", *, embeddings=None, resolution: int = 512,
                 random_flip: bool = True, proportion_empty_prompts: float = 0.0, seed: int = 0,
                 non_personalised: bool = False, max_samples: int | None = None, cache=None,
                 check_images: bool = True):
        self.split_dir = resolve_split_dir(root, split)
        self.metadata_path = self.split_dir / METADATA_NAME
        records = read_metadata(self.metadata_path)
        if max_samples is not None:
            records = records[:max_samples]
        self.records: list[SageRecord] = records
        self.resolution = resolution
        self.random_flip = random_flip
        self.proportion_empty_prompts = proportion_empty_prompts
        self.seed = seed
        self.non_personalised = non_personalised
        self.cache = cache
        self.pairs = [self._pair_names(r) for r in records]
        if check_images:
            self._check_images()
        self.user_embeds: dict[str, torch.Tensor] = {}
        if not non_personalised:
            if embeddings is None:
                raise ValueError("personalised training needs user embeddings (embeds_folder)")
            self._load_embeddings(embeddings)

    def _where(self, record: SageRecord) -> str:
        return f"{self.metadata_path}:{record.line}"

    def _pair_names(self, record: SageRecord) -> tuple[str, str]:
        """(chosen, rejected) image names; in non-personalised mode (safe ``_s``, unsafe ``_u``)."""
        if not self.non_personalised:
            return record.chosen, record.rejected
        names = {}
        for name in (record.chosen, record.rejected):
            parsed = parse_image_name(name)
            if parsed is None:
                raise SageFormatError(f"{self._where(record)}: non-personalised mode needs to tell the safe image "
                                      f"from the unsafe one, but {name!r} is not a SAGE image name")
            names[parsed.variant] = name
        if set(names) != {"s", "u"}:
            raise SageFormatError(f"{self._where(record)}: the pair is not one _s and one _u image")
        return names["s"], names["u"]

    def _check_images(self) -> None:
        for record, names in zip(self.records, self.pairs):
            for name in names:
                path = self.image_path(name)
                if not path.is_file():
                    raise FileNotFoundError(f"{self._where(record)}: image not found: {path}")

    def _load_embeddings(self, store) -> None:
        for record in self.records:
            uid = record.user_id
            if uid in self.user_embeds:
                continue
            try:
                vector = store[uid]
            except KeyError as err:  # name the record that needs it, too
                source = getattr(store, "source", "the embedding store")
                raise MissingEmbeddingError(uid, f"{source} (needed by {self._where(record)})") from err
            self.user_embeds[uid] = torch.tensor(np.asarray(vector), dtype=torch.float32).reshape(-1)
        dims = {v.shape[0] for v in self.user_embeds.values()}
        if len(dims) != 1:
            raise ValueError(f"user embeddings have different lengths {sorted(dims)}")
        self.embed_dim = dims.pop()

    def identity(self) -> dict:
        """What this data set is, for checkpoints: the metadata file, its SHA-256 and the number of records used."""
        digest = hashlib.sha256()
        with self.metadata_path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return {"metadata": str(self.metadata_path.resolve()), "sha256": digest.hexdigest(), "records": len(self)}

    def pair_groups(self) -> list[tuple[str, str]]:
        """``(category, case)`` of every record, case one of ``"safe caption"``, ``"harmful, safe chosen"``,
        ``"harmful, unsafe chosen"`` (from the SAGE image names): the cells of ``--pair_balance category``."""
        groups = []
        for record in self.records:
            parsed = parse_image_name(record.chosen)
            if parsed is None or record.caption_kind is None:
                raise SageFormatError(f"{self._where(record)}: pair_balance 'category' needs SAGE image names "
                                      f"(user_<id>_<category>_<concept>_<n>_<s|u>.jpg) and file_name suffixes; got "
                                      f"chosen {record.chosen!r}, file_name {record.file_name!r}")
            case = ("safe caption" if record.caption_kind == "safe"
                    else "harmful, safe chosen" if parsed.variant == "s" else "harmful, unsafe chosen")
            groups.append((parsed.category, case))
        return groups

    def image_path(self, name: str) -> Path:
        """The file of an image name (relative to the split folder; names were checked to stay inside it)."""
        return Path(os.path.normpath(self.split_dir / name.replace("\\", "/")))

    def image_names(self) -> list[str]:
        """Every distinct image name used by the (chosen, rejected) pairs, in first-use order."""
        return list(dict.fromkeys(name for pair in self.pairs for name in pair))

    def captions(self) -> list[str]:
        """Every distinct caption, plus the empty caption used by dropout."""
        return list(dict.fromkeys([""] + [r.caption for r in self.records]))

    def user_ids(self) -> list[str]:
        return list(dict.fromkeys(r.user_id for r in self.records))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        record = self.records[index]
        generator = sample_generator(self.seed, epoch, index, STREAM_AUGMENT)
        # Fixed draw order (flip w, flip l, dropout) so items do not depend on which options are on.
        draws = torch.rand(3, generator=generator).tolist()
        flip_w = self.random_flip and draws[0] < 0.5
        flip_l = self.random_flip and draws[1] < 0.5
        caption = "" if draws[2] < self.proportion_empty_prompts else record.caption
        item = {
            "index": index,
            "epoch": epoch,
            "caption": caption,
            "noise_seed": derive_seed(self.seed, epoch, index, STREAM_NOISE),
        }
        if not self.non_personalised:
            item["user_embeds"] = self.user_embeds[record.user_id]
        name_w, name_l = self.pairs[index]
        if self.cache is None:
            pixels_w = preprocess_image(self.image_path(name_w), self.resolution)
            pixels_l = preprocess_image(self.image_path(name_l), self.resolution)
            item["pixel_values_w"] = hflip(pixels_w) if flip_w else pixels_w
            item["pixel_values_l"] = hflip(pixels_l) if flip_l else pixels_l
        else:
            item["moments_w"] = self.cache.moments(name_w, flip_w)
            item["moments_l"] = self.cache.moments(name_l, flip_l)
            text = self.cache.text(caption)
            item["encoder_hidden_states"] = text.encoder_hidden_states
            if text.pooled_text_embeds is not None:
                item["pooled_text_embeds"] = text.pooled_text_embeds
        return item
