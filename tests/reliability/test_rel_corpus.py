"""Every case of the bad-input corpus (corpus.py): a non-zero exit, one message that names the file and the line,
key or user, no raw traceback, and nothing already in the output folder lost or changed."""

from __future__ import annotations

import pytest
from corpus import CASES, Ctx, run_case, snapshot


@pytest.fixture(autouse=True)
def _fresh_accelerate_and_one_thread(fresh_accelerate):
    yield


def test_the_corpus_is_large_and_covers_every_input_family():
    kinds = {c.kind for c in CASES}
    assert len(CASES) >= 30
    assert {"SAGE metadata.jsonl", "users CSV", "profile file", "prompt CSV", ".npy folder", "embedding store",
            "adapter folder", "reference .bin", "LoRA weights", "UNet weights", "YAML config", "flags",
            "evaluation config", "Q16 prompts.p"} <= kinds


@pytest.mark.parametrize("item", CASES, ids=[f"{c.kind}: {c.name}" for c in CASES])
def test_bad_input_gives_one_clear_message(workspace, tmp_path, item):
    ctx = Ctx(workspace, tmp_path)
    cli, argv, fragments = item.build(ctx)
    before = snapshot(ctx.out)
    outcome = run_case(cli, argv)
    assert outcome.raised is None, f"raw traceback: {outcome.raised}\n{outcome.stderr[-3000:]}"
    assert "Traceback" not in outcome.stderr + outcome.stdout
    assert outcome.code not in (0, None), f"exit {outcome.code}: it proceeded\n{outcome.stderr[-2000:]}"
    lines = (outcome.stderr + outcome.stdout).splitlines()
    naming = [i for i, ln in enumerate(lines) if all(f in ln for f in map(str, fragments))]
    assert naming, f"no line names {fragments}; printed:\n" + "\n".join(lines[-8:])
    # one message: nothing follows the line that names the problem but a validator's closing verdict
    assert all(not ln.strip() or ln.strip() == "FAILED" for ln in lines[naming[-1] + 1:]), "\n".join(lines[-8:])
    after = snapshot(ctx.out)
    assert {k: after.get(k) for k in before} == before, "a file written before the run was lost or changed"
