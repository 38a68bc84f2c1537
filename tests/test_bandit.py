import warnings

import numpy as np
import pytest
import torch

from bilevel_rlhf.bandit import (
    LMBandit,
    exact_hypergradient,
    exact_optimum,
    lower_objective,
    pair_loss_matrix,
    penalized_policy,
    penalty_hypergradient,
    phi_tau,
    preference_matrix,
    soft_optimal_policy,
    upper_loss,
    upper_loss_grads,
)
from bilevel_rlhf.rl_utils import bradley_terry_loss

# (oracle temperature, tau): a BT oracle and the deterministic oracle (temperature 0)
CASES = [(0.5, 0.7), (1.0, 0.2), (0.0, 1.5)]


def _problem(temperature, seed=0):
    b = LMBandit.random(8, seed=seed, temperature=temperature)
    x = np.random.default_rng(100 + seed).standard_normal(8)
    return b, x


def _central_fd(fn, x, eps=1e-5):
    return np.array([(fn(x + eps * e) - fn(x - eps * e)) / (2 * eps) for e in np.eye(x.shape[0])])


def test_preference_matrix_and_pair_losses():
    s = np.array([0.0, 1.0, 1.0])
    P = preference_matrix(s, 0.5)
    assert P[1, 0] == pytest.approx(1 / (1 + np.exp(-2.0)))
    np.testing.assert_allclose(P + P.T, 1.0)
    np.testing.assert_array_equal(preference_matrix(s, 0.0), [[0.5, 0, 0], [1, 0.5, 0.5], [1, 0.5, 0.5]])
    # L[a, b] is the per-pair BT loss of the trainer (rl_utils.bradley_terry_loss) on r_x(a), r_x(b), P[a, b]
    b, x = _problem(0.5)
    L = pair_loss_matrix(x, b.scores, b.temperature)
    P = preference_matrix(b.scores, b.temperature)
    xa, xb = np.meshgrid(x, x, indexing="ij")
    L_torch = bradley_terry_loss(torch.tensor(xa), torch.tensor(xb), torch.tensor(P)).numpy()
    np.testing.assert_allclose(L, L_torch, rtol=1e-12)
    np.testing.assert_allclose(L, L.T, rtol=1e-12)
    np.testing.assert_allclose(np.diag(L), np.log(2.0))


@pytest.mark.parametrize("temperature,tau", CASES)
def test_soft_optimal_policy_maximizes_lower_objective(temperature, tau):
    b, x = _problem(temperature)
    pi = soft_optimal_policy(x, b.log_pi_ref, tau)
    J = lower_objective(x, pi, b.log_pi_ref, tau)
    # closed form of the optimum: J_tau(x, pi*) = tau * logsumexp(log pi_ref + x / tau)
    assert J == pytest.approx(tau * np.logaddexp.reduce(b.log_pi_ref + x / tau), rel=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.dirichlet(np.ones(8))
        assert lower_objective(x, q, b.log_pi_ref, tau) < J
    # gauge: a constant shift of x changes nothing
    np.testing.assert_allclose(soft_optimal_policy(x + 3.0, b.log_pi_ref, tau), pi, rtol=1e-12)


@pytest.mark.parametrize("temperature,tau", CASES)
def test_upper_loss_and_gradients_against_autograd(temperature, tau):
    b, x = _problem(temperature)
    pi = soft_optimal_policy(x, b.log_pi_ref, tau)
    # upper loss as an explicit expectation over the K*K pairs, with the trainer's BT loss
    P = torch.tensor(preference_matrix(b.scores, temperature))
    xt = torch.tensor(x, requires_grad=True)
    pit = torch.tensor(pi, requires_grad=True)
    f = sum(
        pit[a] * pit[c] * bradley_terry_loss(xt[a], xt[c], P[a, c]) for a in range(8) for c in range(8)
    )
    assert upper_loss(x, pi, b.scores, temperature) == pytest.approx(f.item(), rel=1e-12)
    f.backward()
    g_x, g_pi = upper_loss_grads(x, pi, b.scores, temperature)
    np.testing.assert_allclose(g_x, xt.grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(g_pi, pit.grad.numpy(), rtol=1e-10)
    # total derivative through pi*_tau(x) = softmax(log pi_ref + x / tau), by autograd
    xt2 = torch.tensor(x, requires_grad=True)
    pi2 = torch.softmax(torch.tensor(b.log_pi_ref) + xt2 / tau, dim=0)
    d = xt2[:, None] - xt2[None, :]
    phi = pi2 @ bradley_terry_loss(d, torch.zeros_like(d), P) @ pi2  # loss depends on x_a - x_b only
    phi.backward()
    assert phi_tau(x, b.log_pi_ref, tau, b.scores, temperature) == pytest.approx(phi.item(), rel=1e-12)
    np.testing.assert_allclose(exact_hypergradient(x, b.log_pi_ref, tau, b.scores, temperature), xt2.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("temperature,tau", CASES)
def test_exact_hypergradient_matches_finite_differences(temperature, tau):
    b, x = _problem(temperature, seed=1)
    g = exact_hypergradient(x, b.log_pi_ref, tau, b.scores, temperature)
    fd = _central_fd(lambda z: phi_tau(z, b.log_pi_ref, tau, b.scores, temperature), x)
    assert np.linalg.norm(g - fd) / np.linalg.norm(g) < 1e-6
    assert abs(g.sum()) < 1e-12  # gauge invariance: no component along the all-ones vector


@pytest.mark.parametrize("temperature,tau", CASES)
def test_penalized_policy_is_the_maximizer(temperature, tau):
    b, x = _problem(temperature)
    lam = 50.0
    theta = penalized_policy(x, lam, tau, b.log_pi_ref, b.scores, temperature)

    def objective(q):
        return lam * lower_objective(x, q, b.log_pi_ref, tau) - upper_loss(x, q, b.scores, temperature)

    # first-order condition on the simplex: the gradient lam*(x - tau*(log theta - log pi_ref + 1)) - 2 L theta is constant
    L = pair_loss_matrix(x, b.scores, temperature)
    grad = lam * (x - tau * (np.log(theta) - b.log_pi_ref + 1)) - 2 * L @ theta
    assert np.ptp(grad) < 1e-9 * lam
    # an independent solver: mirror ascent (exponentiated gradient) on the simplex, many small steps
    q = np.full(8, 1 / 8)
    for _ in range(4000):
        g = lam * (x - tau * (np.log(q) - b.log_pi_ref)) - 2 * L @ q
        q = q * np.exp(0.2 / (lam * tau) * (g - g.max()))
        q /= q.sum()
    np.testing.assert_allclose(theta, q, atol=1e-9)
    # and it beats random points and small perturbations
    f_theta = objective(theta)
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert objective(rng.dirichlet(np.ones(8))) < f_theta
        v = rng.standard_normal(8)
        v -= v.mean()
        assert objective(theta + 1e-2 * theta.min() * v / np.abs(v).max()) < f_theta
    # lam -> infinity: theta -> pi*_tau
    pi_star = soft_optimal_policy(x, b.log_pi_ref, tau)
    gaps = [np.abs(penalized_policy(x, l, tau, b.log_pi_ref, b.scores, temperature) - pi_star).max() for l in (1e2, 1e4)]
    assert gaps[1] < gaps[0] / 50


@pytest.mark.parametrize("temperature,tau", CASES)
def test_penalty_hypergradient_converges_to_exact_at_rate_one_over_lambda(temperature, tau):
    b, x = _problem(temperature, seed=2)
    exact = exact_hypergradient(x, b.log_pi_ref, tau, b.scores, temperature)
    lams = np.array([1e1, 1e2, 1e3, 1e4])
    errs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # small lam may be outside the concave regime
        for lam in lams:
            errs.append(np.linalg.norm(penalty_hypergradient(x, lam, tau, b.log_pi_ref, b.scores, temperature) - exact))
    errs = np.array(errs)
    assert errs[-1] < 1e-3 * np.linalg.norm(exact)
    # O(1/lam): lam * error approaches a constant, i.e. each 10x in lam cuts the error about 10x
    ratios = errs[:-1] / errs[1:]
    np.testing.assert_allclose(ratios[1:], 10.0, rtol=0.05)
    # and the penalty estimate is not the partial gradient grad_x f alone (the term lam*(pi* - theta) matters)
    g_x, _ = upper_loss_grads(x, soft_optimal_policy(x, b.log_pi_ref, tau), b.scores, temperature)
    assert np.linalg.norm(g_x - exact) > 100 * errs[-1]


def test_penalized_policy_warns_outside_concave_regime():
    b, x = _problem(0.5)
    with pytest.warns(RuntimeWarning, match="not concave"):
        penalized_policy(x, 1.0, 0.2, b.log_pi_ref, b.scores, 0.5)


def _gradient_descent(b, tau, tol=1e-8, max_iter=3000):
    """An independent minimizer: gradient descent with backtracking, from x = 0."""
    x = np.zeros(8)
    lr = 0.5 * tau
    f = phi_tau(x, b.log_pi_ref, tau, b.scores, b.temperature)
    for _ in range(max_iter):
        g = exact_hypergradient(x, b.log_pi_ref, tau, b.scores, b.temperature)
        if np.abs(g).max() < tol:
            return x
        while True:
            x_new = x - lr * g
            f_new = phi_tau(x_new, b.log_pi_ref, tau, b.scores, b.temperature)
            if f_new <= f - 0.5 * lr * (g @ g):
                break
            lr *= 0.5
        x, f, lr = x_new, f_new, 1.5 * lr
    raise AssertionError("gradient descent did not converge")


# (oracle temperature, tau, seed): instances where Phi_tau is benign enough for plain gradient descent
OPT_CASES = [(0.0, 1.5, 2), (0.5, 1.5, 2), (1.0, 1.5, 1)]


@pytest.mark.parametrize("temperature,tau,seed", OPT_CASES)
def test_exact_optimum_is_a_local_minimum(temperature, tau, seed):
    b = LMBandit.random(8, seed=seed, temperature=temperature)
    x_opt = exact_optimum(b.log_pi_ref, tau, b.scores, temperature)
    assert abs(x_opt.sum()) < 1e-10  # the gauge
    g = exact_hypergradient(x_opt, b.log_pi_ref, tau, b.scores, temperature)
    assert np.abs(g).max() <= 1e-10
    phi_opt = phi_tau(x_opt, b.log_pi_ref, tau, b.scores, temperature)
    assert phi_opt < phi_tau(np.zeros(8), b.log_pi_ref, tau, b.scores, temperature)
    # Hessian (finite differences of the exact gradient) is positive semi-definite, null only along ones
    H = np.stack(
        [
            (
                exact_hypergradient(x_opt + 1e-6 * e, b.log_pi_ref, tau, b.scores, temperature)
                - exact_hypergradient(x_opt - 1e-6 * e, b.log_pi_ref, tau, b.scores, temperature)
            )
            / 2e-6
            for e in np.eye(8)
        ]
    )
    eig = np.linalg.eigvalsh((H + H.T) / 2)
    assert eig[0] > -1e-6 and eig[1] > 1e-6
    # the same point as an independent solver's (gradient descent from the same start), in the gauge
    x_gd = _gradient_descent(b, tau)
    np.testing.assert_allclose(x_opt, x_gd - x_gd.mean(), atol=1e-5)
    # a constant shift is the same point
    assert phi_tau(x_opt + 5.0, b.log_pi_ref, tau, b.scores, temperature) == pytest.approx(phi_opt, rel=1e-12)
    # the reward at the optimum ranks the best-scored token above the worst-scored one
    assert x_opt[np.argmax(b.scores)] > x_opt[np.argmin(b.scores)]


def test_bad_input():
    b, x = _problem(0.5)
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        soft_optimal_policy(x, b.log_pi_ref, 0.0)
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        penalized_policy(x, -1.0, 0.5, b.log_pi_ref, b.scores, 0.5)
    with pytest.raises(ValueError, match="normalized log-probabilities"):
        soft_optimal_policy(x, b.log_pi_ref + 0.1, 0.5)
    with pytest.raises(ValueError, match="log_pi_ref must be finite: every reference probability"):
        soft_optimal_policy(x, np.full(8, -np.inf), 0.5)
    with pytest.raises(ValueError, match=r"x must have shape \[8\]"):
        pair_loss_matrix(x[:3], b.scores, 0.5)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        preference_matrix(b.scores, -1.0)
    with pytest.raises(ValueError, match="pi must be a probability vector"):
        upper_loss(x, np.full(8, 0.2), b.scores, 0.5)
    with pytest.raises(ValueError, match="x must be finite"):
        phi_tau(np.full(8, np.nan), b.log_pi_ref, 0.5, b.scores, 0.5)
    with pytest.raises(ValueError, match="num_actions must be >= 2"):
        LMBandit.random(1)
    with pytest.raises(ValueError, match=r"log_pi_ref must have shape \[8\]"):
        LMBandit(b.log_pi_ref[:4], b.scores)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        LMBandit(b.log_pi_ref, b.scores, temperature=float("nan"))
