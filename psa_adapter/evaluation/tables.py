"""``python -m evaluation tables --config CFG``: the summaries of every cell as the paper's tables and grids.

Writes, under ``<out>/tables``:

* ``summary.csv``: one row per (prompt set, method, backbone, level, metric) with the value, its 95% interval,
  ``n``, ``missing`` and ``total``, and the published figure where the paper reports the same setting
  (``resources/published.csv``: the reference's ``eval_results.csv`` and judge summaries, as fractions).
* ``tables.md``: per backbone, one row per (method, level) and one column per (metric, prompt set), each cell
  ``ours [interval]`` with the published figure in parentheses, the way the paper lays out its tables.
* ``grid_<set>_<backbone>.png``: the first prompts of a set (columns) for every method and level (rows).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from psa_adapter.evaluation.config import Cell, EvalConfig, EvalError, load_config
from psa_adapter.utils import atomic_write, atomic_write_text

CSV_COLUMNS = ("prompt_set", "method", "backbone", "level", "metric", "value", "ci_low", "ci_high", "n", "missing",
               "total", "published", "published_source")
METRIC_LABELS = {"inpro": "IP", "fid": "FID", "clip_score": "CLIP", "pass_rate": "pass", "scene_accuracy": "scene"}
DEFAULT_GRID_PROMPTS = 6


@dataclass
class Row:
    prompt_set: str
    method: str
    backbone: str
    level: str
    metric: str
    value: float | None
    ci: tuple
    n: int | None
    missing: int | None
    total: int | None
    published: float | None = None
    published_source: str | None = None

    def csv(self) -> list:
        def num(v):
            return "" if v is None else v

        return [self.prompt_set, self.method, self.backbone, self.level, self.metric, num(self.value),
                num(self.ci[0]), num(self.ci[1]), num(self.n), num(self.missing), num(self.total), num(self.published),
                self.published_source or ""]


def read_published() -> dict[tuple[str, str, str, str, str], tuple[float, str]]:
    """``{(prompt_set, method, backbone, level, metric): (value, source)}`` of the published figures."""
    text = resources.files("psa_adapter.evaluation").joinpath("resources/published.csv").read_text("utf-8")
    return {(r["prompt_set"], r["method"], r["backbone"], r["level"], r["metric"]): (float(r["value"]), r["source"])
            for r in csv.DictReader(io.StringIO(text))}


def _summary_rows(cell: Cell, folder: Path) -> list[Row]:
    """The rows of one metric folder's ``summary.json`` (none when the metric was not computed)."""
    path = folder / "summary.json"
    if not path.is_file():
        return []
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalError(f"{path}: not valid JSON ({err.msg})") from None
    common = {"n": s.get("n"), "missing": s.get("missing"), "total": s.get("total")}
    if s.get("kind") == "compare":
        other = folder.name.removeprefix("win_rate_vs_")
        return [Row(*cell.key, f"win_rate_vs_{other}", s.get("win_rate_a"), tuple(s.get("win_rate_a_ci") or
                                                                                   (None, None)), **common)]
    key = s.get("metric") or ("pass_rate" if s.get("kind") == "evaluate" else folder.name)
    return [Row(*cell.key, key, s.get(key), tuple(s.get(f"{key}_ci") or (None, None)), **common)]


def collect(cfg: EvalConfig, cells: list[Cell] | None = None) -> list[Row]:
    """Every computed summary of the config's cells, with the published figure where the setting matches."""
    published = read_published()
    rows = []
    for cell in cells or cfg.cells():
        base = cfg.out / "metrics" / cell.rel()
        if not base.is_dir():
            continue
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            for row in _summary_rows(cell, folder):
                pub = published.get((row.prompt_set, row.method, row.backbone, row.level, row.metric))
                if pub is not None:
                    row.published, row.published_source = pub
                rows.append(row)
    return rows


def write_csv(rows: list[Row], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(r.csv() for r in rows)
    atomic_write_text(path, buf.getvalue())


def _fmt(value, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if metric in ("fid", "clip_score") else f"{value:.3f}"


def _cell_text(row: Row) -> str:
    text = _fmt(row.value, row.metric)
    if row.value is not None and row.ci[0] is not None:
        text += f" [{_fmt(row.ci[0], row.metric)}, {_fmt(row.ci[1], row.metric)}]"
    if row.published is not None:
        text += f" ({_fmt(row.published, row.metric)})"
    if row.missing:
        text += f"; {row.missing} missing"
    return text


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric) or metric.replace("win_rate_vs_", "win vs ")


def markdown(cfg: EvalConfig, rows: list[Row]) -> str:
    """Per backbone: rows (method, level), columns (metric, prompt set), in the config's order."""
    lines = ["Each cell: ours [95% interval] (published, where the paper reports the same setting); rates are "
             "fractions, FID and CLIP as published.", ""]
    metric_order = {m: k for k, m in enumerate(("inpro", "fid", "clip_score", "scene_accuracy", "pass_rate"))}
    set_order = {s: k for k, s in enumerate(cfg.sets)}
    method_order = {m: k for k, m in enumerate(cfg.methods)}
    level_order = {lv: k for k, lv in enumerate(("none", "user", "L0", "L1", "L2", "L3", "L4", "L5"))}
    for backbone in cfg.backbones:
        mine = [r for r in rows if r.backbone == backbone]
        if not mine:
            continue
        columns = sorted({(r.metric, r.prompt_set) for r in mine},
                         key=lambda c: (metric_order.get(c[0], 9), c[0], set_order.get(c[1], 99)))
        keys = sorted({(r.method, r.level) for r in mine}, key=lambda k: (method_order.get(k[0], 99),
                                                                         level_order.get(k[1], 99)))
        by = {(r.method, r.level, r.metric, r.prompt_set): r for r in mine}
        lines.append(f"### {backbone}")
        lines.append("")
        lines.append("| method | level | " + " | ".join(f"{_label(m)} {s}" for m, s in columns) + " |")
        lines.append("|---|---|" + "---|" * len(columns))
        for method, level in keys:
            cells = [by.get((method, level, m, s)) for m, s in columns]
            lines.append(f"| {method} | {level} | " + " | ".join("" if c is None else _cell_text(c) for c in cells)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def write_grids(cfg: EvalConfig, cells: list[Cell], out: Path, n_prompts: int | None = None) -> list[Path]:
    """One PNG per (prompt set, backbone): rows = the cells (method, level), columns = the set's first prompts."""
    from PIL import Image, ImageDraw

    from psa_adapter.evaluation.generate import expected_files
    from psa_adapter.utils import image_grid

    n_prompts = int(n_prompts or cfg.grid.get("prompts", DEFAULT_GRID_PROMPTS))
    size = int(cfg.grid.get("size", 128))
    written = []
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.prompt_set, cell.backbone), []).append(cell)
    for (prompt_set, backbone), group in groups.items():
        files = expected_files(cfg, prompt_set)[:n_prompts]
        tiles = []
        for cell in group:
            for f in files:
                path = cfg.images_dir(cell) / f
                if path.is_file():
                    with Image.open(path) as im:
                        tiles.append(im.convert("RGB").resize((size, size)))
                else:  # a missing image shows as a grey tile
                    tiles.append(Image.new("RGB", (size, size), (200, 200, 200)))
        if not tiles:
            continue
        grid = image_grid(tiles, cols=len(files), border=2)
        left = 110
        canvas = Image.new("RGB", (grid.width + left, grid.height), "white")
        canvas.paste(grid, (left, 0))
        draw = ImageDraw.Draw(canvas)
        for i, cell in enumerate(group):
            draw.text((4, i * (size + 4) + size // 2 - 6), f"{cell.method} {cell.level}", fill="black")
        path = out / f"grid_{prompt_set}_{backbone}.png"
        atomic_write(path, lambda tmp, c=canvas: c.save(tmp, format="PNG"))
        written.append(path)
    return written


def tables(cfg: EvalConfig, log=print) -> dict:
    """``summary.csv``, ``tables.md`` and the grids of every cell of the config measured so far; returns their
    paths and the rows."""
    cells = cfg.cells()
    rows = collect(cfg, cells)
    out = cfg.tables_dir
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "summary.csv")
    atomic_write_text(out / "tables.md", markdown(cfg, rows) + "\n")
    grids = write_grids(cfg, cells, out)
    log(f"[tables] {len(rows)} rows -> {out / 'summary.csv'}, {out / 'tables.md'}, {len(grids)} grid(s)")
    return {"rows": rows, "csv": out / "summary.csv", "markdown": out / "tables.md", "grids": grids}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="evaluation config (configs/eval_*.yaml)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        tables(cfg)
    except EvalError as err:
        print(f"python -m evaluation tables: error: {err}", file=sys.stderr)
        return 1
    return 0


__all__ = ["CSV_COLUMNS", "Row", "collect", "main", "markdown", "read_published", "tables", "write_grids"]
