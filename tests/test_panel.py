"""The testbed panel (`bilevel_rlhf.panel`): instances drawn from a seed, every axis covered, the reference's entropy
on target; the panel runner's summary (`scripts/testbed_compare.py --panel`) on hand-made records."""

from collections import Counter

import numpy as np
import pytest
from script_loader import load_script

from bilevel_rlhf import bandit, panel, testbed


def test_panel_is_a_function_of_its_seed_and_covers_every_axis():
    specs = panel.draw_panel(24, seed=0)
    assert specs == panel.draw_panel(24, seed=0)
    assert specs != panel.draw_panel(24, seed=1)
    assert [s.index for s in specs] == list(range(24))
    # stratified: each score kind 6 times, each objective 12 times, every (C, L) at least 3 times
    assert Counter(s.scores for s in specs) == {k: 6 for k in panel.SCORE_KINDS}
    assert Counter(s.objective for s in specs) == {"preference_nll": 12, "win_rate": 12}
    assert min(Counter((s.num_content, s.max_length) for s in specs).values()) >= 3
    assert any(s.max_length == 1 for s in specs)  # the one-token bandit
    taus = np.array([s.tau for s in specs])
    fractions = np.array([s.entropy_fraction for s in specs])
    assert 0.1 <= taus.min() < 0.15 and 0.75 < taus.max() <= 1.0
    assert fractions.min() < 0.3 and fractions.max() > 0.85  # very peaked to nearly uniform
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        panel.draw_panel(0)


@pytest.mark.parametrize("index", [0, 3, 7])
def test_instance_has_the_target_entropy_and_a_proper_reference(index):
    spec = panel.draw_panel(8, seed=3)[index]
    policy, problem = panel.build_instance(spec)
    n = spec.num_completions
    assert len(problem.scores) == n == len(testbed.enumerate_completions(spec.num_content, spec.max_length)[0])
    assert np.exp(problem.log_pi_ref).sum() == pytest.approx(1.0, abs=1e-9)
    assert panel.entropy(problem.log_pi_ref) == pytest.approx(spec.entropy_fraction * np.log(n), abs=0.01)
    # the policy handed to the trainer is the reference: its exact distribution is pi_ref
    np.testing.assert_allclose(problem.policy_distribution(policy), np.exp(problem.log_pi_ref), atol=1e-6)
    assert problem.temperature == spec.oracle_temperature


@pytest.mark.parametrize("seed, index", [(1, 7), (6, 1)])
def test_every_drawn_instance_is_built_at_its_target_entropy(seed, index):
    """Draws at the edges of what scaling the logits reaches: a very peaked target for a policy whose biases are close
    together (scaled past e^6), and a near-uniform target above the flattest reference of its shape (capped in
    `draw_panel` just below it, not refused by `build_instance`)."""
    spec = panel.draw_panel(24, seed=seed)[index]
    _, problem = panel.build_instance(spec)
    assert panel.entropy(problem.log_pi_ref) == pytest.approx(spec.entropy_fraction * np.log(spec.num_completions),
                                                              abs=0.01)


def test_score_kinds_have_their_shape():
    rng = np.random.default_rng(0)
    few = panel.draw_scores("few_winners", 200, rng)
    assert (few > 1.5).sum() == 10
    assert panel.draw_scores("near_ties", 200, rng).std() < 0.2
    heavy = panel.draw_scores("heavy_tailed", 2000, rng)
    assert np.abs(heavy).max() <= 5.0 and (np.abs(heavy) > 3).mean() > 0.01  # tails a Gaussian of std 1 lacks
    with pytest.raises(ValueError, match="scores must be one of"):
        panel.draw_scores("uniform", 3, rng)


def test_panel_summary_pairs_runs_with_partial_sgd_and_counts_failures():
    compare = load_script("testbed_compare")
    refs = [{"index": 0, "phi_tau_at_x0": 0.7, "phi_tau_best": 0.5}, {"index": 1, "phi_tau_at_x0": 0.0,
                                                                       "phi_tau_best": -1.0}]

    def rec(instance, method, seed, phi, collapsed=(), streak=0):
        return {"instance": instance, "method": method, "seed": seed, "phi_tau": phi, "collapsed": list(collapsed),
                "guard": {"longest_streak": streak, "phi_resyncs": 1}, "seconds": 2.0}

    records = [rec(0, "partial_sgd", 0, 0.6), rec(1, "partial_sgd", 0, -0.5), rec(0, "partial_sgd", 1, 0.55),
               rec(0, "m", 0, 0.55), rec(1, "m", 0, -0.49, collapsed=["phi"], streak=12), rec(0, "m", 1, 0.56)]
    (psgd, m) = compare.summarize_panel(refs, records, ["partial_sgd", "m"])
    assert psgd["below_baseline"] == 0.0 and psgd["not_worse_than_baseline"] == 1.0
    assert m["runs"] == 3 and m["below_baseline"] == pytest.approx(1 / 3)
    # -0.49 is within 2% of instance 1's gain (0.02) above -0.5; 0.56 is not within 0.004 of 0.55
    assert m["not_worse_than_baseline"] == pytest.approx(2 / 3)
    # another baseline: m's runs are the ones compared with
    (psgd_vs_m,) = compare.summarize_panel(refs, records, ["partial_sgd"], baseline="m")
    assert psgd_vs_m["below_baseline"] == pytest.approx(2 / 3)  # 0.6 > 0.55; -0.5 < -0.49; 0.55 < 0.56
    assert m["mean_gap_to_best"] == pytest.approx((0.05 + 0.51 + 0.06) / 3)
    assert m["collapsed_runs"] == 1 and m["lost_tracking_runs"] == 1 and m["phi_resyncs"] == 3
    assert compare.parse_method("single_loop@phi_resync=true,penalty_lambda=5") == (
        "single_loop", {"phi_resync": True, "penalty_lambda": 5})


def test_panel_run_records_the_exact_outcome_and_the_guards(tmp_path):
    import argparse

    compare = load_script("testbed_compare")
    spec = next(s for s in panel.draw_panel(8, seed=0) if s.max_length <= 2)
    args = argparse.Namespace(prompts=8, iterations=3, weight=0.1, penalty_lambda=2.0, actor_lr=3e-3, critic_lr=1e-2,
                              reward_lr=1e-2, crn=True)
    rec = compare.run_panel_instance(spec, "single_loop@phi_resync=true", 0, args)
    assert rec["method"] == "single_loop@phi_resync=true" and rec["instance"] == spec.index
    assert rec["queries"] == 3 * (16 if spec.objective == "win_rate" else 8)  # 8 prompts x 2 completions
    assert np.isfinite(rec["phi_tau"]) and set(rec["guard"]) >= {"longest_streak", "phi_resyncs"}
    for role in ("theta", "phi"):
        assert 0 <= rec[f"{role}_entropy"] <= np.log(spec.num_completions) + 1e-9
        assert rec[f"{role}_kl_to_target"] >= 0
    assert rec["collapsed"] == []


def test_panel_trace_records_the_exact_path_and_leaves_the_run_unchanged():
    """--trace_every: one row every K iterations, the last one the run's own end; the run's outcome is the same."""
    import argparse

    compare = load_script("testbed_compare")
    spec = next(s for s in panel.draw_panel(8, seed=0) if s.max_length <= 2)
    common = dict(prompts=8, iterations=4, weight=0.1, penalty_lambda=1.0, actor_lr=3e-3, critic_lr=1e-2,
                  reward_lr=1e-2, crn=False)
    plain = compare.run_panel_instance(spec, "covariance", 0, argparse.Namespace(**common))
    traced = compare.run_panel_instance(spec, "covariance", 0, argparse.Namespace(**common, trace_every=2))
    assert "trace" not in plain and [row["iteration"] for row in traced["trace"]] == [2, 4]
    assert traced["phi_tau"] == plain["phi_tau"] and traced["theta_entropy"] == plain["theta_entropy"]
    last = traced["trace"][-1]
    assert last["phi_tau"] == pytest.approx(traced["phi_tau"])
    assert last["theta_entropy"] == pytest.approx(traced["theta_entropy"])
    assert last["target_entropy"] == pytest.approx(traced["theta_target_entropy"])  # covariance's target: pi*_tau(x)
    assert last["theta_kl_to_target"] == pytest.approx(traced["theta_kl_to_target"])
    assert len(last["theta_top"]) == 3 and last["theta_top"][0] >= last["theta_top"][1]
    assert traced["trace"][0]["phi_tau"] != last["phi_tau"]  # x moved between the rows


def test_panel_run_scores_the_penalized_theta_against_its_own_lambda(monkeypatch):
    """A method's penalty_lambda override sets the penalized theta's target in the record, not --penalty_lambda."""
    import argparse

    compare = load_script("testbed_compare")
    spec = next(s for s in panel.draw_panel(8, seed=0) if s.max_length <= 2)
    seen = []
    original = testbed.MultiTokenProblem.penalized_policy

    def spy(self, x, lam, tau, **kw):
        seen.append(lam)
        return original(self, x, lam, tau, **kw)

    monkeypatch.setattr(testbed.MultiTokenProblem, "penalized_policy", spy)
    args = argparse.Namespace(prompts=4, iterations=2, weight=0.1, penalty_lambda=2.0, actor_lr=3e-3, critic_lr=1e-2,
                              reward_lr=1e-2, crn=False)
    compare.run_panel_instance(spec, "penalized_covariance@penalty_lambda=0.7", 0, args)
    assert seen == [0.7]


def test_panel_run_without_a_penalized_optimum_is_scored_against_pi_star(monkeypatch):
    """Where the penalized objective has no maximum at the learned x (lam * tau small), the run keeps its record: the
    penalized theta is scored against pi*_tau(x), and the record says so."""
    import argparse

    compare = load_script("testbed_compare")
    spec = next(s for s in panel.draw_panel(8, seed=0) if s.max_length <= 2)

    def no_maximum(self, x, lam, tau, **kw):
        raise RuntimeError("penalized_policy: the stationary point found is not a local maximum")

    monkeypatch.setattr(testbed.MultiTokenProblem, "penalized_policy", no_maximum)
    args = argparse.Namespace(prompts=4, iterations=2, weight=0.1, penalty_lambda=2.0, actor_lr=3e-3, critic_lr=1e-2,
                              reward_lr=1e-2, crn=False)
    rec = compare.run_panel_instance(spec, "penalized_covariance", 0, args)
    assert "not a local maximum" in rec["theta_target_note"] and np.isfinite(rec["phi_tau"])
    assert rec["theta_kl_to_target"] >= 0 and rec["theta_target_entropy"] > 0


def test_an_exploring_panel_run_records_what_its_weights_kept():
    import argparse

    compare = load_script("testbed_compare")
    spec = next(s for s in panel.draw_panel(8, seed=0) if s.max_length <= 2)
    args = argparse.Namespace(prompts=4, iterations=2, weight=0.1, penalty_lambda=2.0, actor_lr=3e-3, critic_lr=1e-2,
                              reward_lr=1e-2, crn=False)
    rec = compare.run_panel_instance(spec, "penalized_covariance@exploration_temperature=4,logging_steps=1", 0, args)
    kept = rec["effective_sample_fraction"]
    assert 0 < kept["min"] <= kept["mean"] <= 1
    assert "effective_sample_fraction" not in compare.run_panel_instance(spec, "penalized_covariance", 0, args)


def test_panel_runs_only_the_chosen_instances(tmp_path, monkeypatch, capsys):
    """--instances: the drawn panel's chosen indices only (their references and runs); an index outside it is
    refused before any run."""
    import json
    import sys

    compare = load_script("testbed_compare")
    out = tmp_path / "panel.json"
    base = ["testbed_compare.py", "--panel", "8", "--seeds", "0", "--iterations", "1", "--prompts", "4",
            "--methods", "partial_sgd", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*base, "--instances", "8"])
    with pytest.raises(SystemExit, match=r"--instances: \[8\] not in the panel's indices 0-7"):
        compare.main()
    assert not out.exists()
    spec = next(s for s in panel.draw_panel(8, seed=0) if s.max_length <= 2)
    monkeypatch.setattr(sys, "argv", [*base, "--instances", str(spec.index)])
    compare.main()
    state = json.loads(out.read_text())
    assert [r["index"] for r in state["references"]] == [spec.index]
    assert [(r["instance"], r["method"]) for r in state["runs"]] == [(spec.index, "partial_sgd")]


def test_exact_descent_script_follows_the_closed_form_hypergradient():
    """scripts/exact_descent.py: from x = 0, Phi_tau and the hypergradient's norm at the checkpoints are those of
    plain gradient steps recomputed here."""
    descent = load_script("exact_descent")
    rows = descent.main(["--panel", "3", "--instance", "1", "--lrs", "0.5", "--steps", "100"])
    spec = panel.draw_panel(3, 0)[1]
    _, problem = panel.build_instance(spec)
    obj = dict(objective=spec.objective, weight=0.1)
    x = np.zeros(len(problem.scores))
    expected = {}
    for k in range(101):
        g = problem.exact_hypergradient(x, spec.tau, **obj)
        expected[k] = (problem.phi_tau(x, spec.tau, **obj), np.linalg.norm(g))
        x = x - 0.5 * g
    assert [r["step"] for r in rows] == [0, 100]
    for r in rows:
        assert (r["phi_tau"], r["grad_norm"]) == pytest.approx(expected[r["step"]])
    assert rows[-1]["phi_tau"] < rows[0]["phi_tau"]


@pytest.mark.parametrize("beta2", [0.999, 0.9])
def test_exact_descent_script_takes_adams_steps(beta2):
    """--optimizer adam: Adam's steps on the exact hypergradient, recomputed here by hand (bias-corrected moments,
    beta1 0.9, beta2 --adam_beta2, eps 1e-8): the first step moves every coordinate by lr against the gradient's
    sign."""
    descent = load_script("exact_descent")
    rows = descent.main(["--panel", "3", "--instance", "1", "--optimizer", "adam", "--lrs", "0.05", "--steps", "100",
                         "--adam_beta2", str(beta2)])
    spec = panel.draw_panel(3, 0)[1]
    _, problem = panel.build_instance(spec)
    obj = dict(objective=spec.objective, weight=0.1)
    x, m, v = (np.zeros(len(problem.scores)) for _ in range(3))
    for k in range(100):
        g = problem.exact_hypergradient(x, spec.tau, **obj)
        m, v = 0.9 * m + 0.1 * g, beta2 * v + (1 - beta2) * g * g
        step = 0.05 * (m / (1 - 0.9 ** (k + 1))) / (np.sqrt(v / (1 - beta2 ** (k + 1))) + 1e-8)
        if k == 0:
            np.testing.assert_allclose(np.abs(step[g != 0]), 0.05, rtol=1e-4)  # up to eps
        x = x - step
    assert rows[-1]["step"] == 100
    assert rows[-1]["phi_tau"] == pytest.approx(problem.phi_tau(x, spec.tau, **obj), abs=1e-9)


@pytest.mark.parametrize("objective", ["win_rate", "preference_nll"])
def test_ideal_actor_script_estimates_the_exact_hypergradient(objective):
    """scripts/ideal_actor.py: the trainer's x-loss on completions drawn from pi*_tau(x) averages to the closed form,
    grad_x f for partial_sgd and the whole hypergradient for covariance (noiseless labels, as the panel's oracle); so
    does its importance-weighted form on completions drawn from a flatter distribution."""
    import dataclasses

    ideal = load_script("ideal_actor")
    drawn = next(s for s in panel.draw_panel(8, seed=0) if s.num_completions <= 16)
    spec = dataclasses.replace(drawn, objective=objective)
    _, problem = panel.build_instance(spec)
    x = np.random.default_rng(1).normal(0.0, 0.3, len(problem.scores))
    pi = problem.soft_optimal_policy(x, spec.tau)
    g_x, _ = bandit.upper_loss_grads(x, pi, problem.scores, problem.temperature, objective=objective, weight=0.1,
                                     log_pi_ref=problem.log_pi_ref)
    exact = {"partial_sgd": g_x, "covariance": problem.exact_hypergradient(x, spec.tau, objective=objective)}
    rng = np.random.default_rng(0)
    for method, target in exact.items():
        for temperature in (1.0, 3.0):  # 3: drawn from pi^(1/3), importance-weighted back to pi
            mean = np.mean([ideal.sampled_gradient(problem, x, pi, method, spec.tau, 1.0, objective, 0.1,
                                                   prompts=20_000, rng=rng, sample_temperature=temperature)
                            for _ in range(10)], axis=0)
            np.testing.assert_allclose(mean, target, atol=0.02 * np.abs(target).max(), err_msg=f"{method} {temperature}")
    rows = ideal.main(["--panel", "8", "--instance", str(spec.index), "--methods", "covariance", "--seeds", "0",
                       "--iterations", "2", "--every", "1"])
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[0]["phi_tau"] == pytest.approx(problem.phi_tau(np.zeros(len(problem.scores)), spec.tau,
                                                               objective=drawn.objective))


def test_ideal_actor_warmup_ramps_the_covariance_term(monkeypatch):
    """--warmup r: the covariance term's weight rises as min(1, k / (r * iterations)); at weight 0 covariance's
    x-gradient is partial_sgd's on the same draws, at weight 1 it is not."""
    ideal = load_script("ideal_actor")
    spec = next(s for s in panel.draw_panel(8, seed=0) if s.num_completions <= 16)
    _, problem = panel.build_instance(spec)
    x = np.random.default_rng(1).normal(0.0, 0.3, len(problem.scores))
    pi = problem.soft_optimal_policy(x, spec.tau)

    def grad(method, weight):
        return ideal.sampled_gradient(problem, x, pi, method, spec.tau, 1.0, spec.objective, 0.1, prompts=32,
                                      rng=np.random.default_rng(3), covariance_weight=weight)

    np.testing.assert_array_equal(grad("covariance", 0.0), grad("partial_sgd", 1.0))
    assert not np.allclose(grad("covariance", 1.0), grad("partial_sgd", 1.0))
    weights = []
    original = ideal.sampled_gradient

    def spy(*args, covariance_weight=1.0, **kwargs):
        weights.append(covariance_weight)
        return original(*args, covariance_weight=covariance_weight, **kwargs)

    monkeypatch.setattr(ideal, "sampled_gradient", spy)
    ideal.main(["--panel", "8", "--instance", str(spec.index), "--methods", "covariance", "--seeds", "0",
                "--iterations", "4", "--warmup", "0.5"])
    assert weights == [0.0, 0.5, 1.0, 1.0]


def test_scripts_refuse_an_instance_outside_the_panel():
    """exact_descent.py and ideal_actor.py name the flag and the panel's indices."""
    for name in ("exact_descent", "ideal_actor"):
        with pytest.raises(SystemExit, match=r"--instance must be one of the panel's indices 0-2, got 3"):
            load_script(name).main(["--panel", "3", "--instance", "3"])
    assert panel.drawn_instance(3, 0, 1) == panel.draw_panel(3, 0)[1]
