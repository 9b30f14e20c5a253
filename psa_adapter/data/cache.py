"""Precomputed conditioning: VAE moments of every image (both flips) and text embeddings of every caption.

The VAE and the text encoders are frozen, so their outputs can be computed once and read back every epoch. We
store the VAE's posterior *moments* (mean and log-variance, 2C channels), not a sample, and draw the latent sample
at training time from the sample's own generator; the cached and uncached paths therefore train identically.

Layout: ``<cache_root>/<fingerprint>/`` with ``*.safetensors`` shards (keys ``m:<image name>`` -> (2, 2C, h, w)
[unflipped, flipped]; ``t:<sha1>`` -> (S, D); ``p:<sha1>`` -> (P,)) and ``cache_info.json``, written last, whose
presence marks a complete cache. The fingerprint covers the images, captions, model, resolution and dtype, so a
stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from psa_adapter.conditioning import TextConditioning
from psa_adapter.data.transforms import hflip, preprocess_image
from psa_adapter.utils import atomic_write, atomic_write_text

INFO_NAME = "cache_info.json"
CACHE_VERSION = 1


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


def cache_fingerprint(image_names: list[str], captions: list[str], model: str, resolution: int,
                      dtype: torch.dtype, split_dir: Path) -> str:
    """A short hash of everything the cached tensors depend on."""
    digest = hashlib.sha256()
    for part in (f"v{CACHE_VERSION}", str(Path(split_dir).resolve()), str(model), str(resolution), str(dtype)):
        digest.update(part.encode() + b"\0")
    for name in sorted(image_names):
        digest.update(b"i" + name.encode() + b"\0")
    for caption in sorted(captions):
        digest.update(b"c" + caption.encode() + b"\0")
    return digest.hexdigest()[:16]


class ConditioningCache:
    """Read side of a complete cache folder; tensors are memory-mapped and loaded on demand."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        info_path = self.directory / INFO_NAME
        if not info_path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a complete conditioning cache (no {INFO_NAME})")
        self.info = json.loads(info_path.read_text())
        self._where: dict[str, Path] = {}
        for shard in sorted(self.directory.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                for key in handle.keys():
                    self._where[key] = shard
        self._handles: dict[Path, object] = {}

    def _get(self, key: str, what: str) -> torch.Tensor:
        shard = self._where.get(key)
        if shard is None:
            raise KeyError(f"conditioning cache {self.directory} has no entry for {what}; delete it to rebuild")
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    def moments(self, image_name: str, flip: bool) -> torch.Tensor:
        """(2C, h, w) VAE posterior moments of an image, flipped or not."""
        return self._get(f"m:{image_name}", f"image {image_name!r}")[int(flip)]

    def text(self, caption: str) -> TextConditioning:
        """(S, D) hidden states (+ (P,) pooled embeds for SDXL) of a caption."""
        key = caption_key(caption)
        pooled = f"p:{key}" in self._where
        return TextConditioning(self._get(f"t:{key}", f"caption {caption[:40]!r}"),
                                self._get(f"p:{key}", "pooled embeds") if pooled else None)

    def __getstate__(self):
        # DataLoader workers re-open the shards themselves.
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


@torch.no_grad()
def vae_moments(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 3, R, R) pixels in [-1, 1] -> (N, 2C, R/8, R/8) posterior moments (mean, log-variance)."""
    pixel_values = pixel_values.to(device=vae.device, dtype=vae.dtype)
    return vae.encode(pixel_values).latent_dist.parameters


class _ShardWriter:
    """Collects tensors and writes them as numbered safetensors files of bounded size."""

    def __init__(self, directory: Path, prefix: str, max_items: int = 1024):
        self.directory, self.prefix, self.max_items = directory, prefix, max_items
        self.items: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.items[key] = tensor.detach().to("cpu").contiguous()
        if len(self.items) >= self.max_items:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        items, self.items = self.items, {}
        path = self.directory / f"{self.prefix}-{self.count:05d}.safetensors"
        atomic_write(path, lambda tmp: save_file(items, tmp))
        self.count += 1


def build_conditioning_cache(
    cache_root: str | Path,
    dataset,
    vae,
    conditioner,
    *,
    model: str,
    dtype: torch.dtype,
    batch_size: int = 8,
    process_index: int = 0,
    num_processes: int = 1,
    barrier: Callable[[], None] = lambda: None,
    show_progress: bool = True,
) -> ConditioningCache:
    """Compute (or reuse) the cache for ``dataset``; every process computes its share, then all read the result.

    ``dataset`` is a ``SageDataset``; ``conditioner`` a ``TextConditioner``; ``barrier`` synchronises processes
    (``accelerator.wait_for_everyone``). Returns the reader.
    """
    images, captions = dataset.image_names(), dataset.captions()
    fingerprint = cache_fingerprint(images, captions, model, dataset.resolution, dtype, dataset.split_dir)
    directory = Path(cache_root) / fingerprint
    if (directory / INFO_NAME).is_file():
        return ConditioningCache(directory)
    barrier()  # nobody may still be reading an old partial folder
    if process_index == 0:
        if directory.exists():
            shutil.rmtree(directory)  # an interrupted build: its shards may be incomplete
        directory.mkdir(parents=True)
    barrier()

    writer = _ShardWriter(directory, f"p{process_index:03d}")
    mine = images[process_index::num_processes]
    bar = tqdm(total=len(mine), desc="caching VAE latents", disable=not show_progress)
    for start in range(0, len(mine), batch_size):
        names = mine[start:start + batch_size]
        pixels = torch.stack([preprocess_image(dataset.image_path(n), dataset.resolution) for n in names])
        plain, flipped = vae_moments(vae, pixels), vae_moments(vae, hflip(pixels))
        for i, name in enumerate(names):
            writer.add(f"m:{name}", torch.stack([plain[i], flipped[i]]).to(dtype))
        bar.update(len(names))
    bar.close()
    mine = captions[process_index::num_processes]
    for start in tqdm(range(0, len(mine), batch_size), desc="caching text embeddings", disable=not show_progress):
        batch = mine[start:start + batch_size]
        encoded = conditioner.encode(batch)
        for i, caption in enumerate(batch):
            key = caption_key(caption)
            writer.add(f"t:{key}", encoded.encoder_hidden_states[i].to(dtype))
            if encoded.pooled_text_embeds is not None:
                writer.add(f"p:{key}", encoded.pooled_text_embeds[i].to(dtype))
    writer.flush()
    barrier()
    if process_index == 0:
        info = {"version": CACHE_VERSION, "model": str(model), "resolution": dataset.resolution, "dtype": str(dtype),
                "split_dir": str(dataset.split_dir), "images": len(images), "captions": len(captions)}
        atomic_write_text(directory / INFO_NAME, json.dumps(info, indent=2) + "\n")
    barrier()
    return ConditioningCache(directory)
