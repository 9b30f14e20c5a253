"""User embeddings computed at generation time from profiles, with a causal LM (``infer.py --llm_model``).

For each distinct profile: the banned categories (the profile's own list when it has one, otherwise the policy's:
``llm``, the reference's, asks the same LM; ``rules`` is deterministic), then the safety statement embedded by the
LLM encoder (masked mean of the last hidden state, ``LLMEncoder``). Embeddings are computed once per profile,
batched, and kept in an embedding store (``user_embeddings.safetensors`` beside the images) that records, per user,
a fingerprint of what produced it (profile, banned-list source, policy); a rerun serves them from the store without
loading the LM. Before anything is computed the encoder is checked against the one the adapter was trained with.

Profiles come from SAGE records (``user_data``), a users CSV (``read_users_csv``), a profile file or a level.
Every error is an ``OnlineEmbeddingError`` whose message names the file, line, field or user.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._templates import load_template, template_hash
from .encoders import load_statement_template
from .profile import ProfileError, UserProfile, profile_from_mapping, read_users_csv

STORE_NAME = "user_embeddings.safetensors"
POOLING = "masked_mean"  # LLMEncoder's pooling (no normalisation)
POLICY_CHOICES = ("llm", "rules")
_POLICY_FIELDS = {"user_id", "age", "age_group", "gender", "religion", "physical_condition", "mental_condition",
                  "categories"}
# Template placeholder -> the SAGE user_data / users.csv column that fills it.
_COLUMN_FOR_FIELD = {"user_id": "User_ID", "age": "Age", "age_group": "Age_Group", "gender": "Gender",
                     "religion": "Religion", "physical_condition": "Physical_Condition",
                     "mental_condition": "Mental_Condition"}


class OnlineEmbeddingError(ValueError):
    """A profile, a template, a store or an LM reply that prevents embedding a user; the message says where."""


class EncoderMismatchError(OnlineEmbeddingError):
    """The LLM encoder of this run is not the one the adapter was trained with; the message names both."""


@dataclass(frozen=True)
class ProfileSource:
    """A profile and where it came from ("metadata.jsonl line 3", "users.csv, user 0000033", a file path)."""

    profile: UserProfile
    where: str


# ------------------------------------------------------------------------------------------------- profiles
def template_fields(template: str) -> set[str]:
    """The placeholders a str.format template uses."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def check_needed_fields(mapping: dict, where: str, needed: dict[str, str] | None) -> None:
    """Raise naming the first profile field a template needs (``needed``: field -> "the statement template ...")
    that ``mapping`` (snake_case keys or the reference column names, any case) lacks."""
    lower = {str(k).lower() for k in mapping}
    for field, what in (needed or {}).items():
        column = _COLUMN_FOR_FIELD.get(field, field)
        if column.lower() not in lower and field not in lower:
            raise OnlineEmbeddingError(f"{where}: the profile has no {column!r} field, which {what} needs "
                                       f"(placeholder {{{field}}})")


def profile_from_record(user_data: dict, where: str, needed: dict[str, str] | None = None) -> UserProfile:
    """A profile from a SAGE ``user_data`` object (reference column names; ``Cluster_ID`` and other non-profile
    keys are ignored). ``needed`` maps profile fields to the template that needs them: a missing one is named with
    that template. Other problems are the profile schema's (``ProfileError``), prefixed with ``where``."""
    if not isinstance(user_data, dict):
        raise OnlineEmbeddingError(f"{where}: user_data must be a JSON object, found {type(user_data).__name__}")
    check_needed_fields(user_data, f"{where}, user_data", needed)
    known = {c.lower() for c in _COLUMN_FOR_FIELD.values()} | set(_COLUMN_FOR_FIELD) | {
        "banned_categories", "allowed_categories", "banned", "allowed"}
    data = {k: v for k, v in user_data.items() if str(k).lower() in known}
    try:
        return profile_from_mapping(data, where=f"{where}, user_data")
    except ProfileError as err:
        raise OnlineEmbeddingError(str(err)) from None


def profile_from_file(path: str | os.PathLike, needed: dict[str, str] | None = None) -> UserProfile:
    """One person's profile file (``load_profile``'s YAML/JSON), checked for the fields the templates need."""
    from .profile import _read_mapping

    try:
        data = _read_mapping(Path(path))
        if isinstance(data, dict):
            check_needed_fields(data, str(path), needed)
        return profile_from_mapping(data, where=str(path))
    except (ProfileError, FileNotFoundError) as err:
        raise OnlineEmbeddingError(str(err)) from None


def profiles_from_sage(path: str | os.PathLike, needed: dict[str, str] | None = None) -> dict[str, ProfileSource]:
    """{User_ID: profile} from the ``user_data`` of every record of a SAGE ``metadata.jsonl``. A user whose records
    disagree about the profile is an error naming both lines."""
    from psa_adapter.data.sage import SageFormatError, iter_metadata_objects

    out: dict[str, ProfileSource] = {}
    try:
        for line_no, record in iter_metadata_objects(path):
            user_data = record.get("user_data")
            if user_data is None:
                continue
            where = f"{path} line {line_no}"
            profile = profile_from_record(user_data, where, needed)
            seen = out.get(profile.user_id)
            if seen is None:
                out[profile.user_id] = ProfileSource(profile, where)
            elif seen.profile != profile:
                raise OnlineEmbeddingError(f"{where}: the user_data of user {profile.user_id} differs from the one "
                                           f"at {seen.where}; one user has one profile")
    except SageFormatError as err:
        raise OnlineEmbeddingError(str(err)) from None
    return out


def profiles_from_users_csv(path: str | os.PathLike) -> dict[str, ProfileSource]:
    """{User_ID: profile} from a users table in the reference format (row r is user r:07d without a User_ID
    column); banned lists in the file are kept."""
    try:
        return {p.user_id: ProfileSource(p, f"{path}, user {p.user_id}") for p in read_users_csv(path)}
    except (ProfileError, FileNotFoundError) as err:
        raise OnlineEmbeddingError(str(err)) from None


def resolve_sources(keys: dict[str, str], *, meta_data: str | os.PathLike | None = None,
                    users_csv: str | os.PathLike | None = None,
                    needed: dict[str, str] | None = None) -> dict[str, ProfileSource]:
    """The profile of each user key of a run ({key: where}, keys as ``infer_cli.Job.user``): ``profile:PATH`` (a
    profile file), a level name, or a User_ID looked up in ``users_csv`` (first) and the ``user_data`` of the
    SAGE records in ``meta_data``. A user with no profile is an error naming where it was asked for."""
    from .levels import load_level

    table: dict[str, ProfileSource] = {}
    if any(k.isdigit() for k in keys):
        if meta_data:
            table.update(profiles_from_sage(meta_data, needed))
        if users_csv:
            table.update(profiles_from_users_csv(users_csv))
    out = {}
    for key, where in keys.items():
        if key.startswith("profile:"):
            path = key.removeprefix("profile:")
            out[key] = ProfileSource(profile_from_file(path, needed), path)
        elif key.isdigit():
            if key not in table:
                looked = [f"--users_csv {users_csv}"] if users_csv else []
                looked += [f"the user_data of --meta_data {meta_data}"] if meta_data else []
                sources = " and ".join(looked) or "no profile source given"
                raise OnlineEmbeddingError(f"{where}: user {key} has no profile to embed (looked in: {sources}); "
                                           "--llm_model embeds profiles: give --users_csv, --profile, or SAGE "
                                           "records with user_data")
            out[key] = table[key]
        else:
            try:
                out[key] = ProfileSource(load_level(key), f"--level {key}")
            except (OSError, KeyError, ValueError) as err:
                raise OnlineEmbeddingError(f"--level {key}: {err}") from None
    return out


# ------------------------------------------------------------------------------------------------- encoders
def model_name(encoder_id: str) -> str:
    """The comparable name of a model: the last component of a hub id or a path, the GGUF file's stem,
    lowercased ("Qwen/Qwen2.5-7B-Instruct" and "/models/Qwen2.5-7B-Instruct" are the same model)."""
    model, _, gguf = str(encoder_id).partition("::")
    name = Path(gguf or model.rstrip("/\\")).name
    return (name[:-5] if name.lower().endswith(".gguf") else name).lower()


def describe_encoder(info: dict) -> str:
    """ "576-d embeddings of MODEL (pooling masked_mean, statement template HASH)" for messages."""
    dim = info.get("dim")
    model = info.get("encoder_id") or "an unknown encoder"
    size = f"{dim}-d " if dim is not None else ""
    return (f"{size}embeddings of {model} (pooling {info.get('pooling') or 'unknown'}, "
            f"statement template {info.get('template_hash') or 'unknown'})")


def read_adapter_record(psa_path: str | os.PathLike | None) -> tuple[dict | None, int | None]:
    """(encoder record, embed_dim) from an adapter folder's config.json, without loading weights; (None, None) for
    a reference checkpoint (no config), whose size is checked once its weights are loaded."""
    from psa_adapter.adapter import CONFIG_NAME, AdapterMismatchError, PSAAdapterConfig

    if psa_path is None or not (Path(psa_path) / CONFIG_NAME).is_file():
        return None, None
    try:
        config = PSAAdapterConfig.from_json_file(Path(psa_path) / CONFIG_NAME)
    except AdapterMismatchError as err:
        raise OnlineEmbeddingError(str(err)) from None
    return config.encoder, config.embed_dim


def check_encoder(record: dict | None, embed_dim: int | None, info: dict, adapter: str) -> str | None:
    """Compare this run's encoder ``info`` (encoder_id, pooling, template_hash, dim; dim may be None before the
    model loads) with the adapter's record and size. A disagreement raises ``EncoderMismatchError`` naming both;
    an adapter without a (known) record returns a warning naming what is assumed; a match returns None."""
    ours = describe_encoder(info)
    unknown = (not record or not record.get("encoder_id")
               or str(record.get("encoder_id")).startswith("unknown"))
    theirs_dim = embed_dim if embed_dim is not None else (record or {}).get("dim")
    if theirs_dim is not None and info.get("dim") is not None and int(theirs_dim) != int(info["dim"]):
        theirs = describe_encoder({**(record or {}), "dim": theirs_dim}) if not unknown else f"{theirs_dim}-d " \
            "user embeddings (encoder not recorded)"
        raise EncoderMismatchError(f"the adapter {adapter} was trained on {theirs}, but this run embeds users as "
                                   f"{ours}: the dimensions differ; use the adapter's encoder as --llm_model")
    if unknown:
        return (f"warning: the adapter {adapter} records no user encoder; assuming it was trained on {ours} "
                "(a reference checkpoint's users were embedded from the reference's own profile prompt, so theirs "
                "and these can differ)")
    problems = []
    if model_name(record["encoder_id"]) != model_name(info["encoder_id"]):
        problems.append("model")
    if record.get("pooling") not in (None, "unknown") and record["pooling"] != info.get("pooling"):
        problems.append("pooling")
    if record.get("template_hash") not in (None, "none") and record["template_hash"] != info.get("template_hash"):
        problems.append("statement template")
    if problems:
        verb = "differ" if len(problems) > 1 else "differs"
        raise EncoderMismatchError(
            f"the adapter {adapter} was trained on {describe_encoder({**record, 'dim': theirs_dim})}, but this run "
            f"embeds users as {ours}: the {' and '.join(problems)} {verb}; use the adapter's encoder as --llm_model "
            "(and its statement template)")
    return None


# --------------------------------------------------------------------------------------------------- embedder
def _hash(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def default_llm_dtype(device: str) -> str:
    """float32 on CPU (bit-stable), bfloat16 on CUDA (a 7B model fits one GPU)."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


class OnlineUserEmbedder:
    """Banned lists and LLM embeddings for profiles, cached in an embedding store at ``store_path``.

    ``model``: a local folder, a hub id in the local cache, or a .gguf file (``load_causal_lm``); the LM is loaded
    on first need only, once, and shared by the llm policy and the encoder. ``embed`` returns {key: vector}.
    Counters ``computed`` and ``reused`` tell what the last ``embed`` did.
    """

    def __init__(self, model: str | os.PathLike, *, policy: str = "llm", store_path: str | os.PathLike | None = None,
                 statement_template: str | os.PathLike | None = None,
                 policy_template: str | os.PathLike | None = None, device: str = "cpu", dtype: str | None = None,
                 batch_size: int = 8):
        if policy not in POLICY_CHOICES:
            raise OnlineEmbeddingError(f"unknown policy {policy!r}; expected one of {', '.join(POLICY_CHOICES)}")
        self.model, self.policy_name, self.device, self.batch_size = str(model), policy, device, batch_size
        self.dtype = dtype or default_llm_dtype(device)
        self.store_path = Path(store_path) if store_path is not None else None
        try:
            self.statement_template_path = statement_template
            self.statement_template = load_statement_template(statement_template)
            self.policy_template_path = policy_template
            self.policy_template = load_template(policy_template, "policy_prompt.txt", _POLICY_FIELDS)[0]
        except (OSError, ValueError) as err:
            raise OnlineEmbeddingError(str(err)) from None
        self._lm = self._tokenizer = self._encoder = self._policy = None
        self.computed = self.reused = 0
        self.banned: dict[str, tuple[str, ...]] = {}  # user id -> banned list used
        self.banned_by: dict[str, str] = {}  # user id -> "profile", "rules" or "llm"
        self.user_of: dict[str, str] = {}  # key of the last embed() -> user id
        self._store = self._open_store()

    # -- identity ------------------------------------------------------------------------------------------------
    @property
    def identity(self) -> dict:
        """What makes two embeddings of the same statement comparable: model, pooling, template, dtype."""
        return {"encoder_id": self.model, "pooling": POOLING, "template_hash": template_hash(self.statement_template),
                "llm_dtype": self.dtype}

    @property
    def info(self) -> dict:
        """identity plus dim (from the store when one exists, otherwise from the loaded model)."""
        if self._encoder is not None:
            dim = self._encoder.dim
        elif self._store is not None:
            dim = self._store.dim
        else:
            dim = None
        return {**self.identity, "dim": dim}

    def needed_fields(self) -> dict[str, str]:
        """Profile fields the templates use -> which template (for messages about a profile that lacks one)."""
        statement = "the statement template" + (f" {self.statement_template_path}" if self.statement_template_path
                                                else "")
        needed = {f: statement for f in sorted(template_fields(self.statement_template) & set(_COLUMN_FOR_FIELD))}
        if self.policy_name == "llm":
            prompt = "the llm policy's prompt" + (f" {self.policy_template_path}" if self.policy_template_path else "")
            for f in sorted(template_fields(self.policy_template) & set(_COLUMN_FOR_FIELD)):
                needed.setdefault(f, prompt)
        return needed

    def policy_identity(self) -> dict:
        if self.policy_name == "rules":
            return {"policy": "rules"}
        return {"policy": "llm", "model": self.model, "template_hash": template_hash(self.policy_template),
                "llm_dtype": self.dtype}

    # -- store ---------------------------------------------------------------------------------------------------
    def _open_store(self):
        from .store import EmbeddingStore

        if self.store_path is None or not self.store_path.exists():
            return None
        try:
            store = EmbeddingStore.open(self.store_path)
        except (OSError, ValueError) as err:
            raise OnlineEmbeddingError(f"{self.store_path}: {err}") from None
        meta = store.metadata
        stored = {k: meta.get(k) for k in self.identity}
        if stored != self.identity:
            diff = ", ".join(f"{k} {stored[k]!r} (this run: {v!r})" for k, v in self.identity.items()
                             if stored[k] != v)
            raise OnlineEmbeddingError(f"{self.store_path} holds user embeddings made with another encoder: {diff}; "
                                       "use another --save_path, or delete the file to embed the users again")
        return store

    def _fingerprint(self, profile: UserProfile) -> str:
        source = {"policy": "profile"} if profile.banned is not None else self.policy_identity()
        return _hash({"profile": profile.to_dict(), "banned_by": source})

    # -- model ---------------------------------------------------------------------------------------------------
    def _load(self):
        if self._encoder is not None:
            return
        import torch

        from .encoders import LLMEncoder
        from .policies import load_causal_lm

        dtype = getattr(torch, self.dtype)
        try:
            self._lm, self._tokenizer = load_causal_lm(self.model, dtype=dtype, device=self.device)
        except (OSError, ValueError, ImportError) as err:
            raise OnlineEmbeddingError(f"--llm_model {self.model}: {err}") from None
        self._encoder = LLMEncoder(lm=self._lm, tokenizer=self._tokenizer, template=self.statement_template_path,
                                   batch_size=self.batch_size, device=self.device, encoder_id=self.model)

    def _llm_policy(self):
        if self._policy is None:
            from .policies import LLMPolicy

            self._load()
            self._policy = LLMPolicy(lm=self._lm, tokenizer=self._tokenizer, template=self.policy_template_path)
            self._policy.info["model"] = self.model
        return self._policy

    def load_model(self) -> dict:
        """Load the LM now (to learn the embedding size before anything is computed); returns ``info``."""
        self._load()
        return self.info

    def needs_model(self, sources: dict[str, ProfileSource]) -> bool:
        """Whether ``embed(sources)`` would compute anything (False: every user is served from the store)."""
        return any(self._cached(s.profile) is None for s in sources.values())

    def release(self) -> None:
        """Drop the LM (before the diffusion model loads)."""
        self._lm = self._tokenizer = self._encoder = self._policy = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def _cached(self, profile: UserProfile):
        if self._store is None or profile.user_id not in self._store:
            return None
        entry = self._store.metadata.get("users", {}).get(profile.user_id, {})
        if entry.get("fingerprint") != self._fingerprint(profile):
            return None
        return self._store[profile.user_id], entry

    # -- embedding -----------------------------------------------------------------------------------------------
    def embed(self, sources: dict[str, ProfileSource], *, progress: bool = False) -> dict[str, np.ndarray]:
        """{key: (dim,) float32} for ``sources`` ({key: ProfileSource}); the store is updated atomically."""
        from tqdm.auto import tqdm

        from .policies import LLMReplyError, RulesPolicy

        by_user: dict[str, ProfileSource] = {}
        for source in sources.values():
            seen = by_user.setdefault(source.profile.user_id, source)
            if seen.profile != source.profile:
                raise OnlineEmbeddingError(f"{source.where}: user {source.profile.user_id} has another profile at "
                                           f"{seen.where}; one user id, one profile")
        self.user_of = {key: source.profile.user_id for key, source in sources.items()}
        vectors: dict[str, np.ndarray] = {}
        todo: list[ProfileSource] = []
        for uid, source in by_user.items():
            hit = self._cached(source.profile)
            if hit is None:
                todo.append(source)
            else:
                vectors[uid] = np.asarray(hit[0])
                self.banned[uid], self.banned_by[uid] = tuple(hit[1]["banned"]), hit[1]["banned_by"]
        self.computed, self.reused = len(todo), len(by_user) - len(todo)
        if todo:
            with_lists = []
            for source in tqdm(todo, desc=f"banned categories ({self.policy_name})", unit="user",
                               disable=not progress or self.policy_name != "llm"):
                profile = source.profile
                if profile.banned is not None:
                    by = "profile"
                elif self.policy_name == "rules":
                    profile, by = profile.with_banned(RulesPolicy().banned_categories(profile)), "rules"
                else:
                    try:
                        banned = self._llm_policy().banned_categories(profile)
                    except LLMReplyError as err:
                        raise OnlineEmbeddingError(
                            f"{source.where}: the llm policy ({self.model}) gave no usable banned list: {err}; give "
                            "the profile a banned list, or use --policy rules") from None
                    profile, by = profile.with_banned(banned), "llm"
                with_lists.append(profile)
                self.banned[profile.user_id], self.banned_by[profile.user_id] = profile.banned, by
            self._load()
            try:
                new = self._encoder.encode(with_lists, progress=progress)
            except ValueError as err:
                raise OnlineEmbeddingError(f"cannot embed user(s) {', '.join(p.user_id for p in with_lists)}: "
                                           f"{err}") from None
            for profile, vector in zip(with_lists, new):
                vectors[profile.user_id] = vector
            self._save({p.user_id: (s.profile, v) for p, s, v in zip(with_lists, todo, new)})
        return {key: vectors[source.profile.user_id] for key, source in sources.items()}

    def _save(self, new: dict[str, tuple[UserProfile, np.ndarray]]) -> None:
        from .store import EmbeddingStore

        if self.store_path is None:
            return
        arrays, users = {}, {}
        if self._store is not None:
            arrays = {uid: self._store[uid] for uid in self._store}
            users = dict(self._store.metadata.get("users", {}))
        for uid, (profile, vector) in new.items():
            arrays[uid] = vector
            users[uid] = {"fingerprint": self._fingerprint(profile), "banned": list(self.banned[uid]),
                          "banned_by": self.banned_by[uid]}
        metadata = {**self.identity, "dim": int(next(iter(arrays.values())).shape[0]), "users": users,
                    "policy": self.policy_identity()}
        store = EmbeddingStore.from_arrays(arrays, metadata, source=str(self.store_path))
        store.save(self.store_path)
        self._store = EmbeddingStore.open(self.store_path)


def embed_for_run(keys: dict[str, str], *, model: str, policy: str = "llm", meta_data=None, users_csv=None,
                  adapter_path=None, store_path=None, statement_template=None, policy_template=None,
                  device: str = "cpu", is_main_process: bool = True, wait=None, log=None):
    """Embed the users of a generation run (``infer.py --llm_model``); returns (vectors {key: (E,)}, embedder).

    Order: templates and store are read, the profiles resolved and the adapter's recorded encoder compared with
    this one (model, pooling, template) before the LM loads; once loaded, its size too, before anything is
    computed. Under several processes the main one computes and writes the store while the others ``wait()`` and
    then read it. ``log`` (e.g. print to stderr) gets the warning of an adapter without an encoder record and a
    summary of what was computed and what came from the store.
    """
    log = log or (lambda message: None)
    if not is_main_process and wait is not None:
        wait()
    embedder = OnlineUserEmbedder(model, policy=policy, store_path=store_path, statement_template=statement_template,
                                  policy_template=policy_template, device=device)
    sources = resolve_sources(keys, meta_data=meta_data, users_csv=users_csv, needed=embedder.needed_fields())
    record, embed_dim = read_adapter_record(adapter_path)
    warning = check_encoder(record, embed_dim, embedder.info, str(adapter_path))
    if embedder.needs_model(sources):
        warning = check_encoder(record, embed_dim, embedder.load_model(), str(adapter_path))
    if warning and is_main_process:
        log(warning)
    vectors = embedder.embed(sources, progress=is_main_process)
    embedder.release()
    if is_main_process:
        where = f" ({embedder.store_path})" if embedder.store_path else ""
        log(f"user embeddings: {embedder.computed} computed with {model} (banned lists: {policy} policy unless the "
            f"profile has one), {embedder.reused} served from the store{where}")
        if wait is not None:
            wait()
    return vectors, embedder


__all__ = [
    "POLICY_CHOICES",
    "STORE_NAME",
    "EncoderMismatchError",
    "OnlineEmbeddingError",
    "OnlineUserEmbedder",
    "ProfileSource",
    "check_encoder",
    "default_llm_dtype",
    "describe_encoder",
    "embed_for_run",
    "model_name",
    "profile_from_file",
    "profile_from_record",
    "profiles_from_sage",
    "profiles_from_users_csv",
    "read_adapter_record",
    "resolve_sources",
    "template_fields",
]
