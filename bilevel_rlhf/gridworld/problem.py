"""The goal-position bilevel problem on a grid: reward parameterizations, designer cost, Phi,
Phi_tau, the exact hypergradient and the global search for the best Phi.

Upper variable x places the agent's goal:
- ``position``: x in R^2 is a continuous (row, col) goal position and
  r_x(s, a) = R * exp(-||coords_s - x||^2 / (2 sigma^2)) (a radial reward bump);
- ``cells``: x in R^S are logits of a goal-placement distribution, r_x(s, a) = R * softmax(x)_s.
Designer (upper) objective f(x, pi) = E_{s~d^pi, a~pi}[u(s, a)] + c(x), with u = hazard_cost on
hazard cells, -target_bonus on target cells, and the placement cost c(x) = kappa * (expected)
squared distance of the goal to the target's centre (it pulls the goal toward the target).
Phi(x) = f(x, pi*_0(x)) (hard optimum, uniform tie-breaking), Phi_tau(x) = f(x, pi*_tau(x)).
"""

from dataclasses import dataclass, field

import numpy as np

from .mdp import GridMDP
from .solvers import (
    hard_value_iteration,
    objective,
    occupancy,
    policy_evaluation,
    reward_adjoint,
    soft_value_iteration,
    softmax,
)

PARAMETERIZATIONS = ("position", "cells")


@dataclass
class GoalProblem:
    """A goal-placement instance; all arrays float64."""

    grid: GridMDP
    parameterization: str = "position"
    reward_scale: float = 1.0  # R
    bump_width: float = 1.0  # sigma of the radial bump (position parameterization)
    hazard_cost: float = 1.0  # u on hazard cells
    target_bonus: float = 1.0  # -u on target cells
    placement_weight: float = 0.01  # kappa in c(x)
    designer_cost: np.ndarray = field(init=False, repr=False)  # u [S, A]
    center: np.ndarray = field(init=False, repr=False)  # target centre [2]

    def __post_init__(self) -> None:
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {self.parameterization!r}")
        for name in ("reward_scale", "bump_width"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("hazard_cost", "target_bonus", "placement_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        g = self.grid
        if not g.target.any():
            raise ValueError("the layout needs at least one target cell 'T'")
        u = self.hazard_cost * g.hazard - self.target_bonus * g.target
        self.designer_cost = np.repeat(u[:, None].astype(np.float64), self.mdp.n_actions, axis=1)
        self.center = g.coords[g.target].mean(0)
        self._box = np.array(g.shape, dtype=np.float64) - 1.0  # the board's far corner (project)

    @property
    def mdp(self):
        return self.grid.mdp

    @property
    def dim(self) -> int:
        """Dimension of x."""
        return 2 if self.parameterization == "position" else self.mdp.n_states

    def check_x(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"x must have last dimension {self.dim} ({self.parameterization}), got shape {x.shape}")
        return x

    def project(self, x: np.ndarray) -> np.ndarray:
        """Projection onto the feasible set: the board box [0, n_rows-1] x [0, n_cols-1] for
        'position' (off the board the bump fades and every gradient vanishes), identity for 'cells'."""
        if self.parameterization == "position":
            return np.clip(x, 0.0, self._box)
        return x

    # ----- reward r_x and its vector-Jacobian product -----
    def goal_weights(self, x: np.ndarray) -> np.ndarray:
        """w_x(s) with r_x(s, a) = R * w_x(s); shape [..., S]."""
        if self.parameterization == "position":
            sq = ((self.grid.coords - x[..., None, :]) ** 2).sum(-1)
            return np.exp(-sq / (2.0 * self.bump_width**2))
        return softmax(x)

    def reward(self, x: np.ndarray) -> np.ndarray:
        """r_x [..., S, A] (the goal reward does not depend on the action)."""
        w = self.reward_scale * self.goal_weights(self.check_x(x))
        return np.repeat(w[..., None], self.mdp.n_actions, axis=-1)

    def reward_vjp(self, x: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """grad_x sum_{s,a} weights(s, a) r_x(s, a); with weights = d^pi pi this is grad_x E_pi[r_x]."""
        w_s = weights.sum(-1)  # the reward is action-independent
        g = self.goal_weights(x)
        if self.parameterization == "position":
            # d/dx exp(-|c - x|^2 / 2 s^2) = exp(.) (c - x) / s^2
            diff = self.grid.coords - x[..., None, :]
            return self.reward_scale * ((w_s * g)[..., None] * diff).sum(-2) / self.bump_width**2
        return self.reward_scale * (g * w_s - g * (g * w_s).sum(-1, keepdims=True))

    # ----- placement cost c(x) -----
    def _sq_dist_to_center(self) -> np.ndarray:
        return ((self.grid.coords - self.center) ** 2).sum(-1)

    def placement_cost(self, x: np.ndarray) -> np.ndarray:
        x = self.check_x(x)
        if self.parameterization == "position":
            return self.placement_weight * ((x - self.center) ** 2).sum(-1)
        return self.placement_weight * (softmax(x) * self._sq_dist_to_center()).sum(-1)

    def placement_grad(self, x: np.ndarray) -> np.ndarray:
        x = self.check_x(x)
        if self.parameterization == "position":
            return 2.0 * self.placement_weight * (x - self.center)
        p, q = softmax(x), self._sq_dist_to_center()
        return self.placement_weight * (p * q - p * (p * q).sum(-1, keepdims=True))

    # ----- upper objective -----
    def upper(self, x: np.ndarray, pi: np.ndarray) -> np.ndarray:
        """f(x, pi) = E_{d^pi, pi}[u] + c(x)."""
        d = occupancy(self.mdp, pi)
        return (d * (pi * self.designer_cost).sum(-1)).sum(-1) + self.placement_cost(x)

    def lower_policy(self, x: np.ndarray, tau: float, V0: np.ndarray | None = None) -> np.ndarray:
        """pi*_tau(x) (tau > 0: soft VI) or pi*_0(x) (tau = 0: hard VI with uniform tie-breaking)."""
        r = self.reward(x)
        if tau > 0:
            return soft_value_iteration(self.mdp, r, tau, V0=V0)[2]
        if tau == 0:
            return hard_value_iteration(self.mdp, r, V0=V0)[2]
        raise ValueError(f"tau must be >= 0, got {tau}")

    def phi(self, x: np.ndarray, tau: float = 0.0) -> np.ndarray:
        """Phi_tau(x) = f(x, pi*_tau(x)); tau = 0 gives the original Phi. Batched over x's leading dims."""
        x = self.check_x(x)
        return self.upper(x, self.lower_policy(x, tau))

    def hypergradient(self, x: np.ndarray, tau: float, V0: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """(Phi_tau(x), grad Phi_tau(x)) by implicit differentiation of the soft Bellman equation: df/dpi(a|s) =
        d(s) Q^u(s, a), pulled back to the reward by `solvers.reward_adjoint`, then to x by `reward_vjp`."""
        if not tau > 0:
            raise ValueError(f"tau must be > 0 for the hypergradient, got {tau}")
        x = self.check_x(x)
        if x.ndim != 1:
            raise ValueError(f"hypergradient takes a single x of shape [{self.dim}], got {x.shape}")
        mdp, u = self.mdp, self.designer_cost
        _, _, pi = soft_value_iteration(mdp, self.reward(x), tau, V0=V0)
        d = occupancy(mdp, pi)
        Qu, _ = policy_evaluation(mdp, pi, u)
        value = float((d * (pi * u).sum(-1)).sum() + self.placement_cost(x))
        g_r = reward_adjoint(mdp, pi, d[:, None] * Qu, tau)  # df/dpi = d(s) Q^u(s, a), pulled back to r
        return value, self.reward_vjp(x, g_r) + self.placement_grad(x)

    # ----- penalty (reformulation) quantities, exact -----
    def penalty(self, x: np.ndarray, theta_pi: np.ndarray, tau: float, lam: float) -> float:
        """lambda * (max_phi J_tau(x, phi) - J_tau(x, theta)) >= 0, with the max by soft VI."""
        r = self.reward(x)
        _, V, _ = soft_value_iteration(self.mdp, r, tau)
        best = (1.0 - self.mdp.gamma) * float(self.mdp.rho @ V)
        return lam * (best - float(objective(self.mdp, theta_pi, r, tau)))

    def penalty_hypergradient(self, x: np.ndarray, tau: float, lam: float) -> np.ndarray:
        """grad_x of the penalty value function with both actors at their exact optima:
        grad c(x) + lam * (E_{d^phi}[grad r_x] - E_{d^theta}[grad r_x]),
        phi = pi*_tau(r_x), theta = pi*_tau(r_x - u / lam). It tends to grad Phi_tau(x) as lam grows."""
        x = self.check_x(x)
        r = self.reward(x)
        pi_phi = soft_value_iteration(self.mdp, r, tau)[2]
        pi_theta = soft_value_iteration(self.mdp, r - self.designer_cost / lam, tau)[2]
        w_phi = occupancy(self.mdp, pi_phi)[:, None] * pi_phi
        w_theta = occupancy(self.mdp, pi_theta)[:, None] * pi_theta
        return self.placement_grad(x) + lam * self.reward_vjp(x, w_phi - w_theta)


def position_grid(problem: GoalProblem, step: float) -> np.ndarray:
    """All goal positions on a regular grid of spacing ``step`` covering the board, [N, 2]."""
    n_rows, n_cols = problem.grid.shape
    rows = np.arange(0.0, n_rows - 1 + 1e-9, step)
    cols = np.arange(0.0, n_cols - 1 + 1e-9, step)
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)


def batched_phi(problem: GoalProblem, xs: np.ndarray, tau: float = 0.0, chunk: int = 256) -> np.ndarray:
    """Phi_tau at many x at once (exact), in chunks to bound memory."""
    return np.concatenate([problem.phi(xs[i : i + chunk], tau) for i in range(0, len(xs), chunk)])


def global_search(problem: GoalProblem, step: float = 0.25, refine_step: float = 0.05, n_starts: int = 8,
                  tau_descent: float = 0.05, descent_steps: int = 300, lr: float = 1.0, seed: int = 0) -> dict:
    """Best Phi (tau = 0) found by a global search; returns {"x": best x, "phi": best Phi, "method": ...}.

    position: a dense grid of spacing ``step`` over the board, refined with spacing ``refine_step``
    in the +-step box around the best point (Phi is piecewise smooth, with jumps where pi*_0 switches).
    cells: every one-hot-like placement (logit 8 on one cell), then exact-gradient descent on
    Phi_tau (tau_descent) from the ``n_starts`` best of those and from random logits, evaluated on Phi.
    """
    if problem.parameterization == "position":
        xs = position_grid(problem, step)
        vals = batched_phi(problem, xs)
        best = xs[np.argmin(vals)]
        fine = np.arange(-step, step + 1e-9, refine_step)
        local = best + np.stack(np.meshgrid(fine, fine, indexing="ij"), -1).reshape(-1, 2)
        xs, vals = np.concatenate([xs, local]), np.concatenate([vals, batched_phi(problem, local)])
        i = int(np.argmin(vals))
        return {"x": xs[i], "phi": float(vals[i]), "method": f"dense grid, step {step}, refined {refine_step}"}
    S = problem.mdp.n_states
    onehot = 8.0 * np.eye(S)[~problem.grid.wall]
    vals = batched_phi(problem, onehot)
    rng = np.random.default_rng(seed)
    starts = list(onehot[np.argsort(vals)[:n_starts]]) + list(rng.normal(size=(n_starts, S)))
    cands, cvals = [onehot[np.argmin(vals)]], [float(vals.min())]
    for x in starts:
        x = x.copy()
        for _ in range(descent_steps):
            x -= lr * problem.hypergradient(x, tau_descent)[1]
        cands.append(x)
        cvals.append(float(problem.phi(x)))
    i = int(np.argmin(cvals))
    return {"x": cands[i], "phi": cvals[i],
            "method": f"one-hot placements + {2 * n_starts} exact-gradient descents on Phi_tau (tau={tau_descent})"}
