"""The exact "LM bandit": every quantity of the penalty method in closed form (numpy, float64).

One fixed prompt; a completion is ONE token y from a vocabulary of K; the reference policy is
pi_ref (``log_pi_ref`` [K]); the reward model is tabular, r_x(y) = x[y], so grad_x r_x(y) = e_y.
The oracle has known scores s [K] and labels a pair (a, b) with expected label

    P[a, b] = sigmoid((s_a - s_b) / T)          (T = temperature > 0, Bradley-Terry oracle)
    P[a, b] = 1[s_a > s_b] + 0.5 * 1[s_a = s_b]  (T = 0, deterministic oracle, ties by a fair coin).

Symbols (docs/algorithm.md, "Symbols, config fields and TRL fields"): tau = regularization weight, lam = penalty coefficient lambda,
pi = a policy on the K tokens, theta = the penalized policy.

- upper objective f (``objective=``), with
  L[a, b] = BT-NLL of r_x on the pair (a, b) with label P[a, b] (same-token pairs included: log 2):
  "preference_nll": f(x, pi) = sum_{a,b} pi_a pi_b L[a, b] = pi^T L pi (r_x fitted on pairs from pi);
  "win_rate":       f(x, pi) = sum_{a,b} pi_a rho_b (w L[a, b] - P[a, b]) = pi^T (w L - P) rho, rho = pi_ref
                    (minus the oracle's win rate of pi against pi_ref, plus w times r_x's BT-NLL on those
                    labelled pairs; ``weight`` = w >= 0). Linear in pi. It needs ``log_pi_ref``.
- lower level: J_tau(x, pi) = E_pi[x_y] - tau * KL(pi || pi_ref), maximized by
  pi*_tau(x) = softmax(log pi_ref + x / tau).
- Phi_tau(x) = f(x, pi*_tau(x)), and its hypergradient by the chain rule through the softmax
  (equivalently, the covariance form grad_x f + Cov_{y ~ pi*}(e_y, grad_pi f(y)) / tau).
- partial_sgd (the usual RLHF alternation) stops where grad_x f(x, pi*_tau(x)) = 0 with pi held
  fixed: :func:`partial_sgd_fixed_point`.

x is identified only up to a constant shift (pi*_tau and f see only differences of x): the gauge
used by :func:`exact_optimum` and :func:`partial_sgd_fixed_point` is ``sum(x) = 0``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LMBandit",
    "preference_matrix",
    "pair_loss_matrix",
    "soft_optimal_policy",
    "lower_objective",
    "upper_loss",
    "upper_loss_grads",
    "phi_tau",
    "exact_hypergradient",
    "penalized_policy",
    "penalty_hypergradient",
    "exact_optimum",
    "OBJECTIVES",
    "oracle_win_rate",
    "covariance_hypergradient",
    "partial_sgd_fixed_point",
]

OBJECTIVES = ("preference_nll", "win_rate")


@dataclass(frozen=True, eq=False)
class LMBandit:
    """One bandit instance: reference log-probabilities, oracle scores and oracle temperature."""

    log_pi_ref: np.ndarray  # [K] normalized log-probabilities of the reference policy
    scores: np.ndarray  # [K] the oracle's score of each token (higher is preferred)
    temperature: float = 1.0  # oracle BT temperature; 0 = deterministic oracle

    def __post_init__(self) -> None:
        _check_log_pi_ref(self.log_pi_ref, _vec("scores", self.scores).shape[0])
        preference_matrix(self.scores, self.temperature)  # validates the temperature

    @classmethod
    def random(cls, num_actions: int = 8, seed: int = 0, temperature: float = 1.0) -> "LMBandit":
        """pi_ref ~ Dirichlet(1), scores ~ N(0, 1), from ``numpy.random.default_rng(seed)``."""
        if num_actions < 2:
            raise ValueError(f"LMBandit.random: num_actions must be >= 2, got {num_actions}")
        rng = np.random.default_rng(seed)
        pi_ref = rng.dirichlet(np.ones(num_actions))
        return cls(np.log(pi_ref), rng.standard_normal(num_actions), float(temperature))


# ----------------------------------------------------------------------------- validation


def _vec(name: str, v: np.ndarray, k: int | None = None) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 1 or (k is not None and v.shape[0] != k):
        want = f"[{k}]" if k is not None else "a 1-d array"
        raise ValueError(f"{name} must have shape {want}, got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _check_log_pi_ref(log_pi_ref: np.ndarray, k: int | None) -> np.ndarray:
    if np.any(np.asarray(log_pi_ref) == -np.inf):
        raise ValueError("log_pi_ref must be finite: every reference probability must be > 0")
    log_pi_ref = _vec("log_pi_ref", log_pi_ref, k)
    total = np.logaddexp.reduce(log_pi_ref)
    if abs(total) > 1e-8:
        raise ValueError(f"log_pi_ref must be normalized log-probabilities (logsumexp = 0), got logsumexp = {total}")
    return log_pi_ref


def _check_positive(name: str, v: float) -> float:
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return float(v)


def _check_pi(pi: np.ndarray, k: int) -> np.ndarray:
    pi = _vec("pi", pi, k)
    if np.any(pi < 0) or abs(pi.sum() - 1.0) > 1e-9:
        raise ValueError(f"pi must be a probability vector (>= 0, sum 1), got sum {pi.sum()} and min {pi.min()}")
    return pi


def _check_objective(objective: str, weight: float) -> tuple[str, float]:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating, np.integer)):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    if not (np.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be a finite number >= 0, got {weight}")
    return objective, float(weight)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return z - np.logaddexp.reduce(z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


# ----------------------------------------------------------------------------- closed forms


def preference_matrix(scores: np.ndarray, temperature: float) -> np.ndarray:
    """P[a, b] = probability that the oracle prefers token a over token b ([K, K])."""
    scores = _vec("scores", scores)
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = deterministic oracle), got {temperature}")
    diff = scores[:, None] - scores[None, :]
    if temperature == 0:
        return (diff > 0) + 0.5 * (diff == 0)
    return _sigmoid(diff / temperature)


def pair_loss_matrix(x: np.ndarray, scores: np.ndarray, temperature: float) -> np.ndarray:
    """L[a, b] = -(P_ab log sigmoid(x_a - x_b) + (1 - P_ab) log sigmoid(x_b - x_a)) ([K, K], symmetric)."""
    P = preference_matrix(scores, temperature)
    x = _vec("x", x, P.shape[0])
    d = x[:, None] - x[None, :]
    # -log sigmoid(d) = log(1 + e^{-d})
    return P * np.logaddexp(0.0, -d) + (1.0 - P) * np.logaddexp(0.0, d)


def soft_optimal_policy(x: np.ndarray, log_pi_ref: np.ndarray, tau: float) -> np.ndarray:
    """pi*_tau(x) = softmax(log pi_ref + x / tau), the maximizer of J_tau(x, .) over the simplex."""
    x = _vec("x", x)
    log_pi_ref = _check_log_pi_ref(log_pi_ref, x.shape[0])
    tau = _check_positive("tau", tau)
    return np.exp(_log_softmax(log_pi_ref + x / tau))


def lower_objective(x: np.ndarray, pi: np.ndarray, log_pi_ref: np.ndarray, tau: float) -> float:
    """J_tau(x, pi) = E_pi[x_y] - tau * KL(pi || pi_ref) (0 log 0 = 0)."""
    x = _vec("x", x)
    pi = _check_pi(pi, x.shape[0])
    log_pi_ref = _check_log_pi_ref(log_pi_ref, x.shape[0])
    if not (np.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau}")
    pos = pi > 0
    kl = float(np.sum(pi[pos] * (np.log(pi[pos]) - log_pi_ref[pos])))
    return float(pi @ x) - tau * kl


def oracle_win_rate(pi: np.ndarray, log_pi_ref: np.ndarray, scores: np.ndarray, temperature: float) -> float:
    """pi^T P pi_ref: probability that the oracle prefers y ~ pi to y' ~ pi_ref (ties count 1/2)."""
    P = preference_matrix(scores, temperature)
    rho = np.exp(_check_log_pi_ref(log_pi_ref, P.shape[0]))
    return float(_check_pi(pi, P.shape[0]) @ P @ rho)


def _reference(log_pi_ref: np.ndarray | None, k: int) -> np.ndarray:
    if log_pi_ref is None:
        raise ValueError("objective='win_rate' needs log_pi_ref (the pairs are pi's completion against pi_ref's)")
    return np.exp(_check_log_pi_ref(log_pi_ref, k))


def upper_loss(
    x: np.ndarray, pi: np.ndarray, scores: np.ndarray, temperature: float,
    *, objective: str = "preference_nll", weight: float = 0.1, log_pi_ref: np.ndarray | None = None,
) -> float:
    """f(x, pi). "preference_nll": E_{y1, y2 ~ pi iid}[BT-NLL of r_x on (y1, y2) with the oracle's expected
    label] = pi^T L pi. "win_rate": pi^T (w L - P) pi_ref with w = ``weight`` (needs ``log_pi_ref``)."""
    objective, weight = _check_objective(objective, weight)
    L = pair_loss_matrix(x, scores, temperature)
    pi = _check_pi(pi, L.shape[0])
    if objective == "win_rate":
        rho = _reference(log_pi_ref, L.shape[0])
        return float(pi @ (weight * L - preference_matrix(scores, temperature)) @ rho)
    return float(pi @ L @ pi)


def upper_loss_grads(
    x: np.ndarray, pi: np.ndarray, scores: np.ndarray, temperature: float,
    *, objective: str = "preference_nll", weight: float = 0.1, log_pi_ref: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(grad_x f(x, pi), grad_pi f(x, pi)) with pi treated as a free vector in R^K.

    With G[a, b] = sigmoid(x_a - x_b) - P[a, b] (antisymmetric) and rho = pi_ref:
    "preference_nll": grad_x f = 2 pi * (G pi), grad_pi f = 2 L pi (L symmetric);
    "win_rate": grad_x f = w (pi * (G rho) + rho * (G pi)), grad_pi f = (w L - P) rho.
    """
    objective, weight = _check_objective(objective, weight)
    P = preference_matrix(scores, temperature)
    x = _vec("x", x, P.shape[0])
    pi = _check_pi(pi, P.shape[0])
    G = _sigmoid(x[:, None] - x[None, :]) - P
    L = pair_loss_matrix(x, scores, temperature)
    if objective == "win_rate":
        rho = _reference(log_pi_ref, P.shape[0])
        return weight * (pi * (G @ rho) + rho * (G @ pi)), (weight * L - P) @ rho
    return 2.0 * pi * (G @ pi), 2.0 * (L @ pi)


def phi_tau(
    x: np.ndarray, log_pi_ref: np.ndarray, tau: float, scores: np.ndarray, temperature: float,
    *, objective: str = "preference_nll", weight: float = 0.1,
) -> float:
    """Phi_tau(x) = f(x, pi*_tau(x)), the regularized bilevel objective."""
    pi = soft_optimal_policy(x, log_pi_ref, tau)
    return upper_loss(x, pi, scores, temperature, objective=objective, weight=weight, log_pi_ref=log_pi_ref)


def _grads_at_optimum(
    x: np.ndarray, log_pi_ref: np.ndarray, tau: float, scores: np.ndarray, temperature: float,
    objective: str, weight: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pi, grad_x f(x, pi), grad_pi f(x, pi)) at pi = pi*_tau(x)."""
    pi = soft_optimal_policy(x, log_pi_ref, tau)
    g_x, g_pi = upper_loss_grads(x, pi, scores, temperature, objective=objective, weight=weight, log_pi_ref=log_pi_ref)
    return pi, g_x, g_pi


def exact_hypergradient(
    x: np.ndarray, log_pi_ref: np.ndarray, tau: float, scores: np.ndarray, temperature: float,
    *, objective: str = "preference_nll", weight: float = 0.1,
) -> np.ndarray:
    """d Phi_tau / dx = grad_x f + (d pi*/dx)^T grad_pi f, with d pi*/dx = (diag(pi) - pi pi^T) / tau."""
    pi, g_x, g_pi = _grads_at_optimum(x, log_pi_ref, tau, scores, temperature, objective, weight)
    return g_x + pi * (g_pi - pi @ g_pi) / tau


def covariance_hypergradient(
    x: np.ndarray, log_pi_ref: np.ndarray, tau: float, scores: np.ndarray, temperature: float,
    *, objective: str = "preference_nll", weight: float = 0.1,
) -> np.ndarray:
    """grad_x f + (1/tau) Cov_{y ~ pi*_tau(x)}(e_y, g(y)), g = grad_pi f at pi*_tau(x) (docs/algorithm.md, "The covariance limit").

    grad_x r_x(y) = e_y for the tabular reward. Written as the expectation over y that a sampled estimator
    averages; equal to :func:`exact_hypergradient` (pi* is a Boltzmann tilt of pi_ref by x / tau).
    """
    pi, g_x, g = _grads_at_optimum(x, log_pi_ref, tau, scores, temperature, objective, weight)
    k = pi.shape[0]
    centered_e = np.eye(k) - pi  # row y: e_y - E[e_y]
    cov = (pi * (g - pi @ g)) @ centered_e  # sum_y pi_y (g_y - E g) (e_y - E e)
    return g_x + cov / tau


def _tangent_basis(k: int) -> np.ndarray:
    """Orthonormal basis [K, K-1] of the vectors summing to 0 (the simplex's tangent space)."""
    q, _ = np.linalg.qr(np.eye(k) - 1.0 / k)
    return q[:, : k - 1]


def penalized_policy(
    x: np.ndarray, lam: float, tau: float, log_pi_ref: np.ndarray, scores: np.ndarray, temperature: float,
    tol: float = 1e-12, max_iter: int = 200,
    *, objective: str = "preference_nll", weight: float = 0.1,
) -> np.ndarray:
    """theta = argmax over the simplex of lam * J_tau(x, pi) - f(x, pi).

    "win_rate": f is linear in pi with gradient g = (w L - P) pi_ref, so theta is in closed form,
    theta = softmax(log pi_ref + (x - g / lam) / tau) (strictly concave objective, unique maximizer).

    "preference_nll": the maximizer is interior (the KL term), so it solves the stationarity condition
    theta = softmax(log pi_ref + (x - 2 L theta / lam) / tau). We solve w = log pi_ref + (x - 2 L
    softmax(w) / lam) / tau for the logits w by Newton's method with step halving, started at
    pi*_tau's logits, to ``max |residual| <= tol * (1 + max |w|)``.

    The objective is strictly concave, so theta is unique and global, when lam * tau + 2 mu > 0 with
    mu the smallest eigenvalue of L on the tangent space (always true for lam large enough). Otherwise
    the returned point is checked to be a strict local maximum and a RuntimeWarning says it may not
    be global; if it is not a local maximum a RuntimeError is raised.
    """
    lam = _check_positive("lam", lam)
    tau = _check_positive("tau", tau)
    objective, weight = _check_objective(objective, weight)
    L = pair_loss_matrix(x, scores, temperature)
    x = np.asarray(x, dtype=np.float64)
    k = L.shape[0]
    log_pi_ref = _check_log_pi_ref(log_pi_ref, k)
    if objective == "win_rate":
        g = (weight * L - preference_matrix(scores, temperature)) @ np.exp(log_pi_ref)
        return np.exp(_log_softmax(log_pi_ref + (x - g / lam) / tau))
    c = log_pi_ref + x / tau
    a = 2.0 / (lam * tau)

    def residual(w: np.ndarray) -> np.ndarray:
        return w - c + a * (L @ np.exp(_log_softmax(w)))

    w = c.copy()
    r = residual(w)
    for _ in range(max_iter):
        if np.max(np.abs(r)) <= tol * (1.0 + np.max(np.abs(w))):
            break
        pi = np.exp(_log_softmax(w))
        jac = np.eye(k) + a * L @ (np.diag(pi) - np.outer(pi, pi))
        step = np.linalg.solve(jac, -r)
        t = 1.0
        while True:  # step halving on the residual norm
            w_new = w + t * step
            r_new = residual(w_new)
            if np.linalg.norm(r_new) < np.linalg.norm(r) or t < 1e-10:
                break
            t *= 0.5
        w, r = w_new, r_new
    else:
        raise RuntimeError(
            f"penalized_policy: Newton did not converge in {max_iter} iterations (max |residual| = {np.max(np.abs(r))})"
        )
    theta = np.exp(_log_softmax(w))

    Q = _tangent_basis(k)
    mu = np.linalg.eigvalsh(Q.T @ L @ Q).min()
    if lam * tau + 2.0 * mu <= 0:
        # Hessian of lam*J - f on the tangent space at theta: -lam*tau*diag(1/theta) - 2L
        hess = Q.T @ (-lam * tau * np.diag(1.0 / theta) - 2.0 * L) @ Q
        if np.linalg.eigvalsh(hess).max() >= 0:
            raise RuntimeError(
                f"penalized_policy: the stationary point found is not a local maximum (lam={lam}, tau={tau}); "
                "increase lam or tau"
            )
        warnings.warn(
            f"penalized_policy: lam*tau + 2*mu = {lam * tau + 2 * mu:.3g} <= 0, the objective is not concave; "
            "returning a strict local maximum that may not be the global one",
            RuntimeWarning,
            stacklevel=2,
        )
    return theta


def penalty_hypergradient(
    x: np.ndarray, lam: float, tau: float, log_pi_ref: np.ndarray, scores: np.ndarray, temperature: float,
    *, objective: str = "preference_nll", weight: float = 0.1,
) -> np.ndarray:
    """Population value of the trainer's reward-model gradient at the exact lower-level solutions:

    h = grad_x f(x, theta) + lam * (E_{pi*_tau}[grad_x r_x] - E_theta[grad_x r_x])
      = grad_x f(x, theta) + lam * (pi*_tau(x) - theta),  theta = penalized_policy(x, lam, tau, ...).

    h -> exact_hypergradient(x, ...) as lam -> infinity, with error O(1 / lam).
    """
    kw = dict(objective=objective, weight=weight)
    theta = penalized_policy(x, lam, tau, log_pi_ref, scores, temperature, **kw)
    pi_star = soft_optimal_policy(x, log_pi_ref, tau)
    g_x, _ = upper_loss_grads(x, theta, scores, temperature, log_pi_ref=log_pi_ref, **kw)
    return g_x + lam * (pi_star - theta)


def exact_optimum(
    log_pi_ref: np.ndarray, tau: float, scores: np.ndarray, temperature: float,
    x0: np.ndarray | None = None, tol: float = 1e-10, max_iter: int = 500, max_step: float = 1.0,
    *, objective: str = "preference_nll", weight: float = 0.1,
) -> np.ndarray:
    """A minimizer of Phi_tau over x in the gauge sum(x) = 0, by damped (modified) Newton's method.

    Works in coordinates of the gauge plane {sum(x) = 0}. The Hessian is the central finite
    difference of :func:`exact_hypergradient` (exact gradients, so Newton converges to float64
    precision), shifted to be positive definite where Phi_tau is not convex. A step moves no logit
    x_y / tau by more than ``max_step`` and is backtracked on Phi_tau (Armijo), or on |grad| once
    Phi_tau's decrease is below float64 resolution; if the Newton direction fails, steepest descent
    is tried. If that run fails (shifting by -eig_min makes the step huge along the most negative
    curvature direction, and the step cap then shrinks every other component: it can crawl in shallow
    non-convex valleys, e.g. "win_rate" near a token that pi_ref almost never samples), it is
    restarted from ``x0`` with the eigenvalues of H replaced by their absolute values instead.

    Phi_tau is not convex in general (several local minima, and flat valleys along tokens that
    pi*_tau almost never samples, mostly for small tau): the result is the local minimum reached
    from ``x0`` (default 0, i.e. pi*_tau = pi_ref), a point with max |grad Phi_tau| <= tol.
    Raises RuntimeError otherwise.
    """
    log_pi_ref = _check_log_pi_ref(log_pi_ref, None)
    tau = _check_positive("tau", tau)
    kw = dict(objective=objective, weight=weight)
    _check_objective(objective, weight)
    k = log_pi_ref.shape[0]
    x = np.zeros(k) if x0 is None else _vec("x0", x0, k).copy()
    x -= x.mean()  # gauge: Phi_tau(x + c) = Phi_tau(x)
    Q = _tangent_basis(k)  # x = Q z + const

    def value_grad(z: np.ndarray) -> tuple[float, np.ndarray]:
        return (
            phi_tau(z, log_pi_ref, tau, scores, temperature, **kw),
            exact_hypergradient(z, log_pi_ref, tau, scores, temperature, **kw),
        )

    def hessian(z: np.ndarray, eps: float = 1e-5) -> np.ndarray:
        cols = [(value_grad(z + eps * q)[1] - value_grad(z - eps * q)[1]) / (2 * eps) for q in Q.T]
        H = Q.T @ np.stack(cols, axis=1)
        return (H + H.T) / 2

    def line_search(x, f, g, d):
        d = d * min(1.0, max_step * tau / np.abs(d).max())  # stay local: far steps can fall into flat regions
        t = 1.0
        while t >= 1e-12:
            x_new = x + t * d
            f_new, g_new = value_grad(x_new)
            if f_new <= f + 1e-4 * t * (g @ d):  # Armijo
                return x_new, f_new, g_new
            if np.max(np.abs(g)) < 1e-6 and abs(f_new - f) <= 1e-14 * max(1.0, abs(f)):
                if np.linalg.norm(g_new) < np.linalg.norm(g):  # Phi_tau flat to float64 resolution
                    return x_new, f_new, g_new
            t *= 0.5
        return None

    def newton_direction(H: np.ndarray, g: np.ndarray, absolute: bool) -> np.ndarray:
        """Modified Newton: a descent direction where Phi_tau is not convex."""
        if absolute:
            eig, V = np.linalg.eigh(H)
            eig = np.maximum(np.abs(eig), 1e-8 * np.abs(eig).max())
            return Q @ (V @ (-(V.T @ (Q.T @ g)) / eig))
        eig_min, eig_max = np.linalg.eigvalsh(H)[[0, -1]]
        shift = max(0.0, 1e-8 * eig_max - eig_min)
        return Q @ np.linalg.solve(H + shift * np.eye(k - 1), -(Q.T @ g))

    def run(x: np.ndarray, absolute: bool) -> np.ndarray:
        f, g = value_grad(x)
        for _ in range(max_iter):
            if np.max(np.abs(g)) <= tol:
                return x
            newton = newton_direction(hessian(x), g, absolute)
            step = line_search(x, f, g, newton) or line_search(x, f, g, -g)
            if step is None:
                raise RuntimeError(
                    f"exact_optimum: line search failed at max |grad| = {np.max(np.abs(g))} > tol = {tol}"
                )
            x, f, g = step
            x = x - x.mean()
        raise RuntimeError(
            f"exact_optimum: no stationary point within {max_iter} iterations (max |grad| = {np.max(np.abs(g))})"
        )

    try:
        return run(x, absolute=False)
    except RuntimeError as first:
        try:
            return run(x, absolute=True)
        except RuntimeError as second:
            raise RuntimeError(f"{second} (and with the shifted Hessian: {first})") from None


def _pair_weights(pi: np.ndarray, rho: np.ndarray, objective: str, weight: float) -> np.ndarray:
    """V = W + W^T, where f's BT part is sum_ab W_ab L_ab: W = pi pi^T, or w pi rho^T. Then grad_x f = (V * G) 1."""
    W = np.outer(pi, pi) if objective == "preference_nll" else weight * np.outer(pi, rho)
    return W + W.T


def _reward_fit(x: np.ndarray, V: np.ndarray, P: np.ndarray, tol: float, max_iter: int = 200) -> np.ndarray:
    """argmin_x 0.5 sum_ab V_ab L_ab(x) (the pair-weighted BT-NLL, convex) by Newton's method from ``x``, in the gauge
    sum(x) = 0, to a per-token residual max_a |sum_b V_ab (sigmoid(x_a - x_b) - P_ab)| / sum_b V_ab <= tol.

    Tokens that pi rarely samples have tiny pair weights: V is normalized to max 1 and floored at 1e-30 (a change of
    the problem below float64 resolution), Newton runs in the gauge x_anchor = 0 (anchor = the token of largest pair
    weight) with Jacobi scaling, no coordinate moves by more than 2 per step, and a step is accepted on Armijo for the
    loss, or, where the loss cannot resolve it, on a decrease of the per-token residual."""
    V = np.maximum(V / V.max(), 1e-30)
    np.fill_diagonal(V, 0.0)  # same-token pairs carry no gradient
    deg = V.sum(1)
    free = np.arange(len(x)) != np.argmax(deg)

    def value_residual(z: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        d = z[:, None] - z[None, :]
        sig = _sigmoid(d)
        f = 0.5 * float(np.sum(V * (P * np.logaddexp(0.0, -d) + (1.0 - P) * np.logaddexp(0.0, d))))
        grad = ((sig - P) * V).sum(1)
        return f, grad, sig

    x = x - x.mean()
    f, grad, sig = value_residual(x)
    for _ in range(max_iter):
        res = np.max(np.abs(grad) / deg)
        if res <= tol:
            return x
        VS = V * sig * (1.0 - sig)
        H = (np.diag(VS.sum(1)) - VS)[np.ix_(free, free)]  # the weighted graph Laplacian, anchor row/column removed
        np.fill_diagonal(H, np.maximum(np.diag(H), 1e-300))  # curvature that underflowed (|x_a - x_b| huge)
        scale = 1.0 / np.sqrt(np.diag(H))
        d = np.zeros_like(x)
        d[free] = -scale * np.linalg.solve(H * np.outer(scale, scale), scale * grad[free])
        d *= min(1.0, 2.0 / np.abs(d).max())  # a trust radius: Newton on a logistic loss overshoots far from the fit
        t = 1.0
        while True:  # backtracking
            f_new, grad_new, sig_new = value_residual(x + t * d)
            if f_new <= f + 1e-4 * t * (grad @ d) and f_new < f:
                break
            if f_new <= f + 1e-15 * max(1.0, abs(f)) and np.max(np.abs(grad_new) / deg) < res:
                break  # the loss cannot resolve the step (rarely sampled tokens): the residual decreased
            t *= 0.5
            if t < 1e-12:
                raise RuntimeError(f"partial_sgd_fixed_point: the reward fit's line search failed (residual {res})")
        x = x + t * d
        x, f, grad, sig = x - x.mean(), f_new, grad_new, sig_new
    raise RuntimeError(f"partial_sgd_fixed_point: the reward fit did not converge in {max_iter} Newton steps")


def partial_sgd_fixed_point(
    log_pi_ref: np.ndarray, tau: float, scores: np.ndarray, temperature: float,
    *, objective: str = "preference_nll", weight: float = 0.1,
    x0: np.ndarray | None = None, tol: float = 1e-10, max_iter: int = 200,
) -> np.ndarray:
    """The x (gauge sum(x) = 0) with grad_x f(x, pi)|_{pi = pi*_tau(x)} = 0, pi held fixed when differentiating.

    This is where the usual RLHF alternation stops: fit r_x by BT on labelled pairs from the current policy,
    re-solve the policy. Solved as the fixed point x = M(x), M(x) = argmin_x' f(x', pi*_tau(x)) (f is convex
    in x' for a fixed pi; its minimizer is found by Newton), by the damped iteration
    x <- x + alpha (M(x) - x) from ``x0`` (default 0), alpha halved whenever |M(x) - x| grows, to
    max |M(x) - x| <= tol. (M(x) - x is in the units of x, unlike grad_x f, which vanishes with the pair
    weights of tokens pi*_tau rarely samples: its near-zeros there are not fixed points.)

    For this tabular r_x and a BT oracle (temperature > 0) the labels are realizable, so M(x) = scores /
    temperature (minus its mean) for every pi with full support: the fixed point is that x, for both objectives
    and every tau, pi_ref and weight > 0. A deterministic oracle (temperature 0) separates the tokens and has
    no finite fit (ValueError), as has weight = 0 for "win_rate" (grad_x f = 0). RuntimeError if no convergence.
    """
    log_pi_ref = _check_log_pi_ref(log_pi_ref, None)
    tau = _check_positive("tau", tau)
    objective, weight = _check_objective(objective, weight)
    if objective == "win_rate" and weight == 0:
        raise ValueError(
            "partial_sgd_fixed_point: weight must be > 0 for objective='win_rate' (grad_x f = 0 at weight 0)"
        )
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"partial_sgd_fixed_point: temperature must be a finite number > 0 (a deterministic oracle's labels have "
            f"no finite BT fit), got {temperature}"
        )
    k = log_pi_ref.shape[0]
    P = preference_matrix(_vec("scores", scores, k), temperature)
    rho = np.exp(log_pi_ref)
    x = np.zeros(k) if x0 is None else _vec("x0", x0, k).copy()
    x -= x.mean()

    def step(z: np.ndarray) -> np.ndarray:
        V = _pair_weights(soft_optimal_policy(z, log_pi_ref, tau), rho, objective, weight)
        return _reward_fit(z, V, P, tol=1e-13) - z

    alpha, delta = 1.0, step(x)
    for _ in range(max_iter):
        if np.max(np.abs(delta)) <= tol:
            return x
        x_new = x + alpha * delta
        delta_new = step(x_new)
        if np.linalg.norm(delta_new) < np.linalg.norm(delta) or alpha < 1e-6:
            x, delta = x_new, delta_new
        else:
            alpha *= 0.5
    if np.max(np.abs(delta)) <= tol:
        return x
    raise RuntimeError(
        f"partial_sgd_fixed_point: no fixed point within {max_iter} iterations "
        f"(max |M(x) - x| = {np.max(np.abs(delta))})"
    )
