"""infer.py SIGKILLed at named points: no truncated image, no duplicate manifest line, a rerun makes only what is
missing, and the images equal those of an uninterrupted run (which two runs reproduce byte for byte)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from reltools import PLANTED_KEY, assert_key_nowhere, killed, run_in_process, run_script

pytestmark = pytest.mark.slow
N = 6


def _args(ws: Path, prompts: Path, out: Path):
    return ["infer.py", "--sd_model", ws / "sd15", "--prompts_csv", prompts, "--save_path", out, "--steps", "2",
            "--height", "32", "--width", "32", "--seed", "7"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.csv"
    path.write_text("caption\n" + "".join(f"a red square number {i}\n" for i in range(N)))
    return path


@pytest.fixture(scope="module")
def reference(workspace, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer") / "uninterrupted"
    result = run_script(_args(workspace, prompts, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _images(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def _check_no_truncated_image(out: Path) -> None:
    for path in out.glob("*.png"):
        with Image.open(path) as image:
            image.load()  # raises on a truncated file


def _generated(log: str) -> int:
    return int(re.search(r"this process generated (\d+)", log).group(1))


def test_killed_generation_leaves_no_broken_image_and_a_rerun_makes_only_the_missing(workspace, prompts, reference,
                                                                                     tmp_path):
    out = tmp_path / "killed"
    # 1. killed right after the 2nd image was written, before its manifest line
    r = run_script(_args(workspace, prompts, out), kill=["return:psa_adapter.infer_cli:save_image:2"])
    assert killed(r)
    assert sorted(_images(out)) == ["00000.png", "00001.png"]
    parts = list(out.glob(".manifest.jsonl.part*"))
    assert len(parts) == 1 and parts[0].read_text().count("\n") == 1
    # the state a kill in the middle of a manifest line leaves: a torn last line
    with parts[0].open("a") as f:
        f.write('{"file": "00001.png", "ind')
    # 2. killed while the next image (00002.png) is half written
    r = run_script(_args(workspace, prompts, out), kill=["torn:PIL.Image:Image.save:1"])
    assert killed(r)
    _check_no_truncated_image(out)
    assert sorted(_images(out)) == ["00000.png", "00001.png"]
    # 3. killed after every image, before the manifest is merged
    r = run_script(_args(workspace, prompts, out), kill=["call:psa_adapter.infer_cli:merge_manifest:1"])
    assert killed(r)
    assert len(_images(out)) == N
    # 4. killed right after the manifest was written, before the parts were removed
    r = run_script(_args(workspace, prompts, out), kill=["return:psa_adapter.utils:atomic_write_text:2"])
    assert killed(r)
    # 5. the rerun generates nothing and leaves one manifest line per image
    code, log = run_in_process("infer.py", _args(workspace, prompts, out)[1:])
    assert code == 0, log[-3000:]
    assert _generated(log) == 0
    _check_no_truncated_image(out)
    assert _images(out) == _images(reference)  # every image equals the uninterrupted run's, byte for byte
    lines = (out / "manifest.jsonl").read_text().splitlines()
    files = [json.loads(line)["file"] for line in lines]
    assert sorted(files) == sorted(_images(reference)) and len(files) == len(set(files)) == N
    # only the image whose line the first kill prevented is marked as found rather than made by this prompt list
    assert [json.loads(line)["file"] for line in lines if json.loads(line).get("resumed")] == ["00001.png"]
    assert not list(out.glob(".manifest.jsonl.part*"))
    assert not [p.name for p in out.glob(".*.tmp")], "temporary files left behind"
    assert_key_nowhere([out], [log])


def test_a_rerun_after_deleting_two_images_makes_exactly_those(workspace, prompts, reference, tmp_path):
    import shutil

    out = tmp_path / "partial"
    shutil.copytree(reference, out)
    (out / "00001.png").unlink()
    (out / "00004.png").unlink()
    code, log = run_in_process("infer.py", _args(workspace, prompts, out)[1:])
    assert code == 0 and _generated(log) == 2
    assert _images(out) == _images(reference)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == N


def test_two_generation_runs_give_identical_images(workspace, prompts, reference, tmp_path):
    out = tmp_path / "again"  # the reference ran in a process of its own, this one here
    code, log = run_in_process("infer.py", _args(workspace, prompts, out)[1:])
    assert code == 0, log[-3000:]
    assert _images(out) == _images(reference) and len(_images(out)) == N
    assert PLANTED_KEY not in (out / "manifest.jsonl").read_text()
