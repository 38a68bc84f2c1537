"""Guards of the bilevel loop: lost tracking and actor collapse, detected from each rollout's metrics.

- **Lost tracking** (two-actor penalty methods). phi is meant to maximize J_tau(x, .), so the penalty gap
  J_tau(x, phi) - J_tau(x, theta) is >= 0 when phi tracks. A gap below `-tracking_tolerance` for `tracking_patience`
  iterations in a row means theta beats phi at phi's own objective: phi has lost track, and x's penalty term
  lambda (E_phi[grad r_x] - E_theta[grad r_x]) turns r_x into a discriminator between the two actors' samples. The
  guard warns (:class:`TrackingWarning`, with the iteration and the gap) and, with `phi_resync=True`, copies theta's
  weights, value head and optimizer moments into phi before the next rollout: phi restarts from the better of the
  two, which is what the max over phi asks for.
- **Actor collapse** (every method). An actor whose mean token entropy falls below `collapse_entropy_fraction` times
  its entropy at the first iteration has collapsed onto a few strings: the guard warns (:class:`CollapseWarning`).

The counts are logged (`guard/*`) and checkpointed with the trainer's state.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch

__all__ = ["CollapseWarning", "GuardRecord", "TrackingGuard", "TrackingWarning", "copy_actor"]


class TrackingWarning(UserWarning):
    """phi lost track of the lower-level optimum: the measured penalty gap stayed negative."""


class CollapseWarning(UserWarning):
    """An actor's token entropy collapsed."""


@dataclass
class GuardRecord:
    """What the guards saw so far (checkpointed)."""

    negative_gap_iterations: int = 0  # iterations with penalty gap < -tracking_tolerance
    streak: int = 0  # the current run of such iterations
    longest_streak: int = 0
    phi_resyncs: int = 0
    collapses: int = 0  # iterations at which an actor was below the entropy floor
    initial_entropy: dict[str, float] = field(default_factory=dict)
    resync_due: bool = False

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict | None) -> "GuardRecord":
        return cls(**state) if state else cls()


class TrackingGuard:
    """Reads each rollout's gathered metrics (`check`) and repairs phi before the next rollout (`before_rollout`).
    Every process sees the same gathered metrics, so every process takes the same decision."""

    def __init__(self, tolerance: float, patience: int, resync: bool, collapse_fraction: float):
        self.tolerance, self.patience, self.resync = tolerance, patience, resync
        self.collapse_fraction = collapse_fraction
        self.record = GuardRecord()

    def check(self, metrics: dict[str, float], iteration: int) -> dict[str, float]:
        """Update the record from one rollout's metrics; return the `guard/*` metrics to log."""
        rec = self.record
        gap = metrics.get("objective/penalty_gap")
        if gap is not None:
            if gap < -self.tolerance:
                rec.negative_gap_iterations += 1
                rec.streak += 1
                rec.longest_streak = max(rec.longest_streak, rec.streak)
            else:
                rec.streak = 0
            if rec.streak == self.patience:
                action = "re-synchronising phi from theta" if self.resync else "set phi_resync=True to repair it"
                bound = f"-{self.tolerance:g}" if self.tolerance else "0"
                warnings.warn(
                    f"iteration {iteration}: phi lost track of the lower-level optimum: the penalty gap "
                    f"J(phi) - J(theta) = {gap:.4g} has been below {bound} for {rec.streak} iterations; {action}",
                    TrackingWarning,
                    stacklevel=2,
                )
                if self.resync:
                    rec.resync_due = True
                    rec.streak = 0
        for role in ("theta", "phi"):
            h = metrics.get(f"policy_{role}/entropy")
            if h is None:
                continue
            h0 = rec.initial_entropy.setdefault(role, h)
            if h < self.collapse_fraction * h0:
                rec.collapses += 1
                warnings.warn(
                    f"iteration {iteration}: {role} collapsed: its mean token entropy is {h:.4g}, below "
                    f"{self.collapse_fraction:g} x its initial {h0:.4g}",
                    CollapseWarning,
                    stacklevel=2,
                )
        logged = {"guard/collapses": float(rec.collapses)}
        if gap is not None:
            logged["guard/negative_gap_iterations"] = float(rec.negative_gap_iterations)
            logged["guard/phi_resyncs"] = float(rec.phi_resyncs)
        return logged

    def before_rollout(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Copy theta into phi if a resync is due."""
        if self.record.resync_due:
            copy_actor(model, optimizer, source="theta", target="phi")
            self.record.resync_due = False
            self.record.phi_resyncs += 1


def _role_parameters(model: torch.nn.Module, role: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of `role`'s actor and value head, names with the role removed, in a common order."""
    if model.use_peft:  # LoRA: the role's adapter weights ("...lora_A.<role>.weight")
        tag = f".{role}."
        params = [(n.replace(tag, ".<role>."), p) for n, p in model.policy_theta.named_parameters() if tag in n]
    else:
        policy = model.policy_phi if role == "phi" else model.policy_theta
        params = list(policy.named_parameters())
    params += [(f"value.{n}", p) for n, p in model.value_head(role).named_parameters()]
    return sorted(params, key=lambda item: item[0])


@torch.no_grad()
def copy_actor(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, source: str, target: str) -> None:
    """Copy `source`'s actor weights and value head into `target`'s (a `BilevelModel`), with their AdamW moments."""
    src, dst = _role_parameters(model, source), _role_parameters(model, target)
    if [n for n, _ in src] != [n for n, _ in dst]:
        raise RuntimeError(f"cannot copy {source} into {target}: their parameters differ")
    for (_, p), (_, q) in zip(src, dst):
        q.copy_(p)
        if optimizer is not None and p in optimizer.state:
            optimizer.state[q] = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
