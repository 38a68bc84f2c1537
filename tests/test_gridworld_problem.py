"""The goal-placement problem: exact hypergradient vs finite differences, penalty properties, and the
single-loop (penalty) hypergradient estimator vs the exact hypergradient."""

import numpy as np
import pytest

from bilevel_rlhf.gridworld.algorithms import ActorCritic, Sampler, build_problem
from bilevel_rlhf.gridworld.config import GridWorldConfig
from bilevel_rlhf.gridworld.mdp import make_grid
from bilevel_rlhf.gridworld.problem import GoalProblem, global_search
from bilevel_rlhf.gridworld.solvers import soft_value_iteration


@pytest.fixture(scope="module")
def grid():
    return make_grid()


def random_x(problem, rng):
    if problem.parameterization == "position":
        return rng.uniform(0.5, 8.5, size=2)
    return rng.normal(scale=1.5, size=problem.dim)


def central_fd(fun, x, eps):
    g = np.zeros_like(x)
    for i in range(len(x)):
        e = np.zeros_like(x)
        e[i] = eps
        g[i] = (fun(x + e) - fun(x - e)) / (2 * eps)
    return g


@pytest.mark.parametrize("parameterization,tau", [("position", 0.3), ("position", 0.05), ("cells", 0.2)])
def test_exact_hypergradient_matches_central_differences(grid, parameterization, tau):
    problem = GoalProblem(grid, parameterization=parameterization, hazard_cost=2.0, bump_width=0.7)
    rng = np.random.default_rng(0)
    for _ in range(3 if parameterization == "position" else 2):
        x = random_x(problem, rng)
        value, g = problem.hypergradient(x, tau)
        assert abs(value - float(problem.phi(x, tau))) < 1e-10
        if parameterization == "cells":  # 100 coordinates: 8 random ones, plus a random direction
            idx = rng.choice(problem.dim, 8, replace=False)
            fd = np.array([(problem.phi(x + 1e-5 * np.eye(problem.dim)[i], tau)
                            - problem.phi(x - 1e-5 * np.eye(problem.dim)[i], tau)) / 2e-5 for i in idx])
            g_sub = g[idx]
            v = rng.normal(size=problem.dim)
            dd = (problem.phi(x + 1e-5 * v, tau) - problem.phi(x - 1e-5 * v, tau)) / 2e-5
            assert abs(dd - g @ v) <= 1e-4 * abs(dd) + 1e-9
        else:
            fd = central_fd(lambda z: float(problem.phi(z, tau)), x, 1e-5)
            g_sub = g
        assert np.linalg.norm(g_sub - fd) <= 1e-4 * np.linalg.norm(fd), (g_sub, fd)


@pytest.mark.parametrize("parameterization", ["position", "cells"])
def test_reward_and_placement_gradients_match_finite_differences(grid, parameterization):
    problem = GoalProblem(grid, parameterization=parameterization, placement_weight=0.3)
    rng = np.random.default_rng(1)
    x = random_x(problem, rng)
    w = rng.random((problem.mdp.n_states, problem.mdp.n_actions))
    fd = central_fd(lambda z: float((w * problem.reward(z)).sum()), x, 1e-6)
    np.testing.assert_allclose(problem.reward_vjp(x, w), fd, rtol=1e-6, atol=1e-8)
    fd_c = central_fd(lambda z: float(problem.placement_cost(z)), x, 1e-6)
    np.testing.assert_allclose(problem.placement_grad(x), fd_c, rtol=1e-6, atol=1e-9)


def test_penalty_is_nonnegative_and_zero_at_the_soft_optimum(grid):
    problem = GoalProblem(grid)
    rng = np.random.default_rng(2)
    tau, lam = 0.2, 10.0
    for _ in range(3):
        x = random_x(problem, rng)
        pi_star = problem.lower_policy(x, tau)
        assert abs(problem.penalty(x, pi_star, tau, lam)) < 1e-9
        other = rng.dirichlet(np.ones(problem.mdp.n_actions), size=problem.mdp.n_states)
        assert problem.penalty(x, other, tau, lam) > 1e-3
        # theta's optimum (shaped reward r - u / lambda) pays a positive penalty
        theta = soft_value_iteration(problem.mdp, problem.reward(x) - problem.designer_cost / lam, tau)[2]
        assert problem.penalty(x, theta, tau, lam) > 0


def test_penalty_hypergradient_tends_to_exact_hypergradient(grid):
    problem = GoalProblem(grid, hazard_cost=2.0, bump_width=0.7)
    x, tau = np.array([3.7, 2.6]), 0.3
    exact = problem.hypergradient(x, tau)[1]
    errors = [np.linalg.norm(problem.penalty_hypergradient(x, tau, lam) - exact) for lam in (10.0, 100.0, 1000.0)]
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5  # bias O(1 / lambda)
    assert errors[2] < 1e-2 * np.linalg.norm(exact)


def test_sampled_single_loop_estimate_matches_exact_within_sampling_error(grid):
    """Actors held at their exact optima (phi = pi*_tau(r_x), theta = pi*_tau(r_x - u/lam)), walkers
    sampled as in the algorithm (common random numbers), lambda large: h_hat ~ grad Phi_tau."""
    problem = GoalProblem(grid, hazard_cost=2.0, bump_width=0.7)
    x, tau, lam = np.array([3.7, 2.6]), 0.3, 200.0
    exact = problem.hypergradient(x, tau)[1]
    bias = problem.penalty_hypergradient(x, tau, lam) - exact  # exact O(1/lambda) part
    r = problem.reward(x)
    sampler = Sampler(problem.mdp, 512)
    rng = np.random.default_rng(3)
    states = sampler.start(sampler.uniforms(rng)[3])
    actors = ActorCritic(problem.mdp, np.stack([states, states]))  # phi, theta
    for i, reward in enumerate((r, r - problem.designer_cost / lam)):
        actors.logits[i] = np.log(soft_value_iteration(problem.mdp, reward, tau)[2])
    estimates = []
    for t in range(2100):
        u = sampler.uniforms(rng)
        w_phi, w_theta = actors.step(sampler, r, tau, 0.0, 0.0, u)  # alpha = beta = 0: fixed actors
        if t >= 100:  # burn-in: the walkers' law is within gamma^100 of d^pi
            estimates.append(problem.placement_grad(x) + lam * problem.reward_vjp(x, w_phi - w_theta))
    est = np.array(estimates).reshape(40, 50, 2).mean(1)  # batch means (walkers persist across steps)
    mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(len(est))
    assert np.all(np.abs(mean - exact - bias) <= 4 * se + 1e-12), (mean, exact, bias, se)
    assert np.linalg.norm(bias) < 0.05 * np.linalg.norm(exact)
    assert np.linalg.norm(mean - exact) < 0.25 * np.linalg.norm(exact)  # informative, not just noise


def test_global_search_position_beats_random_points(grid):
    problem = GoalProblem(grid, hazard_cost=2.0, bump_width=0.7)
    best = global_search(problem, step=1.0, refine_step=0.25)
    assert abs(best["phi"] - float(problem.phi(best["x"]))) < 1e-12
    rng = np.random.default_rng(4)
    others = problem.phi(rng.uniform(0, 9, size=(64, 2)))
    assert best["phi"] <= others.min() + 1e-12


def test_problem_input_validation(grid):
    with pytest.raises(ValueError, match="parameterization"):
        GoalProblem(grid, parameterization="polar")
    with pytest.raises(ValueError, match="bump_width must be > 0"):
        GoalProblem(grid, bump_width=0.0)
    problem = GoalProblem(grid)
    with pytest.raises(ValueError, match="x must have last dimension 2"):
        problem.reward(np.zeros(3))
    with pytest.raises(ValueError, match="tau must be >= 0"):
        problem.phi(np.zeros(2), -0.1)


def test_the_regularized_optima_script_reports_each_taus_minimizer_and_its_unregularized_phi(capsys):
    from script_loader import load_script

    from bilevel_rlhf.gridworld.problem import batched_phi, position_grid

    out = load_script("gridworld_regularized_optima").main(["--step", "0.5", "--taus", "0.1", "0.005"])
    problem = build_problem(GridWorldConfig())
    xs = position_grid(problem, 0.5)
    assert len(xs) == 19 * 19 and out["best"] == pytest.approx(batched_phi(problem, xs).min(), abs=1e-12)
    for row in out["rows"]:
        phi_tau = batched_phi(problem, xs, row["tau"])
        assert row["phi_tau"] == pytest.approx(phi_tau.min(), abs=1e-12)  # the minimizer over the grid
        assert row["phi"] == pytest.approx(float(problem.phi(np.array(row["x"]), 0.0)), abs=1e-12)
        assert row["phi"] >= out["best"] - 1e-12
    assert "| 0.1 | (" in capsys.readouterr().out
