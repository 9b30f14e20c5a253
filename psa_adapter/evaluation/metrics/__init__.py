"""Image metrics with pluggable backends. See ``base`` for the interfaces and the registries, ``compute`` for the
metrics (InPro, FID, CLIPScore) over a folder, ``backends`` for the real models (registered on import here)."""

# registers q16, nudenet, inception and clip (torch and the models load only when a backend is built)
from psa_adapter.evaluation.metrics import backends  # noqa: F401
from psa_adapter.evaluation.metrics.base import (
    DETECTORS,
    FEATURE_EXTRACTORS,
    TEXT_IMAGE_SCORERS,
    Detector,
    FeatureExtractor,
    TextImageScorer,
    register_detector,
    register_feature_extractor,
    register_text_image_scorer,
)
from psa_adapter.evaluation.metrics.compute import MetricInputError, clip_score, fid, inpro

__all__ = [
    "DETECTORS",
    "FEATURE_EXTRACTORS",
    "TEXT_IMAGE_SCORERS",
    "Detector",
    "FeatureExtractor",
    "MetricInputError",
    "TextImageScorer",
    "clip_score",
    "fid",
    "inpro",
    "register_detector",
    "register_feature_extractor",
    "register_text_image_scorer",
]
