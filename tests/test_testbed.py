"""The exact multi-token testbed: enumeration, the tiny GPT-2's exact distribution (against independent prefix-by-prefix
forward passes and against HF generate), the table reward on trainer-laid-out batches, the oracle on decoded texts,
and the closed forms delegated to the bandit against finite differences."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bilevel_rlhf import bandit
from bilevel_rlhf import testbed as T
from bilevel_rlhf.trainer import BilevelTrainer

torch.set_num_threads(1)  # tiny models on shared cores


@pytest.fixture(scope="module")
def setup():
    tok = T.make_tokenizer()
    model = T.make_policy(seed=0)
    return tok, model, T.MultiTokenProblem.from_policy(model, seed=0, temperature=1.0)


def _trainer_rows(tok, completions, width):
    """A batch laid out as the trainer lays out the policy's ids: prompt "q", then the completion right-padded to
    `width` with pad, the completion mask from the trainer's own `_completion_mask` (up to the first eos)."""
    ids = torch.full((len(completions), width), tok.pad_token_id)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c)
    fake = SimpleNamespace(processing_class=tok)
    mask = BilevelTrainer._completion_mask(fake, ids)
    ids = torch.where(mask.bool(), ids, tok.pad_token_id)
    prompt = torch.full((len(completions), 1), T.PROMPT_ID)
    texts = BilevelTrainer._decode(fake, ids, mask)
    return torch.cat([prompt, ids], 1), torch.cat([torch.ones_like(prompt), mask], 1), texts


def test_enumeration_and_tokenizer():
    comps, index = T.enumerate_completions(4, 3)
    assert len(comps) == 85 == len(set(comps)) and all(index[c] == i for i, c in enumerate(comps))
    assert comps[0] == (T.EOS_ID,) and comps[1] == (4, T.EOS_ID) and comps[-1] == (7, 7, 7)
    for c in comps:  # (content)^n + eos for n < L, or (content)^L
        body = c[:-1] if c[-1] == T.EOS_ID else c
        assert all(4 <= t < 8 for t in body) and (len(body) < 3) == (c[-1] == T.EOS_ID)
    assert len(T.enumerate_completions(2, 4)[0]) == 1 + 2 + 4 + 8 + 16
    tok = T.make_tokenizer()
    assert (tok.unk_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["q", "t0", "t3"]) == [3, 4, 7]
    assert {tok.eos_token_id, tok.pad_token_id} <= set(tok.all_special_ids)
    assert tok.decode([4, 6, 1], skip_special_tokens=True) == "t0 t2"
    assert tok.decode([1], skip_special_tokens=True) == ""
    with pytest.raises(ValueError, match="max_length must be an int >= 1"):
        T.enumerate_completions(4, 0)


def test_exact_distribution(setup):
    tok, model, problem = setup
    comps = problem.completions
    log_p = T.sequence_log_probs(model, tok, comps)
    assert abs(np.exp(log_p).sum() - 1) < 1e-5
    np.testing.assert_allclose(problem.log_pi_ref, log_p, atol=1e-6)
    np.testing.assert_allclose(problem.policy_distribution(model), np.exp(problem.log_pi_ref), rtol=1e-5)
    # independently: one forward pass per prefix, chain rule over the tokens
    allowed = [T.EOS_ID] + list(range(4, 8))
    next_p = {}
    with torch.no_grad():
        for n in range(3):
            for body in T.enumerate_completions(4, n)[0] if n else [()]:
                body = tuple(t for t in body if t != T.EOS_ID)
                if len(body) != n or body in next_p:
                    continue
                probs = torch.softmax(model(torch.tensor([[T.PROMPT_ID, *body]])).logits[0, -1], -1)
                # zero mass (exactly, in float32) outside content + eos, in every context
                assert (probs[[t for t in range(8) if t not in allowed]] == 0).all()
                next_p[body] = probs.double().numpy()
    chain = np.array([np.prod([next_p[c[:i]][c[i]] for i in range(len(c))]) for c in comps])
    np.testing.assert_allclose(np.exp(log_p), chain, rtol=1e-5)
    # the distribution depends on the context, earlier tokens included
    assert np.abs(next_p[(4,)] - next_p[(5,)]).sum() > 0.05
    assert np.abs(next_p[(4, 5)] - next_p[(6, 5)]).sum() > 0.05
    # temperature: exact too
    log_p_t = T.sequence_log_probs(model, tok, comps, temperature=0.7)
    assert abs(np.exp(log_p_t).sum() - 1) < 1e-5 and np.abs(log_p_t - log_p).max() > 0.1
    assert model.training  # mode restored (eval only inside)


def test_generate_samples_the_exact_distribution(setup):
    tok, model, problem = setup
    n = 20000
    torch.manual_seed(0)
    prompt = torch.full((n, 1), T.PROMPT_ID)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_new_tokens=3, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    completion = out[:, 1:]
    seq, mask, texts = _trainer_rows(tok, [tuple(r) for r in completion.tolist()], completion.shape[1])
    idx = T.TableReward().completion_indices(seq, mask).numpy()
    assert [problem.texts[i] for i in idx[:200]] == texts[:200]
    counts = np.bincount(idx, minlength=85)
    p = np.exp(problem.log_pi_ref)
    chi2 = float(np.sum((counts - n * p) ** 2 / (n * p)))
    assert chi2 < 84 + 6 * np.sqrt(2 * 84), chi2  # df = 84: mean 84, sd 13
    assert 0.5 * np.abs(counts / n - p).sum() < 0.04


def test_table_reward_reads_trainer_batches():
    tok = T.make_tokenizer()
    comps, _ = T.enumerate_completions()
    reward = T.TableReward(torch.arange(85.0))
    perm = np.random.default_rng(0).permutation(85)
    seq, mask, _ = _trainer_rows(tok, [comps[i] for i in perm], 3)
    np.testing.assert_array_equal(reward(seq, attention_mask=mask).logits[:, 0].detach().numpy(), perm)
    np.testing.assert_array_equal(reward(seq).logits[:, 0].detach().numpy(), perm)  # pad tokens as padding
    assert reward(seq, mask).logits.shape == (85, 1)
    # a narrower batch (every completion ended early, so generate stopped before L tokens) and left-padded prompts
    short = [c for c in comps if len(c) <= 2]
    seq2, mask2, _ = _trainer_rows(tok, short, 2)
    left = torch.cat([torch.full((len(short), 1), T.PAD_ID), seq2], 1)
    left_mask = torch.cat([torch.zeros(len(short), 1, dtype=torch.long), mask2], 1)
    np.testing.assert_array_equal(reward(left, left_mask, position_ids=None).logits[:, 0].detach().numpy(),
                                  [comps.index(c) for c in short])
    # gradient: e_y per row
    reward.x.grad = None
    reward(seq[:5], mask[:5]).logits.sum().backward()
    np.testing.assert_array_equal(reward.x.grad.numpy(), np.isin(np.arange(85), perm[:5]).astype(np.float32))
    bad = {
        "wrong prompt": ([[4, 4, 1, 2]], [[1, 1, 1, 0]]),
        "tokens after eos": ([[3, 4, 1, 5]], [[1, 1, 1, 1]]),
        "too long": ([[3, 4, 4, 4, 4]], [[1, 1, 1, 1, 1]]),
        "short without eos": ([[3, 4, 4, 2]], [[1, 1, 1, 0]]),
        "disallowed token": ([[3, 3, 1, 2]], [[1, 1, 1, 0]]),
    }
    for name, (ids, m) in bad.items():
        with pytest.raises(ValueError, match="must be the prompt token 3"):
            reward(torch.tensor(ids), torch.tensor(m))
    with pytest.raises(ValueError, match="non-pad tokens under attention_mask = 0"):
        reward(torch.tensor([[3, 4, 1, 5]]), torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="one contiguous block"):
        reward(torch.tensor([[3, 2, 4, 1]]), torch.tensor([[1, 0, 1, 1]]))
    with pytest.raises(ValueError, match=r"x must have shape \[85\]"):
        T.TableReward(torch.zeros(84))


def test_oracle_scores_texts(setup):
    tok, _, problem = setup
    seq, mask, texts = _trainer_rows(tok, problem.completions, 3)
    assert texts == problem.texts and len(set(texts)) == 85
    oracle = problem.oracle()
    np.testing.assert_array_equal(oracle.score([T.PROMPT] * 85, texts), problem.scores)
    # soft labels are the bandit's expected labels P[a, b]
    a, b = np.random.default_rng(1).integers(0, 85, size=(2, 50))
    labels = oracle([T.PROMPT] * 50, [texts[i] for i in a], [texts[i] for i in b])
    P = bandit.preference_matrix(problem.scores, problem.temperature)
    np.testing.assert_allclose(labels, P[a, b], rtol=1e-12)
    with pytest.raises(ValueError, match="not the text of a completion"):
        oracle.score(["q"], ["t0 t9"])
    # a user-given score function of the token tuple; a deterministic oracle
    det = T.MultiTokenProblem.from_policy(setup[1], temperature=0.0, score_fn=lambda c: float(c.count(4)))
    assert det.score_texts(["t0 t0 t1", "", "t0"]) == [2.0, 0.0, 1.0]
    assert det.oracle().mode == "deterministic"
    assert det.oracle()(["q"], ["t0"], ["t1"]) == [1.0]


@pytest.mark.parametrize("objective", bandit.OBJECTIVES)
def test_closed_forms_against_finite_differences(setup, objective):
    _, model, problem = setup
    tau, kw = 0.5, dict(objective=objective, weight=0.1)
    x = np.random.default_rng(2).standard_normal(85)
    pi = problem.soft_optimal_policy(x, tau)
    log_tilt = problem.log_pi_ref + x / tau  # the Boltzmann tilt over whole completions
    np.testing.assert_allclose(pi, np.exp(log_tilt - np.logaddexp.reduce(log_tilt)), rtol=1e-12)
    g = problem.exact_hypergradient(x, tau, **kw)
    eps = 1e-5
    fd = np.array([(problem.phi_tau(x + eps * e, tau, **kw) - problem.phi_tau(x - eps * e, tau, **kw)) / (2 * eps)
                   for e in np.eye(85)])
    assert np.linalg.norm(g - fd) / np.linalg.norm(g) < 1e-6
    np.testing.assert_allclose(problem.covariance_hypergradient(x, tau, **kw), g, rtol=0, atol=1e-10)
    errs = [np.linalg.norm(problem.penalty_hypergradient(x, lam, tau, **kw) - g) for lam in (1e2, 1e3, 1e4)]
    assert errs[2] < 1e-3 * np.linalg.norm(g) and 8 < errs[1] / errs[2] < 12  # O(1 / lambda)
    theta = problem.penalized_policy(x, 1e3, tau, **kw)
    assert 0 < problem.kl(theta, pi) < 1e-3 and problem.kl(pi, pi) == 0.0
    # partial_sgd's fixed point: grad_x f = 0 with pi held fixed (the table reward is well specified: scores / T)
    x_psgd = problem.partial_sgd_fixed_point(tau, **kw)
    g_x, _ = bandit.upper_loss_grads(x_psgd, problem.soft_optimal_policy(x_psgd, tau), problem.scores,
                                     problem.temperature, log_pi_ref=problem.log_pi_ref, **kw)
    assert np.abs(g_x).max() < 1e-12
    np.testing.assert_allclose(x_psgd, problem.scores - problem.scores.mean(), atol=1e-8)
    assert problem.upper_loss(x, pi, **kw) == pytest.approx(problem.phi_tau(x, tau, **kw), rel=1e-14)


def test_kl_and_exact_optimum(setup):
    _, _, problem = setup
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5])
    assert problem.kl(p, q) == pytest.approx(np.log(2.0)) and problem.kl(q, p) == np.inf
    # the bilevel optimum on a smaller instance (C = 3, L = 2: 13 completions; 85 takes ~10 s)
    small = T.MultiTokenProblem.from_policy(T.make_policy(1, num_content=3, max_length=2), seed=1,
                                            num_content=3, max_length=2)
    assert len(small.completions) == 13 and small.texts[:2] == ["", "t0"]
    tau, kw = 0.5, dict(objective="win_rate", weight=0.1)
    x = small.exact_optimum(tau, **kw)
    assert np.abs(small.exact_hypergradient(x, tau, **kw)).max() <= 1e-10
    pi_opt = small.soft_optimal_policy(x, tau)
    x_psgd = small.partial_sgd_fixed_point(tau, **kw)
    pi_psgd = small.soft_optimal_policy(x_psgd, tau)
    assert small.phi_tau(x, tau, **kw) < small.phi_tau(x_psgd, tau, **kw) < small.phi_tau(np.zeros(13), tau, **kw)
    assert small.oracle_win_rate(pi_opt) > small.oracle_win_rate(pi_psgd) > 0.5


def test_the_trainer_runs_on_the_testbed(tmp_path, setup):
    """End to end: the trainer's own rows reach TableReward and its decoded texts reach the oracle."""
    from datasets import Dataset

    from bilevel_rlhf.config import BilevelConfig

    tok, _, problem = setup
    args = BilevelConfig(output_dir=str(tmp_path), per_device_train_batch_size=32, max_completion_length=3,
                         max_prompt_length=4, method="fixed_tau", tau_init=0.5, penalty_lambda=10.0, num_generations=2,
                         use_cpu=True, report_to="none", seed=0, top_k=0, top_p=1.0, temperature=1.0, max_steps=2)
    reward = T.TableReward()
    trainer = BilevelTrainer(T.make_policy(seed=0), reward, problem.oracle(), args,
                             Dataset.from_dict({"prompt": [T.PROMPT] * 32}), processing_class=tok)
    trainer.train()
    assert trainer.oracle_queries == 2 * 16
    assert reward.x.detach().abs().max() > 0  # r_x was trained on the rows it read


@pytest.mark.parametrize("method, objective, exploration", [
    ("single_loop", "preference_nll", 1.0), ("covariance", "preference_nll", 1.0), ("covariance", "win_rate", 1.0),
    ("single_loop", "preference_nll", 4.0), ("penalized_covariance", "preference_nll", 4.0),
    ("covariance", "win_rate", 4.0), ("partial_sgd", "preference_nll", 4.0),
])
def test_the_trainers_x_gradient_is_unbiased_on_the_multi_token_testbed(tmp_path, setup, method, objective,
                                                                         exploration):
    """At fixed (different) policies, the mean of the trainer's x-gradient over rollouts is its population value,
    computed exactly from the policies' distributions over the 85 completions: grad_x f(x, p_theta) +
    lambda (p_phi - p_theta) for the penalty method, grad_x f(x, p_theta) + (1/tau) Cov_{p_theta}(e_y, g) for the
    covariance methods. With an `exploration_temperature` theta's labelled completions come from a flatter mixture,
    importance-weighted back: the expectation is p_theta's all the same."""
    from datasets import Dataset

    from bilevel_rlhf import bandit
    from bilevel_rlhf.config import BilevelConfig
    from bilevel_rlhf.trainer import BilevelTrainer

    tok, _, problem = setup
    tau, lam, w, prompts, rollouts = 0.5, 3.0, 0.3, 512, 12
    args = BilevelConfig(output_dir=str(tmp_path), per_device_train_batch_size=2 * prompts, max_completion_length=3,
                         max_prompt_length=4, method=method, objective=objective, objective_weight=w, tau_init=tau,
                         tau_schedule="constant", penalty_lambda=lam, use_cpu=True, report_to="none", seed=0,
                         common_random_numbers=method == "single_loop", exploration_temperature=exploration)
    x = np.random.default_rng(3).normal(size=85)
    trainer = BilevelTrainer(T.make_policy(seed=0), T.TableReward(x), problem.oracle(), args,
                             Dataset.from_dict({"prompt": [T.PROMPT] * prompts}), processing_class=tok)
    with torch.no_grad():  # three different policies: the reference, theta and phi
        for i, role in enumerate(("policy_theta", "policy_phi")):
            module = getattr(trainer.model, role)
            if module is not None:
                g = torch.Generator().manual_seed(10 + i)
                module.lm_head.weight[:, 1:].add_(0.5 * torch.randn(module.lm_head.weight[:, 1:].shape, generator=g))
    p_theta = problem.policy_distribution(trainer.model.policy_theta)
    grad_f, g_pi = bandit.upper_loss_grads(x, p_theta, problem.scores, problem.temperature, objective=objective,
                                           weight=w, log_pi_ref=problem.log_pi_ref)
    if method in ("covariance", "penalized_covariance"):
        expected = grad_f + p_theta * (g_pi - p_theta @ g_pi) / tau
    elif method == "partial_sgd":
        expected = grad_f
    else:
        expected = grad_f + lam * (problem.policy_distribution(trainer.model.policy_phi) - p_theta)
    torch.manual_seed(4)
    grads = []
    for _ in range(rollouts):
        batch = trainer.generate_and_score([T.PROMPT] * prompts)
        (grad,) = torch.autograd.grad(trainer.compute_loss(trainer.model, batch), trainer.model.reward_model.x)
        grads.append(grad.double().numpy())
    grads = np.stack(grads)
    mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(rollouts)
    bad = np.abs(mean - expected) > 5 * se + 1e-3  # + 1e-3: completions too rare to be drawn at all
    assert not bad.any(), (np.flatnonzero(bad), mean[bad], expected[bad], se[bad])
    # the method's own term is there: grad_x f alone is far away
    if method != "partial_sgd":
        assert np.linalg.norm(expected - grad_f) > 10 * np.linalg.norm(se)
    if exploration != 1.0:  # the weights are in play: the unweighted mean of the explored sample is far off
        assert batch.theta.weight is not None and float(batch.theta.weight.std()) > 0.1
