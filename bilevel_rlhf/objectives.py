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

A pair the oracle did not answer (it abstained, or the call failed) enters no estimate: the trainer calls an
objective on the answered pairs alone (`answered_x_loss`, `answered_completion_values`, `answered_value`), so an
objective never sees a mask, and g = 0 for a completion whose pair has no answer.
"""

from __future__ import annotations

import torch

__all__ = ["OBJECTIVES", "PreferenceNLL", "UpperObjective", "WinRate", "answered_completion_values",
           "answered_completions", "answered_value", "answered_x_loss", "get_objective"]


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


# ---------------------------------------------------------------------------------------------------- answered pairs
def answered_completions(answered: torch.Tensor, against_reference: bool) -> torch.Tensor:
    """Which of the policy's compared completions are in an answered pair, in row order: completion p of pair p
    (against the reference), or completions 2p and 2p + 1 of pair p."""
    return answered if against_reference else answered.repeat_interleave(2)


def answered_x_loss(objective: UpperObjective, pair_loss: torch.Tensor, labels: torch.Tensor,
                    answered: torch.Tensor) -> torch.Tensor:
    """`objective.x_loss` on the answered pairs alone; with none, a zero that keeps the graph (so every process
    runs the same backward)."""
    if not bool(answered.any()):
        return pair_loss.sum() * 0.0
    return objective.x_loss(pair_loss[answered], labels[answered])


def answered_completion_values(objective: UpperObjective, pair_loss: torch.Tensor, labels: torch.Tensor,
                               answered: torch.Tensor) -> torch.Tensor:
    """g: `objective.completion_values` of the answered pairs' completions, 0 for the others (no oracle term)."""
    rows = answered_completions(answered, objective.against_reference)
    g = torch.zeros(rows.shape, dtype=pair_loss.dtype, device=pair_loss.device)
    if bool(answered.any()):
        values = objective.completion_values(pair_loss[answered], labels[answered])
        if not isinstance(values, torch.Tensor) or values.shape != (int(rows.sum()),):
            raise ValueError(
                f"objective {objective.name!r}: completion_values must return one value per completion of theta "
                f"compared (shape ({int(rows.sum())},)), got {getattr(values, 'shape', type(values).__name__)}"
            )
        g[rows] = values.detach().to(g.dtype)
    return g


def answered_value(objective: UpperObjective, pair_loss: torch.Tensor, labels: torch.Tensor,
                   answered: torch.Tensor) -> torch.Tensor:
    """`objective.value` on the answered pairs alone (NaN with none)."""
    if not bool(answered.any()):
        return torch.tensor(float("nan"))
    return objective.value(pair_loss[answered], labels[answered])
