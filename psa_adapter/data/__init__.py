"""SAGE data: metadata reading and validation, the preference-pair dataset, sampling, and the conditioning cache."""

from psa_adapter.data.dataset import SageDataset
from psa_adapter.data.embeddings import MissingEmbeddingError, open_embedding_store
from psa_adapter.data.sage import (
    CATEGORIES,
    SageFormatError,
    SageRecord,
    SplitReport,
    parse_image_name,
    read_banned_lists,
    read_metadata,
    validate_split,
)
from psa_adapter.data.sampling import ShardedBatchSampler, derive_seed, sample_generator

__all__ = [
    "CATEGORIES",
    "MissingEmbeddingError",
    "SageDataset",
    "SageFormatError",
    "SageRecord",
    "ShardedBatchSampler",
    "SplitReport",
    "derive_seed",
    "open_embedding_store",
    "parse_image_name",
    "read_banned_lists",
    "read_metadata",
    "sample_generator",
    "validate_split",
]
