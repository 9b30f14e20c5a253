import json

import numpy as np
import pytest

from psa_adapter.evaluation.records import JsonlAppender, read_jsonl, read_summary, write_summary
from psa_adapter.evaluation.stats import bootstrap_ci, mean_with_ci, paired_win_ci


def test_bootstrap_interval_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.random(20) < 0.3
    large = rng.random(2000) < 0.3
    s, big = mean_with_ci(small), mean_with_ci(large)
    assert s["ci"][0] <= s["value"] <= s["ci"][1]
    assert big["ci"][0] <= big["value"] <= big["ci"][1]
    assert (big["ci"][1] - big["ci"][0]) < (s["ci"][1] - s["ci"][0]) / 3
    assert 0.27 < big["ci"][0] < 0.3 < big["ci"][1] < 0.33
    assert bootstrap_ci(large) == bootstrap_ci(large)  # seeded: same records, same interval


def test_constant_values_have_a_point_interval_and_empty_is_none():
    assert mean_with_ci([1, 1, 1])["ci"] == [1.0, 1.0]
    assert mean_with_ci([]) == {"value": None, "ci": [None, None], "n": 0}


def test_paired_win_interval():
    out = paired_win_ci([1] * 80 + [-1] * 10 + [0] * 10)
    assert out["win_rate_a"]["value"] == pytest.approx(0.8)
    assert out["win_rate_b"]["value"] == pytest.approx(0.1)
    assert out["tie_rate"]["value"] == pytest.approx(0.1)
    assert out["a_minus_b"]["ci"][0] > 0  # A clearly better
    even = paired_win_ci([1, -1] * 50)
    assert even["a_minus_b"]["ci"][0] < 0 < even["a_minus_b"]["ci"][1]


def test_jsonl_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "records.jsonl"
    with JsonlAppender(path) as out:
        out.write({"a": 1})
        out.write({"a": 2})
    with path.open("a") as f:
        f.write('{"a": 3')  # a kill mid-write
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    with JsonlAppender(path) as out:
        out.write({"a": 4})
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_summary_round_trip(tmp_path):
    write_summary(tmp_path, {"n": 3, "fid": 1.5})
    assert read_summary(tmp_path) == {"n": 3, "fid": 1.5}
    assert json.loads((tmp_path / "summary.json").read_text())["n"] == 3
