"""Your own tabular bilevel problem: contexts, terminal states, any differentiable reward and leader objective.

A leader chooses x; in each context c (weight w_c) a follower faces the MDP_c (transitions, start, discount,
terminal states) with the reward

    r_c(s, a) = follower_reward_c(s, a) + incentive(x, c)(s, a)

and plays its entropy-regularized best response pi*_{tau, c}(x) (soft-optimal: pi = softmax(Q / tau)). The leader
collects leader_reward_c(s, a) + leader_cost(x, c)(s, a) along the follower's trajectories, and its value is

    V(x) = sum_c w_c rho_c^T V_UL,c(x),   V_UL = sum_a pi(a|s) (u(s, a) + gamma P V_UL)   (leader maximizes V)

with plain discounted sums (no (1 - gamma) factor): the scale of episodic benchmarks such as HPGD's Four-Rooms.
`incentive` and `leader_cost` are `Parameterization`s, any function of x given with its vector-Jacobian product.
`TabularBilevelProblem.hypergradient` is exact (implicit differentiation of the soft Bellman equation, one adjoint
solve per context); `exact_ascent` climbs it. Dense numpy: the problems of this module have a few hundred states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .mdp import TabularMDP
from .solvers import discounted_visits, policy_evaluation, reward_adjoint, soft_value_iteration, softmax

__all__ = ["Context", "Parameterization", "TabularBilevelProblem", "bounded_incentive", "exact_ascent"]


@dataclass(frozen=True)
class Context:
    """One situation the follower may face: its MDP, its own reward, the leader's reward, and a weight."""

    mdp: TabularMDP
    follower_reward: np.ndarray  # [S, A], before the incentive
    leader_reward: np.ndarray  # [S, A], before the leader's x-dependent cost
    weight: float = 1.0  # relative probability of this context (normalized over the contexts)


@dataclass(frozen=True)
class Parameterization:
    """A differentiable map x -> [S, A] per context: `value(x, c)` and `vjp(x, c, g) = grad_x sum(g * value(x, c))`."""

    dim: int
    value: Callable[[np.ndarray, int], np.ndarray]
    vjp: Callable[[np.ndarray, int, np.ndarray], np.ndarray]


@dataclass
class TabularBilevelProblem:
    """A leader's x against soft-optimal followers in weighted contexts (see the module docstring)."""

    contexts: list[Context]
    incentive: Parameterization
    leader_cost: Parameterization | None = None
    check_gradients: bool = False  # compare every Parameterization's vjp with finite differences at construction
    x_check: np.ndarray | None = field(default=None, repr=False)  # where to check (default: a seeded random x)

    def __post_init__(self) -> None:
        if not self.contexts:
            raise ValueError("contexts must hold at least one Context")
        S, A = self.contexts[0].mdp.n_states, self.contexts[0].mdp.n_actions
        for i, c in enumerate(self.contexts):
            if not isinstance(c.mdp, TabularMDP):
                raise TypeError(f"contexts[{i}].mdp must be a TabularMDP, got {type(c.mdp).__name__}")
            if (c.mdp.n_states, c.mdp.n_actions) != (S, A):
                raise ValueError(f"contexts[{i}].mdp has {c.mdp.n_states} states x {c.mdp.n_actions} actions; "
                                 f"contexts[0] has {S} x {A}")
            for name in ("follower_reward", "leader_reward"):
                value = np.asarray(getattr(c, name))
                if value.shape != (S, A) or not np.all(np.isfinite(value)):
                    raise ValueError(f"contexts[{i}].{name} must be a finite [S, A] = [{S}, {A}] array, got shape "
                                     f"{value.shape}")
            if not (np.isfinite(c.weight) and c.weight > 0):
                raise ValueError(f"contexts[{i}].weight must be a finite probability weight > 0, got {c.weight}")
        total = sum(c.weight for c in self.contexts)
        self.weights = np.array([c.weight / total for c in self.contexts])
        self.shape = (S, A)
        x = np.random.default_rng(0).normal(size=self.incentive.dim) if self.x_check is None else self.x_check
        for name in ("incentive", "leader_cost"):
            param = getattr(self, name)
            if param is not None:
                _check_parameterization(name, param, x, len(self.contexts), self.shape, self.check_gradients)

    @property
    def dim(self) -> int:
        return self.incentive.dim

    def follower_rewards(self, x: np.ndarray) -> list[np.ndarray]:
        return [c.follower_reward + self.incentive.value(x, i) for i, c in enumerate(self.contexts)]

    def leader_rewards(self, x: np.ndarray) -> list[np.ndarray]:
        cost = (lambda i: self.leader_cost.value(x, i)) if self.leader_cost is not None else (lambda i: 0.0)
        return [c.leader_reward + cost(i) for i, c in enumerate(self.contexts)]

    def best_response(self, x: np.ndarray, tau: float) -> list[np.ndarray]:
        """pi*_{tau, c}(x) for every context c, each [S, A]."""
        if not tau > 0:
            raise ValueError(f"tau must be > 0 (the followers' entropy weight), got {tau}")
        return [soft_value_iteration(c.mdp, r, tau)[2] for c, r in zip(self.contexts, self.follower_rewards(x))]

    def value(self, x: np.ndarray, tau: float, policies: list[np.ndarray] | None = None) -> float:
        """V(x) = sum_c w_c rho_c^T V_UL,c under the followers' soft best responses (or the given `policies`)."""
        x = self._check_x(x)
        policies = self.best_response(x, tau) if policies is None else policies
        values = [float(c.mdp.rho @ policy_evaluation(c.mdp, pi, u)[1])
                  for c, pi, u in zip(self.contexts, policies, self.leader_rewards(x))]
        return float(self.weights @ values)

    def hypergradient(self, x: np.ndarray, tau: float) -> tuple[float, np.ndarray]:
        """(V(x), grad V(x)), exact. Per context: the direct term sum_{s,a} d(s) pi(a|s) grad_x u_x(s, a), and the
        follower's response: dV/dpi(a|s) = d(s) Q_UL(s, a) pulled back to its reward (`solvers.reward_adjoint`)
        and then to x through the incentive's VJP; d are the discounted visits."""
        x = self._check_x(x)
        value, grad = 0.0, np.zeros(self.dim)
        for i, (c, pi, u) in enumerate(zip(self.contexts, self.best_response(x, tau), self.leader_rewards(x))):
            Q_ul, V_ul = policy_evaluation(c.mdp, pi, u)
            d = discounted_visits(c.mdp, pi)
            g = self.incentive.vjp(x, i, reward_adjoint(c.mdp, pi, d[:, None] * Q_ul, tau))
            if self.leader_cost is not None:
                g = g + self.leader_cost.vjp(x, i, d[:, None] * pi)
            value += self.weights[i] * float(c.mdp.rho @ V_ul)
            grad += self.weights[i] * g
        return value, grad

    def _check_x(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dim,) or not np.all(np.isfinite(x)):
            raise ValueError(f"x must be a finite vector of shape [{self.dim}], got shape {x.shape}")
        return x


def _check_parameterization(name, param, x, n_contexts, shape, check_gradients, eps=1e-6, rtol=1e-4) -> None:
    """Shapes of value and vjp in every context; with `check_gradients`, the vjp against central differences along
    a random direction (<g, J v> must equal <J^T g, v>)."""
    rng = np.random.default_rng(1)
    for c in range(n_contexts):
        value = np.asarray(param.value(x, c))
        if value.shape != shape:
            raise ValueError(f"{name}.value(x, {c}) must have shape [S, A] = {list(shape)}, got {value.shape}")
        g = rng.normal(size=shape)
        vjp = np.asarray(param.vjp(x, c, g))
        if vjp.shape != (param.dim,):
            raise ValueError(f"{name}.vjp(x, {c}, g) must have shape [dim] = [{param.dim}], got {vjp.shape}")
        if check_gradients:
            v = rng.normal(size=param.dim)
            fd = float(np.sum(g * (np.asarray(param.value(x + eps * v, c)) - np.asarray(param.value(x - eps * v, c)))))
            fd /= 2 * eps
            if abs(fd - vjp @ v) > rtol * max(1.0, abs(fd)):
                raise ValueError(f"{name}.vjp disagrees with finite differences in context {c}: "
                                 f"<vjp(g), v> = {vjp @ v:.6g}, (value(x + eps v) - value(x - eps v)) . g / 2eps = "
                                 f"{fd:.6g}")


def bounded_incentive(cells: np.ndarray, n_actions: int, scale: float, zero_in: list[np.ndarray] | None = None
                      ) -> Parameterization:
    """HPGD's bounded incentive: x has one logit per cell in `cells` ([S] bool) plus a spare one ("unused budget"),
    and the incentive of cell s is `scale * softmax(x)_s`, paid for every action there (scale < 0: a penalty), so
    its l1 norm stays below |scale|. `zero_in[c]` ([S] bool) marks the cells where context c pays nothing."""
    cells = np.asarray(cells, dtype=bool)
    index = np.flatnonzero(cells)
    S = cells.shape[0]

    def per_state(x: np.ndarray, c: int) -> np.ndarray:
        out = np.zeros(S)
        out[index] = scale * softmax(x)[:-1]
        if zero_in is not None:
            out[zero_in[c]] = 0.0
        return out

    def value(x: np.ndarray, c: int) -> np.ndarray:
        return np.repeat(per_state(x, c)[:, None], n_actions, axis=1)

    def vjp(x: np.ndarray, c: int, g: np.ndarray) -> np.ndarray:
        g_s = np.asarray(g).sum(-1)
        if zero_in is not None:
            g_s = np.where(zero_in[c], 0.0, g_s)
        p = softmax(x)
        g_p = np.zeros_like(p)
        g_p[:-1] = scale * g_s[index]
        return p * (g_p - p @ g_p)  # through the softmax

    return Parameterization(dim=len(index) + 1, value=value, vjp=vjp)


def exact_ascent(problem: TabularBilevelProblem, x0: np.ndarray, tau: float, learning_rate: float, iterations: int,
                 max_grad_norm: float | None = 1.0, record_every: int = 1) -> dict:
    """Gradient ascent on V with the exact hypergradient: x <- x + lr * clip(grad V(x)), the global-norm clip of
    HPGD's optimizer. Returns the final x and the value curve (every `record_every` iterations, before each step)."""
    x = np.asarray(x0, dtype=np.float64).copy()
    steps, values = [], []
    for t in range(iterations):
        value, grad = problem.hypergradient(x, tau)
        if not (np.isfinite(value) and np.all(np.isfinite(grad))):
            raise FloatingPointError(f"exact_ascent: non-finite value or hypergradient at iteration {t}")
        if t % record_every == 0:
            steps.append(t)
            values.append(value)
        x = clipped_ascent_step(x, grad, learning_rate, max_grad_norm)
    return {"x": x, "value": problem.value(x, tau), "steps": steps, "values": values}


def clipped_ascent_step(x: np.ndarray, direction: np.ndarray, learning_rate: float, max_grad_norm: float | None
                        ) -> np.ndarray:
    """x + lr * direction, the direction first scaled to global norm <= max_grad_norm (HPGD's clip-then-SGD)."""
    norm = float(np.linalg.norm(direction))
    if max_grad_norm is not None and norm > max_grad_norm:
        direction = direction * (max_grad_norm / norm)
    return x + learning_rate * direction
