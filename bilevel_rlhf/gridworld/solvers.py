"""Exact tabular solvers, float64 and vectorized over any leading batch dimensions of r / pi.

Conventions (the lead's normalization): Q^pi(s, a) = r(s, a) + gamma * sum_s' P(s'|s,a) V^pi(s'),
V^pi(s) = sum_a pi(a|s) (Q^pi(s, a) - tau log pi(a|s)) (unnormalized, as in soft RL), and the
normalized objective J_tau(pi) = (1 - gamma) rho^T V^pi = E_{s~d^pi, a~pi}[r(s,a) - tau log pi(a|s)]
with the discounted occupancy d^pi = (1 - gamma) (I - gamma P_pi^T)^{-1} rho. In an episodic MDP P stands for
`mdp.P_continue`: no successor after a terminal state, so nothing accrues after it.
"""

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from .mdp import TabularMDP

# Hard value iteration: actions whose Q* is within TIE_TOL of the best are "tied" and share the
# probability uniformly. Q* is certified to HARD_VI_TOL, far below TIE_TOL, so a genuine tie is never
# split and a genuine gap > TIE_TOL is never merged. (Rewards here are O(1), Q* is O(1/(1-gamma)).)
TIE_TOL = 1e-8
HARD_VI_TOL = 1e-11


def expected_next(mdp: TabularMDP, V: np.ndarray) -> np.ndarray:
    """E[V(s') | s, a] = sum_s' P(s'|s,a) V(s'), shape [..., S, A] for V of shape [..., S]."""
    S, A = mdp.n_states, mdp.n_actions
    if mdp.sparse:
        return np.asarray(mdp.P_continue @ V.reshape(-1, S).T).T.reshape(V.shape[:-1] + (S, A))
    return (V @ mdp.P_continue.reshape(S * A, S).T).reshape(V.shape[:-1] + (S, A))


def state_transition(mdp: TabularMDP, pi: np.ndarray):
    """P_pi[s, s'] = sum_a pi(a|s) P(s'|s,a), shape [..., S, S] (a sparse [S, S] matrix for a sparse MDP)."""
    if mdp.sparse:
        S, A = mdp.n_states, mdp.n_actions
        _one_policy(mdp, pi)
        weights = scipy.sparse.csr_matrix((pi.ravel(), np.arange(S * A), np.arange(0, S * A + 1, A)), shape=(S, S * A))
        return (weights @ mdp.P_continue).tocsc()
    return np.einsum("...sa,sat->...st", pi, mdp.P_continue, optimize=True)


def _one_policy(mdp: TabularMDP, pi: np.ndarray) -> None:
    if pi.shape != (mdp.n_states, mdp.n_actions):
        raise ValueError(f"a sparse MDP solves one policy [S, A] at a time, got shape {pi.shape} (batch over a loop, "
                         "or use a dense P)")


def _solve_linear(mdp: TabularMDP, P_pi, rhs: np.ndarray, transpose: bool = False) -> np.ndarray:
    """x with (I - gamma P_pi) x = rhs (or its transpose), for dense [..., S, S] or sparse P_pi."""
    if mdp.sparse:
        lhs = scipy.sparse.identity(mdp.n_states, format="csc") - mdp.gamma * (P_pi.T if transpose else P_pi)
        return scipy.sparse.linalg.spsolve(lhs.tocsc(), rhs)
    lhs = np.eye(mdp.n_states) - mdp.gamma * (np.swapaxes(P_pi, -1, -2) if transpose else P_pi)
    return np.linalg.solve(lhs, rhs[..., None])[..., 0]


def entropy_term(pi: np.ndarray) -> np.ndarray:
    """-log pi(a|s) weighted so that 0 * log 0 = 0: returns pi * log pi (elementwise)."""
    return np.where(pi > 0, pi * np.log(np.where(pi > 0, pi, 1.0)), 0.0)


def policy_evaluation(mdp: TabularMDP, pi: np.ndarray, r: np.ndarray, tau: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Q^pi, V^pi) of the tau-regularized reward by one linear solve per batch element."""
    r_pi = (pi * r).sum(-1) - tau * entropy_term(pi).sum(-1)  # [..., S]
    V = _solve_linear(mdp, state_transition(mdp, pi), r_pi)
    return r + mdp.gamma * expected_next(mdp, V), V


def discounted_visits(mdp: TabularMDP, pi: np.ndarray) -> np.ndarray:
    """Expected discounted visits sum_t gamma^t Pr(s_t = s) = (I - gamma P_pi^T)^{-1} rho, [..., S]."""
    rhs = np.broadcast_to(mdp.rho, pi.shape[:-1])
    return _solve_linear(mdp, state_transition(mdp, pi), np.array(rhs), transpose=True)


def occupancy(mdp: TabularMDP, pi: np.ndarray) -> np.ndarray:
    """Normalized discounted state occupancy d = (1 - gamma) (I - gamma P_pi^T)^{-1} rho, [..., S]."""
    return (1.0 - mdp.gamma) * discounted_visits(mdp, pi)


def reward_adjoint(mdp: TabularMDP, pi: np.ndarray, g_pi: np.ndarray, tau: float) -> np.ndarray:
    """g_r = (d pi*_tau / d r)^T g_pi: how a cotangent g_pi [S, A] on the soft-optimal policy pi of reward r
    pulls back to r. Implicit differentiation of Q = r + gamma P V, V = tau logsumexp(Q / tau), pi = softmax(Q /
    tau): g_Q = pi (g_pi - pi . g_pi) / tau, then g_r = (I - gamma P Pi)^{-T} g_Q by one [S, S] solve (Woodbury on
    P Pi): g_r = g_Q + gamma Pi^T z with (I - gamma P_pi^T) z = P^T g_Q."""
    g_Q = pi * (g_pi - (pi * g_pi).sum(-1, keepdims=True)) / tau
    if mdp.sparse:
        back = np.asarray(mdp.P_continue.T @ g_Q.ravel()).ravel()  # P^T g_Q
    else:
        back = np.einsum("sat,sa->t", mdp.P_continue, g_Q)
    z = _solve_linear(mdp, state_transition(mdp, pi), back, transpose=True)
    return g_Q + mdp.gamma * pi * z[:, None]


def objective(mdp: TabularMDP, pi: np.ndarray, r: np.ndarray, tau: float = 0.0) -> np.ndarray:
    """J_tau(pi) = E_{d^pi, pi}[r - tau log pi], shape [...]."""
    d = occupancy(mdp, pi)
    return (d * ((pi * r).sum(-1) - tau * entropy_term(pi).sum(-1))).sum(-1)


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _soft_max_value(Q: np.ndarray, tau: float) -> np.ndarray:
    """V(s) = tau log sum_a exp(Q(s,a)/tau), computed stably."""
    m = Q.max(-1)
    return m + tau * np.log(np.exp((Q - m[..., None]) / tau).sum(-1))


def _solve(mdp: TabularMDP, r: np.ndarray, tau: float, tol: float, max_iter: int, V0) -> np.ndarray:
    """Q* of the tau-regularized Bellman optimality equation (tau = 0: hard max).

    Policy iteration, i.e. Newton's method on Q = r + gamma P max_tau(Q) (its Jacobian is gamma P Pi):
    pi <- greedy/soft-greedy(Q), Q <- Q^pi by an exact linear solve. It stops when the Bellman
    residual certifies ||Q - Q*||_inf <= ||T Q - Q||_inf / (1 - gamma) <= tol, so the answer is the
    value-iteration fixed point to tol, reached in a handful of solves instead of ~log(tol)/log(gamma)
    sweeps. (Soft PI improves monotonically; hard PI terminates finitely.) When tol is below the
    round-off floor 64 ulp(|Q|max) / (1 - gamma), that floor is what is certified instead.
    """
    gamma = mdp.gamma
    V = np.zeros(r.shape[:-1]) if V0 is None else np.broadcast_to(V0, r.shape[:-1]).copy()
    Q = r + gamma * expected_next(mdp, V)
    act = Q.argmax(-1)  # tau = 0: a deterministic policy, switched only on a real improvement
    eye = np.eye(mdp.n_actions)
    for _ in range(max_iter):
        if tau > 0:
            pi = softmax(Q / tau)
        else:
            # keep the current action unless another beats it by more than the tolerance: ties
            # then cannot make policy iteration cycle, and at the end max_a Q - Q(s, act) <= tol (1 - gamma) / 2
            q_act = np.take_along_axis(Q, act[..., None], -1)[..., 0]
            act = np.where(Q.max(-1) > q_act + 0.5 * tol * (1.0 - gamma), Q.argmax(-1), act)
            pi = eye[act]
        Q, V = policy_evaluation(mdp, pi, r, tau)
        residual = np.max(np.abs(r + gamma * expected_next(mdp, _backup(Q, tau)) - Q)) if Q.size else 0.0
        if not np.isfinite(residual):
            raise FloatingPointError(f"value iteration: Q went non-finite (tau={tau})")
        # round-off floor: a residual of a few ulps of |Q| cannot be reduced further
        if residual <= max(tol * (1.0 - gamma), 64 * np.finfo(np.float64).eps * (1.0 + np.max(np.abs(Q)))):
            return Q
    raise RuntimeError(f"value iteration did not reach tol={tol} in max_iter={max_iter} iterations (tau={tau})")


def _backup(Q: np.ndarray, tau: float) -> np.ndarray:
    return _soft_max_value(Q, tau) if tau > 0 else Q.max(-1)


def _greedy(Q: np.ndarray, tau: float, tie_tol: float = TIE_TOL) -> np.ndarray:
    """softmax(Q / tau), or (tau = 0) uniform over the actions within tie_tol of the best."""
    if tau > 0:
        return softmax(Q / tau)
    best = Q >= Q.max(-1, keepdims=True) - tie_tol
    return best / best.sum(-1, keepdims=True)


def soft_value_iteration(
    mdp: TabularMDP, r: np.ndarray, tau: float, tol: float = 1e-11, max_iter: int = 1000, V0: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pi*_tau (tau > 0): the fixed point of the soft Bellman operator; returns (Q*, V*, pi*).

    Q = r + gamma P V, V = tau logsumexp(Q / tau), pi = softmax(Q / tau), with ||Q - Q*||_inf <= tol
    (solved by Newton / soft policy iteration, see _solve). ``r`` may carry leading batch dims;
    ``V0`` warm-starts.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0 for soft value iteration, got {tau} (use hard_value_iteration)")
    Q = _solve(mdp, r, tau, tol, max_iter, V0)
    return Q, _soft_max_value(Q, tau), softmax(Q / tau)


def hard_value_iteration(
    mdp: TabularMDP, r: np.ndarray, tol: float = HARD_VI_TOL, tie_tol: float = TIE_TOL, max_iter: int = 1000,
    V0: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unregularized optimum (tau = 0); returns (Q*, V*, pi*) with ||Q - Q*||_inf <= tol.

    pi* is uniform over the actions with Q*(s, a) >= max_a Q*(s, a) - tie_tol (uniform tie-breaking);
    tol must be well below tie_tol so that ties are decided on an accurate Q*.
    """
    if not tol < tie_tol:
        raise ValueError(f"tol must be < tie_tol, got tol={tol}, tie_tol={tie_tol}")
    Q = _solve(mdp, r, 0.0, tol, max_iter, V0)
    return Q, Q.max(-1), _greedy(Q, 0.0, tie_tol)
