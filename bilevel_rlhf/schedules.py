"""tau, lambda and step-size schedules: pure functions of the iteration k (so checkpoints only need k), and the one
schedule that is not: `AdaptiveTau`, which steers tau to a target KL (its value is checkpointed)."""

from __future__ import annotations

import math


def tau_at(k: int, tau_init: float, tau_min: float, schedule: str, decay_rate: float, horizon: float) -> float:
    """Regularization weight tau_k, non-increasing in k and floored at tau_min.

    constant: tau_0; polynomial: tau_0 (1 + k/k_0)^(-c); exponential: tau_0 exp(-c k/k_0).
    """
    if schedule == "constant":
        tau = tau_init
    elif schedule == "polynomial":
        tau = tau_init * (1.0 + k / horizon) ** (-decay_rate)
    elif schedule == "exponential":
        tau = tau_init * math.exp(-decay_rate * k / horizon)
    else:
        raise ValueError(f"tau_schedule must be one of constant, polynomial, exponential, got {schedule!r}")
    return max(tau, tau_min)


class AdaptiveTau:
    """tau steered to a target KL to the reference: the adaptive KL controller of Ziegler et al. (2019), as TRL's
    former `AdaptiveKLController`. After each rollout with measured sequence KL `kl`,

        tau <- max(tau_min, tau * (1 + clip(kl / target - 1, -0.2, 0.2) / horizon))

    so tau grows while the policy is further from the reference than the target, and shrinks while it is closer;
    `horizon` (iterations) sets how fast."""

    def __init__(self, tau_init: float, target_kl: float, horizon: float, tau_min: float = 0.0):
        self.value, self.target, self.horizon, self.tau_min = float(tau_init), float(target_kl), float(horizon), tau_min

    def update(self, kl: float) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value = max(self.tau_min, self.value * (1.0 + error / self.horizon))
        return self.value


def lambda_at(k: int, lambda_init: float, schedule: str, growth: float, horizon: float, lambda_max: float | None) -> float:
    """Penalty coefficient lambda_k, non-decreasing in k: constant lambda_0 or lambda_0 (1 + k/k_0)^g, capped."""
    if schedule == "constant":
        lam = lambda_init
    elif schedule == "polynomial":
        lam = lambda_init * (1.0 + k / horizon) ** growth
    else:
        raise ValueError(f"penalty_lambda_schedule must be constant or polynomial, got {schedule!r}")
    return lam if lambda_max is None else min(lam, lambda_max)


def lr_factor(k: int, schedule: str, decay: float, horizon: float) -> float:
    """Multiplier of a base learning rate at iteration k: 1, or (1 + k/k_0)^(-c)."""
    if schedule == "constant":
        return 1.0
    if schedule == "polynomial":
        return (1.0 + k / horizon) ** (-decay)
    raise ValueError(f"learning-rate schedule must be constant or polynomial, got {schedule!r}")


def warmup_weight(k: int, warmup_iterations: float) -> float:
    """Weight of the covariance term at iteration k: min(1, k / K) over a warmup of K iterations (K = 0: 1)."""
    return 1.0 if warmup_iterations <= 0 else min(1.0, k / warmup_iterations)
