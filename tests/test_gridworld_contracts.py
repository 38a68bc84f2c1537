"""Contracts of the GridWorld methods: each test asserts the mathematics of one piece (an update rule,
a schedule, a summary number), so that a small deliberate bug in it fails here, not by chance through
a loose end-to-end threshold.

Seam: the methods build their actors inside ``algorithms._penalty_method`` & co. with the module-level
name ``ActorCritic`` and expose no hook to start them at given policies, so ``install_actors`` replaces
that name (pytest's monkeypatch) by a recording subclass that can start the first actors at exact soft
optima, with their walkers drawn from the policies' discounted occupancies (stationary from step one).
"""

from pathlib import Path

import numpy as np
import pytest

from bilevel_rlhf.gridworld import algorithms as alg
from bilevel_rlhf.gridworld.algorithms import (
    ActorCritic,
    Sampler,
    build_problem,
    gridworld_tau,
    inverse_cdf,
    lam_at,
    poly,
    run_method,
)
from bilevel_rlhf.gridworld.config import GridWorldConfig, load_config
from bilevel_rlhf.gridworld.recipe import format_table, samples_to_reach, summarize
from bilevel_rlhf.gridworld.solvers import occupancy, soft_value_iteration

CONFIG_YAML = Path(__file__).resolve().parents[1] / "recipes" / "gridworld" / "config.yaml"
# An interior goal of the default instance where lambda (E_phi - E_theta)[grad r_x] is large in both
# coordinates (about (0.60, 0.71) at tau = 0.3, lambda = 10) and the exact hypergradient is well defined.
X_PEN = [2.5, 1.5]
TARGET_CENTRE = np.array([4.0, 4.5])  # the default layout's 'T' cells: row 4, columns 2..7


@pytest.fixture(scope="module")
def problem():
    return build_problem(GridWorldConfig())  # the default instance (every test below keeps its fields)


def soft_optimum(problem, reward, tau):
    Q, _, pi = soft_value_iteration(problem.mdp, reward, tau)
    return Q, pi


def install_actors(monkeypatch, problem, held=(), tau=None, seed=0):
    """Replace algorithms.ActorCritic by a recording subclass. Actor i of the first stack created (phi, theta),
    i < len(held), starts at pi*_tau(held[i]): logits Q*/tau (so pi = softmax(Q*/tau)), critic Q* (its soft TD error
    is then zero in expectation) and walkers drawn from d^pi with uniforms shared between the held actors (coupled,
    as the method's own walkers are). Returns (one entry per actor, in creation order: its stack and its index in
    it; every actor's step in chronological order as ((stack, index), dict of the step's arguments and result))."""
    actors, calls = [], []
    optima = [soft_optimum(problem, r, tau) for r in held]
    u0 = 1.0 - np.random.default_rng([seed, 12345]).random(1 << 13)

    class Recording(ActorCritic):
        def __init__(self, mdp, states):
            super().__init__(mdp, states)
            first = not actors
            actors.extend((self, i) for i in range(len(self.s)))
            for i, (Q, pi) in enumerate(optima[: len(self.s)] if first else ()):
                assert self.s.shape[1] <= len(u0)
                self.logits[i], self.Q[i] = Q / tau, Q.copy()
                self.s[i] = inverse_cdf(np.cumsum(occupancy(problem.mdp, pi)), u0[: self.s.shape[1]])

        def step(self, sampler, reward, tau_t, alpha, beta, u):
            k = len(self.s)
            w = super().step(sampler, reward, tau_t, alpha, beta, u)
            reward, u = np.broadcast_to(reward, self.Q.shape), np.broadcast_to(u, (k,) + np.shape(u)[-2:])
            for i in range(k):
                calls.append(((self, i), dict(reward=reward[i].copy(), tau=tau_t, alpha=alpha, beta=beta,
                                              u=u[i].copy(), w=w[i])))
            return w

    monkeypatch.setattr(alg, "ActorCritic", Recording)
    return actors, calls


def grad_fd(fun, x, eps=1e-5):
    """Central differences of a scalar function of x (independent of the product's closed forms)."""
    return np.array([(fun(x + eps * e) - fun(x - eps * e)) / (2 * eps) for e in np.eye(len(x))])


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----- 1. one x-step of the sampled single loop = the population penalty hypergradient -----
def test_one_single_loop_x_step_is_the_population_penalty_hypergradient(problem, monkeypatch):
    cfg = GridWorldConfig(x0=X_PEN, iterations=1, batch_size=4096, reward_lr_decay=0.0, eval_every=1)
    # on purpose past validation (> 0): zero actor and critic steps hold the actors
    cfg.actor_learning_rate = cfg.critic_learning_rate = 0.0
    x, tau, lam, zeta = np.array(cfg.x0), cfg.tau_init, cfg.penalty_lambda, cfg.reward_learning_rate
    r, u_cost = problem.reward(x), problem.designer_cost
    _, pi_phi = soft_optimum(problem, r, tau)  # phi: argmax J_tau(x, .)
    _, pi_theta = soft_optimum(problem, r - u_cost / lam, tau)  # theta: argmax lam J_tau(x, .) - f(x, .)
    # population value from the occupancy measures, grad_x by central differences (not reward_vjp)
    w_phi = occupancy(problem.mdp, pi_phi)[:, None] * pi_phi
    w_theta = occupancy(problem.mdp, pi_theta)[:, None] * pi_theta
    population = grad_fd(lambda z: float(problem.placement_cost(z)), x) + lam * grad_fd(
        lambda z: float(((w_phi - w_theta) * problem.reward(z)).sum()), x)
    np.testing.assert_allclose(problem.penalty_hypergradient(x, tau, lam), population, rtol=1e-7)
    grad_c = problem.placement_grad(x)

    estimates = []
    for seed in range(30):
        with monkeypatch.context() as mp:
            actors, calls = install_actors(mp, problem, held=(r, r - u_cost / lam), tau=tau, seed=seed)
            result = run_method(problem, cfg, "single_loop", seed)
        assert len(actors) == 2 and len(calls) == 2
        (a_phi, c_phi), (a_theta, c_theta) = calls
        assert a_phi == actors[0] and a_theta == actors[1] and a_phi[0] is a_theta[0]  # one stack: phi, theta
        assert c_phi["alpha"] == c_theta["alpha"] == 0.0 and c_phi["tau"] == c_theta["tau"] == tau
        np.testing.assert_allclose(a_phi[0].logits[a_phi[1]], soft_optimum(problem, r, tau)[0] / tau)  # held
        assert np.all((result.x > 0) & (result.x < 9))  # no projection: x1 = x0 - zeta h exactly
        h = (x - result.x) / zeta
        # the step is exactly -zeta (grad c + lam (E_phi - E_theta)[grad r]) on this batch's samples
        h_batch = grad_c + lam * problem.reward_vjp(x, c_phi["w"] - c_theta["w"])
        np.testing.assert_allclose(h, h_batch, rtol=1e-9, atol=1e-11)
        estimates.append(h)
    estimates = np.array(estimates)
    mean, se = estimates.mean(0), estimates.std(0, ddof=1) / np.sqrt(len(estimates))
    assert np.all(np.abs(mean - population) <= 4 * se), (mean, population, se)
    penalty = population - grad_c
    mutants = {"penalty sign flipped": grad_c - penalty, "lambda dropped": grad_c + penalty / lam,
               "lambda doubled": grad_c + 2 * penalty, "no penalty term": grad_c}
    for name, mutant in mutants.items():  # the test discriminates: every mutant is many standard errors away
        assert np.max(np.abs(mean - mutant) / se) > 20, (name, mean, mutant, se)


# ----- 2. tau: fixed_tau keeps tau_0, decaying methods follow the formula -----
TAU_CFG = dict(iterations=80, batch_size=8, tau_init=0.3, tau_min=0.02, tau_horizon=5.0, tau_decay_rate=1.0,
               eval_every=1000, nested_inner_steps=4, fd_inner_steps=4, exact_iterations=8)
# tau_t = max(0.02, 0.3 / (1 + t / 5)), by hand
HAND_TAU = {0: 0.3, 5: 0.15, 10: 0.1, 25: 0.05, 45: 0.03, 69: 0.3 / 14.8, 70: 0.02, 75: 0.02, 79: 0.02}


def step_taus(calls, per_step):
    taus = [c["tau"] for _, c in calls]
    for j in range(1, per_step):  # the penalty methods step phi then theta at the same tau
        assert taus[j::per_step] == taus[::per_step]
    return taus[::per_step]


def test_fixed_tau_uses_tau_0_at_every_step(problem, monkeypatch):
    cfg = GridWorldConfig(**TAU_CFG)
    _, calls = install_actors(monkeypatch, problem)
    result = run_method(problem, cfg, "fixed_tau", seed=0)
    taus = step_taus(calls, 2)
    assert len(taus) == cfg.iterations and all(t == cfg.tau_init for t in taus), taus
    assert result.tau_final == cfg.tau_init
    assert result.phi_tau == pytest.approx(float(problem.phi(result.x, cfg.tau_init)), abs=1e-12)
    # and it is the schedule that keeps it: with decay=False gridworld_tau ignores t
    assert [gridworld_tau(cfg, t, decay=False) for t in HAND_TAU] == [0.3] * len(HAND_TAU)


@pytest.mark.parametrize("method,per_step", [("single_loop", 2), ("nested_loop", 2), ("partial_sgd", 1),
                                             ("finite_difference", 1)])
def test_decaying_methods_use_the_documented_tau_at_each_step(problem, monkeypatch, method, per_step):
    cfg = GridWorldConfig(**TAU_CFG)
    _, calls = install_actors(monkeypatch, problem)
    result = run_method(problem, cfg, method, seed=0)
    taus = step_taus(calls, per_step)  # chronological: the walker step t
    assert len(taus) >= cfg.iterations
    for t, expected in HAND_TAU.items():
        assert taus[t] == pytest.approx(expected, rel=1e-12), (method, t, taus[t])
    if method != "finite_difference":  # its tau_final is the tau at the last x-update's start
        assert result.tau_final == pytest.approx(HAND_TAU[79], rel=1e-12)


@pytest.mark.parametrize("method", ["exact", "exact_decay"])
def test_exact_methods_use_the_documented_tau(problem, monkeypatch, method):
    cfg = GridWorldConfig(**TAU_CFG)
    seen, original = [], problem.hypergradient

    def spy(x, tau, V0=None):
        seen.append(tau)
        return original(x, tau, V0)

    monkeypatch.setattr(problem, "hypergradient", spy)
    result = run_method(problem, cfg, method, seed=0)
    if method == "exact":
        expected = [cfg.exact_tau] * cfg.exact_iterations
    else:  # step k uses tau_t at t = k * 80 / 8 = 10 k: 0.3 / (1 + 2 k), floored at 0.02
        expected = [0.3, 0.1, 0.06, 0.3 / 7, 0.3 / 9, 0.3 / 11, 0.3 / 13, 0.02]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert result.tau_final == pytest.approx(expected[-1], rel=1e-12)


# ----- 3. the hypergradient directions of nested_loop, partial_sgd and finite_difference -----
def test_nested_loop_outer_step_descends_along_the_hypergradient(problem, monkeypatch):
    """One outer step (20 inner steps, actors learning from their optima at x0): the step is
    -nested_reward_learning_rate (grad c + lam * mean over the second half of (w_phi - w_theta)), points along
    -grad Phi_tau and lowers the exact Phi_tau."""
    cfg = GridWorldConfig(x0=X_PEN, iterations=20, batch_size=512, eval_every=1000)
    x, tau, lam, inner = np.array(cfg.x0), cfg.tau_init, cfg.penalty_lambda, cfg.nested_inner_steps
    r = problem.reward(x)
    exact = problem.hypergradient(x, tau)[1]
    phi_tau_0 = float(problem.phi(x, tau))
    cosines = []
    for seed in range(6):
        with monkeypatch.context() as mp:
            _, calls = install_actors(mp, problem, held=(r, r - problem.designer_cost / lam), tau=tau, seed=seed)
            result = run_method(problem, cfg, "nested_loop", seed)
        assert len(calls) == 2 * inner
        diffs = [calls[2 * t][1]["w"] - calls[2 * t + 1][1]["w"] for t in range(inner // 2, inner)]
        h_replay = problem.placement_grad(x) + lam * problem.reward_vjp(x, np.mean(diffs, 0))
        h = (x - result.x) / cfg.nested_reward_learning_rate
        np.testing.assert_allclose(h, h_replay, rtol=1e-9, atol=1e-11)
        assert h @ exact > 0, (seed, h, exact)
        assert float(problem.phi(result.x, tau)) < phi_tau_0 - 0.05, seed
        cosines.append(cosine(h, exact))
    assert np.mean(cosines) > 0.95, cosines


def test_partial_sgd_steps_along_minus_grad_c(problem):
    """x_{t+1} = x_t - zeta_t grad c(x_t), grad c = 2 kappa (x - target centre): no penalty term and
    zeta_t = reward_learning_rate (1 + t/lr_horizon)^-reward_lr_decay, replayed by hand."""
    cfg = GridWorldConfig(x0=X_PEN, iterations=6, batch_size=8, reward_learning_rate=0.5, reward_lr_decay=0.5,
                          lr_horizon=2.0, placement_weight=0.01, eval_every=1000)
    x = np.array(cfg.x0)
    for t in range(cfg.iterations):
        x = x - 0.5 * (1 + t / 2.0) ** -0.5 * 2 * 0.01 * (x - TARGET_CENTRE)
    result = run_method(problem, cfg, "partial_sgd", seed=0)
    np.testing.assert_allclose(result.x, x, rtol=0, atol=1e-13)
    step = np.array(cfg.x0) - result.x
    assert cosine(step, np.array(cfg.x0) - TARGET_CENTRE) > 1 - 1e-12  # along +grad c, so x descends c


def test_finite_difference_estimate_points_along_the_exact_hypergradient(problem, monkeypatch):
    """One x-update from a base actor held at pi*_tau(x): replayed from the recorded walker batches,
    g_i = (f(x + eps e_i) - f(x - eps e_i)) / (2 eps), f = mean over the second half of E_w[u] + c; and
    g is a (shrunken: 20 warm-started inner steps) estimate of grad Phi_tau: cosine > 0.9."""
    cfg = GridWorldConfig(x0=X_PEN, iterations=1, batch_size=512, tau_decay_rate=0.0, fd_learning_rate=0.5,
                          eval_every=1000)
    x, tau, K, eps = np.array(cfg.x0), cfg.tau_init, cfg.fd_inner_steps, cfg.fd_eps
    exact = problem.hypergradient(x, tau)[1]
    cosines = []
    for seed in range(4):
        with monkeypatch.context() as mp:
            _, calls = install_actors(mp, problem, held=(problem.reward(x),), tau=tau, seed=seed)
            result = run_method(problem, cfg, "finite_difference", seed)
        assert len(calls) == (1 + 2 * problem.dim) * K  # base at x, then + and - per coordinate

        def f_hat(block, x_eval):
            np.testing.assert_array_equal(block[0][1]["reward"], problem.reward(x_eval))
            second = [c["w"] for _, c in block[K // 2:]]
            return np.mean([(w * problem.designer_cost).sum() for w in second]) + float(problem.placement_cost(x_eval))

        g = np.zeros(2)
        for i, e in enumerate(np.eye(2)):
            plus, minus = calls[(1 + 2 * i) * K:(2 + 2 * i) * K], calls[(2 + 2 * i) * K:(3 + 2 * i) * K]
            g[i] = (f_hat(plus, x + eps * e) - f_hat(minus, x - eps * e)) / (2 * eps)
        np.testing.assert_allclose((x - result.x) / cfg.fd_learning_rate, g, rtol=1e-9, atol=1e-11)
        assert g @ exact > 0, (seed, g, exact)
        cosines.append(cosine(g, exact))
    assert min(cosines) > 0.8 and np.mean(cosines) > 0.9, cosines


@pytest.mark.parametrize("method,inner", [("single_loop", 1), ("nested_loop", 4)])
def test_penalty_methods_replay_with_lambda_and_zeta_schedules(problem, monkeypatch, method, inner):
    """Several x-steps, increasing lambda and decaying zeta: theta learns on r_x - u/lam_t, phi on r_x,
    and after each block of `inner` walker steps (k-th x-step)
    x <- x - zeta_k (grad c(x) + lam_t reward_vjp(x, mean over the block's second half of w_phi - w_theta)),
    zeta_k = zeta_0 (1 + k / (lr_horizon / inner))^-reward_lr_decay: nested_loop's x-steps are on their own clock."""
    cfg = GridWorldConfig(x0=X_PEN, iterations=3 * inner, batch_size=64, penalty_lambda=10.0, penalty_lambda_growth=1.0,
                          lr_horizon=2.0 * inner, reward_learning_rate=0.05, nested_reward_learning_rate=0.05,
                          reward_lr_decay=0.5, nested_inner_steps=inner, eval_every=1000)
    _, calls = install_actors(monkeypatch, problem)
    result = run_method(problem, cfg, method, seed=0)
    x = np.array(cfg.x0)
    for k in range(3):
        diffs = []
        for t in range(k * inner, (k + 1) * inner):
            lam_t = 10.0 * (1 + t / (2.0 * inner))
            (_, c_phi), (_, c_theta) = calls[2 * t], calls[2 * t + 1]
            np.testing.assert_array_equal(c_phi["reward"], problem.reward(x))
            np.testing.assert_allclose(c_theta["reward"], problem.reward(x) - problem.designer_cost / lam_t, rtol=1e-14)
            if t - k * inner >= inner // 2:
                diffs.append(c_phi["w"] - c_theta["w"])
        zeta_k = 0.05 * (1 + k / 2.0) ** -0.5  # lam_t is the one at the block's last step
        x = x - zeta_k * (problem.placement_grad(x) + lam_t * problem.reward_vjp(x, np.mean(diffs, 0)))
    np.testing.assert_allclose(result.x, x, rtol=0, atol=1e-12)


# ----- 4. schedules against hand-computed values -----
def test_tau_schedule_hand_values():
    cfg = GridWorldConfig(tau_init=0.3, tau_min=0.02, tau_horizon=500.0, tau_decay_rate=1.0, lr_horizon=1000.0)
    for t, expected in {0: 0.3, 500: 0.15, 1000: 0.1, 1500: 0.075, 7000: 0.02, 10**6: 0.02}.items():
        assert gridworld_tau(cfg, t) == pytest.approx(expected, rel=1e-12), t
    # tau_horizon, not lr_horizon, sets the time scale
    assert gridworld_tau(cfg, 4000) == pytest.approx(0.3 / 9, rel=1e-12)
    cfg2 = GridWorldConfig(tau_init=0.3, tau_min=0.0, tau_horizon=500.0, tau_decay_rate=2.0)
    assert gridworld_tau(cfg2, 500) == pytest.approx(0.075, rel=1e-12)
    assert gridworld_tau(cfg2, 1500) == pytest.approx(0.3 / 16)
    assert gridworld_tau(GridWorldConfig(tau_decay_rate=0.0), 10**5) == 0.3  # power 0: constant
    assert all(gridworld_tau(cfg, t, decay=False) == 0.3 for t in (0, 500, 10**6))


def test_lambda_schedule_hand_values():
    cfg = GridWorldConfig(penalty_lambda=10.0, penalty_lambda_growth=1.0, lr_horizon=1000.0, tau_horizon=7.0)
    assert [lam_at(cfg, t) for t in (0, 1000, 3000)] == pytest.approx([10.0, 20.0, 40.0], rel=1e-12)
    cfg = GridWorldConfig(penalty_lambda=10.0, penalty_lambda_growth=0.5, lr_horizon=1000.0)
    assert [lam_at(cfg, t) for t in (0, 3000, 8000)] == pytest.approx([10.0, 20.0, 30.0], rel=1e-12)
    assert all(lam_at(GridWorldConfig(penalty_lambda=7.0), t) == 7.0 for t in (0, 10, 10**6))  # growth 0: constant


def test_poly_step_size_hand_values():
    assert poly(2.0, 0.5, 3000, 1000.0) == pytest.approx(1.0, rel=1e-12)
    assert poly(2.0, 1.0, 1000, 1000.0) == pytest.approx(1.0, rel=1e-12)
    assert poly(0.9, 2.0, 2, 1.0) == pytest.approx(0.1, rel=1e-12)
    assert poly(0.5, 0.0, 10**6, 1.0) == 0.5 and poly(0.5, 3.0, 0, 1.0) == 0.5


# ----- 5. the recipe's summary numbers on a hand-made input -----
def run(seed, phi, curve_samples, curve_phi, phi_tau=0.0, samples=300, seconds=1.0):
    return {"seed": seed, "phi": phi, "phi_tau": phi_tau, "samples": samples, "seconds": seconds,
            "curve_samples": curve_samples, "curve_phi": curve_phi}


BEST = -100.0  # threshold best + 1% |best| = -99.0 exactly in floating point
RUNS = {
    "a": [run(0, -99.5, [0, 100, 200, 300], [-50.0, -98.999, -99.0, -99.5], phi_tau=-98.0, seconds=1.0),  # at -99.0
          run(1, -98.5, [0, 100, 200, 300], [-50.0, -99.2, -98.0, -98.5], phi_tau=-97.0, seconds=3.0)],  # first hit
    "b": [run(0, -90.0, [0, 100, 200], [-50.0, -98.99, -90.0], samples=256000, seconds=0.5),  # never
          run(1, -80.0, [0, 100, 200], [-50.0, -98.0, -80.0], samples=256000, seconds=0.5)],
    "c": [run(0, -99.9, [0, 100, 200], [-50.0, -99.5, -99.9]), run(1, -99.9, [0, 100, 300], [-50.0, -60.0, -99.9]),
          run(2, -60.0, [0, 100, 200], [-50.0, -60.0, -60.0])],
    "d": [run(0, -99.0, [0, 100, 500], [-99.5, -99.0, -99.0]), run(1, -99.0, [0, 100, 500], [-50.0, -99.1, -99.0]),
          run(2, -99.0, [0, 100, 500], [-50.0, -60.0, -99.0])],  # reach at 0, 100, 500: median 100, mean 200
}


def test_samples_to_reach_boundary_first_hit_and_never():
    a0, a1, b0 = RUNS["a"][0], RUNS["a"][1], RUNS["b"][0]
    assert samples_to_reach(a0, -99.0) == 200  # exactly at the threshold counts
    assert samples_to_reach(a0, -99.0 - 1e-9) == 300
    assert samples_to_reach(a1, -99.0) == 100  # the first crossing, even if it leaves again
    assert samples_to_reach(b0, -99.0) is None  # -98.99 is above -99
    assert samples_to_reach(run(0, 0.0, [0, 7], [5.0, 4.0]), 5.0) == 0


def test_summarize_hand_made_runs():
    s = summarize(RUNS, BEST)
    assert set(s) == {"a", "b", "c", "d"}
    assert s["a"] == pytest.approx({
        "phi_mean": -99.0, "phi_std": 0.5, "gap_mean": 1.0, "phi_tau_mean": -97.5,
        "samples_to_1pct_median": 150.0, "seeds_reaching_1pct": 2, "n_seeds": 2,
        "samples_mean": 300.0, "seconds_mean": 2.0})
    assert s["b"] == pytest.approx({
        "phi_mean": -85.0, "phi_std": 5.0, "gap_mean": 15.0, "phi_tau_mean": 0.0,
        "samples_to_1pct_median": None, "seeds_reaching_1pct": 0, "n_seeds": 2,
        "samples_mean": 256000.0, "seconds_mean": 0.5})
    assert s["c"]["samples_to_1pct_median"] == 200.0 and s["c"]["seeds_reaching_1pct"] == 2
    assert s["c"]["n_seeds"] == 3
    assert s["d"]["samples_to_1pct_median"] == 100.0 and s["d"]["seeds_reaching_1pct"] == 3
    assert s["c"]["phi_mean"] == pytest.approx(-86.6) and s["c"]["phi_std"] == pytest.approx(np.sqrt(2 * 13.3**2 / 3 + 26.6**2 / 3))


def test_format_table_rows():
    lines = format_table(summarize(RUNS, BEST), BEST).splitlines()
    assert lines[0].startswith("Global best Phi = -100.0000;")
    assert lines[1] == "| method | final Phi (mean +- std) | gap to best | to 1% (samples) | samples used | seconds |"
    assert lines[3:] == [
        "| a | -99.0000 +- 0.5000 | 1.0000 | 150 (2/2 seeds) | 300 | 2.0 |",
        "| b | -85.0000 +- 5.0000 | 15.0000 | never (0/2 seeds) | 2.56e+05 | 0.5 |",
        "| c | -86.6000 +- 18.8090 | 13.4000 | 200 (2/3 seeds) | 300 | 1.0 |",
        "| d | -99.0000 +- 0.0000 | 1.0000 | 100 (3/3 seeds) | 300 | 1.0 |",
    ]


# ----- 6. docs/gridworld.md: exact_decay < exact on the default instance -----
def test_exact_decay_ends_below_exact_on_the_default_instance():
    """docs/gridworld.md's table (default config): exact -0.4216, exact_decay -0.5286. The full default
    budget (300 model-based steps each) takes ~2 s, so it is run as is."""
    cfg = load_config(str(CONFIG_YAML))
    assert cfg == GridWorldConfig()  # the YAML is the default config
    problem = build_problem(cfg)
    exact, decay = run_method(problem, cfg, "exact", 0), run_method(problem, cfg, "exact_decay", 0)
    assert decay.phi < exact.phi - 0.05, (decay.phi, exact.phi)
    assert exact.phi == pytest.approx(-0.4216, abs=5e-4) and decay.phi == pytest.approx(-0.5286, abs=5e-4)


# ----- 7. common random numbers -----
@pytest.mark.parametrize("crn", [True, False])
def test_common_random_numbers_share_the_uniforms_exactly_when_on(problem, monkeypatch, crn):
    cfg = GridWorldConfig(iterations=6, batch_size=16, eval_every=1000, common_random_numbers=crn)
    _, calls = install_actors(monkeypatch, problem)
    run_method(problem, cfg, "single_loop", seed=3)
    # the stream: one start draw, then per step phi's uniforms and (CRN off only) theta's own
    rng, sampler = np.random.default_rng(3), Sampler(problem.mdp, cfg.batch_size)
    sampler.uniforms(rng)
    for t in range(cfg.iterations):
        u_phi, u_theta = calls[2 * t][1]["u"], calls[2 * t + 1][1]["u"]
        np.testing.assert_array_equal(u_phi, sampler.uniforms(rng))
        if crn:
            np.testing.assert_array_equal(u_theta, u_phi)
        else:
            np.testing.assert_array_equal(u_theta, sampler.uniforms(rng))
            assert not np.any(u_theta == u_phi)


@pytest.mark.parametrize("crn", [True, False])
def test_identical_actors_cancel_exactly_only_with_common_random_numbers(problem, crn):
    """phi = theta = uniform (zero steps): with CRN the two batches coincide, the penalty term is exactly
    0 and x moves by -zeta grad c; independent uniforms leave a nonzero noise term."""
    cfg = GridWorldConfig(x0=X_PEN, iterations=3, batch_size=64, reward_lr_decay=0.0, eval_every=1000,
                          common_random_numbers=crn)
    cfg.actor_learning_rate = cfg.critic_learning_rate = 0.0  # past validation on purpose: both actors stay uniform
    x = np.array(cfg.x0)
    for _ in range(cfg.iterations):
        x = x - cfg.reward_learning_rate * problem.placement_grad(x)
    result = run_method(problem, cfg, "single_loop", seed=0)
    if crn:
        np.testing.assert_allclose(result.x, x, rtol=0, atol=1e-13)
    else:
        assert np.linalg.norm(result.x - x) > 1e-3


def test_single_loop_without_common_random_numbers_runs_and_differs(problem):
    on = run_method(problem, GridWorldConfig(iterations=60, batch_size=32, eval_every=20), "single_loop", 0)
    off = run_method(problem, GridWorldConfig(iterations=60, batch_size=32, eval_every=20,
                                              common_random_numbers=False), "single_loop", 0)
    assert np.isfinite(off.phi) and np.all(np.isfinite(off.x)) and off.samples == on.samples == 2 * 32 * 60
    assert not np.allclose(on.x, off.x)


# ----- 8. one actor-critic step by hand -----
def test_actor_critic_step_is_soft_expected_sarsa_and_a_soft_policy_gradient(problem):
    """One walker, one step: the critic moves by beta * (r + gamma V_soft(s') - Q(s, a)) with
    V_soft(s) = sum_a pi (Q - tau log pi); the actor by alpha * pi * (soft Q - its pi-mean) at the visited state."""
    mdp, tau, alpha, beta = problem.mdp, 0.3, 0.2, 0.5
    rng = np.random.default_rng(5)
    ac = ActorCritic(mdp, np.array([int(np.argmax(mdp.rho))]))  # one actor, one walker
    ac.logits = rng.normal(size=ac.logits.shape)
    ac.Q = rng.normal(size=ac.Q.shape)
    reward = rng.normal(size=ac.Q.shape[1:])
    sampler, u = Sampler(mdp, 1), np.full((4, 1), 0.5)
    logits, Q, s = ac.logits[0].copy(), ac.Q[0].copy(), int(ac.s[0, 0])
    log_pi = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    pi = np.exp(log_pi)
    a = int(np.searchsorted(np.cumsum(pi[s]), 0.5))
    s_next = int(sampler.succ[s, a, np.searchsorted(sampler.cum_P[s, a], 0.5)])
    v_soft = (pi * (Q - tau * log_pi)).sum(-1)
    ac.step(sampler, reward, tau, alpha, beta, u)
    expected_Q = Q.copy()
    expected_Q[s, a] += beta * (reward[s, a] + mdp.gamma * v_soft[s_next] - Q[s, a])
    np.testing.assert_allclose(ac.Q[0], expected_Q, atol=1e-12)
    soft_q = expected_Q[s] - tau * log_pi[s]
    expected_logits = logits.copy()
    expected_logits[s] += alpha * pi[s] * (soft_q - pi[s] @ soft_q)
    np.testing.assert_allclose(ac.logits[0], expected_logits, atol=1e-12)


def test_a_stack_of_actors_steps_exactly_as_each_actor_alone(problem):
    """phi and theta stepped together (one ActorCritic of two) equal two single actors stepped apart, bit for bit,
    with their own rewards and uniforms and with shared ones."""
    mdp, rng = problem.mdp, np.random.default_rng(7)
    sampler = Sampler(mdp, 16)
    starts = [sampler.start(sampler.uniforms(rng)[3]) for _ in range(2)]
    stack, alone = ActorCritic(mdp, np.stack(starts)), [ActorCritic(mdp, s) for s in starts]
    for t in range(5):
        rewards = rng.normal(size=(2,) + stack.Q.shape[1:])
        u = np.stack([sampler.uniforms(rng), sampler.uniforms(rng)]) if t % 2 else sampler.uniforms(rng)
        w = stack.step(sampler, rewards, 0.3, 0.4, 0.5, u)
        for i, ac in enumerate(alone):
            w_i = ac.step(sampler, rewards[i], 0.3, 0.4, 0.5, u[i] if u.ndim == 3 else u)
            np.testing.assert_array_equal(w[i], w_i[0])
            for name in ("Q", "logits", "s"):
                np.testing.assert_array_equal(getattr(stack, name)[i], getattr(ac, name)[0])
    assert stack.logits.shape == (2, mdp.n_states, mdp.n_actions) and not np.allclose(stack.Q[0], stack.Q[1])


def array_form_step(ac, sampler, reward, tau, alpha, beta, u):
    """ActorCritic.step written with whole-array numpy operations (the compiled step's reference)."""
    S, A, gamma = ac.mdp.n_states, ac.mdp.n_actions, ac.mdp.gamma
    k, B = ac.s.shape
    actor = np.arange(k)[:, None]
    reward, u = np.broadcast_to(reward, ac.Q.shape), np.broadcast_to(u, (k, 4, B))
    z = ac.logits - ac.logits.max(-1, keepdims=True)
    log_pi = z - np.log(np.exp(z).sum(-1, keepdims=True))
    pi = np.exp(log_pi)
    s = ac.s
    a = inverse_cdf(np.cumsum(pi[actor, s], -1), u[:, 0])
    s_next = sampler.succ[s, a, inverse_cdf(sampler.cum_P[s, a], u[:, 1])]
    V = (pi * (ac.Q - tau * log_pi)).sum(-1)
    td = reward[actor, s, a] + gamma * V[actor, s_next] - ac.Q[actor, s, a]
    idx = ((actor * S + s) * A + a).ravel()
    counts = np.bincount(idx, minlength=k * S * A)
    ac.Q += beta * (np.bincount(idx, weights=td.ravel(), minlength=k * S * A) / np.maximum(counts, 1)).reshape(k, S, A)
    soft_q = ac.Q - tau * log_pi
    grad = pi * (soft_q - (pi * soft_q).sum(-1, keepdims=True))
    visited = (np.bincount((actor * S + s).ravel(), minlength=k * S) > 0).reshape(k, S)
    ac.logits[visited] += alpha * grad[visited]
    ac.s = np.where(u[:, 2] <= 1.0 - gamma, sampler.start(u[:, 3]), s_next)
    return counts.reshape(k, S, A) / B


@pytest.mark.parametrize("shared", [True, False])
def test_the_compiled_step_equals_the_array_form_step(problem, shared):
    """Same uniforms, same draws: walkers and visit counts equal exactly, tables to rounding, over 60 steps of a
    stack of two actors (rewards and uniforms shared by both, or each its own), from random tables."""
    mdp, rng = problem.mdp, np.random.default_rng(11)
    sampler = Sampler(mdp, 64)
    compiled = ActorCritic(mdp, np.stack([sampler.start(sampler.uniforms(rng)[3]) for _ in range(2)]))
    compiled.logits, compiled.Q = 3.0 * rng.normal(size=compiled.Q.shape), rng.normal(size=compiled.Q.shape)
    reference = compiled.copy()
    for t in range(60):
        reward = rng.normal(size=compiled.Q.shape[-2:] if shared else compiled.Q.shape)
        u = sampler.uniforms(rng) if shared else np.stack([sampler.uniforms(rng), sampler.uniforms(rng)])
        w = compiled.step(sampler, reward, 0.3, 0.4, 0.5, u)
        np.testing.assert_array_equal(w, array_form_step(reference, sampler, reward, 0.3, 0.4, 0.5, u))
        np.testing.assert_array_equal(compiled.s, reference.s)
        np.testing.assert_allclose(compiled.Q, reference.Q, rtol=0, atol=1e-12)
        np.testing.assert_allclose(compiled.logits, reference.logits, rtol=0, atol=1e-12)
        assert compiled.finite
    assert len(np.unique(compiled.s)) > 10 and not np.allclose(compiled.Q[0], compiled.Q[1])


def test_the_step_checks_shapes_and_flags_non_finite_tables(problem):
    mdp = problem.mdp
    sampler, ac = Sampler(mdp, 8), ActorCritic(mdp, np.zeros((2, 8), dtype=np.int64))
    S, A = mdp.n_states, mdp.n_actions
    with pytest.raises(ValueError, match=r"reward must be"):
        ac.step(sampler, np.zeros((3, S, A)), 0.1, 0.1, 0.1, np.full((4, 8), 0.5))
    with pytest.raises(ValueError, match=r"and u \[4, 8\]"):
        ac.step(sampler, np.zeros((S, A)), 0.1, 0.1, 0.1, np.full((4, 7), 0.5))
    ac.step(sampler, np.zeros((S, A)), 0.1, 0.1, 0.1, np.full((4, 8), 0.5))
    assert ac.finite
    ac.check_finite("m", 0)  # passes
    reward = np.zeros((2, S, A))
    reward[1] = np.nan
    ac.step(sampler, reward, 0.1, 0.1, 0.1, np.full((4, 8), 0.5))
    assert not ac.finite and np.isfinite(ac.Q[0]).all()
    with pytest.raises(FloatingPointError, match="m: critics became non-finite at iteration 7"):
        ac.check_finite("m", 7)


def test_inverse_cdf_picks_the_first_index_whose_cumulative_mass_reaches_u():
    """i with cum[i-1] < u <= cum[i]: by hand, never a zero-mass index (u in (0, 1]), and the one-distribution
    (binary search) path equal to the row-wise one."""
    cum = np.cumsum([0.0, 0.25, 0.0, 0.5, 0.25])  # [0, .25, .25, .75, 1]
    u = np.array([1e-12, 0.25, 0.2500001, 0.75, 0.9, 1.0])
    np.testing.assert_array_equal(inverse_cdf(cum, u), [1, 1, 3, 3, 4, 4])
    assert [alg._first_reaching(cum, v) for v in u] == [1, 1, 3, 3, 4, 4]
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=50) * (rng.random((50, 7)) > 0.3)
    p[:, 0] += 1e-3
    cums = np.cumsum(p / p.sum(-1, keepdims=True), -1)
    us = 1.0 - rng.random((50, 40))
    for c, u in zip(cums, us):
        picks = inverse_cdf(c, u)
        np.testing.assert_array_equal(picks, inverse_cdf(np.broadcast_to(c, (40, 7)), u))
        np.testing.assert_array_equal(picks, [alg._first_reaching(c, v) for v in u])  # the compiled step's
        assert np.all(np.diff(c)[picks[picks > 0] - 1] > 0)  # the picked index holds mass
