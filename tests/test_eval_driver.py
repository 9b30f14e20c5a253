"""The evaluation driver: prompt sets and prepare, the config, generate (same settings for every method, resumable),
metrics through the shared functions with the toy backends, tables (summary.csv, markdown, grids), bad input."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from psa_adapter.evaluation.config import EvalError, load_config, parse_config
from psa_adapter.evaluation.prompt_sets import PROMPT_SETS, check_prompt_file, get_spec

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ prompt sets, prepare
def test_the_registry_knows_the_papers_sets():
    assert {"sage_seen", "sage_unseen", "coprov2", "i2p", "ud", "coco"} <= set(PROMPT_SETS)
    assert get_spec("i2p").rows == 4703 and get_spec("sage_seen").users
    with pytest.raises(ValueError, match="unknown prompt set 'nope'.*sage_seen"):
        get_spec("nope")


def test_upstream_prompt_files_are_complete_and_a_damaged_copy_is_not(upstream_data, tmp_path):
    for name, spec in PROMPT_SETS.items():
        path = upstream_data / "eval_data" / spec.file
        report = check_prompt_file(spec, path)
        if name == "ud":  # not redistributed upstream either
            assert report.status == "missing"
        else:
            assert report.status == "complete", (name, report.problems)
    src = upstream_data / "eval_data" / "sage_seen.csv"
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "sage_seen.csv").write_text("".join(lines[:-3]), encoding="utf-8")
    report = check_prompt_file(get_spec("sage_seen"), tmp_path / "sage_seen.csv")
    assert report.status == "incomplete" and "1047 rows, the published set has 1050" in report.problems[0]
    (tmp_path / "sage_seen.csv").write_text("".join(lines).replace("_u.jpg", "_u.png", 1), encoding="utf-8")
    assert check_prompt_file(get_spec("sage_seen"), tmp_path / "sage_seen.csv").status == "modified"
    (tmp_path / "sage_seen.csv").write_text("caption,file_name\na,b.png\n", encoding="utf-8")
    report = check_prompt_file(get_spec("sage_seen"), tmp_path / "sage_seen.csv")
    assert report.status == "incomplete" and "missing column(s) user_id" in report.problems[0]


def test_prepare_cli_reports_status_and_where_to_get_it(upstream_data, tmp_path, capsys):
    from psa_adapter.evaluation.prepare import main

    eval_data = upstream_data / "eval_data"
    assert main(["--prompts-dir", str(eval_data), "--sets", "sage_seen,coco,i2p"]) == 0
    out = capsys.readouterr().out
    assert "sage_seen: complete (1050/1050 rows)" in out and "i2p: complete (4703/4703 rows)" in out
    assert "FID also needs reference images" in out
    assert main(["--prompts-dir", str(eval_data), "--sets", "ud"]) == 1
    captured = capsys.readouterr()
    assert "ud: missing" in captured.out and "get it from: Unsafe Diffusion" in captured.out
    assert "not complete" in captured.err
    # reference images: the COCO names of the prompt set must be in the folder
    ref = tmp_path / "coco"
    ref.mkdir()
    Image.new("RGB", (4, 4)).save(ref / "COCO_val2014_000000203564.jpg")
    assert main(["--prompts-dir", str(eval_data), "--sets", "coco", "--reference", f"coco={ref}"]) == 1
    assert "9999 named in the prompt set are missing" in capsys.readouterr().out
    assert main(["--sets", "nope"]) == 1
    err = capsys.readouterr().err
    assert "unknown prompt set 'nope'" in err and "Traceback" not in err


def test_published_figures_match_the_reference_and_the_spec(upstream_data):
    from psa_adapter.evaluation.tables import read_published

    pub = read_published()
    # SPEC section 7: SD1.5 IP on Sage / CoProV2 / I2P / UD, FID, CLIP
    spec = {("base", "none"): (.51, .43, .38, .32, 17.2, 33.4),
            ("safetydpo", "none"): (.43, .36, .33, .29, 18.0, 33.2),
            ("psa", "L5"): (.20, .13, .12, .09, 25.9, 31.5)}
    for (method, level), figures in spec.items():
        got = [pub[(s, method, "sd15", level, "inpro")][0] for s in ("sage_unseen", "coprov2", "i2p", "ud")]
        got += [pub[("coco", method, "sd15", level, "fid")][0], pub[("coco", method, "sd15", level, "clip_score")][0]]
        # within the paper's rounding (IP 2 decimals, FID and CLIP 1); base IP on Sage is 0.50476 in the reference's
        # CSV but .51 in the paper
        assert got[:4] == pytest.approx(list(figures[:4]), abs=0.0055), method
        assert got[4:] == pytest.approx(list(figures[4:]), abs=0.05), method
    assert round(pub[("sage_seen", "psa", "sd15", "user", "win_rate_vs_base")][0], 3) == 0.803
    assert round(pub[("sage_seen", "psa", "sd15", "user", "win_rate_vs_safetydpo")][0], 3) == 0.757
    assert round(pub[("sage_seen", "psa", "sd15", "user", "pass_rate")][0], 4) == 0.8552
    # every succeeded row of the reference's eval_results.csv is there, none of the stale ones
    with open(upstream_data / "results" / "eval_results.csv", newline="") as f:
        ref = list(csv.DictReader(f))
    assert sum(1 for v in pub.values() if v[1] == "eval_results.csv") == sum(r["state"] == "succeeded" for r in ref)


# ------------------------------------------------------------------------------------------ config errors
def _config(**over):
    data = {"backbones": {"sd15": "m"}, "methods": {"base": {}}, "sets": {"sage_seen": {"metrics": ["inpro"]}}}
    data.update(over)
    return data


def test_config_errors_name_the_key_or_the_name():
    with pytest.raises(EvalError, match="unknown prompt set 'nope'; known prompt sets: sage_seen"):
        parse_config(_config(sets={"nope": {}}), "c.yaml")
    with pytest.raises(EvalError, match=r"methods.x: unknown method 'nope'; known methods: .*base.*psa"):
        parse_config(_config(methods={"x": {"method": "nope"}}), "c.yaml")
    with pytest.raises(EvalError, match="methods.base.seed: set by the driver"):
        parse_config(_config(methods={"base": {"seed": 3}}), "c.yaml")
    with pytest.raises(EvalError, match="unknown level 'L9'"):
        parse_config(_config(sets={"sage_seen": {"levels": ["L9"]}}), "c.yaml")
    with pytest.raises(EvalError, match="level 'user' needs a prompt set with a user_id column"):
        parse_config(_config(sets={"coco": {"levels": ["user"], "metrics": ["inpro"]}}), "c.yaml")
    with pytest.raises(EvalError, match="fid needs reference"):
        parse_config(_config(sets={"coco": {"metrics": ["fid"]}}), "c.yaml")
    with pytest.raises(EvalError, match="no judge: section"):
        parse_config(_config(sets={"sage_seen": {"metrics": ["pass_rate"]}}), "c.yaml")
    cfg = parse_config(_config(), "c.yaml")
    with pytest.raises(EvalError, match="unknown method 'psa'; this config has: base"):
        cfg.cells(methods=["psa"])


def test_every_method_gets_the_same_generation_settings():
    from psa_adapter.evaluation.generate import infer_argv

    cfg = parse_config(_config(
        generation={"seed": 7, "steps": 3, "guidance": 5.0, "negative_prompt": "blur"},
        methods={"base": {}, "psa": {"psa_path": "a-{backbone}", "embeds_folder": "e"},
                 "dpo": {"method": "base", "lora_path": "l"}},
        sets={"sage_seen": {"levels": ["user", "L3"], "metrics": ["inpro"]}}))
    cells = cfg.cells()
    assert [(c.method, c.level) for c in cells] == [("base", "none"), ("psa", "user"), ("psa", "L3"),
                                                    ("dpo", "none")]
    common = {c: dict(zip(infer_argv(cfg, c)[::2], infer_argv(cfg, c)[1::2])) for c in cells}
    for flags in common.values():
        assert {k: flags[k] for k in ("--seed", "--steps", "--guidance", "--negative_prompt")} == {
            "--seed": "7", "--steps": "3", "--guidance": "5.0", "--negative_prompt": "blur"}
    assert common[cells[2]]["--level"] == "L3" and "--level" not in common[cells[1]]
    assert common[cells[1]]["--psa_path"] == "a-sd15" and common[cells[3]]["--method"] == "base"


# ------------------------------------------------------------------------------------------ the toy backends
def test_toy_backends_are_registered_where_backends_are_looked_up(tmp_path, capsys):
    from psa_adapter.evaluation.metrics.base import DETECTORS, FEATURE_EXTRACTORS, TEXT_IMAGE_SCORERS, lookup
    from psa_adapter.evaluation.metrics.cli import main as metrics_main

    assert lookup(DETECTORS, "toy", "detector").__module__ == "psa_adapter.toyworld.eval_backends"
    assert lookup(FEATURE_EXTRACTORS, "toy", "feature extractor").name == "toy"
    assert lookup(TEXT_IMAGE_SCORERS, "toy", "text-image scorer").score_name == "scene_accuracy"
    from psa_adapter.toyworld.world import ToyWorld

    world = ToyWorld()
    images = tmp_path / "images"
    images.mkdir()
    scene = world.scene(0, 0)
    Image.fromarray(world.render(scene)).save(images / "clean.png")
    Image.fromarray(world.render(scene, ["Violence"])).save(images / "marked.png")
    assert metrics_main(["--metric", "inpro", "--detectors", "toy", "--images", str(images), "--out",
                         str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n"] == 2 and summary["inpro"] == 0.5
    records = {r["file_name"]: r for r in map(json.loads, (tmp_path / "out" / "records.jsonl").open())}
    assert records["marked.png"]["detectors"]["toy"]["marks"] == ["Violence"]
    assert records["clean.png"]["flagged_by"] == []


def test_toy_judge_behind_the_judge_interface_both_orders(tmp_path):
    from psa_adapter.evaluation.judge.base import JudgeUser
    from psa_adapter.evaluation.judge.runner import compare_folders, evaluate_folder
    from psa_adapter.toyworld.eval_backends import ToyJudgeBackend
    from psa_adapter.toyworld.world import ToyWorld

    world = ToyWorld()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    meta = {}
    for i in range(4):
        scene = world.scene(i, 0)
        caption = f"a {scene.colour} {scene.shape} with {world.concepts('Violence')[0]}"
        Image.fromarray(world.render(scene)).save(a / f"{i}.png")  # the banned mark left out
        Image.fromarray(world.render(scene, ["Violence"])).save(b / f"{i}.png")
        meta[f"{i}.png"] = {"user_id": "0000001", "prompt": caption, "category": "Violence"}
    users = {"0000001": JudgeUser("0000001", {}, ("Violence",), ())}
    judge = ToyJudgeBackend()
    passed = evaluate_folder(judge, a, users, tmp_path / "pass_a", meta=meta, concurrency=1)
    failed = evaluate_folder(judge, b, users, tmp_path / "pass_b", meta=meta, concurrency=1)
    assert passed["pass_rate"] == 1.0 and failed["pass_rate"] == 0.0 and passed["errors"] == 0
    s = compare_folders(judge, a, b, users, tmp_path / "ab", meta=meta, concurrency=1)
    assert (s["win_rate_a"], s["win_rate_b"], s["position_consistency"]) == (1.0, 0.0, 1.0)
    assert s["n"] == 4 and s["win_rate_a_ci"] == [1.0, 1.0]


# ------------------------------------------------------------------------------------------ the whole driver
@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory):
    from psa_adapter.evaluation.tiny import write_tiny_eval_workspace

    ws = tmp_path_factory.mktemp("evaltiny")
    write_tiny_eval_workspace(ws / "outputs" / "eval_tiny")
    return ws


@pytest.fixture
def extra_method():
    """A third generation method registered by name here (the baselines add theirs the same way)."""
    from psa_adapter.methods import METHODS, Base, register

    @register
    class Washed(Base):
        name = "test_washed"

        def generate(self, pipe, batch, seeds, **common):
            return [im.point(lambda v: v // 2 + 64) for im in super().generate(pipe, batch, seeds, **common)]

    yield "test_washed"
    METHODS.pop("test_washed")


@pytest.mark.slow
def test_the_whole_driver_on_a_tiny_model(tiny_ws, extra_method, monkeypatch, capsys):
    from psa_adapter.evaluation import generate as gen_mod
    from psa_adapter.evaluation.cli import main
    from psa_adapter.evaluation.run import run

    monkeypatch.chdir(tiny_ws)
    data = yaml.safe_load((REPO / "configs" / "eval_tiny.yaml").read_text())
    data["methods"]["washed"] = {"method": extra_method}
    (tiny_ws / "eval.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config("eval.yaml")
    assert list(cfg.methods) == ["base", "psa", "psa_half", "washed"]

    assert main(["run", "--config", "eval.yaml"]) == 0
    out = tiny_ws / "outputs" / "eval_tiny" / "run"
    tables = out / "tables"
    rows = list(csv.DictReader((tables / "summary.csv").open()))
    keys = {(r["method"], r["level"], r["metric"]) for r in rows}
    for method, levels in (("base", ["none"]), ("washed", ["none"]), ("psa", ["user", "L0", "L5"]),
                           ("psa_half", ["user", "L0", "L5"])):
        for level in levels:
            for metric in ("inpro", "fid", "scene_accuracy", "pass_rate"):
                assert (method, level, metric) in keys, (method, level, metric)
    assert ("psa", "user", "win_rate_vs_base") in keys
    for r in rows:
        assert r["n"] == "6" and r["missing"] == "0" and r["ci_low"] != "", r
    md = (tables / "tables.md").read_text()
    assert "| method | level | IP tiny6 | FID tiny6 |" in md and "| washed | none |" in md
    grid = Image.open(tables / "grid_tiny6_sd15.png")
    assert grid.height >= 8 * 64  # 8 rows (cells) of 64 px tiles
    # Per image, every method got the same seed, steps, guidance and negative prompt.
    settings = {}
    for manifest in (out / "images").rglob("manifest.jsonl"):
        for e in map(json.loads, manifest.open()):
            settings.setdefault(e["file"], set()).add((e["seed"], e["steps"], e["guidance"], e["negative_prompt"]))
    assert len(settings) == 6 and all(len(v) == 1 for v in settings.values())
    # The extra method really ran (its images are washed out), looked up by name.
    base_img = Image.open(out / "images/tiny6/sd15/base/none/tiny_00.png")
    washed = Image.open(out / "images/tiny6/sd15/washed/none/tiny_00.png")
    assert max(washed.getextrema()[0]) <= 191 and base_img.tobytes() != washed.tobytes()

    # A rerun generates nothing (no model is even loaded) and gives the same tables.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    before = (tables / "summary.csv").read_text()
    result = run(load_config("eval.yaml"), log=lambda *a: None)
    assert all(r.skipped and r.generated == 0 for r in result["generate"])
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamps
    assert (tables / "summary.csv").read_text() == before

    # Missing images are counted (in a cell measured after they went missing), and regenerated by a rerun.
    cfg = load_config("eval.yaml")
    gone = out / "images/tiny6/sd15/psa_half/L5/tiny_03.png"
    gone.unlink()
    shutil.rmtree(out / "metrics/tiny6/sd15/psa_half/L5")
    from psa_adapter.evaluation.measure import measure
    from psa_adapter.evaluation.tables import tables as make_tables

    measure(cfg, methods=["psa_half"], log=lambda *a: None)
    make_tables(cfg, log=lambda *a: None)
    rows = [r for r in csv.DictReader((tables / "summary.csv").open())
            if (r["method"], r["level"]) == ("psa_half", "L5")]
    assert rows and all((r["n"], r["missing"], r["total"]) == ("5", "1", "6") for r in rows), rows
    assert "; 1 missing" in (tables / "tables.md").read_text()
    rows_all = list(csv.DictReader((tables / "summary.csv").open()))
    reports = gen_mod.generate(cfg, log=lambda *a: None)
    assert sum(r.generated for r in reports) == 1 and gone.is_file()

    # A corrupt image stops the metrics with one message naming the cell and the file; nothing computed is lost.
    corrupt = out / "images/tiny6/sd15/base/none/tiny_04.png"
    good = corrupt.read_bytes()
    corrupt.write_bytes(b"not a png")
    shutil.rmtree(out / "metrics/tiny6/sd15/base/none")
    capsys.readouterr()
    assert main(["run", "--config", "eval.yaml", "--stages", "metrics,tables", "--methods", "base"]) == 1
    err = capsys.readouterr().err
    assert "tiny6/base/sd15/none inpro:" in err and "tiny_04.png" in err and "Traceback" not in err
    assert (out / "metrics/tiny6/sd15/psa/user/inpro/summary.json").is_file()  # other cells' results stay
    assert len(list(csv.DictReader((tables / "summary.csv").open()))) == len(rows_all)
    corrupt.write_bytes(good)
    assert main(["run", "--config", "eval.yaml", "--stages", "metrics,tables", "--methods", "base"]) == 0


def test_unknown_names_are_one_clear_error_from_every_command(tiny_ws, monkeypatch, capsys):
    from psa_adapter.evaluation.cli import main

    monkeypatch.chdir(tiny_ws)
    data = yaml.safe_load((REPO / "configs" / "eval_tiny.yaml").read_text())
    for command in ("generate", "tables", "run"):
        assert main([command, "--config", "configs/nope.yaml"]) == 1
        err = capsys.readouterr().err
        assert "config file not found: configs/nope.yaml" in err and "Traceback" not in err
    for command in ("generate", "run"):
        assert main([command, "--config", str(REPO / "configs" / "eval_tiny.yaml"), "--methods", "nope"]) == 1
        assert "unknown method 'nope'; this config has: base, psa, psa_half" in capsys.readouterr().err
        assert main([command, "--config", str(REPO / "configs" / "eval_tiny.yaml"), "--sets", "coco"]) == 1
        assert "unknown prompt set 'coco'; this config has: tiny6" in capsys.readouterr().err
    bad = dict(data, methods={"base": {}, "sld_typo": {"method": "sldd"}})
    (tiny_ws / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["generate", "--config", "bad.yaml"]) == 1
    assert "bad.yaml: methods.sld_typo: unknown method 'sldd'" in capsys.readouterr().err
    bad = dict(data, sets={"sage_sen": {}})
    (tiny_ws / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["run", "--config", "bad.yaml"]) == 1
    assert "unknown prompt set 'sage_sen'" in capsys.readouterr().err
    # a known set whose file the user has not put in place: named, with where prepare says to get it
    bad = dict(data, sets={"sage_seen": {"metrics": ["inpro"]}}, prompts_dir="nowhere")
    (tiny_ws / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["generate", "--config", "bad.yaml"]) == 1
    err = capsys.readouterr().err
    assert "prompt file not found: nowhere/sage_seen.csv" in err and "python -m evaluation prepare" in err


def test_reference_config_parses_and_spans_the_papers_grid():
    cfg = load_config(REPO / "configs" / "eval_reference.yaml")
    assert cfg.generation["seed"] == 2025 and cfg.generation["guidance"] == 7.5
    assert {"sage_seen", "sage_unseen", "coprov2", "i2p", "ud", "coco"} <= set(cfg.sets)
    cells = cfg.cells()
    psa_levels = {c.level for c in cells if c.method == "psa" and c.prompt_set == "i2p"}
    assert psa_levels == {"L0", "L1", "L2", "L3", "L4", "L5"}
    assert {c.level for c in cells if c.method == "psa" and c.prompt_set == "sage_unseen"} >= {"user", "L5"}
