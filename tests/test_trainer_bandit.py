"""The exact LM bandit through the real trainer: one prompt, one-token completions from K = 8 actions, r_x(y) = x[y].

The policies are GPT-2s whose next-token logits are set exactly (final layer norm with weight 0 and bias e_0, so the
last hidden state is e_0 whatever the input, and lm_head's column 0 holds the logits). The reward model is a table.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from bilevel_rlhf import bandit
from bilevel_rlhf.config import BilevelConfig
from bilevel_rlhf.preference import ScoreOracle
from bilevel_rlhf.trainer import BilevelTrainer

K = 8
FIRST = 4  # ids: <unk>=0, <eos>=1, <pad>=2, q=3, t0..t7 = 4..11
TAU = 0.5
PROBLEM = bandit.LMBandit.random(K, seed=3, temperature=1.0)


def bandit_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "<pad>", "q"] + [f"t{i}" for i in range(K)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def set_logits(model: GPT2LMHeadModel, log_probs: np.ndarray) -> None:
    """Make the next-token distribution exactly softmax(log_probs) over the K actions (others: -1e4)."""
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = -1e4
        model.lm_head.weight[FIRST : FIRST + K, 0] = torch.as_tensor(log_probs, dtype=torch.float32)


def bandit_policy(log_probs: np.ndarray) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=FIRST + K, n_positions=8, n_embd=8, n_layer=1, n_head=1, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=1, pad_token_id=2)
    model = GPT2LMHeadModel(config)
    set_logits(model, log_probs)
    return model


class TabularReward(torch.nn.Module):
    """r_x(prompt, y) = x[y] for the one-token completion y (the last input token)."""

    def __init__(self, x: np.ndarray):
        super().__init__()
        self.x = torch.nn.Parameter(torch.as_tensor(x, dtype=torch.float32).clone())

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.x[(input_ids[:, -1] - FIRST).clamp(0, K - 1)][:, None])


def oracle() -> ScoreOracle:
    # soft labels sigmoid(s_a - s_b): exactly the bandit's expected label at temperature 1
    return ScoreOracle(lambda texts: [float(PROBLEM.scores[int(t[1:])]) for t in texts], mode="probability")


def make_trainer(tmp_path, x, lam, prompts, **kw) -> BilevelTrainer:
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2 * prompts, max_completion_length=1, max_prompt_length=4,
        method="fixed_tau", tau_init=TAU, penalty_lambda=lam, num_generations=2, use_cpu=True, report_to="none",
        seed=0, top_k=0, top_p=1.0, temperature=1.0,
    )
    args = BilevelConfig(**(settings | kw))
    ds = Dataset.from_dict({"prompt": ["q"] * prompts})
    return BilevelTrainer(bandit_policy(PROBLEM.log_pi_ref), TabularReward(x), oracle(), args, ds,
                          processing_class=bandit_tokenizer())


def reward_gradient(trainer: BilevelTrainer, prompts: int) -> np.ndarray:
    """The trainer's own estimate h of one rollout: the gradient in x of compute_loss on the full rollout."""
    batch = trainer.generate_and_score(["q"] * prompts)  # iteration 0: a reward step
    assert batch.reward_step
    loss = trainer.compute_loss(trainer.model, batch)
    (g,) = torch.autograd.grad(loss, trainer.model.reward_model.x)
    return g.double().numpy()


def test_reward_gradient_is_unbiased_for_the_penalty_hypergradient_and_tends_to_the_exact_one(tmp_path):
    x = np.random.default_rng(1).normal(size=K)
    exact = bandit.exact_hypergradient(x, PROBLEM.log_pi_ref, TAU, PROBLEM.scores, PROBLEM.temperature)
    prompts, rollouts = 1024, 12
    for lam in (5.0, 20.0):
        trainer = make_trainer(tmp_path, x, lam, prompts)
        pi_star = bandit.soft_optimal_policy(x, PROBLEM.log_pi_ref, TAU)
        theta = bandit.penalized_policy(x, lam, TAU, PROBLEM.log_pi_ref, PROBLEM.scores, PROBLEM.temperature)
        set_logits(trainer.model.policy_phi, np.log(pi_star))  # actors at their exact optima
        set_logits(trainer.model.policy_theta, np.log(theta))
        torch.manual_seed(10)
        grads = np.stack([reward_gradient(trainer, prompts) for _ in range(rollouts)])
        mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(rollouts)
        h = bandit.penalty_hypergradient(x, lam, TAU, PROBLEM.log_pi_ref, PROBLEM.scores, PROBLEM.temperature)
        # unbiased: the sample mean matches the population value within 5 standard errors, per component
        assert np.all(np.abs(mean - h) <= 5 * se + 1e-4), (lam, mean, h, se)
        # and it estimates the exact hypergradient up to the penalty bias |h - exact| = O(1/lambda)
        assert np.linalg.norm(mean - exact) <= np.linalg.norm(5 * se) + np.linalg.norm(h - exact)
        assert mean @ exact > 0.9 * np.linalg.norm(mean) * np.linalg.norm(exact)
    # the population value of the estimate converges to the exact hypergradient as lambda grows (error O(1/lambda))
    gaps = [np.linalg.norm(bandit.penalty_hypergradient(x, lam, TAU, PROBLEM.log_pi_ref, PROBLEM.scores, 1.0) - exact)
            for lam in (10.0, 100.0, 1000.0)]
    assert gaps[2] < 0.2 * gaps[1] < 0.04 * gaps[0] and gaps[2] < 1e-3 * np.linalg.norm(exact)


def test_short_single_loop_run_moves_x_toward_the_exact_optimum(tmp_path):
    x_star = bandit.exact_optimum(PROBLEM.log_pi_ref, TAU, PROBLEM.scores, PROBLEM.temperature)
    x0 = np.zeros(K)
    trainer = make_trainer(
        tmp_path, x0, 5.0, 64, method="single_loop", tau_schedule="constant", max_steps=40,
        actor_learning_rate=0.05, critic_learning_rate=0.1, reward_learning_rate=0.05, logging_steps=10,
    )
    trainer.train()
    x = trainer.model.reward_model.x.detach().double().numpy()
    x = x - x.mean()  # the gauge of exact_optimum
    phi = lambda z: bandit.phi_tau(z, PROBLEM.log_pi_ref, TAU, PROBLEM.scores, PROBLEM.temperature)
    assert np.linalg.norm(x - x_star) < 0.8 * np.linalg.norm(x0 - x_star)
    assert phi(x) < phi(x0) - 0.5 * (phi(x0) - phi(x_star))


def theta_logit_gradient(trainer: BilevelTrainer, prompts: int) -> np.ndarray:
    """The gradient of theta's PPO loss in its K logits at the rollout (ratio 1): minus a whitened policy gradient."""
    batch = trainer.generate_and_score(["q"] * prompts)
    loss = trainer.compute_loss(trainer.model, batch)
    (g,) = torch.autograd.grad(loss, trainer.model.policy_theta.lm_head.weight)
    return g[FIRST : FIRST + K, 0].double().numpy()


@pytest.mark.filterwarnings("ignore:penalized_policy")  # a strict local maximum is stationary too
@pytest.mark.parametrize("estimator, objective", [("gae", "preference_nll"), ("gae", "win_rate"), ("rloo", "win_rate")])
def test_theta_is_stationary_at_the_penalized_optimum(tmp_path, estimator, objective):
    """theta maximizes J_tau - f / lambda: at the exact penalized policy its expected policy gradient vanishes, and at
    the penalized policy of another lambda (what a g off by a factor would aim at) it does not. With either
    advantage estimator: GAE on the critic, or each completion against its prompt's other one (rloo: win_rate only,
    where a completion's verdict does not depend on its baseline's completion)."""
    x = np.random.default_rng(2).normal(size=K)
    lam, prompts, rollouts, w = 2.0, 1024, 10, 0.3
    means = {}
    for target in (lam, 4 * lam):
        trainer = make_trainer(tmp_path / str(target), x, lam, prompts, advantage_estimator=estimator,
                               objective=objective, objective_weight=w)
        theta = bandit.penalized_policy(x, target, TAU, PROBLEM.log_pi_ref, PROBLEM.scores, PROBLEM.temperature,
                                        objective=objective, weight=w)
        set_logits(trainer.model.policy_theta, np.log(theta))
        set_logits(trainer.model.policy_phi, np.log(bandit.soft_optimal_policy(x, PROBLEM.log_pi_ref, TAU)))
        torch.manual_seed(11)
        grads = np.stack([theta_logit_gradient(trainer, prompts) for _ in range(rollouts)])
        means[target] = (grads.mean(0), grads.std(0, ddof=1) / np.sqrt(rollouts))
    mean, se = means[lam]
    assert np.all(np.abs(mean) <= 5 * se + 1e-6), (mean, se)
    other, other_se = means[4 * lam]
    assert np.linalg.norm(other) > 8 * np.linalg.norm(other_se), (other, other_se)


@pytest.mark.filterwarnings("ignore:penalized_policy")
@pytest.mark.parametrize("method, objective", [("fixed_tau", "win_rate"), ("covariance", "preference_nll"),
                                               ("covariance", "win_rate")])
def test_reward_gradient_is_unbiased_for_each_method_and_objective(tmp_path, method, objective):
    """At fixed policies, the mean of the trainer's x-gradient is the population value: the penalty hypergradient
    for the penalty methods (phi at pi*_tau(x), theta at the penalized optimum), the exact hypergradient for the
    covariance method (its one actor at pi*_tau(x)). The penalty method samples with common random numbers: the
    coupling keeps the estimate unbiased and makes its noise small enough to tell the penalty term apart."""
    x, w, lam, prompts, rollouts = np.random.default_rng(4).normal(size=K), 0.3, 5.0, 1024, 12
    args = (x, PROBLEM.log_pi_ref, TAU, PROBLEM.scores, PROBLEM.temperature)
    obj = dict(objective=objective, weight=w)
    trainer = make_trainer(tmp_path, x, lam, prompts, method=method, objective=objective, objective_weight=w,
                           common_random_numbers=method != "covariance")
    pi_star = bandit.soft_optimal_policy(x, PROBLEM.log_pi_ref, TAU)
    if method == "covariance":
        set_logits(trainer.model.policy_theta, np.log(pi_star))
        expected = bandit.exact_hypergradient(*args, **obj)
        np.testing.assert_allclose(bandit.covariance_hypergradient(*args, **obj), expected, atol=1e-10)
        policy = pi_star
    else:
        policy = bandit.penalized_policy(x, lam, TAU, PROBLEM.log_pi_ref, PROBLEM.scores, PROBLEM.temperature, **obj)
        set_logits(trainer.model.policy_phi, np.log(pi_star))
        set_logits(trainer.model.policy_theta, np.log(policy))
        expected = bandit.penalty_hypergradient(x, lam, TAU, PROBLEM.log_pi_ref, PROBLEM.scores, PROBLEM.temperature,
                                                **obj)
    torch.manual_seed(12)
    grads = np.stack([reward_gradient(trainer, prompts) for _ in range(rollouts)])
    mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(rollouts)
    assert np.all(np.abs(mean - expected) <= 5 * se + 1e-4), (mean, expected, se)
    # the test can tell the method's term apart: grad_x f alone (partial_sgd's estimate) is far away
    grad_f, _ = bandit.upper_loss_grads(x, policy, PROBLEM.scores, PROBLEM.temperature, log_pi_ref=PROBLEM.log_pi_ref,
                                        **obj)
    assert np.linalg.norm(expected - grad_f) > 10 * np.linalg.norm(se)
