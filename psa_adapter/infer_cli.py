"""Batch image generation from the command line: the logic behind ``infer.py``.

Accepts the reference implementation's flags (``--sd_model``, ``--meta_data``, ``--save_path``, ``--load_psa``,
``--psa_path``, ``--embeds_folder``, ...) plus single prompts, CSV prompt sets and strictness levels.

Work is split across processes under ``accelerate launch``: process ``r`` of ``n`` takes prompts ``r, r + n, ...``.
Image ``i`` (0-based position in the prompt list, after ``--limit``) always uses seed ``--seed + i``, so an image
is the same whatever the batch size or the number of processes. Existing images are skipped (resume); images are
written atomically, so an interrupted run never leaves half an image behind. ``manifest.jsonl`` beside the images
records, per image, its file, prompt, user, seed and the generation settings.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

DEFAULT_SEED = 2025
MANIFEST_NAME = "manifest.jsonl"
CONFIG_NAME = "resolved_config.yaml"
# Settings recorded per image; a resumed image made with other values is reported.
_SETTING_KEYS = ("prompt", "user", "seed", "method", "psa_scale", "psa_uncond", "guidance", "steps", "model",
                 "adapter", "lora", "negative_prompt", "sld_preset", "sld_concept", "unet_weights", "prompt_mode",
                 "method_prompt", "method_negative_prompt")


class InferError(Exception):
    """Bad input: printed as one message (no traceback) and the program exits with status 1."""


@dataclass
class Job:
    """One image to generate. ``index`` is its position in the prompt list: its seed is ``--seed + index``."""

    index: int
    prompt: str
    file_name: str
    user: str | None  # 7-digit User_ID, "L0".."L5", "profile:<path>", or None
    where: str  # "file line N" for messages
    negative_prompt: str | None = None  # a per-row negative prompt (CSV column); None: --negative_prompt
    seed: int | None = None  # a per-row seed (CSV column); None: --seed + index


# ------------------------------------------------------------------------------------------------------ inputs
def normalize_user_id(value, where: str) -> str:
    """``33``, ``"33"`` or ``"0000033"`` -> ``"0000033"``; anything else is an ``InferError`` naming ``where``."""
    text = str(value).strip()
    if not text.isdigit() or len(text) > 7:
        raise InferError(
            f"{where}: user id {text!r} is not a User_ID (expected up to 7 digits, e.g. 0000033 or 33)"
        )
    return text.zfill(7)


def _image_formats() -> dict[str, str]:
    from PIL import Image

    Image.init()
    return {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def check_file_name(name: str, where: str) -> str:
    """A relative output path inside the save folder with an image extension PIL can write."""
    path = PurePosixPath(name.replace("\\", "/"))
    if not name or path.is_absolute() or ".." in path.parts:
        raise InferError(f"{where}: file_name {name!r} must be a relative path inside --save_path")
    if path.suffix.lower() not in _image_formats():
        raise InferError(f"{where}: file_name {name!r} has no image extension (.png, .jpg, ...)")
    return str(path)


def read_sage_jobs(path: str | os.PathLike) -> list[Job]:
    """SAGE ``metadata.jsonl``: every record (harmful and safe captions) with its ``caption``,
    ``user_data.User_ID`` and ``file_name`` (kept as is, as the reference does). Lines are read by the data
    package's SAGE reader; only ``caption`` and ``file_name`` are required here."""
    from psa_adapter.data.sage import SageFormatError, iter_metadata_objects

    path = Path(path)
    if not path.is_file():
        raise InferError(f"--meta_data file not found: {path}")
    jobs = []
    try:
        for line_no, record in iter_metadata_objects(path):
            where = f"{path} line {line_no}"
            missing = [k for k in ("caption", "file_name") if k not in record]
            if missing:
                raise InferError(f"{where}: record has no {' or '.join(missing)} field")
            user_data = record.get("user_data") or {}
            if not isinstance(user_data, dict):
                raise InferError(f"{where}: user_data must be a JSON object, found {type(user_data).__name__}")
            user = user_data.get("User_ID")
            jobs.append(Job(
                index=len(jobs), prompt=str(record["caption"]), where=where,
                file_name=check_file_name(str(record["file_name"]), where),
                user=None if user is None else normalize_user_id(user, where),
            ))
    except SageFormatError as err:  # a line that is not a JSON object; the message names file and line
        raise InferError(str(err)) from err
    return jobs


def read_csv_jobs(path: str | os.PathLike) -> list[Job]:
    """A prompt CSV with a ``caption`` column and optional ``user_id`` (zero-padded to 7 digits) and ``file_name``
    columns (the evaluation sets: coco_10k, i2p, CoProv2, sage_seen/unseen). Without ``file_name`` images are named
    ``<index:05d>.png``. Two more optional columns: ``negative_prompt`` (per row, e.g. a user's banned concepts for
    the prompt-based baseline; empty = none) and ``seed`` (per row, an integer; empty = ``--seed`` + index), so that
    several prompt lists can share seeds image by image."""
    path = Path(path)
    if not path.is_file():
        raise InferError(f"--prompts_csv file not found: {path}")
    jobs = []
    from psa_adapter.utils import NotUTF8Error, read_utf8

    try:
        text = read_utf8(path, bom=True, translate_newlines=False)  # a byte-order mark is tolerated
    except NotUTF8Error as err:
        raise InferError(str(err)) from None
    # newline="" because captions may contain newlines
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "caption" not in columns:
            raise InferError(f"{path}: no 'caption' column (found columns: {', '.join(columns) or 'none'})")
        for row in reader:
            where = f"{path} line {reader.line_num}"
            user = (row.get("user_id") or "").strip()
            name = (row.get("file_name") or "").strip() or f"{len(jobs):05d}.png"
            seed_text = (row.get("seed") or "").strip()
            try:
                seed = int(seed_text) if seed_text else None
            except ValueError:
                raise InferError(f"{where}: seed {seed_text!r} is not an integer") from None
            jobs.append(Job(
                index=len(jobs), prompt=row["caption"] or "", where=where,
                file_name=check_file_name(name, where), user=normalize_user_id(user, where) if user else None,
                negative_prompt=(row.get("negative_prompt") or "").strip() or None, seed=seed,
            ))
    return jobs


def prompt_jobs(prompt: str, num_images: int) -> list[Job]:
    """``num_images`` images of one prompt, named ``00000.png``, ``00001.png``, ..."""
    return [Job(index=i, prompt=prompt, file_name=f"{i:05d}.png", user=None, where="--prompt")
            for i in range(num_images)]


def dedupe_file_names(jobs: list[Job]) -> int:
    """Rename repeated file names ``x.jpg`` -> ``x_1.jpg`` (upstream debug.csv repeats one); returns how many."""
    seen, renamed = set(), 0
    for job in jobs:
        if job.file_name in seen:
            path = PurePosixPath(job.file_name)
            k = 1
            while str(path.with_name(f"{path.stem}_{k}{path.suffix}")) in seen:
                k += 1
            job.file_name = str(path.with_name(f"{path.stem}_{k}{path.suffix}"))
            renamed += 1
        seen.add(job.file_name)
    return renamed


def parse_scale(text: str):
    """``"0.5"`` -> 0.5; ``'{"down": 1, "up_blocks.1": 0.5}'`` -> a per-block dict (see ``PSAAdapter.set_scale``)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected a number or a JSON object of block -> number, got {text!r}")
    return {str(k): float(v) for k, v in value.items()}


# ----------------------------------------------------------------------------------------------------- users
def _users_module():
    try:
        from psa_adapter import users
    except ImportError as err:
        raise InferError(f"--level, --profile and --embeds_folder need psa_adapter.users, which failed to import: "
                         f"{err}") from err
    return users


def _encoder_for(adapter, adapter_path: str):
    """The user encoder the adapter was trained with (``psa_adapter.loaders.user_encoder_for``)."""
    _users_module()
    from psa_adapter.loaders import UserEncoderError, user_encoder_for

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            encoder = user_encoder_for(adapter, adapter_path)
        except UserEncoderError as err:
            raise InferError(str(err)) from err
    for warning in caught:  # one plain line each, not Python's file:line form
        print(f"warning: {warning.message}", file=sys.stderr)
    return encoder


class UserEmbeddings:
    """Each job's user as a (E,) float32 vector: ``<User_ID>.npy`` (or a store) from ``--embeds_folder``, or a level
    preset / profile file embedded with the adapter's encoder, or (``llm_args``: the parsed flags of
    ``--llm_model``) every user's profile embedded now by the LLM (``psa_adapter.users.online``). A missing user is
    an error, never a zero vector."""

    def __init__(self, embeds_folder: str | None, llm_args: argparse.Namespace | None = None):
        self.vectors: dict[str, object] = {}
        self.store = None
        self.llm_args, self.llm = llm_args, None
        if embeds_folder:
            users = _users_module()
            try:
                self.store = users.EmbeddingStore.open(embeds_folder)
            except (OSError, ValueError) as err:
                raise InferError(f"--embeds_folder {embeds_folder}: {err}") from err

    def _from_store(self, user_id: str, where: str):
        users = _users_module()
        if self.store is None:
            raise InferError(f"{where}: user {user_id} needs an embedding: pass --embeds_folder (<User_ID>.npy files)")
        try:
            return self.store[user_id]
        except users.MissingEmbeddingError as err:
            raise InferError(f"{where}: {err}") from err

    def load_ids(self, jobs: Sequence[Job]) -> None:
        """Fetch every stored embedding the jobs need, failing on the first missing one (before any model loads).
        With ``--llm_model``: embed every user's profile now (or take it from the run's store), then free the LLM."""
        if self.llm_args is not None:
            return self._embed_with_llm(jobs)
        for job in jobs:
            if job.user and job.user.isdigit() and job.user not in self.vectors:
                self.vectors[job.user] = self._from_store(job.user, job.where)

    def _embed_with_llm(self, jobs: Sequence[Job]) -> None:
        import torch
        from accelerate import PartialState

        from psa_adapter.users import online

        args, state = self.llm_args, PartialState(cpu=not torch.cuda.is_available())
        keys = {}
        for job in jobs:
            keys.setdefault(job.user, job.where)
        try:
            vectors, self.llm = online.embed_for_run(
                keys, model=args.llm_model, policy=args.policy, meta_data=args.meta_data, users_csv=args.users_csv,
                adapter_path=args.psa_path, store_path=Path(args.save_path) / online.STORE_NAME,
                statement_template=args.llm_emb_prompt_file, policy_template=args.llm_ban_prompt_file,
                device=str(state.device), is_main_process=state.is_main_process, wait=state.wait_for_everyone,
                log=lambda message: print(message, file=sys.stderr))
        except online.OnlineEmbeddingError as err:
            raise InferError(str(err)) from err
        self.vectors.update(vectors)

    def record(self, job: Job) -> dict:
        """What the manifest records about a job's user beyond its key: with ``--llm_model``, the store, the LLM
        and the banned list embedded (and who decided it: the profile, the rules or the llm policy)."""
        if self.llm is None or job.user is None:
            return {}
        from psa_adapter.users import online

        uid = self.llm.user_of[job.user]
        return {"user_embeddings": online.STORE_NAME, "llm_model": self.llm.model,
                "banned": list(self.llm.banned[uid]), "banned_by": self.llm.banned_by[uid]}

    def load_presets(self, jobs: Sequence[Job], adapter, adapter_path: str) -> None:
        """Embed ``L*`` levels and ``profile:`` users. A level is a fixed user: with ``--embeds_folder`` its stored
        embedding is used, otherwise its profile is embedded with the adapter's encoder. With ``--llm_model`` every
        user is embedded already; the LLM encoder is checked against the loaded adapter (its size, for reference
        checkpoints that have no config)."""
        if self.llm is not None:
            from psa_adapter.users import online

            try:
                online.check_encoder(adapter.config.encoder, adapter.config.embed_dim, self.llm.info, adapter_path)
            except online.OnlineEmbeddingError as err:
                raise InferError(str(err)) from err
        keys = dict.fromkeys(j.user for j in jobs if j.user and not j.user.isdigit() and j.user not in self.vectors)
        if not keys:
            return
        users = _users_module()
        profiles = {}
        for key in keys:
            if key.startswith("profile:"):
                path = key.removeprefix("profile:")
                try:
                    profiles[key] = users.load_profile(path)
                except (OSError, ValueError, KeyError) as err:
                    raise InferError(f"--profile {path}: {err}") from err
                continue
            try:
                profile = users.load_level(key)
            except (OSError, ValueError, KeyError) as err:
                raise InferError(f"--level {key}: {err}") from err
            if self.store is not None:
                self.vectors[key] = self._from_store(profile.user_id, f"--level {key}")
            else:
                profiles[key] = profile
        if profiles:
            encoder = _encoder_for(adapter, adapter_path)
            try:
                vectors = encoder.encode(list(profiles.values()))
            except ValueError as err:  # e.g. a profile without a banned list
                raise InferError(f"cannot embed {', '.join(profiles)}: {err}") from err
            self.vectors.update(zip(profiles, vectors))

    def check_dim(self, expected: int, adapter_path: str) -> None:
        """Every vector must be (E,) with the adapter's E; the message names the store or the user."""
        users = _users_module()
        if self.store is not None:
            try:
                self.store.check_dim(expected, f"the adapter {adapter_path}")
            except users.EmbeddingDimensionError as err:
                raise InferError(str(err)) from err
        for key, vector in self.vectors.items():
            if tuple(vector.shape) != (expected,):
                raise InferError(f"the embedding of user {key} has shape {tuple(vector.shape)}, but the adapter "
                                 f"{adapter_path} expects ({expected},); embed the user with the adapter's encoder or "
                                 "pass --embeds_folder with matching embeddings")

    def stack(self, jobs: Sequence[Job]):
        """(B, E) float32 tensor of the jobs' users."""
        import numpy as np
        import torch

        return torch.from_numpy(np.stack([np.asarray(self.vectors[j.user], dtype=np.float32) for j in jobs]))


# -------------------------------------------------------------------------------------------------- manifest
def _part_path(save_path: Path, rank: int) -> Path:
    return save_path / f".{MANIFEST_NAME}.part{rank:03d}"


def _read_jsonl(path: Path) -> list[dict]:
    """Entries of a manifest (part); a torn last line of a crashed run is skipped."""
    entries = []
    if not path.exists():
        return entries
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def merge_manifest(save_path: Path, jobs: Sequence[Job], settings_for) -> tuple[int, int]:
    """Write ``manifest.jsonl`` from the old manifest and every process's part file, then remove the parts.

    Images of this prompt list that already existed keep their old entry; one with no entry gets this run's
    settings and ``"resumed": true``. Returns (entries written, resumed images whose recorded settings differ
    from this run's).
    """
    from psa_adapter.utils import atomic_write_text

    manifest = save_path / MANIFEST_NAME
    entries = {e["file"]: e for e in _read_jsonl(manifest) if "file" in e and (save_path / e["file"]).exists()}
    old = dict(entries)
    parts = sorted(save_path.glob(f".{MANIFEST_NAME}.part*"))
    generated = set()
    for part in parts:
        for entry in _read_jsonl(part):
            if "file" in entry and (save_path / entry["file"]).exists():
                entries[entry["file"]] = entry
                generated.add(entry["file"])
    differing = 0
    for job in jobs:
        if job.file_name in generated or not (save_path / job.file_name).exists():
            continue
        current = settings_for(job)
        if job.file_name in old:
            if any(old[job.file_name].get(k) != current.get(k) for k in _SETTING_KEYS):
                differing += 1
        else:
            entries[job.file_name] = {**current, "resumed": True}
    ordered = sorted(entries.values(), key=lambda e: (e.get("index", 0), e["file"]))
    atomic_write_text(manifest, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in ordered))
    for part in parts:
        part.unlink()
    return len(ordered), differing


def cut_torn_last_line(path: Path) -> None:
    """Cut the unfinished last line a killed run may have left in a manifest part, so that appending starts on a
    line of its own (a line glued to a torn one would be lost too)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def remove_stale_temporaries(save_path: Path, jobs: Sequence[Job]) -> None:
    """Delete the temporary files (``.<name>.XXXXXXXX.tmp``) of ``jobs``' images that a killed run left half
    written. Only this process's own images: other processes may be writing theirs."""
    wanted: dict[Path, set[str]] = {}
    for job in jobs:
        target = save_path / job.file_name
        wanted.setdefault(target.parent, set()).add(target.name)
    for folder, names in wanted.items():
        for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
            name = stale.name[1:-len(".tmp")].rpartition(".")[0]  # mkstemp adds ".<random>"
            if name in names:
                stale.unlink(missing_ok=True)


def save_image(image, path: Path) -> None:
    """Write a PIL image atomically, in the format its extension names."""
    from psa_adapter.utils import atomic_write

    fmt = _image_formats()[path.suffix.lower()]
    if fmt == "JPEG" and image.mode != "RGB":
        image = image.convert("RGB")
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


# ------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infer.py",
        description="Generate images with Stable Diffusion 1.5 / SDXL, optionally with a PSA adapter and a user. "
        f"Image i of the prompt list uses seed --seed + i. Run under `accelerate launch` to shard prompts over "
        f"processes; existing images are skipped; {MANIFEST_NAME} records every image.",
    )
    src = parser.add_argument_group("prompts (exactly one)").add_mutually_exclusive_group(required=True)
    src.add_argument("--meta_data", help="SAGE metadata.jsonl: every record's caption, user_data.User_ID, file_name")
    src.add_argument("--prompts_csv", help="CSV with a caption column and optional user_id and file_name columns")
    src.add_argument("--prompt", help="one prompt (see --num_images)")
    parser.add_argument("--num_images", type=int, default=1, help="images of --prompt, seeds --seed + 0, 1, ...")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")

    usr = parser.add_argument_group("user (overrides any user column for every prompt)").add_mutually_exclusive_group()
    usr.add_argument("--user_id", help="a User_ID whose <User_ID>.npy is in --embeds_folder (33 or 0000033)")
    usr.add_argument("--level", help="strictness preset L0 (bans nothing) .. L5 (bans all seven categories)")
    usr.add_argument("--profile", help="a user profile file, embedded with the adapter's encoder")

    from psa_adapter.methods import add_method_arguments, method_names

    parser.add_argument("--method", choices=method_names(), default=None,
                        help="generation method (default: psa when --psa_path is given, otherwise base); every method "
                             "gets the same prompts, seeds, steps, guidance and negative prompt")
    add_method_arguments(parser)  # each method's own flags (psa_adapter.methods, psa_adapter.baselines)

    model = parser.add_argument_group("model")
    model.add_argument("--sd_model", default="runwayml/stable-diffusion-v1-5",
                       help="diffusers pipeline folder or hub id (SD1.5 or SDXL, detected from the UNet config)")
    model.add_argument("--sdxl", action="store_true", help="accepted for compatibility; SDXL is detected anyway")
    model.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                       help="weights dtype; auto = fp16 on CUDA (the reference's), fp32 on CPU")

    psa = parser.add_argument_group("PSA adapter")
    psa.add_argument("--load_psa", action="store_true", help="generate with the adapter in --psa_path")
    psa.add_argument("--psa_path", help="our adapter folder, or a reference psa_adapter.bin / .safetensors "
                                        "(or a folder holding one); implies --load_psa")
    psa.add_argument("--embeds_folder", help="user embeddings: a folder of <User_ID>.npy or an embedding store")
    psa.add_argument("--psa_scale", type=parse_scale, default=1.0,
                     help='adapter scale: a number, or JSON per block, e.g. \'{"down": 1, "up": 0.5}\'')
    psa.add_argument("--psa_uncond", choices=("null", "off"), default="null",
                     help="unconditional branch of guidance: null = proj(0) tokens (the paper's, default); off = "
                          "zero tokens, the adapter is off there (a named variant)")
    psa.add_argument("--num_tokens", type=int, default=None,
                     help="expected user tokens K; checked against the adapter (default: the adapter's own)")
    model.add_argument("--lora_path", help="a LoRA in diffusers' format (pytorch_lora_weights.safetensors, e.g. the "
                                            "non_personalised SafetyDPO-style baseline of train.py) to load into the "
                                            "UNet")
    psa.add_argument("--llm_model", help="embed each user's profile now with this causal LM (a local folder, a hub id "
                                         "in the local cache, or a .gguf file; the reference's: Qwen/Qwen2.5-7B-"
                                         "Instruct): profiles from --profile, --level, the user_data of --meta_data "
                                         "records or --users_csv; kept in <save_path>/user_embeddings.safetensors and "
                                         "reused by a rerun")
    psa.add_argument("--policy", choices=("llm", "rules"), default=None,
                     help="with --llm_model: who decides the banned categories of a profile that has no banned list: "
                          "llm (default, the reference's: the same LM) or rules (deterministic)")
    psa.add_argument("--users_csv", help="a users table (reference users.csv format): with --method prompt, the "
                                         "banned lists of User_IDs; with --llm_model: a users table with the "
                                         "profiles of user_id columns and --user_id")
    psa.add_argument("--llm_ban_prompt_file", help="with --llm_model and --policy llm: the policy prompt template "
                                                   "(default: the packaged policy_prompt.txt)")
    psa.add_argument("--llm_emb_prompt_file", help="with --llm_model: the safety-statement template (default: the "
                                                   "packaged statement_template.txt; must match the adapter's)")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--save_path", required=True, help="output folder for images and manifest.jsonl")
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (reference 7.5)")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (reference 50)")
    gen.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base seed; image i uses seed + i (ref. 2025)")
    gen.add_argument("--batch_size", type=int, default=1, help="images per forward pass (does not change images)")
    gen.add_argument("--negative_prompt", default=None,
                     help="one negative prompt for every image and every method (default none); recorded. A "
                          "negative_prompt column in --prompts_csv gives one per row instead")
    gen.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.method is None:
        args.method = "psa" if (args.psa_path or args.load_psa) else "base"
    if args.psa_path and args.method != "psa":
        parser.error(f"--psa_path is an adapter for --method psa, not --method {args.method}")
    if args.method == "psa" and not args.psa_path:
        parser.error(f"{'--load_psa' if args.load_psa else '--method psa'} needs --psa_path")
    args.load_psa = args.method == "psa"
    for name in ("num_images", "batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.limit is not None and args.limit < 0:
        parser.error("--limit must be >= 0")
    if args.num_images != 1 and not args.prompt:
        parser.error("--num_images applies to --prompt only")
    llm_only = [f for f in ("policy", "users_csv", "llm_ban_prompt_file", "llm_emb_prompt_file") if getattr(args, f)
                and not (f == "users_csv" and args.method == "prompt")]  # --method prompt reads banned lists there
    if llm_only and not args.llm_model:
        parser.error(f"--{llm_only[0]} applies with --llm_model only")
    if args.llm_model:
        if not args.load_psa:
            parser.error(f"--llm_model embeds users for a PSA adapter (--psa_path), not for --method {args.method}")
        if args.embeds_folder:
            parser.error("give --embeds_folder (precomputed user embeddings) or --llm_model (embedded now), not both")
        args.policy = args.policy or "llm"
        if args.llm_ban_prompt_file and args.policy != "llm":
            parser.error("--llm_ban_prompt_file is the prompt of --policy llm")
    if args.level:
        args.level = args.level.upper()


def load_jobs(args: argparse.Namespace) -> list[Job]:
    """The prompt list of the command line, after the user override and ``--limit``."""
    if args.meta_data:
        jobs = read_sage_jobs(args.meta_data)
    elif args.prompts_csv:
        jobs = read_csv_jobs(args.prompts_csv)
    else:
        jobs = prompt_jobs(args.prompt, args.num_images)
    if args.limit is not None:
        jobs = jobs[: args.limit]
    if args.negative_prompt is not None:
        rows = [j for j in jobs if j.negative_prompt is not None]
        if rows:
            raise InferError(f"{rows[0].where}: a negative_prompt column and --negative_prompt were both given; "
                             "use one of them")
        for job in jobs:
            job.negative_prompt = args.negative_prompt
    override, flag = None, None
    if args.user_id:
        override, flag = normalize_user_id(args.user_id, "--user_id"), "--user_id"
    elif args.level:
        override, flag = args.level, "--level"
    elif args.profile:
        if not Path(args.profile).is_file():
            raise InferError(f"--profile file not found: {args.profile}")
        override, flag = f"profile:{args.profile}", "--profile"
    if override:
        for job in jobs:
            job.user, job.where = override, flag  # messages about the user then name the flag, not a CSV line
    return jobs


def _batches(items: Sequence[Job], size: int) -> Iterator[Sequence[Job]]:
    """Consecutive jobs, at most ``size`` at a time, never mixing negative prompts (one per pipeline call)."""
    batch: list[Job] = []
    for job in items:
        if batch and (len(batch) == size or job.negative_prompt != batch[0].negative_prompt):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def run(args: argparse.Namespace) -> dict:
    """Generate the images of ``args`` (parsed by ``build_parser``); returns counts for this process."""
    # Inputs are checked before the heavy imports and the model load, so bad input fails in seconds.
    save_path = Path(args.save_path)
    jobs = load_jobs(args)
    renamed = dedupe_file_names(jobs)
    from psa_adapter.methods import MethodError, get_method

    try:
        method = get_method(args.method)(args)
        method.validate(jobs)
    except MethodError as err:
        raise InferError(str(err)) from err
    users = None
    if method.needs_user:
        missing = [j for j in jobs if not j.user]
        if missing:
            raise InferError(f"{missing[0].where}: prompt has no user; give --user_id, --level or --profile, or a "
                             "user_id column")
        users = UserEmbeddings(args.embeds_folder, args if args.llm_model else None)
        users.load_ids(jobs)  # every stored embedding exists, before the slow model load

    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from psa_adapter.pipeline import ModelLoadError, default_dtype, load_pipeline

    # cpu=True lets several CPU processes (torchrun, or `accelerate launch --multi_gpu` without GPUs) shard too.
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    if renamed and state.is_main_process:
        print(f"note: {renamed} repeated file names got a _<k> suffix", file=sys.stderr)
    if not (method.needs_user or method.uses_user) and state.is_main_process and any(j.user for j in jobs):
        print(f"note: --method {method.name} does not use users: they are recorded in the manifest only",
              file=sys.stderr)

    def job_seed(job: Job) -> int:
        return job.seed if job.seed is not None else args.seed + job.index

    method_settings = {"psa_scale": None, "psa_uncond": None, "adapter": None, "lora": None, **method.settings()}

    def settings_for(job: Job) -> dict:
        return {
            "file": job.file_name, "index": job.index, "prompt": job.prompt, "user": job.user,
            "seed": job_seed(job), **method_settings,
            "guidance": args.guidance, "steps": args.steps, "model": args.sd_model,
            "negative_prompt": job.negative_prompt, **(users.record(job) if users else {}),
            **method.job_settings(job),
        }

    my_jobs = jobs[rank::world]
    todo = [j for j in my_jobs if not (save_path / j.file_name).exists()]
    save_path.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(save_path, todo)
    if state.is_main_process:
        import yaml

        from psa_adapter.utils import atomic_write_text

        atomic_write_text(save_path / CONFIG_NAME, yaml.safe_dump({**vars(args), "num_processes": world}))

    if todo:
        dtype = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        try:
            pipe = load_pipeline(args.sd_model, state.device, dtype or default_dtype(state.device))
        except ModelLoadError as err:
            raise InferError(str(err)) from err
        from psa_adapter.adapter import is_sdxl_unet

        if args.sdxl and not is_sdxl_unet(pipe.unet) and state.is_main_process:
            print(f"note: --sdxl given but {args.sd_model} is not an SDXL model; generating with its own pipeline",
                  file=sys.stderr)
        try:
            method.prepare(pipe, jobs, users)
        except MethodError as err:
            raise InferError(str(err)) from err
        method_settings.update(method.settings())  # what prepare resolved (e.g. which implementation runs)

        bar = tqdm(total=len(my_jobs), initial=len(my_jobs) - len(todo), unit="img", disable=not state.is_main_process,
                   desc=f"generating (process 0 of {world})" if world > 1 else "generating")
        cut_torn_last_line(_part_path(save_path, rank))
        with _part_path(save_path, rank).open("a", encoding="utf-8") as part:
            for batch in _batches(todo, args.batch_size):
                images = method.generate(
                    pipe, batch, [job_seed(j) for j in batch],
                    negative_prompt=batch[0].negative_prompt, guidance_scale=args.guidance,
                    num_inference_steps=args.steps, height=args.height, width=args.width,
                )
                for job, image in zip(batch, images):
                    save_image(image, save_path / job.file_name)
                    entry = {**settings_for(job), "width": image.width, "height": image.height}
                    part.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    part.flush()  # a crash keeps the entries of every image already written
                bar.update(len(batch))
        bar.close()

    state.wait_for_everyone()
    counts = {"generated": len(todo), "skipped": len(my_jobs) - len(todo), "total": len(jobs)}
    if state.is_main_process:
        written, differing = merge_manifest(save_path, jobs, settings_for)
        if differing:
            print(f"warning: {differing} existing images were made with other settings than this run's (see "
                  f"{MANIFEST_NAME}); delete them to regenerate", file=sys.stderr)
        present = sum((save_path / j.file_name).exists() for j in jobs)
        print(f"done: {present}/{len(jobs)} images in {save_path} (this process generated {counts['generated']}, "
              f"skipped {counts['skipped']} existing); manifest: {save_path / MANIFEST_NAME} ({written} entries)",
              file=sys.stderr)
    return counts


def main(argv: Sequence[str | os.PathLike] | None = None) -> int:
    """Entry point of ``infer.py``: exit status 0, or 1 with one message on bad input (2 for bad flags)."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else [os.fspath(a) for a in argv])
    _validate(parser, args)
    try:
        run(args)
    except InferError as err:
        print(f"infer.py: error: {err}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "DEFAULT_SEED",
    "InferError",
    "Job",
    "UserEmbeddings",
    "build_parser",
    "load_jobs",
    "main",
    "merge_manifest",
    "normalize_user_id",
    "read_csv_jobs",
    "read_sage_jobs",
    "run",
]
