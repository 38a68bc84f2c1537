"""The general tabular bilevel API (`bilevel_rlhf.gridworld.tabular`) and HPGD's Four-Rooms instance: episodic
values, the exact hypergradient against finite differences, the instance against an independent computation, a
user-defined problem, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from bilevel_rlhf.gridworld.four_rooms import FOUR_ROOMS_LAYOUT, four_rooms
from bilevel_rlhf.gridworld.mdp import TabularMDP
from bilevel_rlhf.gridworld.solvers import policy_evaluation, soft_value_iteration
from bilevel_rlhf.gridworld.tabular import Context, Parameterization, TabularBilevelProblem, exact_ascent


def _independent_four_rooms_value(w: np.ndarray, tau: float, c_ul: float, sweeps: int = 3000) -> float:
    """The leader's value of HPGD's instance from the map alone: its own transition table (loops over cells), soft
    value iteration to convergence, then the leader's policy evaluation by iteration; no solver of the package."""
    cells = [(r, c) for r, row in enumerate(FOUR_ROOMS_LAYOUT) for c, ch in enumerate(row) if ch == "."]
    where = {cell: i for i, cell in enumerate(cells)}
    n, moves = len(cells), [(-1, 0), (0, 1), (1, 0), (0, -1)]
    P = np.zeros((n, 4, n))
    for i, (r, c) in enumerate(cells):
        for a in range(4):
            for b, (dr, dc) in enumerate(moves):
                P[i, a, where.get((r + dr, c + dc), i)] += 0.56 if a == b else 0.44 / 3
    e = np.exp(w - w.max())
    incentive = -0.2 * (e / e.sum())[:-1]
    total = 0.0
    for goal in ((1, 9), (11, 11)):
        g = where[goal]
        go_on = 0.99 * (np.arange(n) != g)[:, None]  # nothing after acting in the goal
        reward = np.where(np.arange(n) == g, 1.0, incentive)[:, None]
        V = np.zeros(n)
        for _ in range(sweeps):
            Q = reward + go_on * (P @ V)
            V = Q.max(1) + tau * np.log(np.exp((Q - Q.max(1, keepdims=True)) / tau).sum(1))
        pi = np.exp((Q - Q.max(1, keepdims=True)) / tau)
        pi /= pi.sum(1, keepdims=True)
        leader = np.where(np.arange(n) == where[(8, 4)], 1.0, 0.0) - np.where(np.arange(n) == g,
                                                                             c_ul * np.abs(incentive).sum(), 0.0)
        U = np.zeros(n)
        for _ in range(sweeps):
            U = (pi * (leader[:, None] + go_on * (P @ U))).sum(1)
        total += 0.5 * U[where[(4, 1)]]
    return total


def test_the_four_rooms_value_equals_an_independent_computation():
    w = np.random.default_rng(3).normal(0.0, 1.0, size=105)
    problem = four_rooms(c_ul=3.0)
    assert problem.dim == 105 and problem.shape == (104, 4)
    assert problem.value(w, 0.05) == pytest.approx(_independent_four_rooms_value(w, 0.05, 3.0), abs=1e-6)


@pytest.mark.parametrize(("tau", "c_ul"), [(0.003, 1.0), (0.05, 5.0)])
def test_the_exact_hypergradient_matches_central_differences(tau, c_ul):
    problem = four_rooms(c_ul)
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 0.5, size=problem.dim)
    value, grad = problem.hypergradient(x, tau)
    assert value == pytest.approx(problem.value(x, tau), abs=1e-12)
    for _ in range(3):
        v = rng.normal(size=problem.dim)
        eps = 1e-6
        fd = (problem.value(x + eps * v, tau) - problem.value(x - eps * v, tau)) / (2 * eps)
        assert grad @ v == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_a_terminal_state_pays_once_with_one_entropy_bonus():
    """The issue's 2-state example: r = 1 at the goal, gamma 0.99, tau 0.003, 4 actions. Episodic: V(goal) = 1 + tau
    log 4 (one step, one bonus), where a sink collecting the bonus forever would give far more."""
    A, tau = 4, 0.003
    P = np.zeros((2, A, 2))
    P[:, :, 1] = 1.0  # every action leads to the goal
    mdp = TabularMDP(P, np.array([1.0, 0.0]), 0.99, terminal=np.array([False, True]))
    r = np.array([[0.0] * A, [1.0] * A])
    _, V, pi = soft_value_iteration(mdp, r, tau)
    assert V[1] == pytest.approx(1.0 + tau * np.log(A), abs=1e-10)
    assert V[0] == pytest.approx(tau * np.log(A) + 0.99 * V[1], abs=1e-10)
    assert np.allclose(pi, 1.0 / A)
    # gamma = 1 is allowed once every state reaches a terminal one
    undiscounted = TabularMDP(P, np.array([1.0, 0.0]), 1.0, terminal=np.array([False, True]))
    assert policy_evaluation(undiscounted, pi, r, tau)[1][0] == pytest.approx(1.0 + 2 * tau * np.log(A), abs=1e-10)


def test_a_user_defined_problem_with_contexts_and_a_leader_cost():
    """A bandit-like chain the docs describe: the leader pays a per-state bonus x to steer the follower, in two
    contexts; the gradient is exact and ascent raises the leader's value."""
    S, A = 3, 2
    P = np.zeros((S, A, S))
    P[0, 0, 1] = P[0, 1, 2] = 1.0  # from the start, action 0 goes to state 1, action 1 to state 2
    P[1, :, 1] = P[2, :, 2] = 1.0
    terminal = np.array([False, True, True])
    mdp = TabularMDP(P, np.array([1.0, 0.0, 0.0]), 0.9, terminal=terminal)
    contexts = [Context(mdp, follower_reward=np.array([[0, 0], [1, 1], [0.5, 0.5]]), leader_reward=np.array(
        [[0, 0], [0, 0], [1, 1]]), weight=2.0),
        Context(mdp, follower_reward=np.array([[0, 0], [0.2, 0.2], [0, 0]]), leader_reward=np.array(
            [[0, 0], [0, 0], [1, 1]]), weight=1.0)]
    bonus = Parameterization(dim=S, value=lambda x, c: np.repeat(x[:, None], A, axis=1),
                             vjp=lambda x, c, g: np.asarray(g).sum(-1))
    spend = Parameterization(dim=S, value=lambda x, c: -0.1 * np.repeat((x ** 2)[:, None], A, axis=1),
                             vjp=lambda x, c, g: -0.2 * x * np.asarray(g).sum(-1))
    problem = TabularBilevelProblem(contexts, bonus, spend, check_gradients=True)
    x = np.array([0.0, 0.1, 0.2])
    value, grad = problem.hypergradient(x, 0.1)
    eps = 1e-6
    for i in range(S):
        e = np.eye(S)[i] * eps
        assert grad[i] == pytest.approx((problem.value(x + e, 0.1) - problem.value(x - e, 0.1)) / (2 * eps), rel=1e-5,
                                        abs=1e-9)
    out = exact_ascent(problem, x, 0.1, learning_rate=0.5, iterations=50)
    assert out["value"] > value + 0.1 and out["values"][0] == pytest.approx(value)


def _mdp(**kw):
    P = np.full((2, 1, 2), 0.5)
    return TabularMDP(P, np.array([1.0, 0.0]), 0.9, **kw)


def test_bad_input_names_what_is_wrong():
    mdp = _mdp()
    ok = Parameterization(dim=2, value=lambda x, c: np.repeat(x[:, None], 1, axis=1), vjp=lambda x, c, g: g.sum(-1))
    ctx = Context(mdp, np.zeros((2, 1)), np.zeros((2, 1)))
    TabularBilevelProblem([ctx], ok, check_gradients=True)  # fine
    with pytest.raises(ValueError, match="contexts must hold at least one Context"):
        TabularBilevelProblem([], ok)
    with pytest.raises(ValueError, match=r"contexts\[0\].weight must be a finite probability weight > 0"):
        TabularBilevelProblem([Context(mdp, np.zeros((2, 1)), np.zeros((2, 1)), weight=0.0)], ok)
    with pytest.raises(ValueError, match=r"contexts\[0\].follower_reward must be a finite \[S, A\]"):
        TabularBilevelProblem([Context(mdp, np.zeros((3, 1)), np.zeros((2, 1)))], ok)
    bad_value = Parameterization(dim=2, value=lambda x, c: x, vjp=ok.vjp)
    with pytest.raises(ValueError, match=r"incentive.value\(x, 0\) must have shape \[S, A\]"):
        TabularBilevelProblem([ctx], bad_value)
    bad_vjp = Parameterization(dim=2, value=ok.value, vjp=lambda x, c, g: g)
    with pytest.raises(ValueError, match=r"incentive.vjp\(x, 0, g\) must have shape \[dim\]"):
        TabularBilevelProblem([ctx], bad_vjp)
    wrong_vjp = Parameterization(dim=2, value=ok.value, vjp=lambda x, c, g: 2.0 * g.sum(-1))
    TabularBilevelProblem([ctx], wrong_vjp)  # the finite-difference check is opt-in
    with pytest.raises(ValueError, match="incentive.vjp disagrees with finite differences in context 0"):
        TabularBilevelProblem([ctx], wrong_vjp, check_gradients=True)
    problem = TabularBilevelProblem([ctx], ok)
    with pytest.raises(ValueError, match=r"x must be a finite vector of shape \[2\]"):
        problem.value(np.zeros(3), 0.1)
    with pytest.raises(ValueError, match="tau must be > 0"):
        problem.value(np.zeros(2), 0.0)


def test_the_docs_example_runs_as_written(capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "gridworld.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "TabularBilevelProblem(" in b]
    namespace: dict = {}
    exec(block, namespace)
    before, after = (float(v) for v in re.findall(r"(-?\d+\.\d+)", capsys.readouterr().out))
    assert namespace["result"]["value"] == pytest.approx(after, abs=5e-4) and after > before + 0.1


def test_sparse_transitions_give_the_dense_answers():
    """make_grid(sparse=True): the same MDP as a scipy.sparse [S * A, S] matrix. Phi, the exact hypergradient,
    episodic values, and a sampled single_loop run agree with the dense P."""
    from bilevel_rlhf.gridworld import GoalProblem, GridWorldConfig, make_grid, run_method
    from bilevel_rlhf.gridworld.algorithms import build_problem

    dense, sparse = make_grid(), make_grid(sparse=True)
    assert sparse.mdp.sparse and not dense.mdp.sparse
    assert np.allclose(sparse.mdp.P.toarray().reshape(dense.mdp.P.shape), dense.mdp.P, rtol=0, atol=1e-15)
    x = np.array([4.3, 3.1])
    for tau in (0.0, 0.05):
        a, b = GoalProblem(dense), GoalProblem(sparse)
        assert b.phi(x, tau) == pytest.approx(a.phi(x, tau), abs=1e-10)
    va, ga = GoalProblem(dense).hypergradient(x, 0.05)
    vb, gb = GoalProblem(sparse).hypergradient(x, 0.05)
    assert vb == pytest.approx(va, abs=1e-10) and np.allclose(gb, ga, atol=1e-9)
    # episodic: terminal states on a sparse P
    terminal = dense.target.copy()
    values = []
    for grid in (dense, sparse):
        mdp = TabularMDP(grid.mdp.P, grid.mdp.rho, 0.9, terminal=terminal)
        r = np.repeat(terminal[:, None].astype(float), mdp.n_actions, axis=1)
        values.append(soft_value_iteration(mdp, r, 0.1)[1])
    assert np.allclose(values[1], values[0], atol=1e-10)
    with pytest.raises(ValueError, match="a sparse MDP solves one policy"):
        GoalProblem(sparse).phi(np.stack([x, x]), 0.05)
    # the walkers draw the same successors
    cfg = GridWorldConfig(iterations=50, eval_every=50, progress=False)
    problem = build_problem(cfg)
    sparse_problem = GoalProblem(make_grid(cfg.layout, cfg.slip, cfg.gamma, sparse=True), **{
        k: getattr(problem, k) for k in ("parameterization", "reward_scale", "bump_width", "hazard_cost",
                                         "target_bonus", "placement_weight")})
    r_dense, r_sparse = run_method(problem, cfg, "single_loop", 0), run_method(sparse_problem, cfg, "single_loop", 0)
    assert np.allclose(r_dense.x, r_sparse.x, atol=1e-12)


def _chain_problem():
    """Two contexts over a 4-state chain with a terminal end, discounting and a leader cost (a small instance that
    exercises every term of the penalty direction)."""
    S, A = 4, 2
    P = np.zeros((S, A, S))
    for s in range(S - 1):
        P[s, 0, s + 1], P[s, 0, s] = 0.8, 0.2  # forward, mostly
        P[s, 1, max(s - 1, 0)] = 1.0  # back
    P[S - 1, :, 0] = 1.0  # never taken: the episode ends there (walkers that played on would start over)
    terminal = np.array([False, False, False, True])
    mdp = TabularMDP(P, np.array([1.0, 0.0, 0.0, 0.0]), 0.95, terminal=terminal)
    mdp2 = TabularMDP(P, np.array([0.0, 1.0, 0.0, 0.0]), 0.9, terminal=terminal)
    goal = np.zeros((S, A))
    goal[S - 1] = 1.0
    leader = np.zeros((S, A))
    leader[1] = 0.5
    bonus = Parameterization(dim=S, value=lambda x, c: np.repeat(x[:, None], A, axis=1),
                             vjp=lambda x, c, g: np.asarray(g).sum(-1))
    spend = Parameterization(dim=S, value=lambda x, c: -0.2 * np.repeat((x ** 2)[:, None], A, axis=1),
                             vjp=lambda x, c, g: -0.4 * x * np.asarray(g).sum(-1))
    return TabularBilevelProblem([Context(mdp, goal, leader, 1.0), Context(mdp2, 0.5 * goal, leader, 3.0)], bonus,
                                 spend)


def test_the_penalty_direction_tends_to_the_hypergradient_as_lambda_grows():
    from bilevel_rlhf.gridworld.walkers import penalty_hypergradient

    for problem, x, tau in ((_chain_problem(), np.array([0.1, 0.3, -0.2, 0.0]), 0.2),
                            (four_rooms(1.0), np.random.default_rng(0).normal(0.0, 0.5, size=105), 0.05)):
        exact = problem.hypergradient(x, tau)[1]
        errors = [np.linalg.norm(penalty_hypergradient(problem, x, tau, lam) - exact) for lam in (10.0, 100.0, 1000.0)]
        assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2 * max(1.0, np.linalg.norm(exact)), errors


def test_walkers_estimate_the_penalty_direction_without_bias():
    """With the actors' policies fixed at their soft optima, the walkers' estimate (restarts at termination and with
    probability 1 - gamma, two contexts of different lengths and weights) matches the exact direction."""
    from bilevel_rlhf.gridworld.solvers import soft_value_iteration
    from bilevel_rlhf.gridworld.walkers import EpisodicWalkers, penalty_hypergradient, sampled_penalty_hypergradient

    # an incentive under which both actors reach the terminal state often (the walkers' episodes end there)
    problem, x, tau, lam = _chain_problem(), np.array([-0.1, 0.0, 0.1, 0.5]), 0.2, 2.0
    phi = [soft_value_iteration(c.mdp, r, tau)[2] for c, r in zip(problem.contexts, problem.follower_rewards(x))]
    theta = [soft_value_iteration(c.mdp, r + u / lam, tau)[2] for c, r, u in
             zip(problem.contexts, problem.follower_rewards(x), problem.leader_rewards(x))]
    exact = penalty_hypergradient(problem, x, tau, lam)
    estimates = np.stack([sampled_penalty_hypergradient(problem, x, lam, phi, theta, 1024, 400,
                                                        np.random.default_rng(seed)) for seed in range(8)])
    mean, se = estimates.mean(0), estimates.std(0, ddof=1) / np.sqrt(len(estimates))
    assert np.all(np.abs(mean - exact) <= 4 * se + 1e-3) and np.all(se < 0.02 * np.abs(exact).max()), (mean, exact, se)
    # the visits follow mu(c, s) = w_c d_c(s) / Z, and their mean episode-end probability is 1 / Z
    from bilevel_rlhf.gridworld.solvers import discounted_visits

    d = np.stack([w * discounted_visits(ctx.mdp, p) for w, ctx, p in zip(problem.weights, problem.contexts, phi)])
    Z = d.sum()
    walkers, rng = EpisodicWalkers(problem, 4096, np.random.default_rng(0)), np.random.default_rng(1)
    freq, ends = np.zeros_like(d), []
    for i in range(300):
        c, s, _, _ = walkers.step(phi, rng)
        if i >= 100:  # past the start's transient
            np.add.at(freq, (c, s), 1.0)
            ends.append(walkers.end[c, s].mean())
    np.testing.assert_allclose(freq / freq.sum(), d / Z, atol=3e-3)
    assert np.mean(ends) == pytest.approx(1.0 / Z, rel=0.01)


@pytest.mark.parametrize("crn, floor", [(True, 3.0), (False, 3.2)])
def test_the_sampled_single_loop_climbs_the_exact_value(crn, floor):
    """From samples only (episodic walkers, tabular actors and critics per context), x climbs the leader's exact
    value from 2.13 towards the exact ascent's 3.45 on the chain problem, with coupled or independent walkers (the
    coupled ones reach the exact penalty optimum's x, but take a detour along a flat direction of V first)."""
    from bilevel_rlhf.gridworld.walkers import sampled_single_loop

    problem = _chain_problem()
    out = sampled_single_loop(problem, np.zeros(4), 4000, 64, 0.2, 5.0, 0.005, seed=0, record_every=250,
                              common_random_numbers=crn)
    assert out["values"][0] == pytest.approx(2.133, abs=1e-3) and out["transitions"] == 2 * 64 * 4000
    assert np.median(out["values"][4:]) > floor and problem.value(out["x"], 0.2) > floor


@pytest.mark.parametrize("crn", [True, False])
def test_the_sampled_penalty_direction_of_equal_actors_is_zero_only_when_coupled(crn):
    """theta = phi and no leader cost: coupled walkers visit the same (c, s, a), so the estimated direction is exactly
    zero; independent walkers leave noise."""
    from bilevel_rlhf.gridworld.walkers import sampled_penalty_hypergradient

    chain = _chain_problem()
    problem = TabularBilevelProblem(chain.contexts, chain.incentive)
    x = np.array([0.1, -0.2, 0.3, 0.0])
    pi = [soft_value_iteration(c.mdp, r, 0.2)[2] for c, r in zip(problem.contexts, problem.follower_rewards(x))]
    h = sampled_penalty_hypergradient(problem, x, 5.0, pi, pi, 16, 20, np.random.default_rng(0), crn)
    assert (np.abs(h).max() == 0.0) == crn


def test_coupled_walkers_cut_the_direction_variance_without_bias():
    """Followers at their exact soft optima on the chain problem: the walkers' per-iteration direction has more than
    twofold less variance when theta's walkers draw phi's uniforms, and its mean stays at the exact direction."""
    from bilevel_rlhf.gridworld.walkers import EpisodicWalkers, _penalty_direction, _visit_weights, penalty_hypergradient

    problem, x, tau, lam = _chain_problem(), np.full(4, 0.5), 0.2, 5.0
    rewards, leader = problem.follower_rewards(x), problem.leader_rewards(x)
    phi = [soft_value_iteration(c.mdp, r, tau)[2] for c, r in zip(problem.contexts, rewards)]
    theta = [soft_value_iteration(c.mdp, r + u / lam, tau)[2] for c, r, u in zip(problem.contexts, rewards, leader)]
    exact = penalty_hypergradient(problem, x, tau, lam)
    out = {}
    for coupled in (True, False):
        rng_phi, rng_theta = np.random.default_rng(0), np.random.default_rng(0 if coupled else 1)
        walkers = EpisodicWalkers(problem, 64, rng_phi), EpisodicWalkers(problem, 64, rng_theta)
        h = []
        for t in range(1050):
            v_phi, v_theta = walkers[0].step(phi, rng_phi), walkers[1].step(theta, rng_theta)
            if t >= 50:  # past the start's transient
                h.append(_penalty_direction(problem, x, lam, _visit_weights(problem, walkers[0], [v_phi]),
                                            _visit_weights(problem, walkers[1], [v_theta])))
        out[coupled] = np.array(h)
    assert out[True].var(0).sum() < 0.5 * out[False].var(0).sum(), (out[True].var(0), out[False].var(0))
    assert np.linalg.norm(out[True].mean(0) - exact) < 0.1 * np.linalg.norm(exact), (out[True].mean(0), exact)


@pytest.mark.parametrize("crn", [True, False])
def test_identical_actors_cancel_exactly_only_with_common_random_numbers_in_the_sampled_single_loop(crn):
    """No leader reward and no leader cost: theta's reward equals phi's, so the two actors stay identical. With common
    random numbers their walkers then visit the same (c, s, a) and the direction is exactly zero (x stays at x0);
    with independent walkers it is noise and x moves."""
    from bilevel_rlhf.gridworld.walkers import sampled_single_loop

    chain = _chain_problem()
    problem = TabularBilevelProblem([Context(c.mdp, c.follower_reward, np.zeros_like(c.leader_reward), c.weight)
                                     for c in chain.contexts], chain.incentive)
    x0 = np.array([0.1, -0.2, 0.3, 0.0])
    out = sampled_single_loop(problem, x0, 50, 16, 0.2, 5.0, 0.1, seed=3, common_random_numbers=crn)
    np.testing.assert_array_equal(out["phi"], out["theta"])
    if crn:
        np.testing.assert_array_equal(out["x"], x0)
    else:
        assert np.abs(out["x"] - x0).max() > 1e-3


def test_the_four_rooms_script_runs_both_methods_and_tabulates_them(tmp_path, capsys):
    import json

    from script_loader import load_script

    script = load_script("four_rooms")
    script.main(["--methods", "exact", "single_loop", "penalty", "--settings", "0.003,1", "--learning_rates", "0.5",
                 "0.1", "--iterations", "20", "--transitions", "25600", "--walker_steps", "5", "--output_dir",
                 str(tmp_path)])
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["method"], r["learning_rate"]) for r in runs] == [
        ("exact", 0.5), ("exact", 0.1), ("single_loop", 0.5), ("single_loop", 0.1), ("penalty", 0.5), ("penalty", 0.1)]
    # 2 actors x 128 walkers + 32 exploring starts per iteration
    assert runs[2]["transitions"] == 88 * 288 and runs[2]["iterations"] == 88 and runs[0]["transitions"] == 0
    assert runs[4]["transitions"] == 25600 and runs[4]["iterations"] == 20  # 2 actors x 128 walkers x 5 steps each
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| reg_lambda | c_UL | exact (ours) | best lr | penalty (ours) | best lr | "
                               "single_loop (ours) | best lr | HPGD")
    assert len(table) == 3 and table[2].startswith("| 0.003 | 1 | ")
    with pytest.raises(SystemExit):
        script.main(["--settings", "0.004,1", "--output_dir", str(tmp_path)])
    assert "not one of HPGD's (reg_lambda, c_UL) pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--methods", "single_loop", "--actor_step", "1.5", "--output_dir", str(tmp_path)])
    assert "--actor_step in (0, 1], got 32, 1, 1.5" in capsys.readouterr().err


def test_the_sampled_penalty_direction_with_exact_followers_climbs_like_exact_ascent():
    """HPGD's protocol with the penalty direction: exact soft best responses, the direction from walkers. On the chain
    problem it ends near the value of exact ascent."""
    from bilevel_rlhf.gridworld.walkers import sampled_penalty_ascent

    problem = _chain_problem()
    exact = exact_ascent(problem, np.zeros(4), 0.2, 0.2, 300)["value"]
    out = sampled_penalty_ascent(problem, np.zeros(4), 0.2, 5.0, 0.05, 300, 64, 10, seed=0, record_every=10)
    assert out["values"][0] == pytest.approx(2.133, abs=1e-3) and out["transitions"] == 2 * 64 * 10 * 300
    assert out["value"] > exact - 0.2 and np.median(out["values"][15:]) > exact - 0.2, (out["value"], exact)


def test_the_empirical_model_averages_the_observed_successors_and_keeps_unseen_pairs_in_place():
    """expected_next(V) at (c, s, a) is the mean of V_c(s') over the transitions seen from (c, s, a) (computed here
    from the list), V_c(s) where none was seen; with many exploring starts it tends to P_c V_c."""
    from bilevel_rlhf.gridworld.four_rooms import four_rooms
    from bilevel_rlhf.gridworld.walkers import EmpiricalModel, EpisodicWalkers

    problem = four_rooms(1)
    C, (S, A) = len(problem.contexts), problem.shape
    walkers, rng = EpisodicWalkers(problem, 4, np.random.default_rng(0)), np.random.default_rng(1)
    model = EmpiricalModel(walkers)
    V = np.random.default_rng(2).normal(size=(2, C, S))  # two value tables at once, as the two actors'
    seen: dict[tuple[int, int, int], list[int]] = {}
    for _ in range(3):
        c, s, a, nxt = walkers.explore(500, rng)
        model.add(c, s, a, nxt)
        for key in zip(c.tolist(), s.tolist(), a.tolist(), nxt.tolist()):
            seen.setdefault(key[:3], []).append(key[3])
    expected = model.expected_next(V)
    assert expected.shape == (2, C, S, A) and 0 < len(seen) < C * S * A
    for c in range(C):
        for s in range(S):
            for a in range(A):
                want = V[:, c, seen[c, s, a]].mean(-1) if (c, s, a) in seen else V[:, c, s]
                np.testing.assert_allclose(expected[:, c, s, a], want, rtol=1e-12, atol=1e-12)
    for _ in range(200):
        model.add(*walkers.explore(10_000, rng))
    for c, ctx in enumerate(problem.contexts):
        exact = (ctx.mdp.P @ V[0, c]).reshape(S, A)
        error = np.abs(model.expected_next(V)[0, c] - exact)  # about 2,400 moves per pair: standard errors ~0.02
        assert error.mean() < 0.025 and error.max() < 0.12, (error.mean(), error.max())


def test_the_sampled_actors_track_the_soft_best_response_at_small_tau():
    """At a fixed x on Four-Rooms with tau = 0.003, the sampled follower (critic on the empirical model, natural
    actor step) reaches the leader value of the exact soft best response within 0.01 in 1,500 iterations."""
    from bilevel_rlhf.gridworld.four_rooms import four_rooms
    from bilevel_rlhf.gridworld.walkers import sampled_single_loop

    problem = four_rooms(1)
    x = np.random.default_rng(0).normal(0.0, 0.01, problem.dim)
    out = sampled_single_loop(problem, x, 1500, 128, 0.003, 100.0, 0.0, explore=32, record_every=10**9)
    np.testing.assert_array_equal(out["x"], x)  # a zero step size leaves x where it was
    assert out["model"].counts.sum() == out["transitions"] == 1500 * (2 * 128 + 32)  # every transition is in the model
    exact = problem.value(x, 0.003)
    assert exact == pytest.approx(0.1995, abs=1e-3)
    assert problem.value(x, 0.003, policies=list(out["phi"])) == pytest.approx(exact, abs=0.01)
    # theta leans towards the leader: its value is at least phi's
    assert problem.value(x, 0.003, policies=list(out["theta"])) > exact
    with pytest.raises(ValueError, match="actor_step must be in"):
        sampled_single_loop(problem, x, 1, 4, 0.003, 100.0, 0.0, actor_step=0.0)
