"""The reference augmentation without torchvision: resize the shorter side, center crop, flip, scale to [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; a missing or unreadable file is an error naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image not found: {path}") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so that the shorter side is ``resolution`` (bilinear, antialiased), then center crop a square."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_model_input(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float32 tensor in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def preprocess_image(path: str | Path, resolution: int) -> torch.Tensor:
    """Load, resize, center crop: (3, resolution, resolution) in [-1, 1], not flipped."""
    return to_model_input(resize_center_crop(load_image(path), resolution))


def hflip(pixels: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of a (..., H, W) tensor."""
    return pixels.flip(-1)
