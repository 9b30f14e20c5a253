"""Embedding store: user_id -> float32 vector (E,), in one safetensors file with provenance metadata.

The metadata (encoder_id, pooling, dim, template_hash, ...) is a JSON string under the safetensors metadata key
"psa_users"; one tensor per user, named by the 7-digit user id. The reference's folder of `<User_ID>.npy` files
can be opened directly, imported and exported.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ._io import atomic_write_bytes

FORMAT_VERSION = 1
_META_KEY = "psa_users"


class MissingEmbeddingError(KeyError):
    """No embedding for a user. A KeyError whose message reads normally (KeyError would quote it)."""

    def __init__(self, user_id: str, source: str):
        self.user_id, self.source = user_id, source
        super().__init__(user_id)

    def __str__(self) -> str:
        return (f"no embedding for user {self.user_id} in {self.source}; build it with "
                f"`python -m psa_adapter.users embed` (missing users are never replaced by zero vectors)")


class EmbeddingDimensionError(ValueError):
    """A store's vector size disagrees with what a consumer (an adapter's embed_dim) expects."""


class EmbeddingStoreError(ValueError):
    """A store file or .npy folder that cannot be read as user embeddings. The message names the file."""


def _user_key(user_id) -> str:
    if isinstance(user_id, (int, np.integer)) and not isinstance(user_id, bool):
        return f"{int(user_id):07d}"
    return str(user_id)


def _as_vector(array, *, where: str) -> np.ndarray:
    """Accept shapes (E,), (1, E), (1, 1, E) and floating dtypes; return a C-contiguous float32 (E,) copy."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise EmbeddingStoreError(f"{where}: expected a floating-point vector, got dtype {array.dtype}")
    if array.ndim == 0 or array.ndim > 3 or any(d != 1 for d in array.shape[:-1]) or array.shape[-1] == 0:
        raise EmbeddingStoreError(f"{where}: expected shape (E,), (1, E) or (1, 1, E), got {array.shape}")
    vec = np.ascontiguousarray(array.reshape(-1), dtype=np.float32)
    if not np.isfinite(vec).all():
        raise EmbeddingStoreError(f"{where}: contains NaN or infinite values")
    return vec


class EmbeddingStore:
    """A mapping user_id -> float32 vector (dim,), with provenance metadata.

    Build with from_arrays(), open(), or psa_adapter.users.build_store(encoder, profiles).
    `store[user_id]` (a 7-digit string, or an int) raises MissingEmbeddingError for unknown users.
    """

    def __init__(self, vectors: dict[str, np.ndarray], metadata: dict, source: str = "<memory>"):
        self._vectors, self._metadata, self.source = vectors, metadata, source

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: dict, metadata: dict | None = None, *, source: str = "<memory>") -> EmbeddingStore:
        """Store from {user_id: vector}. Vectors may be (E,), (1, E) or (1, 1, E); all must share E.
        `metadata` should name encoder_id, pooling and template_hash; dim is filled in and checked."""
        vectors: dict[str, np.ndarray] = {}
        dim = None
        for uid, array in arrays.items():
            key = _user_key(uid)
            if not re.fullmatch(r"\d{7}", key):
                raise EmbeddingStoreError(f"{source}: user id must be a 7-digit string, got {uid!r}")
            if key in vectors:
                raise EmbeddingStoreError(f"{source}: user {key} is given twice")
            vec = _as_vector(array, where=f"{source}, user {key}")
            if dim is None:
                dim = vec.shape[0]
            elif vec.shape[0] != dim:
                first = next(iter(vectors))
                raise EmbeddingStoreError(f"{source}: user {key} has a vector of size {vec.shape[0]}, but user "
                                          f"{first} has size {dim}; one store holds one encoder's vectors")
            vectors[key] = vec
        metadata = dict(metadata or {})
        if dim is not None and metadata.get("dim") not in (None, dim):
            raise EmbeddingStoreError(f"{source}: metadata says dim {metadata['dim']} but the vectors have size {dim}")
        metadata["dim"] = dim
        metadata.setdefault("encoder_id", "unknown")
        metadata.setdefault("pooling", "unknown")
        metadata.setdefault("template_hash", None)
        metadata["format_version"] = FORMAT_VERSION
        return cls(dict(sorted(vectors.items())), metadata, source)

    @classmethod
    def open(cls, path: str | os.PathLike, metadata: dict | None = None) -> EmbeddingStore:
        """Open a store: a .safetensors file written by save(), or a folder of reference `<User_ID>.npy` files.

        For a folder, `metadata` may describe the encoder (the .npy files carry none); files are loaded with
        allow_pickle=False and must be named with 7-digit ids. Other files in the folder are ignored.
        """
        path = Path(path)
        if path.is_dir():
            return cls._open_npy_folder(path, metadata)
        if not path.is_file():
            raise FileNotFoundError(f"embedding store not found: {path} (expected a .safetensors file or a folder "
                                    "of <User_ID>.npy files)")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                file_meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise EmbeddingStoreError(f"{path}: not a readable safetensors file ({e})") from None
        if _META_KEY not in file_meta:
            raise EmbeddingStoreError(f"{path}: no '{_META_KEY}' metadata; not an embedding store written by "
                                      "psa_adapter.users (for a folder of .npy files, pass the folder)")
        stored = json.loads(file_meta[_META_KEY])
        if stored.get("format_version") != FORMAT_VERSION:
            raise EmbeddingStoreError(f"{path}: store format version {stored.get('format_version')!r}, this code "
                                      f"reads version {FORMAT_VERSION}")
        if metadata:
            stored.update(metadata)
        return cls.from_arrays(arrays, stored, source=str(path))

    @classmethod
    def _open_npy_folder(cls, folder: Path, metadata: dict | None) -> EmbeddingStore:
        arrays = {}
        for f in sorted(folder.glob("*.npy")):
            if not re.fullmatch(r"\d{7}", f.stem):
                raise EmbeddingStoreError(f"{f}: expected a file named <7-digit User_ID>.npy")
            try:
                arrays[f.stem] = np.load(f, allow_pickle=False)
            except ValueError as e:
                raise EmbeddingStoreError(f"{f}: not a plain .npy array ({e})") from None
        if not arrays:
            raise EmbeddingStoreError(f"{folder}: no <User_ID>.npy files in this folder")
        # Validate each file under its own path so that errors name the file.
        vectors = {uid: _as_vector(arr, where=str(folder / f"{uid}.npy")) for uid, arr in arrays.items()}
        meta = {"encoder_id": "unknown (imported .npy)", "pooling": "unknown", "source": str(folder)}
        meta.update(metadata or {})
        return cls.from_arrays(vectors, meta, source=str(folder))

    # -- mapping -------------------------------------------------------------------------------------------------
    def __getitem__(self, user_id) -> np.ndarray:
        """The vector (dim,) float32 of a user (read-only view); MissingEmbeddingError if absent."""
        key = _user_key(user_id)
        try:
            vec = self._vectors[key]
        except KeyError:
            raise MissingEmbeddingError(key, self.source) from None
        view = vec.view()
        view.flags.writeable = False
        return view

    def __contains__(self, user_id) -> bool:
        return _user_key(user_id) in self._vectors

    def __len__(self) -> int:
        return len(self._vectors)

    def __iter__(self):
        return iter(self._vectors)

    def get_many(self, user_ids) -> np.ndarray:
        """Stack vectors for several users: float32 (N, dim). Raises MissingEmbeddingError on the first gap."""
        return np.stack([self[u] for u in user_ids]) if len(user_ids) else np.empty((0, self.dim), np.float32)

    @property
    def user_ids(self) -> list[str]:
        return list(self._vectors)

    @property
    def dim(self) -> int | None:
        return self._metadata["dim"]

    @property
    def metadata(self) -> dict:
        return dict(self._metadata)

    def check_dim(self, expected: int, what: str = "the adapter") -> None:
        """Raise EmbeddingDimensionError unless vectors have size `expected` (e.g. an adapter's embed_dim)."""
        if self.dim != expected:
            raise EmbeddingDimensionError(
                f"embedding store {self.source} holds {self.dim}-d vectors (encoder {self._metadata['encoder_id']}, "
                f"pooling {self._metadata['pooling']}), but {what} expects {expected}-d user embeddings; build the "
                "store with the encoder the adapter was trained with"
            )

    # -- writing -------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write one .safetensors file atomically (temporary file in the same folder, then os.replace)."""
        from safetensors.numpy import save

        if not self._vectors:
            raise EmbeddingStoreError(f"refusing to write an empty embedding store to {path}")
        data = save(dict(self._vectors), metadata={_META_KEY: json.dumps(self._metadata, sort_keys=True)})
        return atomic_write_bytes(path, data)

    def export_npy(self, folder: str | os.PathLike) -> Path:
        """Write one reference-style `<User_ID>.npy` (float32, shape (dim,)) per user, each atomically."""
        import io

        folder = Path(folder)
        for uid, vec in self._vectors.items():
            buf = io.BytesIO()
            np.save(buf, vec, allow_pickle=False)
            atomic_write_bytes(folder / f"{uid}.npy", buf.getvalue())
        return folder

    def __repr__(self) -> str:
        return (f"EmbeddingStore({len(self)} users, dim={self.dim}, encoder={self._metadata['encoder_id']!r}, "
                f"source={self.source!r})")


def build_store(encoder, profiles, *, batch_size: int | None = None, progress: bool = False) -> EmbeddingStore:
    """Embed `profiles` with `encoder` and return a store whose metadata is the encoder's info."""
    profiles = list(profiles)
    vectors = encoder.encode(profiles, batch_size=batch_size, progress=progress)
    return EmbeddingStore.from_arrays({p.user_id: v for p, v in zip(profiles, vectors)}, dict(encoder.info))
