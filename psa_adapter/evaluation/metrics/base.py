"""The three metric families and their backends, registered by name.

One metric, several backends: real models (Q16 + NudeNet, Inception-v3, CLIP) and the toy world's judge plug
into the same code paths, so the demo exercises the real evaluation code end to end.

- **InPro** is the share of images that any ``Detector`` flags (OR over detectors, e.g. ``q16``, ``nudenet``;
  the toy world registers ``toy``). A detector maps a batch of images to one record per image.
- **FID** is the Frechet distance between ``FeatureExtractor`` features of two image sets (``inception``; the
  toy world registers ``toy``).
- **CLIPScore's role** is a per-image text-image agreement from a ``TextImageScorer`` (``clip``: 100 * cos; the
  toy world's scene accuracy registers ``toy``).

Backends are classes constructed with keyword options (paths, devices) and registered with the decorators
below; the metric code looks them up by name and raises an error listing the known names for an unknown one.
A backend may set ``cache_key`` (a string naming what its results depend on: model, weights, thresholds);
``compute`` recomputes records and cached reference statistics made under another key (without one, the class
and ``name`` serve as the key).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np


class Detector:
    """Flags inappropriate images. ``name`` is the key under which its per-image findings are kept."""

    name: ClassVar[str]

    def detect(self, images: Sequence) -> list[dict]:
        """PIL images (N) -> N records, each at least ``{"flagged": bool}`` plus what the detector saw
        (scores, classes), kept per image so that one can see which detector flagged what."""
        raise NotImplementedError


class FeatureExtractor:
    """Image features for the Frechet distance."""

    name: ClassVar[str]

    def features(self, images: Sequence) -> np.ndarray:
        """PIL images (N) -> (N, F) float64 features."""
        raise NotImplementedError


class TextImageScorer:
    """Agreement between an image and its prompt."""

    name: ClassVar[str]
    score_name: ClassVar[str] = "clip_score"  # key of the value in summary.json

    def score(self, images: Sequence, texts: Sequence[str]) -> np.ndarray:
        """PIL images (N) and their prompts (N) -> (N,) scores."""
        raise NotImplementedError


DETECTORS: dict[str, type[Detector]] = {}
FEATURE_EXTRACTORS: dict[str, type[FeatureExtractor]] = {}
TEXT_IMAGE_SCORERS: dict[str, type[TextImageScorer]] = {}


def _registrar(registry: dict, kind: str):
    def register(cls):
        if cls.name in registry and registry[cls.name] is not cls:
            raise ValueError(f"{kind} {cls.name!r} is registered twice")
        registry[cls.name] = cls
        return cls

    return register


register_detector = _registrar(DETECTORS, "detector")
register_feature_extractor = _registrar(FEATURE_EXTRACTORS, "feature extractor")
register_text_image_scorer = _registrar(TEXT_IMAGE_SCORERS, "text-image scorer")


# Modules whose import registers backends: the real models and the toy world's judge (``toy``).
BUILTIN_BACKEND_MODULES = ("psa_adapter.evaluation.metrics.backends", "psa_adapter.toyworld.eval_backends")


def load_builtin_backends() -> None:
    """Import every module of ``BUILTIN_BACKEND_MODULES`` (cheap: models load only when a backend is built)."""
    import importlib

    for module in BUILTIN_BACKEND_MODULES:
        importlib.import_module(module)


def lookup(registry: dict, name: str, kind: str):
    """``registry[name]`` (after registering the built-in backends); an unknown name is a ``KeyError`` whose
    message lists the known names."""
    load_builtin_backends()
    try:
        return registry[name]
    except KeyError:
        raise KeyError(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry)) or 'none'}") from None
