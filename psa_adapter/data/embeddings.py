"""User-embedding lookup for training, through the users package's ``EmbeddingStore`` (the one reader).

``open_embedding_store(path)`` accepts a store ``.safetensors`` file or a folder of reference ``<User_ID>.npy``
files; ``store[user_id]`` raises ``MissingEmbeddingError`` (never a zero vector: reference bug 3).
"""

from __future__ import annotations

from pathlib import Path

from psa_adapter.users import EmbeddingStore, EmbeddingStoreError, MissingEmbeddingError


def open_embedding_store(path: str | Path) -> EmbeddingStore:
    """Open user embeddings at ``path``: ``store[user_id] -> (E,)`` float32, ``store.dim``, ``store.metadata``."""
    return EmbeddingStore.open(path)


def store_user_ids(store: EmbeddingStore) -> set[str]:
    """The user ids a store holds (used by the validate command)."""
    return set(store.user_ids)


__all__ = ["EmbeddingStoreError", "MissingEmbeddingError", "open_embedding_store", "store_user_ids"]
