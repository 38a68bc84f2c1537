"""The trainer's reward-model step with an ideal actor, on one instance of the testbed panel.

At every iteration theta's completions are drawn from its exact target (`pi*_tau(x)` for `covariance` and
`partial_sgd`, the penalized policy for `penalized_covariance`), the oracle labels them as the panel's oracle does
(its expected label; `--labels bradley_terry` samples it), and x takes one AdamW step (lr `--reward_lr`, no weight
decay) on the trainer's own x-loss (`bilevel_rlhf.trainer.reward_model_loss`). What is left out is the actor's own
learning: a run of `BilevelTrainer` that falls short of this one loses it to its actor, not to x's estimate.

    python scripts/ideal_actor.py --instance 22 --methods partial_sgd covariance penalized_covariance --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from bilevel_rlhf import panel
from bilevel_rlhf.bandit import preference_matrix
from bilevel_rlhf.config import COVARIANCE_METHODS
from bilevel_rlhf.objectives import get_objective
from bilevel_rlhf.rl_utils import bradley_terry_loss
from bilevel_rlhf.schedules import warmup_weight
from bilevel_rlhf.trainer import reward_model_loss

METHODS = ("partial_sgd", "covariance", "penalized_covariance")


def actor_distribution(problem, x: np.ndarray, method: str, tau: float, lam: float, objective: str, weight: float):
    """theta's exact target at x: the penalized policy for penalized_covariance, pi*_tau(x) otherwise."""
    if method == "penalized_covariance":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a strict local maximum off the concave regime is still theta's target
            pi = problem.penalized_policy(x, lam, tau, objective=objective, weight=weight)
    else:
        pi = problem.soft_optimal_policy(x, tau)
    return pi / pi.sum()


def sampled_gradient(problem, x: np.ndarray, pi: np.ndarray, method: str, tau: float, lam: float, objective: str,
                     weight: float, prompts: int, rng: np.random.Generator, labels: str = "probability",
                     covariance_weight: float = 1.0, sample_temperature: float = 1.0) -> np.ndarray:
    """One iteration's x-gradient: 2 * `prompts` completions of theta drawn from `pi` (and as many of the reference
    for win_rate), labelled, through the trainer's x-loss. With `sample_temperature` T != 1 the labelled completions
    are drawn from q ∝ pi^(1/T) instead, and the x-loss's sample means become means weighted by pi / q (self-normalized
    importance weights): the same expectation, with the completions that pi makes rare sampled more often."""
    obj = get_objective(objective, weight)
    P = preference_matrix(problem.scores, problem.temperature)
    n = 2 * prompts
    q = pi ** (1.0 / sample_temperature)
    q = q / q.sum()
    y = rng.choice(len(pi), size=n, p=q)
    if obj.against_reference:
        a, b = y, rng.choice(len(pi), size=n, p=np.exp(problem.log_pi_ref) / np.exp(problem.log_pi_ref).sum())
    else:
        a, b = y[0::2], y[1::2]
    p = P[a, b]
    label = (rng.random(len(p)) < p).astype(float) if labels == "bradley_terry" else p
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor(label)
    pair_loss = bradley_terry_loss(xt[torch.as_tensor(a)], xt[torch.as_tensor(b)], lab)
    g = obj.completion_values(pair_loss, lab).detach()
    if sample_temperature == 1.0:
        loss = reward_model_loss(obj, method, pair_loss, lab, xt[torch.as_tensor(y)], None, lam, tau, g=g,
                                 covariance_weight=covariance_weight)
    else:
        loss = weighted_x_loss(obj, method, pair_loss, lab, xt[torch.as_tensor(y)], g, pi[y] / q[y], tau,
                               covariance_weight)
    (grad,) = torch.autograd.grad(loss, xt)
    return grad.numpy()


def weighted_x_loss(obj, method: str, pair_loss: torch.Tensor, labels: torch.Tensor, r_theta: torch.Tensor,
                    g: torch.Tensor, ratio: np.ndarray, tau: float, covariance_weight: float) -> torch.Tensor:
    """`reward_model_loss` for partial_sgd and the covariance methods with each sample mean replaced by a mean weighted
    by the self-normalized importance weights `ratio` = pi / q of theta's completions (a pair's weight: its
    completion's against the reference, the product of its two completions' otherwise)."""
    ratio = torch.as_tensor(ratio)
    pair_w = ratio if obj.against_reference else ratio[0::2] * ratio[1::2]
    pair_w = pair_w / pair_w.sum()
    loss = obj.x_loss(pair_loss * pair_w * len(pair_w), labels)  # x_loss is a constant times the pairs' mean
    if method in COVARIANCE_METHODS:
        w = pair_w if obj.against_reference else pair_w.repeat_interleave(2) / 2
        loss = loss + covariance_weight * (w * (g - (w * g).sum()) * r_theta).sum() / tau
    return loss


def run(problem, spec, method: str, seed: int, args: argparse.Namespace) -> list[dict]:
    """One run from x = 0: Phi_tau at the checkpoints."""
    rng = np.random.default_rng(seed)
    obj = dict(objective=spec.objective, weight=args.weight)
    x = torch.zeros(len(problem.scores), dtype=torch.float64, requires_grad=True)
    adam = torch.optim.AdamW([x], lr=args.reward_lr, betas=(0.9, args.adam_beta2), weight_decay=0.0)
    top = np.argsort(-problem.scores)[:3]
    rows = []
    for k in range(args.iterations + 1):
        xn = x.detach().numpy().copy()
        pi = actor_distribution(problem, xn, method, spec.tau, args.penalty_lambda, **obj)
        if k % args.every == 0 or k == args.iterations:
            rows.append({"method": method, "seed": seed, "iteration": k, "phi_tau": problem.phi_tau(xn, spec.tau, **obj),
                         "mode": int(pi.argmax()), "mode_probability": float(pi.max()),
                         # how often a rollout holds one of the three best-scored completions
                         "top3_per_iteration": float(2 * args.prompts * pi[top].sum())})
        if k == args.iterations:
            break
        x.grad = torch.from_numpy(sampled_gradient(problem, xn, pi, method, spec.tau, args.penalty_lambda,
                                                   prompts=args.prompts, rng=rng, labels=args.labels,
                                                   covariance_weight=warmup_weight(k, args.warmup * args.iterations),
                                                   sample_temperature=args.sample_temperature,
                                                   **obj))
        adam.step()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--panel", type=int, default=24, help="instances drawn (the panel's size)")
    p.add_argument("--panel_seed", type=int, default=0)
    p.add_argument("--instance", type=int, required=True)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=360)
    p.add_argument("--every", type=int, default=120, help="print Phi_tau every this many iterations")
    p.add_argument("--prompts", type=int, default=64, help="prompts per iteration (2 completions each)")
    p.add_argument("--reward_lr", type=float, default=1e-2)
    p.add_argument("--warmup", type=float, default=0.0,
                   help="hypergradient_warmup_ratio: the covariance term's weight rises 0 -> 1 over this fraction")
    p.add_argument("--sample_temperature", type=float, default=1.0,
                   help="label completions drawn from pi^(1/T), reweighted by importance weights (1: from pi)")
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--penalty_lambda", type=float, default=1.0)
    p.add_argument("--weight", type=float, default=0.1, help="objective_weight of win_rate")
    p.add_argument("--labels", choices=["probability", "bradley_terry"], default="probability",
                   help="the oracle's expected label (as the panel's oracle) or a sampled one")
    args = p.parse_args(argv)
    if not args.sample_temperature >= 1.0:
        raise SystemExit(f"--sample_temperature must be >= 1 (a flatter sample than theta's), got {args.sample_temperature}")
    try:
        spec = panel.drawn_instance(args.panel, args.panel_seed, args.instance)
    except ValueError as e:
        raise SystemExit(f"--{e}") from None
    _, problem = panel.build_instance(spec)
    print(spec)
    rows = [r for m in args.methods for s in args.seeds for r in run(problem, spec, m, s, args)]
    top = np.argsort(-problem.scores)[:3]
    print("the three best-scored completions: " + ", ".join(
        f"{i} (score {problem.scores[i]:.2f}, reference probability {np.exp(problem.log_pi_ref[i]):.1e})" for i in top))
    print("| method | seed | iteration | Phi_tau | theta's mode: completion (probability, score) "
          "| best three completions per rollout |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['seed']} | {r['iteration']} | {r['phi_tau']:.4f} | {r['mode']} "
              f"({r['mode_probability']:.2f}, {problem.scores[r['mode']]:.2f}) | {r['top3_per_iteration']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
