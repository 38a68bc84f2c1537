"""The bilevel methods behind one interface, ``run_method(problem, config, method, seed)``.

Sampled methods are model-free: B walkers per actor with restarts (each step, w.p. 1 - gamma a
walker restarts from rho, else it moves to s' ~ P(.|s, a)), so their states follow d^pi; every
walker step is one environment transition and is counted (inner loops and FD evaluations included).
Critics are soft Q-tables trained by expected-SARSA TD(0); actors are tabular softmax logits updated,
at every visited state, with the all-action soft policy gradient
    logits[s] += alpha * pi(.|s) * (Q(s, .) - tau log pi(.|s) - V(s)),   V(s) = E_pi[Q - tau log pi].
All-action (expected over a ~ pi) rather than sampled-action: it is the exact per-state gradient
given the critic, so it adds no action-sampling noise; the d(s) weighting of the true gradient is
replaced by "visited in this batch" so that rarely visited states still learn. (A natural-gradient
actor, logits += alpha * soft advantage, was tried and tracked pi*_tau worse under critic noise.)

Choices beyond the reconstructed algorithm (docs/algorithm.md), all documented here:
- common random numbers: phi's and theta's walkers use the same uniforms (config
  ``common_random_numbers``), so their samples stay coupled while the policies agree and the
  lambda-weighted difference E_phi[grad r] - E_theta[grad r] has far less variance; each set of
  walkers is still marginally an on-policy sample of its own policy.
- 'position' iterates are projected onto the board box (off the board every gradient vanishes).
- nested_loop estimates h from the second half of each inner loop (the first half re-tracks x).
- finite_difference evaluates x + eps v and x - eps v with the same random stream (common random
  numbers), each from a copy of the warm base actor-critic, and counts all of those transitions.
- exact / exact_decay are deterministic and use the model (samples = 0).
Schedules are indexed by the walker step t, so every sampled method runs on the same budget.
The walker step (`_walker_step`) is compiled with numba: explicit loops over walkers and states, which at these table
sizes run several times faster than the same step as whole-array numpy operations (the tests keep that form as its
reference).
"""

import math
import time
from dataclasses import dataclass, field

import numba
import numpy as np

from .. import schedules
from .config import METHODS, GridWorldConfig
from .mdp import TabularMDP
from .problem import GoalProblem


@dataclass
class RunResult:
    """One method on one seed. Phi is the original (tau = 0) objective, evaluated exactly."""

    method: str
    seed: int
    x: np.ndarray  # final upper variable
    phi: float  # Phi(x_final), tau = 0
    phi_tau: float  # Phi_tau(x_final) at tau_final
    tau_final: float
    samples: int  # environment transitions used (0 for exact: it uses the model)
    seconds: float
    curve_samples: list[int] = field(default_factory=list)
    curve_phi: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["x"] = self.x.tolist()
        return out


# ----- schedules (the project's shared pure functions of the iteration, bilevel_rlhf.schedules) -----
def gridworld_tau(cfg: GridWorldConfig, t: int, decay: bool = True) -> float:
    """tau_t = max(tau_min, tau_init (1 + t/tau_horizon)^-tau_decay_rate), or tau_init when not decaying (fixed_tau)."""
    schedule = "polynomial" if decay else "constant"
    return schedules.tau_at(t, cfg.tau_init, cfg.tau_min, schedule, cfg.tau_decay_rate, cfg.tau_horizon)


def poly(init: float, power: float, t: int, k0: float) -> float:
    """A step size init * (1 + t/k0)^-power."""
    return init * schedules.lr_factor(t, "polynomial", power, k0)


def lam_at(cfg: GridWorldConfig, t: int) -> float:
    """lambda_t = penalty_lambda (1 + t/lr_horizon)^penalty_lambda_growth, growth >= 0: constant or increasing."""
    return schedules.lambda_at(t, cfg.penalty_lambda, "polynomial", cfg.penalty_lambda_growth, cfg.lr_horizon, None)


# ----- sampling -----
def inverse_cdf(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index i with cum[i-1] < u <= cum[i], row-wise (one cum for all u when cum is 1-D); u in (0, 1] never picks a
    zero-mass index."""
    if cum.ndim == 1:  # one distribution: a binary search per u
        return np.minimum(np.searchsorted(cum, u, side="left"), len(cum) - 1)
    return np.minimum((cum < u[..., None]).sum(-1), cum.shape[-1] - 1)


def successor_table(mdp: TabularMDP) -> tuple[np.ndarray, np.ndarray]:
    """(succ, cum_P), each [S, A, K]: the K most likely successors of every (s, a), most likely first (ties by
    index), which hold all the mass (K <= S), and their cumulative probabilities; dense or sparse P."""
    if mdp.sparse:
        S, A = mdp.n_states, mdp.n_actions
        P = mdp.P.tocsr()  # row s * A + a
        n = np.diff(P.indptr)
        K = int(n.max())
        rows = np.repeat(np.arange(S * A), n)
        order = np.lexsort((P.indices, -P.data, rows))  # within a row as the dense argsort: by probability, ties by index
        slot = np.arange(len(order)) - P.indptr[rows]
        last = np.where(n > 0, P.indices[order][np.maximum(P.indptr[1:] - 1, 0)], np.arange(S * A) // A)
        succ = np.repeat(last[:, None], K, axis=1)  # slots past a row's successors repeat its last one (mass 0)
        probs = np.zeros((S * A, K))
        succ[rows, slot], probs[rows, slot] = P.indices[order], P.data[order]
        succ, probs = succ.astype(np.int64).reshape(S, A, K), probs.reshape(S, A, K)
    else:
        K = int((mdp.P > 0).sum(-1).max())
        succ = np.ascontiguousarray(np.argsort(-mdp.P, axis=-1, kind="stable")[..., :K])
        probs = np.take_along_axis(mdp.P, succ, -1)
    return succ, np.cumsum(probs, -1)


class Sampler:
    """Draws the random numbers of one walker step and turns them into transitions."""

    def __init__(self, mdp: TabularMDP, batch_size: int):
        if mdp.terminal is not None:
            raise ValueError("the sampled GridWorld methods do not handle terminal states (episodes never end here)")
        self.mdp, self.B = mdp, batch_size
        self.succ, self.cum_P = successor_table(mdp)
        self.cum_rho = np.cumsum(mdp.rho)

    def uniforms(self, rng: np.random.Generator) -> np.ndarray:
        """[4, B] uniforms in (0, 1]: action, next state, restart coin, restart state."""
        return 1.0 - rng.random((4, self.B))

    def start(self, u: np.ndarray) -> np.ndarray:
        return inverse_cdf(self.cum_rho, u)


class ActorCritic:
    """k tabular softmax actors, each with a soft expected-SARSA critic and B walkers, stepped together: phi and theta
    share one compiled step. logits, Q: [k, S, A]; walkers' states s: [k, B] (a [B] start gives k = 1)."""

    def __init__(self, mdp: TabularMDP, states: np.ndarray):
        self.mdp = mdp
        self.s = np.atleast_2d(states).astype(np.int64)
        shape = (len(self.s), mdp.n_states, mdp.n_actions)
        self.logits = np.zeros(shape)  # the actors' parameters (phi, theta)
        self.Q = np.zeros(shape)  # the critics
        self.finite = True  # whether the last step left every critic and actor entry finite

    def copy(self) -> "ActorCritic":
        other = ActorCritic(self.mdp, self.s)
        other.logits, other.Q = self.logits.copy(), self.Q.copy()
        return other

    def step(self, sampler: Sampler, reward: np.ndarray, tau: float, alpha: float, beta: float, u: np.ndarray) -> np.ndarray:
        """One batch per actor: TD(0) critic step (beta), actor step (alpha), walkers move. `reward`: [k, S, A] or
        one [S, A] for all; `u`: [k, 4, B] or one [4, B] for all (common random numbers). Returns each batch's
        empirical (s, a) frequencies [k, S, A] (an unbiased-in-the-limit sample of d^pi pi)."""
        (k, S, A), B = self.Q.shape, self.s.shape[1]
        reward, u = _writable_c(reward), _writable_c(u)
        if reward.shape not in ((S, A), (k, S, A)) or u.shape not in ((4, B), (k, 4, B)):
            raise ValueError(f"reward must be [{S}, {A}] or [{k}, {S}, {A}] and u [4, {B}] or [{k}, 4, {B}], got "
                             f"{reward.shape} and {u.shape}")
        # one reward / one set of uniforms for all actors travels as a stack of one (no copies)
        counts, self.finite = _walker_step(self.logits, self.Q, self.s, reward.reshape(-1, S, A), u.reshape(-1, 4, B),
                                           sampler.succ, sampler.cum_P, sampler.cum_rho, float(tau), float(alpha),
                                           float(beta), self.mdp.gamma)
        return counts / B

    def check_finite(self, method: str, t: int) -> None:
        """Raise FloatingPointError, naming the critics or the actors, if the last step left a non-finite entry."""
        if not self.finite:
            _check_finite(method, t, critics=self.Q, actors=self.logits)


def _writable_c(a) -> np.ndarray:
    """a as a writable C-contiguous float64 array, copied only if it is not one (broadcast views are read-only):
    the compiled step then has one signature."""
    if type(a) is np.ndarray and a.dtype == np.float64 and a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype=np.float64, order="C")


@numba.njit(cache=True)
def _first_reaching(cum: np.ndarray, u: float) -> int:
    """inverse_cdf for one u: the first index i with cum[i] >= u, or the last index."""
    i = 0
    while i < len(cum) - 1 and cum[i] < u:
        i += 1
    return i


@numba.njit(cache=True)
def _policy_row(logits, Q, tau, i, x, log_pi, pi, V, ready):
    """log pi(.|x), pi(.|x) and the soft value V(x) = sum_a pi (Q - tau log pi) of actor i, from the tables as they
    were before the step; computed once, on first use (a step touches at most 2 B states per actor)."""
    if ready[i, x]:
        return
    m = logits[i, x].max()
    z = 0.0
    for a in range(logits.shape[2]):
        z += np.exp(logits[i, x, a] - m)
    log_z = np.log(z)
    V[i, x] = 0.0
    for a in range(logits.shape[2]):
        log_pi[i, x, a] = logits[i, x, a] - m - log_z
        pi[i, x, a] = np.exp(log_pi[i, x, a])
        V[i, x] += pi[i, x, a] * (Q[i, x, a] - tau * log_pi[i, x, a])
    ready[i, x] = True


@numba.njit(cache=True)
def _walker_step(logits, Q, s, reward, u, succ, cum_P, cum_rho, tau, alpha, beta, gamma):
    """ActorCritic.step, compiled (scalar loops: numpy's per-call cost dominated these small tables). Updates logits,
    Q and s in place; returns (visit counts [k, S, A], whether the updated entries are finite). Every walker reads
    the tables as they were before the step (TD errors of walkers sharing an (s, a) are averaged); then the critic
    moves, then the actor at the visited states with the updated critic."""
    k, S, A = logits.shape
    B = s.shape[1]
    log_pi, pi, V, ready = np.empty((k, S, A)), np.empty((k, S, A)), np.empty((k, S)), np.zeros((k, S), np.bool_)
    counts, td_sum = np.zeros((k, S, A)), np.zeros((k, S, A))
    seen = np.zeros((k, S), np.bool_)
    visited = np.empty((k, B), np.int64)  # the distinct states each actor's walkers start from, n_visited[i] of them
    n_visited = np.zeros(k, np.int64)
    cum_pi = np.empty(A)
    # walkers: a ~ pi(.|s), s' ~ P(.|s, a), soft TD(0) error r + gamma V(s') - Q(s, a); restart from rho w.p. 1 - gamma
    for i in range(k):
        ir, iu = min(i, len(reward) - 1), min(i, len(u) - 1)  # a stack of one serves every actor
        for b in range(B):
            x = s[i, b]
            _policy_row(logits, Q, tau, i, x, log_pi, pi, V, ready)
            if not seen[i, x]:  # x's first walker in this step
                seen[i, x] = True
                visited[i, n_visited[i]] = x
                n_visited[i] += 1
            c = 0.0
            for a in range(A):
                c += pi[i, x, a]
                cum_pi[a] = c
            a = _first_reaching(cum_pi, u[iu, 0, b])
            y = succ[x, a, _first_reaching(cum_P[x, a], u[iu, 1, b])]
            _policy_row(logits, Q, tau, i, y, log_pi, pi, V, ready)
            td_sum[i, x, a] += reward[ir, x, a] + gamma * V[i, y] - Q[i, x, a]
            counts[i, x, a] += 1.0
            s[i, b] = _first_reaching(cum_rho, u[iu, 3, b]) if u[iu, 2, b] <= 1.0 - gamma else y
    # critic: the averaged TD step; actor: the all-action soft policy gradient pi * (soft Q - its pi-mean)
    finite = True
    for i in range(k):
        for j in range(n_visited[i]):
            x = visited[i, j]
            mean = 0.0
            for a in range(A):
                if counts[i, x, a] > 0:
                    Q[i, x, a] += beta * (td_sum[i, x, a] / counts[i, x, a])
                mean += pi[i, x, a] * (Q[i, x, a] - tau * log_pi[i, x, a])
            for a in range(A):
                logits[i, x, a] += alpha * pi[i, x, a] * (Q[i, x, a] - tau * log_pi[i, x, a] - mean)
                finite = finite and np.isfinite(Q[i, x, a]) and np.isfinite(logits[i, x, a])
    return counts, finite


def _check_finite(method: str, t: int, **arrays: np.ndarray) -> None:
    if math.isfinite(sum(value.sum() for value in arrays.values())):
        return  # a sum of finite arrays is finite (barring an overflow, which the loop below then names anyway)
    for name, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise FloatingPointError(f"{method}: {name} became non-finite at iteration {t}")


def initial_x(problem: GoalProblem, cfg: GridWorldConfig) -> np.ndarray:
    """x0: the goal position itself, or logits peaked (cells_init_peak) on the cell nearest to it."""
    x0 = np.asarray(cfg.x0, dtype=np.float64)
    if problem.parameterization == "position":
        return x0
    cell = int(np.argmin(((problem.grid.coords - x0) ** 2).sum(-1)))
    x = np.zeros(problem.dim)
    x[cell] = cfg.cells_init_peak
    return x


class _Tracker:
    """Counts samples and records exact Phi(x) against samples (logging is free, not counted)."""

    def __init__(self, problem: GoalProblem, eval_every: int):
        self.problem, self.eval_every = problem, eval_every
        self.samples, self.curve_samples, self.curve_phi = 0, [], []

    def log(self, x: np.ndarray, t: int, force: bool = False) -> None:
        if force or t % self.eval_every == 0:
            self.curve_samples.append(int(self.samples))
            self.curve_phi.append(float(self.problem.phi(x)))


# ----- methods -----
def _start(problem, cfg, rng):
    """A sampled method's start: (sampler, x0, the walkers' first states, a tracker that has logged x0)."""
    sampler = Sampler(problem.mdp, cfg.batch_size)
    x = initial_x(problem, cfg)
    states = sampler.start(sampler.uniforms(rng)[3])
    tracker = _Tracker(problem, cfg.eval_every)
    tracker.log(x, 0)
    return sampler, x, states, tracker


def _penalty_method(problem, cfg, rng, method):
    """single_loop / fixed_tau / nested_loop: the penalty actor-critic, phi on r_x, theta on r_x - u/lambda."""
    sampler, x, states, tracker = _start(problem, cfg, rng)
    u_cost = problem.designer_cost
    actors = ActorCritic(problem.mdp, np.stack([states, states]))  # phi and theta, stepped together
    nested = method == "nested_loop"
    inner = cfg.nested_inner_steps if nested else 1
    w_sum, n_w = np.zeros_like(u_cost), 0
    tau = cfg.tau_init
    for t in range(cfg.iterations):
        tau = gridworld_tau(cfg, t, decay=method != "fixed_tau")  # entropy weight
        alpha = poly(cfg.actor_learning_rate, cfg.actor_lr_decay, t, cfg.lr_horizon)
        beta = poly(cfg.critic_learning_rate, cfg.critic_lr_decay, t, cfg.lr_horizon)
        lam = lam_at(cfg, t)  # penalty coefficient lambda_t
        r = problem.reward(x)
        u_phi = sampler.uniforms(rng)
        u = u_phi if cfg.common_random_numbers else np.stack([u_phi, sampler.uniforms(rng)])  # theta's
        w_phi, w_theta = actors.step(sampler, np.stack([r, r - u_cost / lam]), tau, alpha, beta, u)
        tracker.samples += 2 * cfg.batch_size
        if t % inner >= inner // 2:  # nested_loop: estimate from the second half of the inner loop
            w_sum += w_phi - w_theta
            n_w += 1
        if (t + 1) % inner == 0:
            zeta = poly(cfg.nested_reward_learning_rate if nested else cfg.reward_learning_rate, cfg.reward_lr_decay,
                        t // inner, cfg.lr_horizon / inner)
            # h = grad_x f(x, theta) + lambda (E_phi[grad r_x] - E_theta[grad r_x]); grad_x f = grad c (u has no x)
            h = problem.placement_grad(x) + lam * problem.reward_vjp(x, w_sum / n_w)
            x = problem.project(x - zeta * h)
            w_sum[:], n_w = 0.0, 0
            _check_finite(method, t, h=h, x=x)
        actors.check_finite(method, t)
        tracker.log(x, t + 1, force=t + 1 == cfg.iterations)
    return x, tau, tracker


def _partial_sgd(problem, cfg, rng, method):
    """The usual alternation: one actor on r_x; x follows grad_x f(x, pi) = grad c(x) only."""
    sampler, x, states, tracker = _start(problem, cfg, rng)
    actor = ActorCritic(problem.mdp, states)
    tau = cfg.tau_init
    for t in range(cfg.iterations):
        tau = gridworld_tau(cfg, t)
        alpha = poly(cfg.actor_learning_rate, cfg.actor_lr_decay, t, cfg.lr_horizon)
        beta = poly(cfg.critic_learning_rate, cfg.critic_lr_decay, t, cfg.lr_horizon)
        actor.step(sampler, problem.reward(x), tau, alpha, beta, sampler.uniforms(rng))
        tracker.samples += cfg.batch_size
        h = problem.placement_grad(x)  # the data's gradient ignores how pi*(x) moves with x
        x = problem.project(x - poly(cfg.reward_learning_rate, cfg.reward_lr_decay, t, cfg.lr_horizon) * h)
        _check_finite(method, t, h=h, x=x)
        actor.check_finite(method, t)
        tracker.log(x, t + 1, force=t + 1 == cfg.iterations)
    return x, tau, tracker


def _finite_difference(problem, cfg, rng, method):
    """Zeroth-order hypergradient: central differences of a sampled Phi estimate (coordinates for
    'position', Gaussian-smoothing directions for 'cells'); each estimate warm-starts an actor-critic
    from the base actor, runs fd_inner_steps on r_{x +- eps v}, and averages u over the second half."""
    sampler, x, states, tracker = _start(problem, cfg, rng)
    base = ActorCritic(problem.mdp, states)
    K = cfg.fd_inner_steps
    t, k, tau = 0, 0, cfg.tau_init
    last_logged = 0

    def solve(ac: ActorCritic, x_eval: np.ndarray, stream: np.random.Generator) -> float:
        nonlocal t
        r, f_sum = problem.reward(x_eval), 0.0
        for j in range(K):
            tau_t = gridworld_tau(cfg, t)
            alpha = poly(cfg.actor_learning_rate, cfg.actor_lr_decay, t, cfg.lr_horizon)
            beta = poly(cfg.critic_learning_rate, cfg.critic_lr_decay, t, cfg.lr_horizon)
            w = ac.step(sampler, r, tau_t, alpha, beta, sampler.uniforms(stream))[0]
            if j >= K // 2:
                f_sum += float((w * problem.designer_cost).sum())
            t += 1
            tracker.samples += cfg.batch_size
        return f_sum / (K - K // 2) + float(problem.placement_cost(x_eval))

    while t < cfg.iterations:
        tau = gridworld_tau(cfg, t)
        solve(base, x, rng)  # keep the base actor at the current x
        if problem.parameterization == "position":
            directions = np.eye(problem.dim)
        else:
            directions = rng.normal(size=(cfg.fd_directions, problem.dim))
        seed = int(rng.integers(2**63))  # common random numbers for all the perturbed evaluations
        g = np.zeros(problem.dim)
        for v in directions:
            f_plus = solve(base.copy(), x + cfg.fd_eps * v, np.random.default_rng(seed))
            f_minus = solve(base.copy(), x - cfg.fd_eps * v, np.random.default_rng(seed))
            g += (f_plus - f_minus) / (2.0 * cfg.fd_eps) * v
        g /= len(directions) if problem.parameterization == "cells" else 1.0
        zeta = poly(cfg.fd_learning_rate, cfg.reward_lr_decay, k, cfg.lr_horizon / ((1 + 2 * len(directions)) * K))
        x = problem.project(x - zeta * g)
        k += 1
        _check_finite(method, t, h=g, x=x)
        base.check_finite(method, t)
        if t - last_logged >= cfg.eval_every:
            tracker.log(x, t, force=True)
            last_logged = t
    tracker.log(x, t, force=True)
    return x, tau, tracker


def _exact(problem, cfg, rng, method):
    """Gradient descent on Phi_tau with the exact hypergradient; uses the model, so it spends no
    samples. exact: tau = exact_tau fixed. exact_decay: the sampled methods' decaying tau path,
    compressed onto exact_iterations steps (step k uses tau_t at t = k * iterations / exact_iterations)."""
    x = initial_x(problem, cfg)
    tracker = _Tracker(problem, max(1, cfg.exact_iterations // 50))
    tracker.log(x, 0)
    tau = cfg.exact_tau
    for k in range(cfg.exact_iterations):
        if method == "exact_decay":
            tau = gridworld_tau(cfg, round(k * cfg.iterations / cfg.exact_iterations))
        _, g = problem.hypergradient(x, tau)
        x = problem.project(x - cfg.exact_learning_rate * g)
        _check_finite(method, k, h=g, x=x)
        tracker.log(x, k + 1, force=k + 1 == cfg.exact_iterations)
    return x, tau, tracker


_RUNNERS = {
    "single_loop": _penalty_method,
    "fixed_tau": _penalty_method,
    "nested_loop": _penalty_method,
    "finite_difference": _finite_difference,
    "partial_sgd": _partial_sgd,
    "exact": _exact,
    "exact_decay": _exact,
}
assert set(_RUNNERS) == set(METHODS)


def run_method(problem: GoalProblem, cfg: GridWorldConfig, method: str, seed: int) -> RunResult:
    """Run one method from the config's initial x; final x is evaluated exactly on Phi and Phi_tau."""
    if method not in _RUNNERS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite values are caught by _check_finite
        x, tau_final, tracker = _RUNNERS[method](problem, cfg, rng, method)
    seconds = time.perf_counter() - start
    tau_eval = tau_final if tau_final > 0 else cfg.tau_min
    return RunResult(
        method=method, seed=seed, x=x, phi=float(problem.phi(x)),
        phi_tau=float(problem.phi(x, tau_eval)) if tau_eval > 0 else float(problem.phi(x)),
        tau_final=float(tau_final), samples=int(tracker.samples), seconds=seconds,
        curve_samples=tracker.curve_samples, curve_phi=tracker.curve_phi,
    )


SPARSE_ABOVE = 900  # states: larger grids get a sparse P (faster from a few hundred states; a dense [S, 5, S] array
# of 2,500 states takes 250 MB)


def build_problem(cfg: GridWorldConfig) -> GoalProblem:
    """The GoalProblem instance a config describes (with a sparse P above SPARSE_ABOVE states)."""
    from .mdp import make_grid

    states = len(cfg.layout) * len(cfg.layout[0])
    grid = make_grid(cfg.layout, slip=cfg.slip, gamma=cfg.gamma, sparse=states > SPARSE_ABOVE)
    return GoalProblem(grid, parameterization=cfg.parameterization, reward_scale=cfg.reward_scale,
                       bump_width=cfg.bump_width, hazard_cost=cfg.hazard_cost, target_bonus=cfg.target_bonus,
                       placement_weight=cfg.placement_weight)
