"""`kl_estimator="exact"` on the multi-token testbed: the actor's gradient averages to the exact gradient of its
KL-regularized objective over the 85 completions (as the k1 estimator's does), with less variance; under the
advantages' whitening the exact KL term keeps the policy-gradient term's units."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from bilevel_rlhf import BilevelConfig, BilevelTrainer
from bilevel_rlhf import testbed as T
from bilevel_rlhf import trainer as trainer_module

torch.set_num_threads(1)  # tiny models on shared cores
TAU, PROMPTS, ROLLOUTS = 0.5, 256, 10


@pytest.fixture(scope="module")
def problem():
    return T.MultiTokenProblem.from_policy(T.make_policy(seed=0), seed=0)


def _trainer(tmp_path, problem, kl_estimator, fuse=True, x_scale=1.0, advantage_estimator="gae"):
    """covariance (theta's reward is r_x alone), no critic loss and lam = 1: the PPO loss at ratio 1 is a plain
    policy gradient whose baseline is the critic's value; theta moved away from the reference. Fused (the default),
    the loss's forward pass completes the rollout; unfused, the rollout carries its advantages and kl_coef."""
    args = BilevelConfig(output_dir=str(tmp_path), per_device_train_batch_size=2 * PROMPTS, max_completion_length=3,
                         max_prompt_length=4, method="covariance", objective="win_rate", tau_init=TAU,
                         tau_schedule="constant", vf_coef=0.0, gamma=1.0, lam=1.0, use_cpu=True, report_to="none",
                         seed=0, kl_estimator=kl_estimator, fuse_rollout_and_update=fuse,
                         advantage_estimator=advantage_estimator)
    x = x_scale * np.random.default_rng(3).normal(size=85)
    trainer = BilevelTrainer(T.make_policy(seed=0), T.TableReward(x), problem.oracle(), args,
                             Dataset.from_dict({"prompt": [T.PROMPT] * PROMPTS}), processing_class=T.make_tokenizer())
    with torch.no_grad():
        head = trainer.model.policy_theta.lm_head.weight
        head[:, 1:].add_(0.5 * torch.randn(head[:, 1:].shape, generator=torch.Generator().manual_seed(10)))
    return trainer, torch.as_tensor(x)


def _exact_gradient(trainer, problem, x, tau=TAU):
    """-grad J(theta), J = E_pi[x_y] - tau KL(pi || pi_ref) over whole completions, by enumeration with autograd."""
    model = trainer.model.policy_theta
    width = max(len(c) for c in problem.completions)
    ids = torch.full((len(problem.completions), 1 + width), T.PAD_ID)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(problem.completions):
        ids[i, : 1 + len(c)] = torch.tensor([T.PROMPT_ID, *c])
        mask[i, : 1 + len(c)] = 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].double(), -1)
    token = logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    log_pi = token.sum(1)
    pi = log_pi.exp()
    j = pi @ x.double() - tau * (pi @ (log_pi - torch.as_tensor(problem.log_pi_ref)))
    (grad,) = torch.autograd.grad(-j, model.lm_head.weight)
    return grad.numpy()


def _sampled_gradients(trainer, unscale):
    """The actor loss's gradient on lm_head per rollout, times the batch's tokens per completion (the loss is a token
    mean) and, with `unscale`, the whitening's scale tau / kl_coef."""
    head = trainer.model.policy_theta.lm_head.weight
    torch.manual_seed(4)
    grads = []
    for _ in range(ROLLOUTS):
        batch = trainer.generate_and_score([T.PROMPT] * PROMPTS)
        (grad,) = torch.autograd.grad(trainer.compute_loss(trainer.model, batch), head)
        factor = batch.theta.mask.sum() / len(batch.theta)
        if unscale:
            factor = factor * TAU / batch.theta.kl_coef[0]
        grads.append((grad * factor).double().numpy())
    return np.stack(grads)


@pytest.mark.parametrize("advantage_estimator", ["gae", "rloo"])
def test_both_estimators_are_unbiased_and_the_exact_one_has_less_variance(tmp_path, problem, monkeypatch,
                                                                         advantage_estimator):
    # whitening off (mean 0, scale 1): each rollout's gradient is then an unbiased estimate as it stands
    monkeypatch.setattr(trainer_module, "whitening_stats", lambda x, m, w=None: (torch.zeros(()), torch.ones(())))
    variance = {}
    for estimator in ("k1", "exact"):
        trainer, x = _trainer(tmp_path / estimator, problem, estimator, advantage_estimator=advantage_estimator)
        expected = _exact_gradient(trainer, problem, x)
        grads = _sampled_gradients(trainer, unscale=False)
        mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(ROLLOUTS)
        bad = np.abs(mean - expected) > 5 * se + 1e-4
        assert not bad.any(), (estimator, np.argwhere(bad), mean[bad], expected[bad], se[bad])
        variance[estimator] = grads.var(0, ddof=1).sum()
        # the KL's part of the gradient is far above the noise: a wrong or missing KL term is seen
        kl_part = expected - _exact_gradient(trainer, problem, x, tau=0.0)
        assert np.linalg.norm(kl_part) > 10 * np.linalg.norm(se), estimator
    if advantage_estimator == "gae":  # per-token credit: the future states' exact KL replaces sampled log-ratios
        assert variance["exact"] < 0.8 * variance["k1"], variance


def test_under_whitening_the_kl_term_keeps_the_advantages_units(tmp_path, problem):
    """The trainer whitens the advantages; the exact KL term is weighted by tau over the same scale, so that the
    gradient times that scale is still the unbiased estimate (up to the batch's own mean and scale, O(1/N))."""
    trainer, x = _trainer(tmp_path, problem, "exact", fuse=False, x_scale=4.0)  # whitening scale far from 1
    expected = _exact_gradient(trainer, problem, x)
    grads = _sampled_gradients(trainer, unscale=True)
    mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(ROLLOUTS)
    assert np.abs(mean - expected).max() < 5 * se.max() + 0.02 * np.abs(expected).max(), (mean, expected)
    batch = trainer.generate_and_score([T.PROMPT] * PROMPTS)
    coef = batch.theta.kl_coef
    assert bool((coef == coef[0]).all()) and float(coef[0]) < TAU / 2  # one weight per batch, the scale in play

