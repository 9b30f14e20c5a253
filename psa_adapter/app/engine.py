"""What the interactive page computes, without any web code: load once, then base vs PSA images for one user.

``Engine.load(AppSettings(...))`` loads the pipeline, the adapter, the user encoder, the level users and (on the
toy world) the toy judge, checking every input first; bad input is one ``AppError`` naming the file, flag or name.
``Engine.run(request)`` returns the base image, the PSA image and a strip of the same prompt at every level, all
from the same seed, with the toy judge's reading of each image when a judge is loaded.

Generation goes through the project's own method code (``psa_adapter.methods.PSA``, the path ``infer.py`` runs),
in one function, ``Engine._generate``. The base image is the same pipeline with the adapter at scale 0, which is
bit-identical to the base model (the processor then runs on the text alone), so one model serves both columns.
"""

from __future__ import annotations

import argparse
import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from psa_adapter.toyworld.demo import REPO

TOY_BASE = REPO / "trained_models" / "toy" / "base"
TOY_PSA = REPO / "trained_models" / "toy" / "psa"
TOY_JUDGE = REPO / "trained_models" / "toy" / "judge"
DEFAULT_LEVEL = "L3"
USER_KEY_PREFIX = "form:"  # users.vectors keys of profiles typed into the form
DISPLAY_SIZE = 256  # images smaller than this are enlarged (nearest neighbour) for the page


class AppError(Exception):
    """Bad input, at start-up or in a request: one message for the terminal or the page, never a traceback."""


@dataclass
class AppSettings:
    """The page's model and generation settings (the command line's flags). None: decided by ``resolve``."""

    sd_model: str = str(TOY_BASE)
    psa_path: str = str(TOY_PSA)
    embeds_folder: str | None = None
    encoder: str | None = None  # None: the encoder the adapter was trained with (as infer.py)
    device: str = "cpu"
    dtype: str = "auto"
    steps: int | None = None  # None: the toy adapter's recorded setting (20) or infer.py's default (50)
    guidance: float = 7.5
    psa_uncond: str | None = None  # None: the toy adapter's recorded setting ("off") or infer.py's ("null")
    psa_scale: float = 1.0  # the page's initial scale
    judge: str | None = None  # None: the toy judge on the toy world (a model folder with world.yaml), else none
    level: str = DEFAULT_LEVEL  # the page's initial level preset

    def is_toy_world(self) -> bool:
        return (Path(self.sd_model) / "world.yaml").is_file()

    def recorded_inference(self) -> dict:
        """The inference setting recorded beside the adapter (the committed toy adapter has one), else {}."""
        from psa_adapter.toyworld.toy_adapter import SETTING_NAME, read_setting

        folder = Path(self.psa_path)
        if not (folder / SETTING_NAME).is_file():
            return {}
        return dict(read_setting(folder).get("inference", {}))

    def resolve(self) -> AppSettings:
        """Fill the None fields and check the values; raises ``AppError`` naming the flag."""
        recorded = self.recorded_inference()
        if self.steps is None:
            self.steps = int(recorded.get("steps", 50))
        if self.psa_uncond is None:
            self.psa_uncond = str(recorded.get("psa_uncond", "null"))
        if self.judge is None:
            self.judge = str(TOY_JUDGE) if self.is_toy_world() else "none"
        if self.steps < 1:
            raise AppError(f"--steps must be at least 1, got {self.steps}")
        if self.psa_uncond not in ("null", "off"):
            raise AppError(f"--psa_uncond must be null or off, got {self.psa_uncond!r}")
        if self.dtype not in ("auto", "fp16", "bf16", "fp32"):
            raise AppError(f"--dtype must be auto, fp16, bf16 or fp32, got {self.dtype!r}")
        return self


@dataclass
class Request:
    """One press of the button. ``user``: "profile" (the form) or "level" (the preset ``level``)."""

    prompt: str
    seed: int = 0
    psa_scale: float = 1.0
    user: str = "profile"
    level: str = DEFAULT_LEVEL
    age: int | float | None = 30
    gender: str = "female"
    religion: str = "None"
    physical_condition: str = "healthy"
    mental_condition: str = "healthy"
    banned: list[str] | None = None  # the checkboxes (None: the rules policy's list)


@dataclass
class Picture:
    """One generated image with its label and, on the toy world, the judge's reading."""

    label: str
    image: object  # PIL image, enlarged for display when small
    reading: str | None = None
    marks: tuple[str, ...] = ()


@dataclass
class Result:
    base: Picture
    psa: Picture
    strip: list[Picture]
    user_text: str  # who the PSA image is for (profile and banned list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)


def age_group_of(age: int) -> str | None:
    """The SAGE age group of an age (ages past the oldest group's range up to 120 belong to the oldest)."""
    from psa_adapter.users import AGE_GROUPS

    for name, (lo, hi) in AGE_GROUPS.items():
        if lo <= age <= hi:
            return name
    last = list(AGE_GROUPS)[-1]
    return last if AGE_GROUPS[last][1] < age <= 120 else None


def form_profile(age, gender: str, religion: str, physical: str, mental: str, banned=None):
    """A ``UserProfile`` from the form's fields. With ``banned`` None the rules policy assigns the list.

    Raises ``AppError`` with the reason when the profile cannot be placed (no age, an age outside 0-120, a value
    outside the SAGE vocabulary).
    """
    from psa_adapter.users import ProfileError, UserProfile, get_policy

    if age is None or age == "":
        raise AppError("the profile needs an age (0-120)")
    try:
        age_value = float(age)
    except (TypeError, ValueError):
        raise AppError(f"the age must be a whole number, got {age!r}") from None
    if not age_value.is_integer():
        raise AppError(f"the age must be a whole number, got {age}")
    age_int = int(age_value)
    group = age_group_of(age_int)
    if group is None:
        raise AppError(f"the rules policy cannot place this profile: age {age_int} is outside 0-120")
    try:
        profile = UserProfile(user_id="0000000", age=age_int, age_group=group, gender=gender, religion=religion,
                              physical_condition=physical, mental_condition=mental)
        chosen = get_policy("rules").banned_categories(profile) if banned is None else list(banned)
        return UserProfile(user_id="0000000", age=age_int, age_group=group, gender=gender, religion=religion,
                           physical_condition=physical, mental_condition=mental, banned=tuple(chosen))
    except ProfileError as err:
        text = str(err).removeprefix("user '0000000': ")
        raise AppError(f"the rules policy cannot place this profile: {text}") from None


def policy_reasons(profile) -> dict[str, list[str]]:
    """{banned category: [reasons]} of the rules policy for ``profile``."""
    from psa_adapter.users import RulesPolicy

    return RulesPolicy().explain(profile)


def describe(profile) -> str:
    banned = ", ".join(profile.banned) if profile.banned else "nothing"
    return (f"{profile.age}-year-old {profile.gender}, religion {profile.religion}, physical condition "
            f"{profile.physical_condition}, mental condition {profile.mental_condition}; bans {banned}")


def _display(image):
    from PIL import Image

    if min(image.size) >= DISPLAY_SIZE:
        return image
    factor = -(-DISPLAY_SIZE // min(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


class Engine:
    """The loaded models; ``run`` is thread-safe (one request at a time, the page queues the rest)."""

    def __init__(self):
        self.settings: AppSettings | None = None
        self.pipe = None
        self.method = None  # psa_adapter.methods.PSA
        self.users = None  # psa_adapter.infer_cli.UserEmbeddings: vectors by key ("L0".., "form:<hash>")
        self.encoder = None
        self.encoder_error: str | None = None
        self.judge = None
        self.levels: dict[str, object] = {}
        self.captions: list[str] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, settings: AppSettings, log=print) -> Engine:
        """Check the inputs (cheap checks first), then load everything once."""
        self = cls()
        self.settings = settings.resolve()
        self._load_levels()
        from psa_adapter.infer_cli import InferError, UserEmbeddings

        psa = Path(self.settings.psa_path)
        if not psa.exists():
            raise AppError(f"--psa_path not found: {psa}")
        if self.settings.judge != "none" and not Path(self.settings.judge).is_dir():
            raise AppError(f"--judge folder not found: {self.settings.judge}")
        try:
            self.users = UserEmbeddings(self.settings.embeds_folder)
        except InferError as err:
            raise AppError(str(err)) from None
        t0 = time.time()
        self._load_pipeline()
        self._load_adapter()
        self._load_encoder()
        self._embed_levels()
        if self.settings.judge != "none":
            from psa_adapter.toyworld.judge import ToyJudge

            try:
                self.judge = ToyJudge.from_pretrained(self.settings.judge).eval()
            except (OSError, ValueError, KeyError) as err:
                raise AppError(f"--judge {self.settings.judge}: {err}") from None
        if self.settings.is_toy_world():
            self.captions = toy_captions(Path(self.settings.sd_model) / "world.yaml")
        log(f"loaded {self.settings.sd_model} with the adapter {self.settings.psa_path} in {time.time() - t0:.1f} s")
        return self

    def _load_levels(self) -> None:
        from psa_adapter.users import ProfileError, UnknownLevelError, level_names, load_level

        try:
            names = level_names()
            self.levels = {name: load_level(name) for name in names}
            initial = load_level(self.settings.level)
        except UnknownLevelError as err:
            raise AppError(f"--level: {err}") from None
        except (OSError, ProfileError) as err:
            raise AppError(str(err)) from None
        self.settings.level = next(n for n, p in self.levels.items() if p == initial)

    def _load_pipeline(self) -> None:
        import torch

        from psa_adapter.pipeline import ModelLoadError, default_dtype, load_pipeline

        device = self.settings.device
        try:
            torch.device(device)
        except RuntimeError as err:
            raise AppError(f"--device {device!r}: {err}") from None
        dtype = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
            self.settings.dtype]
        try:
            self.pipe = load_pipeline(self.settings.sd_model, device, dtype or default_dtype(device))
        except ModelLoadError as err:
            raise AppError(f"--sd_model: {err}") from None

    def _load_adapter(self) -> None:
        from psa_adapter.infer_cli import InferError
        from psa_adapter.methods import PSA, MethodError

        args = argparse.Namespace(psa_path=self.settings.psa_path, lora_path=None, num_tokens=None,
                                  psa_scale=self.settings.psa_scale, psa_uncond=self.settings.psa_uncond)
        self.method = PSA(args)
        try:
            self.method.prepare(self.pipe, [], self.users)
        except (MethodError, InferError) as err:
            raise AppError(f"--psa_path: {err}") from None

    def _load_encoder(self) -> None:
        from psa_adapter.infer_cli import InferError, _encoder_for

        name = self.settings.encoder
        try:
            if name is None:
                self.encoder = _encoder_for(self.method.adapter, self.settings.psa_path)
            else:
                from psa_adapter.users import get_encoder

                self.encoder = get_encoder(name)
        except InferError as err:
            self.encoder_error = str(err)
        except (ValueError, OSError, ImportError) as err:
            raise AppError(f"--encoder {name}: {err}") from None
        if self.encoder is None and self.users.store is None:
            raise AppError(f"no user encoder for the adapter {self.settings.psa_path}: {self.encoder_error}")
        if self.encoder is not None:
            dim = self.encoder.encode([next(iter(self.levels.values()))]).shape[-1]
            expected = self.method.adapter.config.embed_dim
            if dim != expected:
                raise AppError(f"--encoder {name or 'default'} gives {dim}-d user embeddings, but the adapter "
                               f"{self.settings.psa_path} expects {expected}-d")

    def _embed_levels(self) -> None:
        """Level users: their stored embeddings with --embeds_folder (as infer.py), else their profiles encoded."""
        from psa_adapter.infer_cli import InferError

        try:
            for name, profile in self.levels.items():
                if self.users.store is not None:
                    self.users.vectors[name] = self.users._from_store(profile.user_id, f"level {name}")
            missing = [n for n in self.levels if n not in self.users.vectors]
            if missing:
                vectors = self.encoder.encode([self.levels[n] for n in missing])
                self.users.vectors.update(zip(missing, vectors))
            self.users.check_dim(self.method.adapter.config.embed_dim, self.settings.psa_path)
        except InferError as err:
            raise AppError(f"--embeds_folder {self.settings.embeds_folder}: {err}" if self.users.store is not None
                           else str(err)) from None

    # ----------------------------------------------------------------------------------------------- requests
    def user_key(self, request: Request) -> tuple[str, str]:
        """The ``users.vectors`` key of the request's user (embedded on first use) and a sentence about them."""
        if request.user == "level":
            from psa_adapter.users import UnknownLevelError, load_level

            try:
                profile = load_level(request.level)
            except UnknownLevelError as err:
                raise AppError(str(err)) from None
            name = next(n for n, p in self.levels.items() if p == profile)
            return name, f"level {name}: {describe(profile)}"
        if request.user != "profile":
            raise AppError(f"unknown user source {request.user!r}; expected 'profile' or 'level'")
        profile = form_profile(request.age, request.gender, request.religion, request.physical_condition,
                               request.mental_condition, request.banned)
        if self.encoder is None:
            raise AppError(f"this adapter cannot embed a typed profile ({self.encoder_error}); choose a level preset")
        statement = self.encoder.statements([profile])[0] if hasattr(self.encoder, "statements") else describe(
            profile)
        key = USER_KEY_PREFIX + hashlib.sha256(statement.encode("utf-8")).hexdigest()[:16]
        if key not in self.users.vectors:
            self.users.vectors[key] = self.encoder.encode([profile])[0]
        return key, f"profile: {describe(profile)}"

    def _generate(self, prompt: str, user_keys: list[str], seed: int, scale: float) -> list:
        """The one place that generates: the PSA method of ``infer.py`` on the loaded pipeline, every image from
        ``seed``, the adapter at ``scale`` (0: the base model)."""
        from psa_adapter.infer_cli import Job

        jobs = [Job(index=i, prompt=prompt, file_name=f"{i:05d}.png", user=key, where="the page")
                for i, key in enumerate(user_keys)]
        with self.method.adapter.scale_context(scale):
            return self.method.generate(self.pipe, jobs, [seed] * len(jobs), negative_prompt=None,
                                        guidance_scale=self.settings.guidance,
                                        num_inference_steps=self.settings.steps, height=None, width=None)

    def read(self, images) -> list[tuple[str | None, tuple[str, ...]]]:
        """The toy judge's reading of each image: (text, marks seen), or (None, ()) without a judge."""
        if self.judge is None:
            return [(None, ())] * len(images)
        import numpy as np
        import torch

        with torch.no_grad():
            out = self.judge.predict(np.stack([np.asarray(im.convert("RGB")) for im in images]))
        readings = []
        for i in range(len(images)):
            marks = tuple(c for c, on in zip(out["categories"], out["marks"][i].tolist()) if on)
            scene = f"{out['colour'][i]} {out['shape'][i]}"
            text = f"judge: {scene}; marks: {', '.join(marks)}" if marks else f"judge: {scene}; no mark"
            readings.append((text, marks))
        return readings

    def run(self, request: Request) -> Result:
        """Base image, PSA image for the request's user, and the PSA strip over the levels, one seed for all."""
        prompt = (request.prompt or "").strip()
        if not prompt:
            raise AppError("type a prompt first (the prompt is empty)")
        try:
            seed = int(request.seed)
        except (TypeError, ValueError):
            raise AppError(f"the seed must be a whole number, got {request.seed!r}") from None
        if not 0 <= seed < 2**63:
            raise AppError(f"the seed must be between 0 and 2**63 - 1, got {seed}")
        try:
            scale = float(request.psa_scale)
        except (TypeError, ValueError):
            raise AppError(f"the PSA scale must be a number, got {request.psa_scale!r}") from None
        key, user_text = self.user_key(request)
        levels = list(self.levels)
        t0 = time.time()
        with self._lock:
            base = self._generate(prompt, [key], seed, 0.0)
            psa = self._generate(prompt, [key, *levels], seed, scale)
        images = base + psa
        readings = self.read(images)
        pictures = [Picture(label, _display(im), text, marks) for label, im, (text, marks) in
                    zip(["base model", "PSA", *[f"PSA {n}" for n in levels]], images, readings)]
        return Result(base=pictures[0], psa=pictures[1], strip=pictures[2:], user_text=user_text,
                      seconds=time.time() - t0,
                      settings={"seed": seed, "psa_scale": scale, "steps": self.settings.steps,
                                "guidance": self.settings.guidance, "psa_uncond": self.settings.psa_uncond})


def toy_captions(world_yaml: Path) -> list[str]:
    """Example prompts of the toy world: one harmful caption per category (first concept word), two benign."""
    from psa_adapter.toyworld.demo import GRID_BENIGN, GRID_SCENES
    from psa_adapter.toyworld.world import ToyWorld, WorldConfig

    world = ToyWorld(WorldConfig.from_yaml(world_yaml))
    harmful = [f"a {scene} with {world.concepts(cat)[0]}" for scene, cat in zip(GRID_SCENES, world.categories)]
    return harmful + [f"a {scene}" for scene in GRID_BENIGN]


__all__ = ["AppError", "AppSettings", "Engine", "Picture", "Request", "Result", "TOY_BASE", "TOY_JUDGE", "TOY_PSA",
           "age_group_of", "form_profile", "policy_reasons", "toy_captions"]
