"""`forward_kl_coef`: the forward KL from pi*_tau(x) to theta on the reference's completions. Its gradient is the
closed form theta - pi* on an enumerated categorical; in the trainer the part's loss is that estimate on the
rollout's reference completions, scored by the table reward and theta's exact log-probs (multi-token testbed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from bilevel_rlhf import BilevelConfig, BilevelTrainer
from bilevel_rlhf import testbed as T
from bilevel_rlhf.forward_kl import forward_kl_loss

torch.set_num_threads(1)


def test_gradient_is_theta_minus_the_target_on_an_enumerated_categorical():
    """Uniform pi_ref, every completion once: w = softmax(r / tau) = pi*, and d/dz [-sum_i pi*_i log softmax(z)_i] =
    softmax(z) - pi*: large on a completion theta makes rare but pi* does not, unlike the policy gradient's theta(y)."""
    tau, r = 0.5, torch.tensor([1.0, 0.2, -0.3, 0.9, 0.0], dtype=torch.float64)
    z = torch.tensor([6.0, -3.0, -3.0, -4.0, -2.0], dtype=torch.float64, requires_grad=True)  # nearly deterministic
    logprobs = torch.log_softmax(z, 0)[:, None]  # [N, T = 1]
    loss, ess = forward_kl_loss(logprobs, torch.ones_like(logprobs), r, tau)
    (grad,) = torch.autograd.grad(loss, z)
    target = torch.softmax(r / tau, 0)
    torch.testing.assert_close(grad, torch.softmax(z, 0).detach() - target)
    assert float(loss.detach()) == pytest.approx(float(-(target * torch.log_softmax(z.detach(), 0)).sum()))
    assert float(ess) == pytest.approx(1 / (5 * float((target**2).sum())))
    assert abs(float(grad[3])) > 0.3  # theta(3) ~ 1e-4: the forward KL still moves it
    with pytest.raises(ValueError, match="tau_k > 0"):
        forward_kl_loss(logprobs, torch.ones_like(logprobs), r, 0.0)


def test_the_trainers_part_is_the_estimate_on_the_reference_rows(tmp_path):
    """preference_nll (theta's pairs; the reference generates only for this term): the "forward_kl" part's loss is
    coef * -sum_i softmax(x_{y_i} / tau) log theta(y_i) over the rollout's reference completions, theta's log-probs
    exact; its metrics are logged; with coef 0 the reference does not generate."""
    problem = T.MultiTokenProblem.from_policy(T.make_policy(seed=0), seed=0)
    x = np.random.default_rng(3).normal(size=85)
    coef, tau = 0.7, 0.5

    def build(c):
        args = BilevelConfig(output_dir=str(tmp_path / f"c{c}"), per_device_train_batch_size=64, max_completion_length=3,
                             max_prompt_length=4, method="penalized_covariance", objective="preference_nll",
                             tau_init=tau, tau_schedule="constant", use_cpu=True, report_to="none", seed=0,
                             forward_kl_coef=c, max_steps=2, logging_steps=1, save_strategy="no")
        reward = T.TableReward(x)
        return BilevelTrainer(T.make_policy(seed=0), reward, problem.oracle(), args,
                              Dataset.from_dict({"prompt": [T.PROMPT] * 32}), processing_class=T.make_tokenizer()), reward

    trainer, reward = build(coef)
    seen = []
    compute_loss = trainer.compute_loss

    def checking(model, inputs, *a, **kw):
        loss = compute_loss(model, inputs, *a, **kw)
        if "forward_kl" in inputs.parts:
            ref = inputs.batch.ref
            idx = reward.completion_indices(ref.reward_input_ids, ref.reward_attention_mask).numpy()
            log_theta = np.log(problem.policy_distribution(trainer.model.policy_theta))[idx]
            w = np.exp(x[idx] / tau - (x[idx] / tau).max())
            w /= w.sum()
            seen.append((float(loss), -coef * float(w @ log_theta)))
        return loss

    trainer.compute_loss = checking
    trainer.train()
    assert len(seen) == 2  # one part per iteration
    for got, expected in seen:
        assert got == pytest.approx(expected, rel=1e-4)
    logged = [h for h in trainer.state.log_history if "policy_theta/forward_kl_loss" in h]
    assert len(logged) == 2 and all(0 < h["policy_theta/forward_kl_ess"] <= 1 for h in logged)

    plain, _ = build(0.0)
    rollout = plain.generate_and_score([T.PROMPT] * 32)
    assert rollout.ref is None and "forward_kl" not in plain.loss_parts(rollout)[-1]
