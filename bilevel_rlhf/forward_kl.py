"""The forward KL from pi*_tau(x) to theta, estimated on the reference's completions (`forward_kl_coef`).

pi*_tau(x)(y) ∝ pi_ref(y) exp(r_x(y) / tau) is theta's lower-level target (for the penalized theta, the
lambda -> infinity limit of its target). PPO follows it through the reverse KL, whose sampled gradient on a
completion y is proportional to theta(y): once theta is nearly deterministic, the completions it makes rare get no
gradient, and a target that spreads onto them is not followed (docs/panel.md, the collapse). The forward KL has the
same minimizer, theta = pi*_tau(x), and a gradient that does not vanish there:

    KL(pi* || theta) = -H(pi*) - E_{pi*}[log theta(y)],    E_{pi*}[h] = E_{pi_ref}[h exp(r_x / tau)] / E_{pi_ref}[exp(r_x / tau)],

estimated self-normalized on the reference's N completions y_i of the iteration: -sum_i w_i log theta(y_i), with
w = softmax(r_x(y_i) / tau_k) over this process's rows (consistent as N grows; O(1/N) biased, as every
self-normalized estimate). Written here because neither TRL nor transformers has it.
"""

from __future__ import annotations

import torch

__all__ = ["forward_kl_loss"]


def forward_kl_loss(logprobs: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, tau: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(-sum_i w_i log theta(y_i), the weights' effective sample fraction 1 / (N sum_i w_i^2)).

    logprobs: [N, T] theta's token log-probs on the reference's completions (with their graph); mask: [N, T] their
    tokens; scores: [N] r_x of each (no graph); tau: tau_k > 0.
    """
    if not tau > 0:
        raise ValueError(f"forward_kl_coef needs tau_k > 0, got {tau}")
    w = torch.softmax(scores.detach().double() / tau, 0)
    seq = (logprobs * mask).sum(1)
    return -(w.to(seq.dtype) * seq).sum(), 1.0 / (len(w) * (w**2).sum())
