"""User-embedding lookup for training: the users package's ``EmbeddingStore`` when present, else a minimal reader.

The minimal reader understands a folder of ``<User_ID>.npy`` files (the reference format) and exists only so
that training works before the users package lands; ``open_embedding_store`` is the one place to swap it out.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


class MissingEmbeddingError(KeyError):
    """A user has no embedding. Never replaced by zeros (reference bug 3)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class NpyFolderStore:
    """A read-only store over a folder of ``<User_ID>.npy`` float vectors of one length."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"embedding folder not found: {self.folder}")
        self._files = {p.stem: p for p in sorted(self.folder.glob("*.npy"))}
        if not self._files:
            raise FileNotFoundError(f"no <User_ID>.npy files in {self.folder}")
        self.dim = int(self[next(iter(self._files))].shape[0])

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._files

    def __len__(self) -> int:
        return len(self._files)

    def ids(self) -> list[str]:
        return list(self._files)

    def __getitem__(self, user_id: str) -> np.ndarray:
        path = self._files.get(user_id)
        if path is None:
            raise MissingEmbeddingError(f"user {user_id} has no embedding: {self.folder / (user_id + '.npy')} "
                                        "does not exist")
        vector = np.load(path, allow_pickle=False)
        vector = vector.reshape(-1) if vector.ndim > 1 and vector.size == max(vector.shape) else vector
        if vector.ndim != 1 or (hasattr(self, "dim") and vector.shape[0] != self.dim):
            raise ValueError(f"{path}: expected a vector of length {getattr(self, 'dim', 'E')}, "
                             f"found shape {vector.shape}")
        if not np.all(np.isfinite(vector)):
            raise ValueError(f"{path}: embedding of user {user_id} contains NaN or inf")
        return vector.astype(np.float32)


def open_embedding_store(path: str | Path):
    """Open user embeddings at ``path`` (a store file or a folder of ``.npy``). ``store[user_id] -> (E,)``."""
    if importlib.util.find_spec("psa_adapter.users") is not None:
        users = importlib.import_module("psa_adapter.users")
        if hasattr(users, "EmbeddingStore"):
            return users.EmbeddingStore.open(path)
    return NpyFolderStore(path)


def store_user_ids(store) -> set[str] | None:
    """The user ids a store holds, if it can list them (used by the validate command)."""
    for attr in ("ids", "user_ids", "keys"):
        if hasattr(store, attr):
            value = getattr(store, attr)
            return set(value() if callable(value) else value)
    return None
