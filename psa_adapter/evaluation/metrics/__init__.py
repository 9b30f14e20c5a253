"""Image metrics with pluggable backends. See ``base`` for the interfaces and the registries."""

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

__all__ = [
    "DETECTORS",
    "FEATURE_EXTRACTORS",
    "TEXT_IMAGE_SCORERS",
    "Detector",
    "FeatureExtractor",
    "TextImageScorer",
    "register_detector",
    "register_feature_extractor",
    "register_text_image_scorer",
]
