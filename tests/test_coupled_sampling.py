"""Coupled sampling (common_random_numbers): exact marginals, identical completions for identical actors, and the
penalty term's sampling noise removed where theta = phi."""

from __future__ import annotations

import numpy as np
import torch
from test_trainer_bandit import FIRST, K, PROBLEM, make_trainer, set_logits
from test_trainer_math import PROMPTS
from test_trainer_math import make_trainer as make_lm_trainer
from testing_utils import make_tokenizer

from bilevel_rlhf import bandit


def sample_tokens(trainer, role: str, rows: int, seed: int | None) -> np.ndarray:
    tok = trainer.processing_class
    ids = tok(["q"] * rows, return_tensors="pt").input_ids
    out = trainer._generate(role, ids, torch.ones_like(ids), noise_seed=seed)
    return (out[:, 0] - FIRST).numpy()


def test_each_actor_keeps_its_exact_distribution_and_the_two_are_coupled(tmp_path):
    trainer = make_trainer(tmp_path, np.zeros(K), 5.0, 8, common_random_numbers=True, temperature=0.7, top_k=6)
    rng = np.random.default_rng(0)
    logits = {"theta": rng.normal(size=K), "phi": rng.normal(size=K)}
    set_logits(trainer.model.policy_theta, logits["theta"])
    set_logits(trainer.model.policy_phi, logits["phi"])
    draws = {r: [] for r in logits}
    for seed in range(8):
        for r in logits:
            draws[r].append(sample_tokens(trainer, r, 2048, seed))
    for r, z in logits.items():
        # temperature 0.7, then the top 6 of 8 tokens, renormalized
        p = np.exp(z / 0.7 - np.max(z / 0.7))
        p[np.argsort(z)[:2]] = 0.0
        p /= p.sum()
        freq = np.bincount(np.concatenate(draws[r]), minlength=K) / (8 * 2048)
        se = np.sqrt(p * (1 - p) / (8 * 2048))
        assert np.all(np.abs(freq - p) <= 5 * se + 1e-12), (r, freq, p)
    # row i of theta and of phi saw the same noise: they agree far more often than independent draws would
    same = np.mean(np.concatenate(draws["theta"]) == np.concatenate(draws["phi"]))
    p_t, p_p = (np.bincount(np.concatenate(draws[r]), minlength=K) / (8 * 2048) for r in ("theta", "phi"))
    assert same > p_t @ p_p + 0.2, (same, p_t @ p_p)
    # another seed, other noise
    assert not np.array_equal(sample_tokens(trainer, "theta", 256, 0), sample_tokens(trainer, "theta", 256, 1))


def test_identical_actors_cancel_the_penalty_term_exactly(tmp_path):
    x = np.random.default_rng(1).normal(size=K)
    pi = bandit.soft_optimal_policy(x, PROBLEM.log_pi_ref, 0.5)
    grads = {}
    for crn in (True, False):
        trainer = make_trainer(tmp_path / str(crn), x, 20.0, 256, common_random_numbers=crn)
        set_logits(trainer.model.policy_theta, np.log(pi))
        set_logits(trainer.model.policy_phi, np.log(pi))
        torch.manual_seed(3)
        buf = trainer.generate_and_score(["q"] * 256)
        (g,) = torch.autograd.grad(trainer.compute_loss(trainer.model, buf), trainer.model.reward_model.x)
        grads[crn] = g.double().numpy()
        same = torch.equal(buf.theta.input_ids, buf.phi.input_ids)
        assert same == crn
        if crn:  # lambda (mean r_x(phi) - mean r_x(theta)) is exactly zero: x's gradient is grad_x f alone
            labels, s = buf.labels.double(), buf.theta.input_ids[:, -1] - FIRST
            d = torch.as_tensor(x)[s[0::2]] - torch.as_tensor(x)[s[1::2]]
            dloss_dd = torch.sigmoid(d) - labels  # d BT-NLL / d(r_a - r_b)
            expected = np.zeros(K)
            np.add.at(expected, s[0::2].numpy(), dloss_dd.numpy() / len(labels))
            np.add.at(expected, s[1::2].numpy(), -dloss_dd.numpy() / len(labels))
            np.testing.assert_allclose(grads[crn], expected, atol=1e-5)  # float32 sums of lambda-scaled terms
    # independent draws leave a lambda-sized noise term
    assert np.linalg.norm(grads[False]) > 3 * np.linalg.norm(grads[True])


def test_identical_language_models_write_identical_completions(tmp_path):
    trainer = make_lm_trainer(tmp_path, common_random_numbers=True)
    model = trainer.model
    model.policy_phi.load_state_dict(model.policy_theta.state_dict())
    tok = make_tokenizer()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    out = {r: trainer._generate(r, enc.input_ids, enc.attention_mask, noise_seed=123) for r in ("theta", "phi")}
    assert torch.equal(out["theta"], out["phi"])
    assert out["theta"].shape[1] > 1
    # and the same seed reproduces the same completions
    assert torch.equal(out["theta"], trainer._generate("theta", enc.input_ids, enc.attention_mask, noise_seed=123))


def test_coupled_sampling_draws_whole_completions_from_the_exact_distribution(tmp_path):
    """On the exact multi-token testbed: the Gumbel-max completions (noise drawn per position) follow the policy's
    exact distribution over the 85 completions, not only its per-position marginals."""
    from datasets import Dataset

    from bilevel_rlhf import BilevelConfig, BilevelTrainer, testbed

    tok, policy = testbed.make_tokenizer(), testbed.make_policy(seed=1)
    problem = testbed.MultiTokenProblem.from_policy(policy, seed=1)
    args = BilevelConfig(output_dir=str(tmp_path), method="single_loop", per_device_train_batch_size=4, max_completion_length=3,
                         max_prompt_length=2, use_cpu=True, report_to="none", common_random_numbers=True)
    trainer = BilevelTrainer(policy, testbed.TableReward(), problem.oracle(), args,
                             Dataset.from_dict({"prompt": ["q", "q"]}), processing_class=tok)
    ids = torch.full((2048, 1), testbed.PROMPT_ID)
    counts = np.zeros(len(problem.completions))
    for seed in range(4):
        out = trainer._generate("theta", ids, torch.ones_like(ids), noise_seed=seed)
        mask = trainer._completion_mask(out)
        for text in trainer._decode(out, mask):
            counts[problem.texts.index(text)] += 1
    p = problem.policy_distribution(trainer.model.policy_theta)
    tv = 0.5 * np.abs(counts / counts.sum() - p).sum()
    assert tv < 0.06, tv  # 8,192 draws over 85 completions: sampling noise alone gives about 0.03


def test_the_reference_never_shares_theta_noise(tmp_path):
    """win_rate with coupled sampling: theta's completion i and the reference's completion i are independent draws
    (a shared noise would make them equal wherever theta = the reference)."""
    trainer = make_lm_trainer(tmp_path, common_random_numbers=True, objective="win_rate")
    model = trainer.model
    model.policy_theta.load_state_dict(model.ref_policy.state_dict())  # theta = the reference
    model.policy_phi.load_state_dict(model.ref_policy.state_dict())
    torch.manual_seed(0)
    buf = trainer.generate_and_score(PROMPTS[:4])
    assert torch.equal(buf.theta.input_ids, buf.phi.input_ids)  # theta and phi: shared noise
    same = (buf.theta.input_ids == buf.ref.input_ids).all(1)
    assert not bool(same.all()), "the reference's completions repeat theta's"
