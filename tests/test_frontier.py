"""Reading protocol records: envelopes, matched KL, query curves and the report script, on hand-made records."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from script_loader import load_script

from bilevel_rlhf.evaluation import EvalRecord
from bilevel_rlhf.frontier import (
    RunCurve, envelope_at, frontier_comparison, load_run, matched_kl_rows, mean_curve, queries_to_reach,
    upper_envelope, value_at_kl,
)


def record(step, kl, score, queries=None, win=0.5):
    return EvalRecord(step=step, train_queries=step * 10 if queries is None else queries, score=score, score_se=0.0,
                      win_rate=win, win_rate_se=0.0, kl=kl, kl_se=0.0, distinct_1=0.5, distinct_2=0.8, length=5.0,
                      num_completions=8, eval_queries=8 * (step + 1))


def run(name, method, kls, scores, seed=0, setting=None, wins=None):
    wins = wins or [0.5] * len(kls)
    return RunCurve(name, method, setting or method, seed,
                    [record(i, k, s, win=w) for i, (k, s, w) in enumerate(zip(kls, scores, wins))])


def test_upper_envelope_keeps_the_points_no_lower_kl_beats():
    kl = np.array([0.0, 1.0, 2.0, 2.0, 3.0, 4.0])
    score = np.array([0.1, 0.5, 0.4, 0.6, 0.55, 0.7])
    x, y = upper_envelope(kl, score)
    assert x.tolist() == [0.0, 1.0, 2.0, 4.0] and y.tolist() == [0.1, 0.5, 0.6, 0.7]
    # the best score at KL <= k, NaN left of the first point
    got = envelope_at(x, y, np.array([-1.0, 0.5, 2.0, 3.9, 10.0]))
    assert math.isnan(got[0]) and got[1:].tolist() == [0.1, 0.6, 0.6, 0.7]


def test_value_at_kl_interpolates_at_the_first_crossing():
    r = run("a", "m", kls=[0.0, 2.0, 6.0, 3.0, 8.0], scores=[0.0, 0.2, 0.6, 0.9, 1.0])
    assert value_at_kl(r, 4.0) == pytest.approx(0.4)  # between KL 2 (0.2) and 6 (0.6), not the later return to 3
    assert value_at_kl(r, 0.0) == 0.0
    assert math.isnan(value_at_kl(r, 9.0))
    rows = matched_kl_rows([r, run("b", "m", [0.0, 1.0], [0.0, 0.1], seed=1)], [0.5, 4.0])["m"]
    assert rows[0]["runs"] == 2 and rows[0]["mean"] == pytest.approx(0.05)  # a: 0.2 x 0.5 / 2; b: 0.1 x 0.5
    assert rows[1]["runs"] == 1 and rows[1]["of"] == 2 and rows[1]["mean"] == pytest.approx(0.4)


def test_mean_curve_is_the_t_interval_and_queries_to_reach_interpolates():
    from scipy import stats

    runs = [run(f"s{i}", "m", [0, 1, 2], [0.0, s, 2 * s], seed=i) for i, s in enumerate([0.2, 0.3, 0.4])]
    c = mean_curve(runs, "score")
    assert c["queries"].tolist() == [0.0, 10.0, 20.0] and c["mean"] == pytest.approx([0.0, 0.3, 0.6])
    half = stats.t.ppf(0.975, 2) * np.std([0.4, 0.6, 0.8], ddof=1) / math.sqrt(3)
    assert c["hi"][2] - c["mean"][2] == pytest.approx(half)
    assert queries_to_reach(c["queries"], c["mean"], 0.45) == pytest.approx(15.0)
    assert math.isinf(queries_to_reach(c["queries"], c["mean"], 0.7))


def test_frontier_comparison_on_the_shared_kl_range():
    a = [run("a", "A", [0.0, 1.0, 3.0], [0.0, 0.5, 0.6])]
    b = [run("b", "B", [0.5, 2.0, 5.0], [0.2, 0.55, 0.9])]
    c = frontier_comparison(a, b)
    assert c["kl_range"] == [0.5, 3.0]
    # on [0.5, 1): A 0.0 vs B 0.2 (below); [1, 2): 0.5 vs 0.2 (above); [2, 3]: 0.5-0.6 vs 0.55 (mixed)
    assert 0.0 < c["fraction_at_or_above"] < 1.0 and c["min_diff"] == pytest.approx(-0.2)


def test_report_script_on_written_runs(tmp_path):
    """Run folders as the recipe and the compare script write them: the settings are read from summary.json and
    bilevel_config.json, and the report's tables agree with the records."""
    report = load_script("protocol_report")
    for method, weight, seeds, slope in (("online_dpo", 0.1, (0, 1), 0.10), ("penalized_covariance", 0.1, (0, 1), 0.12)):
        for seed in seeds:
            d = tmp_path / f"{method}-seed{seed}"
            d.mkdir()
            recs = [record(i, kl=1.0 * i, score=slope * i + 0.01 * seed, queries=160 * i) for i in range(6)]
            (d / "eval_protocol.json").write_text(json.dumps({"records": [r.to_dict() for r in recs]}))
            summary = {"status": "completed", "method": method, "seed": seed} | ({"beta": weight} if method == "online_dpo" else {})
            (d / "summary.json").write_text(json.dumps(summary))
            if method != "online_dpo":
                (d / "bilevel_config.json").write_text(json.dumps({"tau_init": weight}))
    assert load_run(tmp_path / "penalized_covariance-seed0").setting == "penalized_covariance (tau_0 0.1)"
    (tmp_path / "penalized_covariance-seed0" / "bilevel_config.json").write_text(
        json.dumps({"tau_init": 0.1, "tau_schedule": "constant"}))
    assert load_run(tmp_path / "penalized_covariance-seed0").setting == "penalized_covariance, tau constant (tau_0 0.1)"
    (tmp_path / "penalized_covariance-seed0" / "bilevel_config.json").write_text(
        json.dumps({"tau_init": 0.1, "reward_head_init": "zero", "value_head_init": "zero",
                    "advantage_estimator": "rloo", "hypergradient_warmup_ratio": 0.5}))
    assert (load_run(tmp_path / "penalized_covariance-seed0").setting
            == "penalized_covariance, zero r_x head, zero critics, rloo advantages, warmup 0.5 (tau_0 0.1)")
    (tmp_path / "penalized_covariance-seed0" / "bilevel_config.json").write_text(json.dumps({"tau_init": 0.1}))
    # a run still training (callback records, no summary yet) is left out of the report
    (tmp_path / "online_dpo-seed9").mkdir()
    (tmp_path / "online_dpo-seed9" / "eval_protocol.json").write_text(
        json.dumps({"eval_steps": 1, "records": [record(0, 0.0, 9.0).to_dict()]}))
    out = tmp_path / "report"
    report.main([str(tmp_path), "--output_dir", str(out), "--kls", "2", "9", "--baseline", "online_dpo (beta 0.1)"])
    data = json.loads((out / "report.json").read_text())
    # the baseline's final mean: 0.5 + 0.005; the candidate reaches it at 0.505 / 0.125 ... on its mean curve
    target = 0.505
    assert data["queries_to_reach"]["target"] == pytest.approx(target)
    pc = "penalized_covariance (tau_0 0.1)"
    # mean curve 0.12 i + 0.005 crosses 0.505 at i = 4.1667: queries 160 i
    assert data["queries_to_reach"][pc] == pytest.approx(160 * (0.5 / 0.12)) and data["queries_to_reach"][
        "online_dpo (beta 0.1)"] == pytest.approx(800)
    assert data["matched_kl"][pc][0]["mean"] == pytest.approx(0.245) and data["matched_kl"][pc][1]["runs"] == 0
    assert data["frontier_vs_baseline"]["penalized_covariance"]["fraction_at_or_above"] == 1.0
    text = (out / "report.md").read_text()
    assert "| penalized_covariance (tau_0 0.1) | 2 | 800 | 0.605 ± 0.007 |" in text and "- (0/2)" in text
    assert (out / "frontier.png").stat().st_size > 1000 and (out / "queries.png").stat().st_size > 1000
    assert "online_dpo-seed9" not in json.dumps(data["runs"])
    with pytest.raises(SystemExit, match="not a setting of these runs"):
        report.main([str(tmp_path), "--output_dir", str(out), "--baseline", "rloo"])
