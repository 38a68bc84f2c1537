"""Exploring labelled completions (`exploration_temperature`): the sample is the mixture of theta at temperature 1
and at T, the weights are exactly pi / q_mix, a pair's weight reaches both its completions, and theta's policy and
value losses carry them. The x-gradient's expectation under exploration is tested in tests/test_testbed.py."""

import dataclasses

import numpy as np
import pytest
import torch
from datasets import Dataset

from bilevel_rlhf import BilevelConfig, BilevelTrainer
from bilevel_rlhf import testbed as T
from bilevel_rlhf.exploration import pair_row_weights
from bilevel_rlhf.rl_utils import masked_mean, masked_whiten

torch.set_num_threads(1)  # tiny models on shared cores


def _trainer(tmp_path, exploration=4.0, objective="preference_nll", prompts=256, **kw):
    tok = T.make_tokenizer()
    policy = T.make_policy(seed=0)
    with torch.no_grad():  # a peaked theta: the tempered half then samples other completions
        policy.lm_head.weight.mul_(4.0)
    problem = T.MultiTokenProblem.from_policy(policy, seed=0)
    args = BilevelConfig(output_dir=str(tmp_path), per_device_train_batch_size=2 * prompts, max_completion_length=3,
                         max_prompt_length=4, method="penalized_covariance", objective=objective, tau_init=0.5,
                         use_cpu=True, report_to="none", seed=0, exploration_temperature=exploration, **kw)
    trainer = BilevelTrainer(policy, T.TableReward(), problem.oracle(), args,
                             Dataset.from_dict({"prompt": [T.PROMPT] * prompts}), processing_class=tok)
    return trainer, problem


def test_the_explored_sample_is_the_mixture_and_its_weights_are_pi_over_q_mix(tmp_path):
    trainer, problem = _trainer(tmp_path)
    theta = trainer.model.policy_theta
    pi, q = problem.policy_distribution(theta), problem.policy_distribution(theta, temperature=4.0)
    q_mix = 0.5 * pi + 0.5 * q
    prompt = trainer._tokenize_prompts([T.PROMPT] * 4000)
    torch.manual_seed(0)
    completion, w = trainer._generate_exploring(prompt[0], prompt[1])
    texts = trainer._decode(completion, trainer._completion_mask(completion))
    idx = np.array([problem.texts.index(t) for t in texts])
    # each weight is pi / q_mix of its completion, exactly (up to float32)
    np.testing.assert_allclose(w.numpy(), pi[idx] / q_mix[idx], rtol=1e-4)
    assert float(w.max()) < 2.0 and float(w.std()) > 0.1
    # the sample is drawn from q_mix, not from pi: total variation within sampling noise of q_mix, far from pi
    freq = np.bincount(idx, minlength=len(pi)) / len(idx)
    assert 0.5 * np.abs(freq - q_mix).sum() < 0.06 < 0.5 * np.abs(freq - pi).sum()
    # weighted back, the sample's frequencies estimate pi
    weighted = np.bincount(idx, weights=w.numpy(), minlength=len(pi)) / len(idx)
    assert 0.5 * np.abs(weighted - pi).sum() < 0.06


def test_a_pairs_weight_reaches_both_completions():
    w = torch.tensor([0.5, 2.0, 1.5, 0.1])
    torch.testing.assert_close(pair_row_weights(w, against_reference=False), torch.tensor([1.0, 1.0, 0.15, 0.15]))
    assert pair_row_weights(w, against_reference=True) is w


def test_rollouts_explore_on_labelled_iterations_only(tmp_path):
    trainer, _ = _trainer(tmp_path, prompts=16, label_every=2, fuse_rollout_and_update=False)
    trainer.state.global_step = 0
    labelled = trainer.generate_and_score([T.PROMPT] * 16)
    assert labelled.labels is not None and labelled.theta.weight is not None
    w = labelled.theta.weight
    torch.testing.assert_close(w[0::2], w[1::2])  # preference_nll: theta's pairs (2i, 2i + 1)
    trainer._log_rollout(labelled)
    ess = trainer._rollout_metrics["exploration/effective_sample_fraction"]
    assert ess == pytest.approx(float(w.sum() ** 2 / (len(w) * (w**2).sum())), rel=1e-5) and 0 < ess < 1
    trainer.state.global_step = trainer.args.steps_per_iteration  # k = 1: unlabelled
    unlabelled = trainer.generate_and_score([T.PROMPT] * 16)
    assert unlabelled.labels is None and unlabelled.theta.weight is None
    off, _ = _trainer(tmp_path, exploration=1.0, prompts=16)
    assert off.generate_and_score([T.PROMPT] * 16).theta.weight is None


def test_thetas_policy_and_value_losses_are_weighted_per_row(tmp_path):
    trainer, _ = _trainer(tmp_path, prompts=16, fuse_rollout_and_update=False)  # the rollout has old log-probs
    batch = trainer.generate_and_score([T.PROMPT] * 16)
    theta = batch.theta
    n = len(theta)
    new = {"logprobs": theta.logprobs + 0.05 * torch.randn(theta.logprobs.shape),
           "values": theta.values + 0.3 * torch.randn(theta.values.shape)}
    plain = dataclasses.replace(theta, weight=None)
    unweighted, _ = trainer._ppo_loss(new, plain)
    # one row with weight 1, the others 0: the loss is that row's share of the unweighted token mean
    for i in (0, n - 1):
        only = torch.zeros(n)
        only[i] = 1.0
        loss_i, _ = trainer._ppo_loss(new, dataclasses.replace(theta, weight=only))
        row_i = trainer._ppo_loss({k: v[[i]] for k, v in new.items()}, plain.rows(torch.tensor([i])))[0]
        assert float(loss_i) == pytest.approx(float(row_i * theta.mask[i].sum() / theta.mask.sum()), rel=1e-5)
    # all ones: the unweighted loss
    ones, _ = trainer._ppo_loss(new, dataclasses.replace(theta, weight=torch.ones(n)))
    assert float(ones) == pytest.approx(float(unweighted), rel=1e-6)


def test_exploration_temperature_is_validated(tmp_path):
    with pytest.raises(ValueError, match="exploration_temperature"):
        BilevelConfig(output_dir=str(tmp_path), exploration_temperature=0.5)
    with pytest.raises(ValueError, match="exploration_temperature.*top_k"):
        BilevelConfig(output_dir=str(tmp_path), exploration_temperature=2.0, top_k=50)


def test_weighted_whitening_centres_theta_weighted_back():
    torch.manual_seed(0)
    x, mask = torch.randn(6, 4), (torch.rand(6, 4) < 0.8).float()
    mask[:, 0] = 1
    w = torch.rand(6, 1).expand(6, 4)
    out = masked_whiten(x, mask, weights=w)
    assert float((out * w * mask).sum()) == pytest.approx(0.0, abs=1e-5)  # the weighted mean is removed
    assert float((out**2 * w * mask).sum() / (w * mask).sum()) == pytest.approx(
        float((mask.sum() - 1) / mask.sum()), rel=1e-4)  # unit weighted variance (Bessel-corrected by the count)
    torch.testing.assert_close(masked_whiten(x, mask, weights=torch.ones_like(x)), masked_whiten(x, mask))
    assert bool((out[mask == 0] == 0).all())


def test_thetas_advantages_are_whitened_with_its_weights(tmp_path):
    trainer, _ = _trainer(tmp_path, prompts=16, fuse_rollout_and_update=False)
    theta = trainer.generate_and_score([T.PROMPT] * 16).theta
    w = theta.weight[:, None] * theta.mask
    assert float((theta.advantages * w).sum() / w.sum()) == pytest.approx(0.0, abs=1e-5)
    assert abs(float(masked_mean(theta.advantages, theta.mask))) > 1e-3  # the unweighted mean is not what is removed

