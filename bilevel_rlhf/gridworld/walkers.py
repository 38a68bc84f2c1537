"""Sampling a `TabularBilevelProblem`: episodic walkers over its contexts, and the penalty method's hypergradient
estimated from their visits.

Each walker plays one episode at a time: a context c ~ w, a start s ~ rho_c, then actions a ~ pi_c(.|s) and moves
s' ~ P_c(.|s, a). The episode ends after acting in a terminal state, and also with probability 1 - gamma at every
step (the discount as a restart). By renewal, the walkers' (c, s, a) then follow mu(c, s, a) = w_c d_c(s) pi_c(a|s) / Z,
with d_c the discounted visits and Z = sum_c w_c sum_s d_c(s) the mean discounted episode length. Z comes from the
same visits: each step ends the episode with probability e(s) = 1 - gamma (1 - terminal(s)), and since
sum_s d_c(s) e(s) = 1 in every context, E_mu[e] = 1 / Z. So sum_c w_c E_{d_c, pi_c}[g] is estimated by
mean(g) / mean(e) over the visits (a ratio estimator: consistent, biased by O(1 / visits)).

The penalty method's direction for the leader (who maximizes V) is

    h = sum_c w_c E_{d_c^theta, theta}[grad_x u_x] + lambda (E_{d^theta, theta}[grad_x r_x] - E_{d^phi, phi}[grad_x r_x])

with phi the follower's soft best response to r_x and theta the one to r_x + u_x / lambda; h -> grad V as lambda grows
(`penalty_hypergradient` computes it exactly, `sampled_penalty_hypergradient` from walkers).
"""

from __future__ import annotations

import numpy as np

from .algorithms import inverse_cdf, successor_table
from .solvers import discounted_visits, soft_value_iteration
from .tabular import TabularBilevelProblem, clipped_ascent_step

__all__ = ["EmpiricalModel", "EpisodicWalkers", "penalty_hypergradient", "sampled_penalty_ascent",
           "sampled_penalty_hypergradient", "sampled_single_loop"]


class EpisodicWalkers:
    """`batch` walkers over the contexts of `problem`, each in its own episode (see the module docstring)."""

    def __init__(self, problem: TabularBilevelProblem, batch: int, rng: np.random.Generator):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.problem, self.batch = problem, batch
        S, A = problem.shape
        mdps = [c.mdp for c in problem.contexts]
        # successors most likely first, as cumulative probabilities, padded to one width K: [C, S, A, K]
        tables = [successor_table(m) for m in mdps]
        K = max(succ.shape[-1] for succ, _ in tables)
        self.succ = np.stack([np.concatenate([succ, np.repeat(succ[..., -1:], K - succ.shape[-1], -1)], -1)
                              for succ, _ in tables])
        self.cum_P = np.stack([np.concatenate([cum, np.ones(cum.shape[:-1] + (K - cum.shape[-1],))], -1)
                               for _, cum in tables])
        self.cum_rho = np.cumsum(np.stack([m.rho for m in mdps]), -1)  # [C, S]
        self.cum_w = np.cumsum(problem.weights)
        # the probability that an episode ends after acting in s: [C, S]
        self.end = np.stack([1.0 - m.gamma * (1.0 - (m.terminal if m.terminal is not None else np.zeros(S)))
                             for m in mdps])
        self.c, self.s = self._restart(rng, batch)

    def _restart(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        c = inverse_cdf(self.cum_w, 1.0 - rng.random(n))
        return c, inverse_cdf(self.cum_rho[c], 1.0 - rng.random(n))

    def step(self, policies, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One action per walker from `policies[c]` ([S, A] per context), then the move or a new episode. Returns the
        visits (c, s, a) of this step and the successors s' drawn from P_c(.|s, a) (for TD targets), each [batch]."""
        pi = np.asarray(policies)  # [C, S, A]
        c, s = self.c, self.s
        a = inverse_cdf(np.cumsum(pi[c, s], -1), 1.0 - rng.random(self.batch))
        nxt = self.move(c, s, a, rng)
        ends = rng.random(self.batch) < self.end[c, s]
        c_new, s_new = self._restart(rng, self.batch)
        self.c, self.s = np.where(ends, c_new, c), np.where(ends, s_new, nxt)
        return c, s, a, nxt

    def move(self, c: np.ndarray, s: np.ndarray, a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Successors s' ~ P_c(.|s, a), one per (c, s, a)."""
        return self.succ[c, s, a, inverse_cdf(self.cum_P[c, s, a], 1.0 - rng.random(len(c)))]

    def explore(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`n` exploring starts: (c, s, a) uniform over every context, state and action, and one move from each (a
        simulator that can be reset to any state). Returns (c, s, a, s') as `step`; they follow no policy."""
        C, S, A = self.succ.shape[:3]
        c, s, a = rng.integers(C, size=n), rng.integers(S, size=n), rng.integers(A, size=n)
        return c, s, a, self.move(c, s, a, rng)


def _visit_weights(problem: TabularBilevelProblem, walkers: EpisodicWalkers, visits) -> list[np.ndarray]:
    """Per context, the [S, A] weights W_c with sum_c VJP(W_c) estimating sum_c w_c E_{d_c, pi_c}[grad]: visit counts
    divided by the visits' summed episode-end probabilities (the ratio estimator of the module docstring)."""
    S, A = problem.shape
    counts = np.zeros((len(problem.contexts), S, A))
    ends = 0.0
    for c, s, a, _ in visits:
        np.add.at(counts, (c, s, a), 1.0)
        ends += walkers.end[c, s].sum()
    return list(counts / ends)


def sampled_penalty_hypergradient(problem: TabularBilevelProblem, x: np.ndarray, penalty_lambda: float,
                                  phi: list[np.ndarray], theta: list[np.ndarray], batch: int, steps: int,
                                  rng: np.random.Generator, common_random_numbers: bool = True) -> np.ndarray:
    """h (module docstring) from `steps` steps of `batch` walkers per actor, with the actors' policies fixed
    (`phi[c]`, `theta[c]`: [S, A] per context); with `common_random_numbers` both actors' walkers draw one stream."""
    seed = int(rng.integers(2**63)) if common_random_numbers else None
    runs = {}
    for name, policies in (("phi", phi), ("theta", theta)):
        stream = np.random.default_rng(seed) if common_random_numbers else rng
        walkers = EpisodicWalkers(problem, batch, stream)
        visits = [walkers.step(policies, stream) for _ in range(steps)]
        runs[name] = _visit_weights(problem, walkers, visits)
    return _penalty_direction(problem, x, penalty_lambda, runs["phi"], runs["theta"])


def penalty_hypergradient(problem: TabularBilevelProblem, x: np.ndarray, tau: float, penalty_lambda: float
                          ) -> np.ndarray:
    """h with both actors at their exact soft optima (phi on r_x, theta on r_x + u_x / lambda) and exact visits."""
    weights = {}
    for name, bonus in (("phi", 0.0), ("theta", 1.0 / penalty_lambda)):
        weights[name] = []
        for c, (ctx, r, u) in enumerate(zip(problem.contexts, problem.follower_rewards(x), problem.leader_rewards(x))):
            pi = soft_value_iteration(ctx.mdp, r + bonus * u, tau)[2]
            weights[name].append(problem.weights[c] * discounted_visits(ctx.mdp, pi)[:, None] * pi)
    return _penalty_direction(problem, x, penalty_lambda, weights["phi"], weights["theta"])


def _penalty_direction(problem, x, penalty_lambda, w_phi, w_theta) -> np.ndarray:
    h = np.zeros(problem.dim)
    for c in range(len(problem.contexts)):
        h += penalty_lambda * problem.incentive.vjp(x, c, w_theta[c] - w_phi[c])
        if problem.leader_cost is not None:
            h += problem.leader_cost.vjp(x, c, w_theta[c])
    return h


class EmpiricalModel:
    """Every transition seen so far, per context: counts N_c(s, a, s'), and P_hat = N / N(s, a). The counts are kept
    over each (s, a)'s possible successors (the walkers' successor table, a storage layout: only observed moves carry
    mass). An (s, a) never seen is taken to stay in s."""

    def __init__(self, walkers: EpisodicWalkers):
        self.succ = walkers.succ  # [C, S, A, K]
        self.counts = np.zeros(self.succ.shape)
        self._contexts = np.arange(self.succ.shape[0])[:, None, None, None]

    def add(self, c: np.ndarray, s: np.ndarray, a: np.ndarray, nxt: np.ndarray) -> None:
        slot = (self.succ[c, s, a] == nxt[:, None]).argmax(-1)
        np.add.at(self.counts, (c, s, a, slot), 1.0)

    def expected_next(self, V: np.ndarray) -> np.ndarray:
        """E_{s' ~ P_hat_c(.|s, a)}[V[..., c, s']] for values V [..., C, S]: [..., C, S, A]."""
        n = self.counts.sum(-1)
        seen = (V[..., self._contexts, self.succ] * self.counts).sum(-1) / np.maximum(n, 1.0)
        return np.where(n > 0, seen, V[..., None])


class _Actors:
    """Tabular softmax actors phi and theta (logits [2, C, S, A], one table per context), each with a soft Q-table
    evaluated on the empirical model.

    Critic: backups Q <- r + gamma E_{P_hat}[V], V(s) = E_pi[Q - tau log pi], none past a terminal state. Tabular
    LSTD-Q has this fixed point (policy evaluation on the empirical model), so each backup uses every transition seen
    so far: the reward moves with x, the dynamics do not. Actor: the entropy-regularized natural policy gradient step
    (Cen et al., 2021) logits <- (1 - a) logits + a Q / tau, at every state; a = 1 is soft policy iteration."""

    def __init__(self, problem: TabularBilevelProblem):
        C, (S, A) = len(problem.contexts), problem.shape
        self.logits = np.zeros((2, C, S, A))
        self.Q = np.zeros((2, C, S, A))
        gamma = np.array([c.mdp.gamma for c in problem.contexts])  # [C]
        live = np.stack([~c.mdp.terminal if c.mdp.terminal is not None else np.ones(S, dtype=bool)
                         for c in problem.contexts])  # [C, S]
        self.bootstrap = (gamma[:, None] * live)[..., None]  # [C, S, 1]

    def policies(self) -> tuple[np.ndarray, np.ndarray]:
        z = self.logits - self.logits.max(-1, keepdims=True)
        log_pi = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return np.exp(log_pi), log_pi

    def update(self, model: EmpiricalModel, rewards: np.ndarray, tau: float, actor_step: float, sweeps: int,
               pi: np.ndarray, log_pi: np.ndarray) -> None:
        """`sweeps` critic backups on `model`, then one actor step. `rewards`: [2, C, S, A], what phi and theta
        maximize; `pi`, `log_pi`: `policies()` of the current logits."""
        for _ in range(sweeps):
            V = (pi * (self.Q - tau * log_pi)).sum(-1)  # [2, C, S]
            self.Q = rewards + self.bootstrap * model.expected_next(V)
        self.logits = (1.0 - actor_step) * self.logits + actor_step * self.Q / tau


def sampled_single_loop(problem: TabularBilevelProblem, x0: np.ndarray, iterations: int, batch: int, tau,
                        penalty_lambda: float, reward_learning_rate: float, actor_step: float = 0.5,
                        critic_sweeps: int = 1, explore: int = 0, seed: int = 0, max_grad_norm: float | None = 1.0,
                        record_every: int = 100, value_tau: float | None = None,
                        common_random_numbers: bool = True) -> dict:
    """The penalty actor-critic on a `TabularBilevelProblem`, from samples only. Per iteration: each actor's `batch`
    walkers take one step (one transition each), plus `explore` exploring starts (`EpisodicWalkers.explore`); every
    transition enters the empirical model; the critics take `critic_sweeps` backups on it and the actors one natural
    step (`_Actors`); x ascends the penalty direction estimated from this iteration's on-policy visits (global-norm
    clip, as HPGD's optimizer). With `common_random_numbers`, theta's walkers draw the same uniforms as phi's: while
    the two policies agree their visits coincide, so the lambda-weighted difference of the two has far less variance
    (each set of walkers is still an on-policy sample of its own actor). `tau` is a float or a function of the
    iteration. Returns the final x, the actors' final policies (`phi`, `theta`: [C, S, A]), the `EmpiricalModel`, the
    exact value curve of x (every `record_every` iterations, under the best response at `value_tau`, by default the
    current tau) and the transitions used."""
    if not 0.0 < actor_step <= 1.0:
        raise ValueError(f"actor_step must be in (0, 1], got {actor_step}")
    if critic_sweeps < 1 or explore < 0:
        raise ValueError(f"critic_sweeps must be >= 1 and explore >= 0, got {critic_sweeps}, {explore}")
    # common random numbers: the same stream for both (a walker step draws a fixed number of uniforms)
    rng_phi = np.random.default_rng(seed)
    rng_theta = np.random.default_rng(seed if common_random_numbers else seed + 1_000_003)
    rng_explore = np.random.default_rng(seed + 2_000_006)
    actors = _Actors(problem)
    walkers = [EpisodicWalkers(problem, batch, rng_phi), EpisodicWalkers(problem, batch, rng_theta)]
    model = EmpiricalModel(walkers[0])
    x = np.asarray(x0, dtype=np.float64).copy()
    steps, values = [], []
    for t in range(iterations):
        tau_t = tau(t) if callable(tau) else tau
        if t % record_every == 0:
            steps.append(t)
            values.append(problem.value(x, tau_t if value_tau is None else value_tau))
        pi, log_pi = actors.policies()
        r = np.stack(problem.follower_rewards(x))
        u = np.stack(problem.leader_rewards(x))
        visits = [walkers[0].step(pi[0], rng_phi), walkers[1].step(pi[1], rng_theta)]
        for transitions in visits + ([walkers[0].explore(explore, rng_explore)] if explore else []):
            model.add(*transitions)
        actors.update(model, np.stack([r, r + u / penalty_lambda]), tau_t, actor_step, critic_sweeps, pi, log_pi)
        h = _penalty_direction(problem, x, penalty_lambda, _visit_weights(problem, walkers[0], [visits[0]]),
                               _visit_weights(problem, walkers[1], [visits[1]]))
        if not (np.all(np.isfinite(h)) and np.all(np.isfinite(actors.Q))):
            raise FloatingPointError(f"sampled_single_loop: a non-finite direction or critic at iteration {t}")
        x = clipped_ascent_step(x, h, reward_learning_rate, max_grad_norm)
    pi, _ = actors.policies()
    return {"x": x, "phi": pi[0], "theta": pi[1], "model": model, "steps": steps, "values": values,
            "transitions": (2 * batch + explore) * iterations}


def sampled_penalty_ascent(problem: TabularBilevelProblem, x0: np.ndarray, tau: float, penalty_lambda: float,
                           learning_rate: float, iterations: int, batch: int, steps: int, seed: int = 0,
                           max_grad_norm: float | None = 1.0, record_every: int = 1,
                           common_random_numbers: bool = True) -> dict:
    """HPGD's protocol with the penalty direction: per iteration the followers play their exact soft best responses
    (phi to r_x, theta to r_x + u_x / lambda: the lower level from the model, as in HPGD's code), and the direction
    is estimated from `steps` steps of `batch` walkers per actor (`sampled_penalty_hypergradient`); x ascends it with
    a global-norm clip. Returns the final x, the exact value curve (every `record_every` iterations, before each step)
    and the transitions used."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x0, dtype=np.float64).copy()
    steps_recorded, values = [], []
    for t in range(iterations):
        rewards, leader = problem.follower_rewards(x), problem.leader_rewards(x)
        phi = [soft_value_iteration(c.mdp, r, tau)[2] for c, r in zip(problem.contexts, rewards)]
        theta = [soft_value_iteration(c.mdp, r + u / penalty_lambda, tau)[2]
                 for c, r, u in zip(problem.contexts, rewards, leader)]
        if t % record_every == 0:
            steps_recorded.append(t)
            values.append(problem.value(x, tau, policies=phi))
        h = sampled_penalty_hypergradient(problem, x, penalty_lambda, phi, theta, batch, steps, rng,
                                          common_random_numbers)
        if not np.all(np.isfinite(h)):
            raise FloatingPointError(f"sampled_penalty_ascent: a non-finite direction at iteration {t}")
        x = clipped_ascent_step(x, h, learning_rate, max_grad_norm)
    return {"x": x, "value": problem.value(x, tau), "steps": steps_recorded, "values": values,
            "transitions": 2 * batch * steps * iterations}
