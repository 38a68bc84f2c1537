"""Upper-level objectives f(x, pi): what the reward model's parameters x are chosen for.

The lower level turns x into a policy pi*_tau(x); the upper level scores that policy with f. Every objective here is
estimated from oracle-labelled pairs of completions, and each pair's r_x BT-NLL ``pair_loss`` (differentiable in x)
and label (the probability that the pair's first completion is preferred). An objective supplies:

- which completions are compared: two of the policy's own per prompt (``against_reference = False``: completions
  (2i, 2i+1)), or each policy completion against a completion of the reference policy for the same prompt
  (``against_reference = True``: completion i with reference completion i);
- ``x_loss``: the part of f that depends on x, so that its gradient is grad_x f;
- ``completion_values``: g(y) = df/dpi(y) for each of the policy's compared completions, estimated from its pair.
  The penalized actor theta maximizes J_tau - f / lambda, so its terminal reward is r_x(y) - g(y) / lambda; the
  covariance hypergradient is (1/tau) Cov_y(grad_x r_x(y), g(y)).
- ``value``: the sample estimate of f (logged as ``objective/upper_loss``).

Write your own by subclassing `UpperObjective`; `bilevel_rlhf.bandit` and `bilevel_rlhf.testbed` give the closed
forms to check it against.
"""

from __future__ import annotations

import torch

__all__ = ["OBJECTIVES", "PreferenceNLL", "UpperObjective", "WinRate", "get_objective"]


class UpperObjective:
    """Interface of an upper-level objective (see the module docstring). Tensors: ``pair_loss`` and ``labels`` are
    ``[num_pairs]``; `completion_values` returns one value per compared policy completion, in row order."""

    name: str = "custom"
    against_reference: bool = False

    def x_loss(self, pair_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def completion_values(self, pair_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value(self, pair_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PreferenceNLL(UpperObjective):
    """f(x, pi) = E_{y, y' ~ pi}[BT-NLL of r_x on (y, y')]: r_x fits the oracle on the policy's own pairs (PARL).

    f is quadratic in pi, so df/dpi(y) = 2 E_{y'}[pair loss of (y, y')], estimated by twice the loss of y's pair.
    As tau -> 0 the policy becomes a point mass whose pairs are ties: Phi_0 = log 2 for every x.
    """

    name = "preference_nll"
    against_reference = False

    def x_loss(self, pair_loss, labels):
        return pair_loss.mean()

    def completion_values(self, pair_loss, labels):
        return 2.0 * pair_loss.detach().repeat_interleave(2)

    def value(self, pair_loss, labels):
        return pair_loss.mean()


class WinRate(UpperObjective):
    """f(x, pi) = E_{y ~ pi, y' ~ pi_ref}[w * BT-NLL(r_x on (y, y')) - P(y preferred to y')]: the policy's win rate
    against the reference, as the oracle judges it, plus w times r_x's fit on the same labelled pairs (one oracle
    query serves both). f is linear in pi: df/dpi(y) = w * pair loss - label."""

    name = "win_rate"
    against_reference = True

    def __init__(self, weight: float = 0.1):
        if not weight >= 0:
            raise ValueError(f"objective_weight must be >= 0, got {weight!r}")
        self.weight = float(weight)

    def x_loss(self, pair_loss, labels):
        return self.weight * pair_loss.mean()

    def completion_values(self, pair_loss, labels):
        return (self.weight * pair_loss - labels).detach()

    def value(self, pair_loss, labels):
        return (self.weight * pair_loss - labels).mean()


OBJECTIVES = ("preference_nll", "win_rate")


def get_objective(name: str, weight: float = 0.1) -> UpperObjective:
    """The built-in objective `name` (``objective`` in `BilevelConfig`), with ``objective_weight`` for win_rate."""
    if name == "preference_nll":
        return PreferenceNLL()
    if name == "win_rate":
        return WinRate(weight)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
