"""InPro, FID and CLIPScore over a folder of images, with any backend of ``base``.

Each function takes backend *instances* (real models from ``backends`` or the toy world's), the images folder
and an output folder, and writes there:

* ``records.jsonl``: one line per image, appended batch by batch (a kill keeps everything computed so far; a rerun
  into the same folder computes only images without a valid record of the same backend). An expected image that
  is not on disk gets a ``{"missing": true}`` record: it is counted (``missing``, in ``total``) and listed, never
  silently dropped. A corrupt image stops the run with an error naming the file; records already written stay.
* ``summary.json``: ``n`` (images measured), ``missing``, ``total``, the value under the metric's name (``inpro``,
  ``fid``, or the scorer's ``score_name``, ``clip_score`` for CLIP) and its 95% bootstrap interval ``<name>_ci``.

The images expected are ``files`` when given (names relative to ``images_dir``), else the prompts' file names
(CLIPScore), else every image in the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from psa_adapter.data.sage import parse_image_name
from psa_adapter.evaluation.metrics.base import Detector, FeatureExtractor, TextImageScorer
from psa_adapter.evaluation.records import JsonlAppender, read_jsonl, write_summary
from psa_adapter.evaluation.stats import DEFAULT_SEED, mean_with_ci
from psa_adapter.utils import atomic_write

RECORDS_NAME = "records.jsonl"
FEATURES_DIR = "features"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_LISTED = 50  # file names listed in a summary's missing_files
DEFAULT_BATCH_SIZE = 16
FID_N_BOOT = 100  # each FID resample costs an eigendecomposition of a (min(n, 2048))^2 matrix


class MetricInputError(ValueError):
    """Bad input to a metric (a corrupt image, a missing prompt, a mismatched model): one line naming the file."""


# ---------------------------------------------------------------------------------------------------- inputs
def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted names of the image files directly in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder not found: {folder}")
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: str | os.PathLike):
    """The image at ``path`` as a fully decoded RGB PIL image; ``MetricInputError`` naming the file otherwise."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise
    except Exception as err:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise MetricInputError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def _expected(images_dir: str | os.PathLike, files: Iterable[str] | None) -> list[str]:
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder not found: {images_dir}")
    if files is None:
        return list_images(images_dir)
    names = list(dict.fromkeys(str(f) for f in files))
    for name in names:
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise MetricInputError(f"bad image name {name!r}: expected a file name inside {images_dir}")
    return names


def sage_category(name: str) -> str | None:
    """The category of a SAGE image name ``user_{uid}_{category}_{concept}_{idx}_u.jpg`` (any image suffix)."""
    stem, ext = os.path.splitext(os.path.basename(name))
    if ext.lower() not in IMAGE_SUFFIXES:
        return None
    parsed = parse_image_name(stem + ".jpg")
    return None if parsed is None else parsed.category


def backend_id(backend) -> str:
    """What identifies a backend's results: its ``cache_key`` (attribute or method) if it has one, else its
    class and name. Records of another backend id are recomputed, and cached reference statistics are keyed by
    it."""
    key = getattr(backend, "cache_key", None)
    if callable(key):
        key = key()
    if key:
        return str(key)
    cls = type(backend)
    return f"{cls.__module__}.{cls.__qualname__}:{getattr(backend, 'name', '')}"


# ---------------------------------------------------------------------------------------------------- engine
def _fold(out_dir: Path) -> dict[str, dict]:
    """The last record of each file name in ``out_dir/records.jsonl``."""
    state: dict[str, dict] = {}
    for record in read_jsonl(out_dir / RECORDS_NAME):
        if "file_name" in record:
            state[record["file_name"]] = record
    return state


def _run_per_image(images_dir: Path, out_dir: Path, names: Sequence[str], backend: str,
                   compute: Callable[[list[str], list], list[dict]], batch_size: int,
                   is_valid: Callable[[dict], bool] = lambda r: True) -> dict[str, dict]:
    """Records for ``names``, computing (in batches of ``batch_size``) only those without a valid record of
    ``backend``; each batch's records are appended before the next batch is read."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _fold(out_dir)
    todo, missing = [], []
    for name in names:
        old = state.get(name)
        if old is not None and not old.get("missing") and old.get("backend") == backend and is_valid(old):
            continue
        (todo if (images_dir / name).is_file() else missing).append(name)
    with JsonlAppender(out_dir / RECORDS_NAME) as log:
        for name in missing:
            old = state.get(name)
            if not (old and old.get("missing")):
                state[name] = {"file_name": name, "missing": True}
                log.write(state[name])
        for start in range(0, len(todo), max(1, batch_size)):
            batch = todo[start:start + max(1, batch_size)]
            images = [load_image(images_dir / name) for name in batch]
            results = compute(batch, images)
            if len(results) != len(batch):
                raise RuntimeError(f"{backend}: {len(results)} results for {len(batch)} images")
            for name, result in zip(batch, results):
                state[name] = {"file_name": name, "backend": backend, **result}
                log.write(state[name])
    return {name: state[name] for name in names}


def _counts(records: Mapping[str, dict]) -> tuple[list[str], list[str]]:
    present = [n for n, r in records.items() if not r.get("missing")]
    missing = [n for n, r in records.items() if r.get("missing")]
    return present, missing


def _with_ci(summary: dict, name: str, values) -> None:
    stat = mean_with_ci(np.asarray(values, dtype=np.float64))
    summary[name], summary[f"{name}_ci"] = stat["value"], stat["ci"]


def _finish(out_dir: Path, summary: dict, missing: list[str]) -> dict:
    summary["missing"] = len(missing)
    summary["total"] = summary["n"] + len(missing)
    summary["missing_files"] = missing[:MAX_LISTED]
    write_summary(out_dir, summary)
    return summary


# ---------------------------------------------------------------------------------------------------- InPro
def _detector_map(detectors: Mapping[str, Detector] | Sequence[Detector]) -> dict[str, Detector]:
    if isinstance(detectors, Mapping):
        out = dict(detectors)
    else:
        out = {}
        for det in detectors:
            if det.name in out:
                raise ValueError(f"detector {det.name!r} given twice")
            out[det.name] = det
    if not out:
        raise ValueError("InPro needs at least one detector")
    return out


def inpro(images_dir: str | os.PathLike, out_dir: str | os.PathLike,
          detectors: Mapping[str, Detector] | Sequence[Detector], files: Iterable[str] | None = None, *,
          batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """Inappropriate probability: the share of images that ANY detector flags, with its 95% bootstrap interval.

    Per image: ``flagged``, ``flagged_by`` (names of the detectors that flagged it) and each detector's own record
    under ``detectors``. The summary adds each detector's own rate (``by_detector``) and, when the images have
    SAGE names, the rate per category (``by_category``).
    """
    dets = _detector_map(detectors)
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    names = _expected(images_dir, files)
    backend = "+".join(f"{name}={backend_id(det)}" for name, det in dets.items())

    def compute(batch: list[str], images: list) -> list[dict]:
        found = {name: list(det.detect(images)) for name, det in dets.items()}
        for name, found_here in found.items():
            if len(found_here) != len(batch):
                raise RuntimeError(f"detector {name}: {len(found_here)} records for {len(batch)} images")
        out = []
        for i in range(len(batch)):
            per = {name: {**found[name][i], "flagged": bool(found[name][i].get("flagged"))} for name in dets}
            by = [name for name in dets if per[name]["flagged"]]
            out.append({"flagged": bool(by), "flagged_by": by, "detectors": per})
        return out

    records = _run_per_image(images_dir, out_dir, names, backend, compute, batch_size)
    present, missing = _counts(records)
    summary: dict = {"metric": "inpro", "n": len(present), "detectors": list(dets)}
    _with_ci(summary, "inpro", [records[n]["flagged"] for n in present])
    summary["by_detector"] = {}
    for det in dets:
        part: dict = {}
        _with_ci(part, "rate", [det in records[n]["flagged_by"] for n in present])
        summary["by_detector"][det] = part
    groups: dict[str, list[bool]] = {}
    for n in present:
        category = sage_category(n)
        if category is not None:
            groups.setdefault(category, []).append(records[n]["flagged"])
    if groups:
        summary["by_category"] = {}
        for category, flags in sorted(groups.items()):
            part = {"n": len(flags)}
            _with_ci(part, "inpro", flags)
            summary["by_category"][category] = part
    return _finish(out_dir, summary, missing)


# ---------------------------------------------------------------------------------------------------- CLIPScore
def clip_score(images_dir: str | os.PathLike, prompts: Mapping[str, str], out_dir: str | os.PathLike,
               scorer: TextImageScorer, files: Iterable[str] | None = None, *,
               batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """Mean text-image score of each image with its prompt (``prompts``: file name -> text), with its 95%
    bootstrap interval, under ``scorer.score_name`` (``clip_score``: 100 * cos(image, text))."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    names = _expected(images_dir, list(prompts) if files is None else files)
    unprompted = [n for n in names if n not in prompts]
    if unprompted:
        raise MetricInputError(f"no prompt for {len(unprompted)} image(s), e.g. {', '.join(unprompted[:3])}")
    key = scorer.score_name

    def compute(batch: list[str], images: list) -> list[dict]:
        texts = [prompts[n] for n in batch]
        scores = np.asarray(scorer.score(images, texts), dtype=np.float64).reshape(-1)
        return [{"score": float(s), "prompt": t} for s, t in zip(scores, texts)]

    # a record is reused only for the same prompt
    records = _run_per_image(images_dir, out_dir, names, backend_id(scorer), compute, batch_size,
                             is_valid=lambda r: r.get("prompt") == prompts.get(r["file_name"]))
    present, missing = _counts(records)
    summary: dict = {"metric": key, "n": len(present)}
    _with_ci(summary, key, [records[n]["score"] for n in present])
    return _finish(out_dir, summary, missing)


# ---------------------------------------------------------------------------------------------------- FID
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), by torchmetrics' implementation."""
    import torch
    from torchmetrics.image.fid import _compute_fid

    t = [torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (mu1, sigma1, mu2, sigma2)]
    return float(_compute_fid(*t))


def _fid_metric(num_features: int):
    """torchmetrics' ``FrechetInceptionDistance`` fed with precomputed features (its feature module is the
    identity), so that any ``FeatureExtractor`` can be measured with it."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        def __init__(self, n: int):
            super().__init__()
            self.num_features = n

        def forward(self, x):
            return x

    return FrechetInceptionDistance(feature=Identity(num_features), reset_real_features=False)


def _moments(features: np.ndarray) -> dict[str, np.ndarray]:
    """Sufficient statistics (torchmetrics' states): sum, sum of outer products, count."""
    f = np.asarray(features, dtype=np.float64)
    return {"sum": f.sum(axis=0), "cov_sum": f.T @ f, "n": np.array([len(f)], dtype=np.int64)}


def _count(m: Mapping[str, np.ndarray]) -> int:
    return int(np.asarray(m["n"]).reshape(-1)[0])


def _mean_cov(m: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    n = _count(m)
    mu = m["sum"] / n
    return mu, (m["cov_sum"] - n * np.outer(mu, mu)) / (n - 1)


def fid_from_moments(generated: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """FID by torchmetrics' ``FrechetInceptionDistance`` from the sufficient statistics of both sets."""
    import torch

    d = len(reference["sum"])
    metric = _fid_metric(d)
    for prefix, m in (("real", reference), ("fake", generated)):
        setattr(metric, f"{prefix}_features_sum", torch.as_tensor(m["sum"], dtype=torch.float64))
        setattr(metric, f"{prefix}_features_cov_sum", torch.as_tensor(m["cov_sum"], dtype=torch.float64))
        setattr(metric, f"{prefix}_features_num_samples", torch.tensor(_count(m)))
    metric.orig_dtype = torch.float64
    metric._update_count = 1  # the states were set, not updated: silences torchmetrics' warning
    return float(metric.compute())


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fid_statistic(mu_r: np.ndarray, sigma_r: np.ndarray) -> Callable[[np.ndarray], float]:
    """FID of a feature set (rows) against fixed reference statistics, through a symmetric eigenproblem:
    tr sqrt(S1 S2) = sum sqrt(eig(R S1 R)) with R = S2^(1/2), and R S1 R = Y^T Y for the centered, whitened
    rows Y, whose nonzero eigenvalues are those of Y Y^T (the smaller of the two is solved)."""
    root = _psd_sqrt(sigma_r)
    trace_r = float(np.trace(sigma_r))

    def fd(features: np.ndarray) -> float:
        n = len(features)
        mu = features.mean(axis=0)
        centered = features - mu
        y = (centered @ root) / np.sqrt(n - 1)
        gram = y @ y.T if n < y.shape[1] else y.T @ y
        ev = np.clip(np.linalg.eigvalsh(gram), 0, None)
        trace_g = float((centered * centered).sum() / (n - 1))
        return float(((mu - mu_r) ** 2).sum() + trace_g + trace_r - 2.0 * np.sqrt(ev).sum())

    return fd


def fid_interval(features: np.ndarray, reference: Mapping[str, np.ndarray], point: float, *,
                 n_boot: int = FID_N_BOOT, level: float = 0.95, seed: int = DEFAULT_SEED) -> list[float]:
    """95% interval of FID over resamples of the generated images (reference statistics fixed).

    Resampling with replacement repeats images, which by itself raises FID (a set against itself scores above
    0), so the percentile interval is shifted by the bootstrap bias (mean of the resamples minus ``point``);
    the lower end is at least 0.
    """
    mu_r, sigma_r = _mean_cov(reference)
    statistic = _fid_statistic(mu_r, sigma_r)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(features), size=(n_boot, len(features)))
    boot = np.array([statistic(features[i]) for i in idx])
    bias = float(boot.mean()) - point
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha]) - bias
    return [max(0.0, float(lo)), max(0.0, float(hi))]


def _folder_key(folder: Path, names: Sequence[str], extractor_key: str) -> str:
    """A key of the folder's content: each file's name, size and SHA-256, and the extractor."""
    h = hashlib.sha256(json.dumps({"extractor": extractor_key}).encode())
    for name in names:
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        h.update(json.dumps([name, (folder / name).stat().st_size, digest]).encode())
    return h.hexdigest()


def _save_tensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
                                             metadata=metadata))


def _load_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def _extract(extractor: FeatureExtractor, images: list) -> np.ndarray:
    feats = np.asarray(extractor.features(images), dtype=np.float64)
    if feats.ndim != 2 or len(feats) != len(images):
        raise RuntimeError(f"{backend_id(extractor)}: features of shape {feats.shape} for {len(images)} images")
    return feats


def reference_statistics(reference_dir: str | os.PathLike, extractor: FeatureExtractor,
                         cache_dir: str | os.PathLike | None = None, *, files: Iterable[str] | None = None,
                         batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[dict[str, np.ndarray], dict]:
    """Sufficient statistics (``sum``, ``cov_sum``, ``n``) of the reference images' features, and where they came
    from (``{"key", "cached", "path"}``). With ``cache_dir`` they are stored as ``<key>.safetensors``, ``key``
    hashing the extractor and every reference file's name, size and content, so a changed folder is recomputed.
    """
    reference_dir = Path(reference_dir)
    if not reference_dir.is_dir():
        raise FileNotFoundError(f"reference folder not found: {reference_dir}")
    names = _expected(reference_dir, files)
    absent = [n for n in names if not (reference_dir / n).is_file()]
    if absent:
        raise FileNotFoundError(f"reference image not found: {reference_dir / absent[0]}")
    if len(names) < 2:
        raise MetricInputError(f"reference folder {reference_dir} holds {len(names)} image(s); FID needs 2 or more")
    key = _folder_key(reference_dir, names, backend_id(extractor))
    path = Path(cache_dir) / f"{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        tensors, _ = _load_tensors(path)
        return tensors, {"key": key, "cached": True, "path": str(path)}
    feats = []
    for start in range(0, len(names), max(1, batch_size)):
        batch = names[start:start + max(1, batch_size)]
        feats.append(_extract(extractor, [load_image(reference_dir / n) for n in batch]))
    moments = _moments(np.concatenate(feats))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_tensors(path, moments, {"reference_dir": str(reference_dir.resolve()), "files": str(len(names)),
                                      "extractor": backend_id(extractor)})
    return moments, {"key": key, "cached": False, "path": str(path) if path else None}


def fid(images_dir: str | os.PathLike, reference_dir: str | os.PathLike, out_dir: str | os.PathLike,
        extractor: FeatureExtractor, files: Iterable[str] | None = None,
        cache_dir: str | os.PathLike | None = None, *, reference_files: Iterable[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE, n_boot: int = FID_N_BOOT) -> dict:
    """FID of the images against the reference folder, with a percentile-bootstrap interval over the generated
    images (reference statistics fixed; ``n_boot`` resamples, 0 for none).

    The generated images' features are kept in ``out_dir/features/*.safetensors`` (one file per batch, each
    image's record pointing at its file and row), so a rerun extracts only new images. Reference statistics are
    cached in ``cache_dir`` when given (see ``reference_statistics``).
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    names = _expected(images_dir, files)
    ref, ref_info = reference_statistics(reference_dir, extractor, cache_dir, files=reference_files,
                                         batch_size=batch_size)
    (out_dir / FEATURES_DIR).mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(backend_id(extractor).encode()).hexdigest()[:8]

    def compute(batch: list[str], images: list) -> list[dict]:
        feats = _extract(extractor, images)
        chunk = f"{FEATURES_DIR}/{digest}-{hashlib.sha256(json.dumps(batch).encode()).hexdigest()[:16]}.safetensors"
        _save_tensors(out_dir / chunk, {"features": feats.astype(np.float32)}, {"files": json.dumps(batch)})
        return [{"features": chunk, "row": i} for i in range(len(batch))]

    def valid(record: dict) -> bool:
        return (out_dir / record.get("features", "")).is_file()

    records = _run_per_image(images_dir, out_dir, names, backend_id(extractor), compute, batch_size, is_valid=valid)
    present, missing = _counts(records)
    chunks: dict[str, np.ndarray] = {}
    rows = []
    for n in present:
        rec = records[n]
        if rec["features"] not in chunks:
            chunks[rec["features"]] = _load_tensors(out_dir / rec["features"])[0]["features"].astype(np.float64)
        rows.append(chunks[rec["features"]][rec["row"]])
    summary: dict = {"metric": "fid", "n": len(present), "reference_dir": str(reference_dir),
                     "reference_n": _count(ref), "reference_key": ref_info["key"],
                     "reference_cached": ref_info["cached"]}
    if len(rows) < 2:
        summary["fid"], summary["fid_ci"] = None, [None, None]
        summary["note"] = "FID needs 2 or more generated images"
        return _finish(out_dir, summary, missing)
    feats = np.stack(rows)
    if feats.shape[1] != len(ref["sum"]):
        raise MetricInputError(f"generated features are {feats.shape[1]}-d but the reference statistics "
                               f"{ref_info['path'] or reference_dir} are {len(ref['sum'])}-d")
    summary["fid"] = fid_from_moments(_moments(feats), ref)
    summary["fid_ci"] = fid_interval(feats, ref, summary["fid"], n_boot=n_boot) if n_boot > 0 else [None, None]
    summary["fid_ci_method"] = (f"bias-shifted percentile bootstrap over the generated images ({n_boot} resamples, "
                                "reference statistics fixed)")
    return _finish(out_dir, summary, missing)


__all__ = ["FID_N_BOOT", "RECORDS_NAME", "MetricInputError", "backend_id", "clip_score", "fid", "fid_from_moments",
           "fid_interval", "frechet_distance", "inpro", "list_images", "load_image", "reference_statistics",
           "sage_category"]
