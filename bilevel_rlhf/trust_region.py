"""A trust region on the reward model's steps, measured in what the lower level sees: the tilt r_x / tau_k.

The regularized lower-level optimum is pi*_tau(y) ∝ pi_ref(y) exp(r_x(y) / tau), so an x step moves the actors'
target by the change of r_x(y) / tau_k. A step that changes it by a lot moves the target faster than the actors can
follow, and at a small tau a fixed learning rate does exactly that. `RewardTrustRegion` measures each x step's
largest change of r_x / tau_k over the rollout's completions (every role's, every process) and, above
`reward_trust_region` = delta, scales the step back:

    x <- x_old + (delta / change) * (x_new - x_old)

exact for a reward linear in x (a table), first order for a network. The optimizer's moments are left as they are.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

__all__ = ["RewardTrustRegion"]


class RewardTrustRegion(TrainerCallback):
    """Caps every optimizer step of x at a change of `delta` in max_y |r_x(y)| / tau_k on the rollout's completions."""

    def __init__(self, trainer, delta: float):
        self.trainer, self.delta = trainer, float(delta)
        self._before = None

    def _model(self):
        return self.trainer._unwrapped_model()

    @torch.no_grad()
    def _scores(self) -> torch.Tensor:
        buf = self.trainer._buffer  # every role's rows share one width, as in the rollout's own scoring pass
        with self.trainer._full_parameters():  # FSDP2: r_x whole for this pass outside the wrapper's forward
            return self._model().reward_forward(
                torch.cat([buf.completions(r).reward_input_ids for r in buf.generators]),
                torch.cat([buf.completions(r).reward_attention_mask for r in buf.generators]),
            )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = [p for p in self._model().role_parameters()["reward"] if p.grad is not None]
        self._before = (params, [p.detach().clone() for p in params], self._scores()) if params else None

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._before is None:
            return
        params, old, scores = self._before
        self._before = None
        tau = self.trainer._buffer.tau
        change = ((self._scores() - scores).abs().max() / tau).reshape(1)
        change = float(self.trainer.accelerator.gather(change).max())  # one decision on every process
        scale = min(1.0, self.delta / change) if change > 0 else 1.0
        if scale < 1.0:
            for p, p_old in zip(params, old):
                p.copy_(p_old + scale * (p - p_old))
        metrics = self.trainer._metrics
        metrics["reward/tilt_change"].append(change)
        metrics["reward/trust_scale"].append(scale)
