"""Users: profiles, banned-category policies, user embeddings, embedding stores and strictness levels.

The path from a person to the vector the adapter consumes:
profile (UserProfile) -> policy (banned categories) -> safety_statement -> encoder -> EmbeddingStore.
Command line: ``python -m psa_adapter.users --help``.
"""

from .categories import CATEGORIES, UnknownCategoryError, category_slug, normalize_category
from .encoders import ENCODER_NAMES, LLMEncoder, SentenceEncoder, get_encoder, safety_statement
from .levels import UnknownLevelError, level_names, load_level
from .policies import (
    POLICY_NAMES,
    LLMPolicy,
    LLMReplyError,
    RulesPolicy,
    agreement,
    assign_banned,
    get_policy,
    parse_category_reply,
)
from .profile import (
    AGE_GROUPS,
    GENDERS,
    MENTAL_CONDITIONS,
    PHYSICAL_CONDITIONS,
    RELIGIONS,
    ProfileError,
    UserProfile,
    load_profile,
    read_users_csv,
    save_profile,
    write_users_csv,
)
from .sampler import SPEC_MARGINALS, expected_marginals, profile_violations, sample_profiles
from .store import (
    EmbeddingDimensionError,
    EmbeddingStore,
    EmbeddingStoreError,
    MissingEmbeddingError,
    build_store,
)

__all__ = [
    "AGE_GROUPS",
    "CATEGORIES",
    "ENCODER_NAMES",
    "GENDERS",
    "MENTAL_CONDITIONS",
    "PHYSICAL_CONDITIONS",
    "POLICY_NAMES",
    "RELIGIONS",
    "SPEC_MARGINALS",
    "EmbeddingDimensionError",
    "EmbeddingStore",
    "EmbeddingStoreError",
    "LLMEncoder",
    "LLMPolicy",
    "LLMReplyError",
    "MissingEmbeddingError",
    "ProfileError",
    "RulesPolicy",
    "SentenceEncoder",
    "UnknownCategoryError",
    "UnknownLevelError",
    "UserProfile",
    "agreement",
    "assign_banned",
    "build_store",
    "category_slug",
    "expected_marginals",
    "get_encoder",
    "get_policy",
    "level_names",
    "load_level",
    "load_profile",
    "normalize_category",
    "parse_category_reply",
    "profile_violations",
    "read_users_csv",
    "safety_statement",
    "sample_profiles",
    "save_profile",
    "write_users_csv",
]
