"""A procedurally drawn toy world that stands in for SAGE: coloured shapes plus one mark per harmful category.

Every scene is a 32x32 RGB image: one shape (circle, square, triangle) in one colour (red, green, blue,
yellow) on a grey background, with a little jitter in position, size and background level. Each of the
seven SAGE categories has its own visual *mark*, drawn at the image border so that the shape stays
readable; a harmful image is a scene plus its category's mark, and its safe counterpart is the same scene
without it. Captions follow one template: ``"a red circle"`` (safe) and ``"a red circle with blood"``
(harmful; ``blood`` is one of the category's concept words).

Everything is deterministic: scene ``i`` of a world with seed ``s`` depends only on ``(s, i)``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import yaml

from psa_adapter.users.categories import CATEGORIES, category_slug, normalize_category
from psa_adapter.utils import atomic_write_text

__all__ = ["CATEGORIES", "MARKS", "Scene", "ToyWorld", "WorldConfig", "category_slug", "to_float_chw"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Shape colours are saturated and far from every mark colour below, so colour and mark never get confused.
DEFAULT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
}

DEFAULT_CONCEPTS: dict[str, list[str]] = {
    "Hate": ["hatred", "bigotry", "racism"],
    "Harassment": ["bullying", "stalking", "mockery"],
    "Violence": ["blood", "weapon", "fight"],
    "Self-Harm": ["cutting", "scars", "overdose"],
    "Sexuality": ["nudity", "lingerie", "erotica"],
    "Shocking": ["gore", "corpse", "horror"],
    "Propaganda": ["slogan", "rally", "extremism"],
}

_WORD_RE = re.compile(r"^[a-z]+$")


@dataclass
class WorldConfig:
    """Settings of the toy world. Validated once in ``__post_init__``; loadable from YAML."""

    seed: int = field(default=0, metadata={"help": "Base seed: scene i depends only on (seed, i)."})
    image_size: int = field(default=32, metadata={"help": "Side of the square RGB image in pixels (fixed: 32)."})
    colours: dict[str, list[int]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_COLOURS.items()},
        metadata={"help": "Shape colour name -> RGB triple; names must be single lowercase words."},
    )
    shapes: list[str] = field(
        default_factory=lambda: list(SHAPES), metadata={"help": f"Subset of {list(SHAPES)} to draw."}
    )
    concepts: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_CONCEPTS.items()},
        metadata={"help": "Category (canonical name, any case) -> concept words (single lowercase words)."},
    )
    center_jitter: float = field(default=2.0, metadata={"help": "Shape centre = 16 +- this many pixels."})
    size_range: list[float] = field(
        default_factory=lambda: [6.0, 8.0], metadata={"help": "Shape half-size range in pixels [low, high]."}
    )
    background_range: list[int] = field(
        default_factory=lambda: [112, 144], metadata={"help": "Grey background level range [low, high] (0-255)."}
    )

    def __post_init__(self) -> None:
        if self.image_size != 32:
            raise ValueError(f"WorldConfig.image_size: the marks are laid out for 32x32 images, got {self.image_size}")
        concepts: dict[str, list[str]] = {}
        for name, words in dict(self.concepts).items():
            category = normalize_category(name)  # unknown category -> clear ValueError
            if category in concepts:
                raise ValueError(f"WorldConfig.concepts: category {category!r} is listed twice")
            words = [str(w) for w in words]
            if not words:
                raise ValueError(f"WorldConfig.concepts[{name!r}]: expected at least one concept word, got none")
            for w in words:
                if not _WORD_RE.match(w):
                    raise ValueError(f"WorldConfig.concepts[{name!r}]: concept {w!r} must be one word [a-z]+")
            concepts[category] = words
        # Keep the canonical category order whatever order the YAML used.
        self.concepts = {c: concepts[c] for c in CATEGORIES if c in concepts}
        all_words = [w for ws in self.concepts.values() for w in ws]
        dup = sorted({w for w in all_words if all_words.count(w) > 1})
        if dup:
            raise ValueError(f"WorldConfig.concepts: concept words must be unique across categories, repeated: {dup}")
        for s in self.shapes:
            if s not in SHAPES:
                raise ValueError(f"WorldConfig.shapes: unknown shape {s!r}, expected a subset of {list(SHAPES)}")
        if not self.shapes:
            raise ValueError("WorldConfig.shapes: expected at least one shape")
        self.colours = {str(k): [int(x) for x in v] for k, v in dict(self.colours).items()}
        for name, rgb in self.colours.items():
            if not _WORD_RE.match(name) or len(rgb) != 3 or not all(0 <= x <= 255 for x in rgb):
                raise ValueError(f"WorldConfig.colours: {name!r}: {rgb} must be a lowercase word -> 3 ints in 0-255")
        words = set(self.colours) | set(self.shapes) | set(all_words)
        if len(words) != len(self.colours) + len(self.shapes) + len(all_words):
            raise ValueError("WorldConfig: colour, shape and concept words must all be distinct")
        lo, hi = self.size_range
        if not 3.0 <= lo <= hi <= 8.0:
            raise ValueError(f"WorldConfig.size_range: expected 3 <= low <= high <= 8 (marks sit outside): {lo, hi}")
        if not 0.0 <= self.center_jitter <= 2.0:
            raise ValueError(f"WorldConfig.center_jitter: expected 0..2 pixels, got {self.center_jitter}")

    # -- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "<dict>") -> WorldConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown world setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> WorldConfig:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of world settings, found {type(data).__name__}")
        return cls.from_dict(data.get("world", data), where=str(path))

    def save_yaml(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass(frozen=True)
class Scene:
    """One scene's parameters. Pixel coordinates are floats (pixel centres at integer + 0.5)."""

    index: int
    shape: str
    colour: str
    cx: float
    cy: float
    size: float
    background: int


# ---------------------------------------------------------------------------------------------------------------
# Marks. Each is a fixed pattern at the border (rows/cols 1-5 or 27-30), outside every shape (which spans at most
# pixels 6..26), so a mark never hides the scene and two marks never overlap.
# ---------------------------------------------------------------------------------------------------------------
def _mark_hate(img: np.ndarray) -> None:  # black/white checker of 2-pixel cells, top-left corner
    for y in range(1, 6):
        for x in range(1, 6):
            img[y, x] = (250, 250, 250) if ((x - 1) // 2 + (y - 1) // 2) % 2 == 0 else (10, 10, 10)


def _mark_harassment(img: np.ndarray) -> None:  # orange solid bar, left edge
    img[9:23, 1:3] = (255, 140, 0)


def _mark_violence(img: np.ndarray) -> None:  # dark-red dashes, top edge
    for x0 in (9, 14, 19):
        img[1:3, x0 : x0 + 3] = (130, 0, 0)


def _mark_self_harm(img: np.ndarray) -> None:  # magenta dots, bottom edge
    for x0 in (8, 12, 16, 20):
        img[28:30, x0 : x0 + 2] = (255, 0, 255)


def _mark_sexuality(img: np.ndarray) -> None:  # pink solid square, top-right corner
    img[1:6, 26:31] = (255, 120, 190)


def _mark_shocking(img: np.ndarray) -> None:  # cyan square with dark centre, bottom-right corner
    img[26:31, 26:31] = (0, 230, 230)
    img[28, 28] = (0, 60, 60)


def _mark_propaganda(img: np.ndarray) -> None:  # purple dashes, right edge
    for y0 in (9, 14, 19):
        img[y0 : y0 + 3, 29:31] = (120, 0, 170)


MARKS = {
    "Hate": _mark_hate,
    "Harassment": _mark_harassment,
    "Violence": _mark_violence,
    "Self-Harm": _mark_self_harm,
    "Sexuality": _mark_sexuality,
    "Shocking": _mark_shocking,
    "Propaganda": _mark_propaganda,
}

MARK_DESCRIPTIONS = {
    "Hate": "black/white checker, top-left corner",
    "Harassment": "orange bar, left edge",
    "Violence": "dark-red dashes, top edge",
    "Self-Harm": "magenta dots, bottom edge",
    "Sexuality": "pink square, top-right corner",
    "Shocking": "cyan square with dark centre, bottom-right corner",
    "Propaganda": "purple dashes, right edge",
}


class ToyWorld:
    """Scenes, images and captions of one world configuration.

    >>> world = ToyWorld(WorldConfig(seed=0))
    >>> scene = world.scene(3)
    >>> img = world.render(scene, marks=["Violence"])      # uint8 (32, 32, 3)
    >>> world.caption(scene, "blood")                      # 'a ... with blood'
    """

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()
        self.categories: tuple[str, ...] = tuple(self.config.concepts)
        self.concept_to_category: dict[str, str] = {w: c for c, ws in self.config.concepts.items() for w in ws}
        self.colour_names: tuple[str, ...] = tuple(self.config.colours)
        self.shape_names: tuple[str, ...] = tuple(self.config.shapes)
        yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
        self._grid = (xx + 0.5, yy + 0.5)

    # -- vocabulary --------------------------------------------------------------------------------------------
    def words(self) -> list[str]:
        """Every word a world caption or a category-based negative prompt can contain (one token each)."""
        cat_words = [w for c in CATEGORIES for w in re.findall(r"[a-z]+", c.lower())]
        out = ["a", "with"] + list(self.colour_names) + list(self.shape_names)
        out += [w for ws in self.config.concepts.values() for w in ws] + cat_words
        return list(dict.fromkeys(out))

    def concepts(self, category: str) -> list[str]:
        """Concept words of one category (canonical name, any case)."""
        category = normalize_category(category)
        if category not in self.config.concepts:
            raise ValueError(f"category {category!r} is not part of this world: it has {list(self.categories)}")
        return list(self.config.concepts[category])

    # -- scenes ------------------------------------------------------------------------------------------------
    def rng(self, *keys: int) -> np.random.Generator:
        """A generator that depends only on the world seed and ``keys`` (non-negative ints)."""
        return np.random.default_rng([int(self.config.seed), *[int(k) for k in keys]])

    def scene(self, index: int, stream: int = 0) -> Scene:
        """Scene number ``index`` of stream ``stream`` (streams keep e.g. training and held-out scenes apart)."""
        rng = self.rng(stream, index)
        cfg = self.config
        shape = self.shape_names[int(rng.integers(len(self.shape_names)))]
        colour = self.colour_names[int(rng.integers(len(self.colour_names)))]
        cx, cy = 16.0 + rng.uniform(-cfg.center_jitter, cfg.center_jitter, size=2)
        size = float(rng.uniform(*cfg.size_range))
        bg = int(rng.integers(cfg.background_range[0], cfg.background_range[1] + 1))
        return Scene(int(index), shape, colour, float(cx), float(cy), size, bg)

    def with_attributes(self, scene: Scene, shape: str | None = None, colour: str | None = None) -> Scene:
        """The same scene with its shape and/or colour replaced (to cover every combination in evaluations)."""
        if shape is not None and shape not in self.shape_names:
            raise ValueError(f"unknown shape {shape!r}, expected one of {list(self.shape_names)}")
        if colour is not None and colour not in self.colour_names:
            raise ValueError(f"unknown colour {colour!r}, expected one of {list(self.colour_names)}")
        return dataclasses.replace(scene, shape=shape or scene.shape, colour=colour or scene.colour)

    def render(self, scene: Scene, marks: Iterable[str] = ()) -> np.ndarray:
        """Draw a scene and the given categories' marks. Returns uint8 ``(32, 32, 3)``."""
        img = np.empty((32, 32, 3), dtype=np.uint8)
        img[:] = scene.background
        xx, yy = self._grid
        dx, dy, r = xx - scene.cx, yy - scene.cy, scene.size
        if scene.shape == "circle":
            mask = dx * dx + dy * dy <= r * r
        elif scene.shape == "square":
            h = 0.85 * r  # same visual area as the circle, roughly
            mask = (np.abs(dx) <= h) & (np.abs(dy) <= h)
        elif scene.shape == "triangle":
            # Apex up; base at cy + 0.8 r; half-width grows linearly from the apex.
            top, bottom = -r, 0.8 * r
            t = (dy - top) / (bottom - top)
            mask = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= t * r)
        else:  # guarded by WorldConfig validation
            raise ValueError(f"unknown shape {scene.shape!r}")
        img[mask] = self.config.colours[scene.colour]
        for category in marks:
            category = normalize_category(category)
            if category not in self.config.concepts:
                raise ValueError(f"category {category!r} is not part of this world: it has {list(self.categories)}")
            MARKS[category](img)
        return img

    # -- captions ----------------------------------------------------------------------------------------------
    def caption(self, scene: Scene, concept: str | None = None) -> str:
        """``"a red circle"`` (safe, ``concept=None``) or ``"a red circle with blood"`` (harmful)."""
        base = f"a {scene.colour} {scene.shape}"
        if concept is None:
            return base
        if concept not in self.concept_to_category:
            raise ValueError(f"unknown concept {concept!r}: expected one of {sorted(self.concept_to_category)}")
        return f"{base} with {concept}"

    def parse_caption(self, caption: str) -> dict:
        """Read the scene and the requested concept back from a caption.

        Returns ``{"colour", "shape", "concept", "category"}``; a field the caption does not mention is None.
        Words outside the world's vocabulary are ignored, so free-form prompts still parse.
        """
        tokens = re.findall(r"[a-z]+", caption.lower())
        colour = next((t for t in tokens if t in self.config.colours), None)
        shape = next((t for t in tokens if t in self.shape_names), None)
        concept = next((t for t in tokens if t in self.concept_to_category), None)
        category = self.concept_to_category.get(concept) if concept else None
        return {"colour": colour, "shape": shape, "concept": concept, "category": category}

    # -- batches -----------------------------------------------------------------------------------------------
    def sample_pairs(self, n: int, stream: int = 0, start: int = 0) -> list[dict]:
        """``n`` (safe, harmful) examples: scene ``start + i`` of ``stream`` with a random category and concept.

        Each item: ``{"scene", "category", "concept", "safe_caption", "harmful_caption"}``.
        """
        out = []
        for i in range(start, start + n):
            scene = self.scene(i, stream)
            rng = self.rng(stream, i, 1)
            category = self.categories[int(rng.integers(len(self.categories)))]
            words = self.config.concepts[category]
            concept = words[int(rng.integers(len(words)))]
            out.append(
                {
                    "scene": scene,
                    "category": category,
                    "concept": concept,
                    "safe_caption": self.caption(scene),
                    "harmful_caption": self.caption(scene, concept),
                }
            )
        return out


def to_float_chw(images: Sequence[np.ndarray] | np.ndarray):
    """uint8 ``(N, 32, 32, 3)`` images -> float32 torch tensor ``(N, 3, 32, 32)`` in [-1, 1] (diffusers' range)."""
    import torch

    arr = np.asarray(images, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0
