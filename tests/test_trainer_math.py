"""The trainer's mathematics against independent recomputations: the PPO loss by hand, the rollout buffer (scores,
log-probs, per-token rewards, GAE, whitening, tau_k and lambda_k) recomputed row by row without padding, the
optimizer's per-role structure in a real run, and the logged metrics' values.

Each check is written so that a small bug in the quantity it names (a sign, a swapped argument, a dropped term, a
wrong iteration index) fails it: the models are perturbed away from the reference, the schedules are not constant,
and gamma and the GAE lambda differ from each other and from 1.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import testing_utils
import torch
from testing_utils import record_loss_inputs, record_rollouts
from transformers import TrainerCallback

from bilevel_rlhf.preference import ScoreOracle
from bilevel_rlhf.objectives import PreferenceNLL, WinRate, get_objective
from bilevel_rlhf.rl_utils import bradley_terry_loss
from bilevel_rlhf.rollout import Completions, LossInputs, Rollout
from bilevel_rlhf.schedules import lambda_at, lr_factor, tau_at
from bilevel_rlhf.trainer import BilevelTrainer, reward_model_loss

# prompts of different lengths, so that rows are left-padded by different amounts
PROMPTS = ["the cat", "a dog was very", "we love", "it is very good and", "the sun", "they hate a dark",
           "you and we", "bright day"]
GAMMA, GAE_LAMBDA = 0.9, 0.7
TAU0, TAU_C, TAU_K0 = 0.3, 0.7, 2.0
LAM0, LAM_G, LAM_K0 = 2.0, 0.5, 3.0


def char_score(texts: list[str]) -> list[float]:
    """A score that varies between almost all completions (so labels are rarely 1/2)."""
    return [len(t.replace(" ", "")) / 4.0 for t in texts]


# this file's defaults: 2 passes x 2 micro-batches of 2 prompts x 2 completions; schedules that change with k; gamma != lam
CONFIG = dict(
    per_device_train_batch_size=4, num_generations=2, num_iterations=2, steps_per_generation=2, max_completion_length=5,
    max_prompt_length=8, gamma=GAMMA, lam=GAE_LAMBDA, tau_init=TAU0, tau_schedule="polynomial", tau_decay_rate=TAU_C,
    tau_horizon=TAU_K0, penalty_lambda=LAM0, penalty_lambda_schedule="polynomial", penalty_lambda_growth=LAM_G,
    penalty_lambda_horizon=LAM_K0, actor_learning_rate=1e-3, critic_learning_rate=1e-3, reward_learning_rate=1e-3,
    logging_steps=1,
)


def make_trainer(tmp_path, prompts=PROMPTS, **kw) -> BilevelTrainer:
    """`testing_utils.make_trainer` with this file's defaults and oracle (`char_score`), its actors and critics moved
    away from the reference."""
    oracle = ScoreOracle(char_score, mode="probability", name="chars")
    trainer = testing_utils.make_trainer(tmp_path, prompts, oracle=oracle, **{**CONFIG, **kw})
    # move the actors and critics away from the reference and from each other: the KL terms, the penalty gap and the
    # values are then all non-zero, so a wrong sign or a dropped term shows
    model = trainer.model
    with torch.no_grad():
        for i, module in enumerate([model.policy_theta, model.policy_phi, model.value_theta, model.value_phi]):
            if module is None:
                continue
            g = torch.Generator().manual_seed(100 + i)
            for p in module.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return trainer


def micro_steps(trainer: BilevelTrainer, iteration: int, count: int = 1,
                seed: int = 5) -> tuple[list[Rollout], list[list[LossInputs]]]:
    """The first `count` micro-steps of `iteration` on a fresh trainer, through `training_step` (the rollout, then
    each loss part's forward and backward; no optimizer step): the rollouts generated and, for each micro-step,
    what `compute_loss` was given."""
    rollouts, loss_inputs = record_rollouts(trainer), record_loss_inputs(trainer)
    trainer.state.global_step = iteration * trainer.args.steps_per_iteration
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which these tests do not run
    torch.manual_seed(seed)
    steps = []
    for _ in range(count):
        start = len(loss_inputs)
        trainer.training_step(trainer.model, [{"prompt": p} for p in PROMPTS[: trainer.args.prompts_per_iteration]])
        steps.append(loss_inputs[start:])
    return rollouts, steps


def unpadded_rows(buf: Rollout, role: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt ids, completion ids) of each row, without any padding."""
    P, b = buf.prompt_length, buf.completions(role)
    rows = []
    for ids, am, cm in zip(b.input_ids, b.attention_mask, b.mask):
        rows.append((ids[:P][am[:P].bool()], ids[P:][cm.bool()]))
    return rows


@torch.no_grad()
def recompute_row(model, value_head, prompt: torch.Tensor, completion: torch.Tensor, temperature: float):
    """log pi(y_t | s_t), V(s_t) and the entropy at each completion token, from one unpadded forward pass."""
    x = torch.cat([prompt, completion])[None]
    out = model(input_ids=x, output_hidden_states=True)
    start, L = len(prompt) - 1, len(completion)
    logits = out.logits[0, start : start + L].double() / temperature
    logp = torch.log_softmax(logits, -1)
    lp = logp[torch.arange(L), completion]
    entropy = -(logp.exp() * logp).sum(-1)
    values = value_head(out.hidden_states[-1][:, start : start + L])[0].double() if value_head is not None else None
    return lp, values, entropy


def bt_nll(r_a: np.ndarray, r_b: np.ndarray, label: np.ndarray) -> np.ndarray:
    d = r_a - r_b
    return -(label * np.log(1 / (1 + np.exp(-d))) + (1 - label) * np.log(1 / (1 + np.exp(d))))


def gae_reverse_scan(rewards: np.ndarray, values: np.ndarray, gamma: float, lam: float):
    """A_t = delta_t + gamma lam A_{t+1}, delta_t = r_t + gamma V_{t+1} - V_t, V after the last token = 0."""
    L = len(rewards)
    adv, running = np.zeros(L), 0.0
    for t in reversed(range(L)):
        next_v = values[t + 1] if t + 1 < L else 0.0
        running = rewards[t] + gamma * next_v - values[t] + gamma * lam * running
        adv[t] = running
    return adv, adv + values


def expected_schedule(k: int) -> tuple[float, float]:
    return TAU0 * (1 + k / TAU_K0) ** (-TAU_C), LAM0 * (1 + k / LAM_K0) ** LAM_G


# ---------------------------------------------------------------------------------------------------------- PPO loss
def test_ppo_loss_equals_hand_computed_values(tmp_path):
    trainer = make_trainer(tmp_path, cliprange=0.2, cliprange_value=0.3, vf_coef=0.5)
    # token:          1     2     3     4     5     6 (masked out)
    ratio = torch.tensor([[1.1, 1.5, 0.5, 0.5, 1.5, 3.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0, -2.0, -2.0, 5.0]], dtype=torch.float64)
    old_v = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    new_v = torch.tensor([[0.1, 0.5, -0.5, 0.5, 2.0, 5.0]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 1.0, -1.0, 0.0, 1.0, -5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    new_lp = torch.log(ratio).requires_grad_(True)
    new = {"logprobs": new_lp, "values": new_v}
    ids = torch.zeros(1, 8, dtype=torch.long)
    old = Completions(ids, ids, mask, ids, ids, logprobs=torch.zeros_like(ratio), values=old_v, returns=returns,
                      advantages=adv)
    loss, stats = trainer._ppo_loss(new, old)
    # policy terms max(-A r, -A clip(r, 0.8, 1.2)):
    #   1: -1.1 (inside)  2: max(-1.5, -1.2) = -1.2  3: max(-0.5, -0.8) = -0.5  4: max(1.0, 1.6) = 1.6
    #   5: max(3.0, 2.4) = 3.0                       -> mean 1.8 / 5 = 0.36
    # value terms max((V - R)^2, (V0 + clip(V - V0, -0.3, 0.3) - R)^2):
    #   1: 0.81  2: max(0.25, 0.49)  3: max(0.25, 0.49)  4: max(0.25, 0.49)  5: max(1.0, 0.49) -> 0.5 * 3.28 / 5 = 0.328
    assert stats["policy_loss"].item() == pytest.approx(0.36, abs=1e-9)
    assert stats["value_loss"].item() == pytest.approx(0.328, abs=1e-9)
    assert loss.item() == pytest.approx(0.36 + 0.5 * 0.328, abs=1e-9)
    assert stats["clipfrac"].item() == pytest.approx(4 / 5)  # |r - 1| > 0.2 at tokens 2-5
    logr = np.log([1.1, 1.5, 0.5, 0.5, 1.5])
    assert stats["approxkl"].item() == pytest.approx(0.5 * np.mean(logr**2), rel=1e-9)
    # rloo advantages: no critic, no value loss (the statistic is still computed)
    trainer.args.advantage_estimator = "rloo"
    rloo_loss, rloo_stats = trainer._ppo_loss(new, old)
    assert rloo_loss.item() == pytest.approx(0.36, abs=1e-9)
    assert rloo_stats["value_loss"].item() == pytest.approx(0.328, abs=1e-9)
    trainer.args.advantage_estimator = "gae"
    # gradient in the log-probs: -A r / N where the unclipped term is active, 0 where the clip is (tokens 2 and 4)
    (grad,) = torch.autograd.grad(loss, new_lp)
    expected = np.array([-1.1, 0.0, -0.5, 0.0, 3.0, 0.0]) / 5
    np.testing.assert_allclose(grad[0].numpy(), expected, atol=1e-12)


# ----------------------------------------------------------------------------------------------------- rollout buffer
@pytest.mark.parametrize(
    "method, regularization, whiten_rewards, fused, objective, estimator",
    [("single_loop", "kl", False, False, "preference_nll", "gae"),
     ("single_loop", "entropy", True, False, "preference_nll", "gae"),
     ("single_loop", "kl", False, True, "preference_nll", "gae"), ("partial_sgd", "kl", False, False, "preference_nll", "gae"),
     ("single_loop", "kl", False, False, "win_rate", "gae"), ("covariance", "entropy", False, True, "win_rate", "gae"),
     ("penalized_covariance", "kl", False, False, "win_rate", "gae"),
     ("penalized_covariance", "kl", False, False, "win_rate", "rloo"),
     ("covariance", "entropy", False, True, "preference_nll", "rloo")],
)
def test_rollout_buffer_matches_an_independent_recomputation(tmp_path, method, regularization, whiten_rewards, fused,
                                                              objective, estimator):
    kw = dict(num_iterations=1, steps_per_generation=1, per_device_train_batch_size=8) if fused else {}
    trainer = make_trainer(tmp_path, method=method, regularization=regularization, whiten_rewards=whiten_rewards,
                           temperature=0.8, objective=objective, objective_weight=0.3, advantage_estimator=estimator,
                           **kw)
    assert trainer.fuse_rollout_and_update == fused
    k = 3
    (buf,), (step,) = micro_steps(trainer, iteration=k)
    if fused:  # the update's forward passes complete the rollout: the last loss part's batch holds every stage
        generated, buf = buf, step[-1].batch
        assert buf.theta.advantages is not None and generated.theta.advantages is None  # a new record, not an update
    model = trainer.model
    tau, lam = expected_schedule(k)
    assert buf.iteration == k
    assert buf.tau == pytest.approx(tau, rel=1e-12)
    assert buf.penalty_lambda == pytest.approx(lam, rel=1e-12)
    roles = ["theta"] + (["phi"] if method in ("single_loop", "fixed_tau", "nested_loop") else [])
    assert buf.actors == roles
    scored = roles + (["ref"] if objective == "win_rate" else [])
    tok = trainer.processing_class
    labels = buf.labels.double().numpy()

    scores = {}
    for r in scored:
        # the completion mask: 1 up to and including the first eos, 0 after it (where the ids are pad)
        P = buf.prompt_length
        for ids, m in zip(buf.completions(r).input_ids[:, P:], buf.completions(r).mask):
            eos = (ids == tok.eos_token_id).nonzero()
            end = int(eos[0]) + 1 if len(eos) else len(ids)
            assert m.tolist() == [1] * end + [0] * (len(ids) - end)
            assert (ids[end:] == tok.pad_token_id).all()
        rows = unpadded_rows(buf, r)
        texts = [tok.decode(c, skip_special_tokens=True) for _, c in rows]
        assert texts == buf.stats.texts[r]
        # r_x of each (prompt, completion) scored alone, without padding
        with torch.no_grad():
            scores[r] = np.array([model.reward_model(input_ids=torch.cat([p, c])[None]).logits[0, 0].item()
                                  for p, c in rows])
        np.testing.assert_allclose(buf.completions(r).score.double().numpy(), scores[r], atol=1e-5)
    s = np.array(char_score(buf.stats.texts["theta"]))
    if objective == "win_rate":
        # the oracle's soft labels on (theta's completion i, the reference's completion i); g = w * loss - label
        s_ref = np.array(char_score(buf.stats.texts["ref"]))
        np.testing.assert_allclose(labels, 1 / (1 + np.exp(-(s - s_ref))), atol=1e-6)
        pair_loss = bt_nll(scores["theta"], scores["ref"], labels)
        g = 0.3 * pair_loss - labels
    else:
        # the oracle's soft labels on theta's pairs (2i, 2i+1); g = 2 * the pair's loss (f is quadratic in pi)
        np.testing.assert_allclose(labels, 1 / (1 + np.exp(-(s[0::2] - s[1::2]))), atol=1e-6)
        pair_loss = bt_nll(scores["theta"][0::2], scores["theta"][1::2], labels)
        g = 2 * np.repeat(pair_loss, 2)
    np.testing.assert_allclose(buf.pair_loss.double().numpy(), pair_loss, atol=1e-5)
    np.testing.assert_allclose(buf.theta.g.double().numpy(), g, atol=1e-5)

    for r in roles:
        rows = unpadded_rows(buf, r)
        policy = model.policy_theta if r == "theta" else model.policy_phi
        # theta maximizes J_tau - f / lambda: its terminal reward is r_x - g / lambda (partial_sgd, covariance: r_x)
        penalized = method in ("single_loop", "fixed_tau", "nested_loop", "penalized_covariance")
        terminal = scores[r] - (g / lam if (r == "theta" and penalized) else 0.0)
        per_row = []
        for i, (p, c) in enumerate(rows):
            lp, values, _ = recompute_row(policy, model.value_head(r), p, c, 0.8)
            L = len(c)
            np.testing.assert_allclose(buf.completions(r).logprobs[i, :L].double().numpy(), lp.numpy(), atol=1e-4)
            np.testing.assert_allclose(buf.completions(r).values[i, :L].double().numpy(), values.numpy(), atol=1e-4)
            if regularization == "kl":
                ref_lp, _, _ = recompute_row(model.ref_policy, None, p, c, 0.8)
                np.testing.assert_allclose(buf.completions(r).ref_logprobs[i, :L].double().numpy(), ref_lp.numpy(), atol=1e-4)
                penalty = (lp - ref_lp).numpy()
            else:
                penalty = lp.numpy()
            rewards = -tau * penalty
            rewards[-1] += terminal[i]
            per_row.append((rewards, values.numpy(), penalty))
        if whiten_rewards:  # rescaled to unit variance over the role's real tokens; the mean is kept
            flat = np.concatenate([rw for rw, _, _ in per_row])
            mean, std = flat.mean(), np.sqrt(flat.var(ddof=1) + 1e-8)
            per_row = [((rw - mean) / std + mean, v, pen) for rw, v, pen in per_row]
        if estimator == "rloo":
            # one advantage per completion: its return minus the mean of its prompt's other completion's (n = 2),
            # on every token; the critic's targets are its own values
            n = trainer.args.num_generations
            ret = np.array([terminal[i] - tau * pen.sum() for i, (_, _, pen) in enumerate(per_row)]).reshape(-1, n)
            loo = (ret - (ret.sum(1, keepdims=True) - ret) / (n - 1)).reshape(-1)
            gae = [(np.full(len(v), loo[i]), v) for i, (_, v, _) in enumerate(per_row)]
        else:
            gae = [gae_reverse_scan(rw, v, GAMMA, GAE_LAMBDA) for rw, v, _ in per_row]
        flat = np.concatenate([a for a, _ in gae])
        mean, std = flat.mean(), np.sqrt(flat.var(ddof=1) + 1e-8)
        for i, ((adv, ret), (_, _, pen)) in enumerate(zip(gae, per_row)):
            L = len(adv)
            np.testing.assert_allclose(buf.completions(r).advantages[i, :L].double().numpy(), (adv - mean) / std, atol=2e-4)
            np.testing.assert_allclose(buf.completions(r).returns[i, :L].double().numpy(), ret, atol=1e-4)
            assert buf.completions(r).seq_penalty[i].item() == pytest.approx(pen.sum(), abs=1e-4)
            assert not buf.completions(r).advantages[i, L:].any() and not buf.completions(r).returns[i, L:].any()
        # the micro-step's backward pass reached the critic through its value loss, except with rloo (no critic)
        critic_grads = [p.grad for p in model.value_head(r).parameters() if p.grad is not None]
        assert any(g.any() for g in critic_grads) == (estimator == "gae")


def test_each_epoch_partitions_the_rollout_and_only_the_first_trains_x(tmp_path):
    trainer = make_trainer(tmp_path)  # 2 epochs x 2 mini-batches over 4 prompts x 2 completions
    rollouts, steps = micro_steps(trainer, iteration=1, count=4)
    (buf,) = rollouts  # generated at the first micro-step, replayed by the others
    N = len(buf.theta.input_ids)

    def key(role_batch, i):
        return tuple(role_batch.input_ids[i].tolist()) + tuple(np.round(role_batch.advantages[i].tolist(), 6))

    whole = {r: sorted(key(buf.completions(r), i) for i in range(N)) for r in ("theta", "phi")}
    for epoch in range(2):
        seen = {"theta": [], "phi": []}
        for j in range(2):
            step = steps[2 * epoch + j]
            batch = step[0].batch
            assert all(inputs.batch is batch for inputs in step)  # every loss part of a micro-step: one mini-batch
            assert batch.reward_step == (epoch == 0)
            assert any(part.startswith("reward/") for inputs in step for part in inputs.parts) == (epoch == 0)
            for r in seen:
                seen[r] += [key(batch.completions(r), i) for i in range(len(batch.completions(r).input_ids))]
            # the pair labels travel with their completions
            ids = batch.theta.input_ids
            for p in range(len(batch.labels)):
                a = [i for i in range(N) if torch.equal(buf.theta.input_ids[i], ids[2 * p])]
                assert any(i % 2 == 0 and torch.equal(buf.theta.input_ids[i + 1], ids[2 * p + 1])
                           and buf.labels[i // 2] == batch.labels[p] for i in a)
            if epoch == 0:  # r_x's inputs: each actor's rows
                for r in ("theta", "phi"):
                    assert torch.equal(batch.completions(r).reward_input_ids, batch.completions(r).input_ids)
        for r in seen:
            assert sorted(seen[r]) == whole[r]


# ------------------------------------------------------------------------------------------------ optimizer structure
class StepRecorder:
    """Records, at each optimizer step (after clipping), every group's learning rate and post-clip gradient norm, and
    the pre-clip norms the trainer logged for this step."""

    def __init__(self, trainer: BilevelTrainer):
        self.trainer, self.steps = trainer, []
        trainer.create_optimizer()
        trainer.optimizer.register_step_pre_hook(self)

    def __call__(self, optimizer, args, kwargs):
        rec = {"step": self.trainer.state.global_step}
        for g in optimizer.param_groups:
            grads = [p.grad for p in g["params"] if p.grad is not None]
            post = float(torch.sqrt(sum((q.double() ** 2).sum() for q in grads))) if grads else None
            pre = self.trainer._metrics[f"grad_norm/{g['name']}"][-1] if grads else None
            rec[g["name"]] = {"lr": g["lr"], "post": post, "pre": pre}
        self.steps.append(rec)


def test_learning_rates_follow_their_schedules_and_clipping_is_per_role(tmp_path):
    trainer = make_trainer(
        tmp_path, max_steps=12, penalty_lambda=1e4, penalty_lambda_schedule="constant", max_grad_norm=1.0,
        actor_learning_rate=1e-3, critic_learning_rate=2e-3, reward_learning_rate=5e-4,
        actor_lr_schedule="polynomial", actor_lr_decay=0.5, critic_lr_schedule="polynomial", critic_lr_decay=1.0,
        reward_lr_schedule="polynomial", reward_lr_decay=2.0, lr_horizon=1.5,
    )
    rec = StepRecorder(trainer)
    trainer.train()
    spi = trainer.args.steps_per_iteration
    assert [s["step"] for s in rec.steps] == list(range(12))
    base = {"actor": 1e-3, "critic": 2e-3, "reward": 5e-4}  # distinct, so a group given another's rate shows
    decay = {"actor": 0.5, "critic": 1.0, "reward": 2.0}
    for s in rec.steps:
        k, epoch = divmod(s["step"], spi)[0], (s["step"] % spi) // (trainer.args.steps_per_generation // trainer.args.gradient_accumulation_steps)
        for role in base:
            assert s[role]["lr"] == pytest.approx(base[role] * (1 + k / 1.5) ** (-decay[role]), rel=1e-9), (s, role)
        # x gets a gradient in the first epoch of each iteration only
        assert (s["reward"]["post"] is not None) == (epoch == 0), s
        # each role is clipped to max_grad_norm on its own: the lambda-scaled reward gradient does not shrink the
        # actors' and critics' steps
        for role in base:
            if s[role]["post"] is not None:
                assert s[role]["post"] == pytest.approx(min(s[role]["pre"], 1.0), rel=1e-4), (s, role)
        if epoch == 0:
            assert s["reward"]["pre"] > 50.0  # the test needs a reward gradient far above the clip norm
    # each role's rate is logged under its own name (after the step: the rate of step h["step"]); HF's single
    # learning_rate, the actors', is not
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 12
    for h in logs:
        k = h["step"] // spi
        assert "learning_rate" not in h
        for role in base:
            assert h[f"learning_rate/{role}"] == pytest.approx(base[role] * (1 + k / 1.5) ** (-decay[role]), rel=1e-6)


def test_reward_adam_beta2_sets_the_second_moment_decay_of_x_alone(tmp_path):
    """Adam's second moment of x's parameters follows reward_adam_beta2; the actors' and critics' adam_beta2."""
    trainer = make_trainer(tmp_path, max_steps=8, adam_beta2=0.999, reward_adam_beta2=0.5)
    trainer.create_optimizer()
    grads = {}  # parameter -> the gradients it was stepped with (after clipping)

    def record(optimizer, args, kwargs):
        for g in optimizer.param_groups:
            for q in g["params"]:
                if q.grad is not None:
                    grads.setdefault(q, []).append(q.grad.detach().clone())

    trainer.optimizer.register_step_pre_hook(record)
    trainer.train()
    beta2 = {g["name"]: g["betas"][1] for g in trainer.optimizer.param_groups}
    assert beta2 == {"actor": 0.999, "critic": 0.999, "reward": 0.5}
    for g in trainer.optimizer.param_groups:
        q = next(q for q in g["params"] if q in grads)
        v = torch.zeros_like(q)
        for grad in grads[q]:
            v = beta2[g["name"]] * v + (1 - beta2[g["name"]]) * grad**2
        torch.testing.assert_close(trainer.optimizer.state[q]["exp_avg_sq"], v, rtol=1e-5, atol=1e-12)
        assert len(grads[q]) >= 2  # the recursion is exercised


def test_nested_loop_updates_x_only_at_every_nth_iteration(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4 * 6, method="nested_loop", nested_inner_steps=3)
    rec = StepRecorder(trainer)
    x_before = [p.detach().clone() for p in trainer.model.reward_model.parameters()]
    trainer.train()
    spi = trainer.args.steps_per_iteration
    reward_steps = [s["step"] for s in rec.steps if s["reward"]["post"] is not None]
    # iterations k = 2 and 5 ((k + 1) % 3 == 0), first epoch (2 mini-batches) of each
    assert reward_steps == [2 * spi, 2 * spi + 1, 5 * spi, 5 * spi + 1]
    assert all(s["actor"]["post"] is not None for s in rec.steps)
    assert any(not torch.equal(a, b) for a, b in zip(x_before, trainer.model.reward_model.parameters()))


def test_x_does_not_move_outside_its_steps(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=8)
    x = lambda: torch.cat([p.detach().flatten().clone() for p in trainer.model.reward_model.parameters()])  # noqa: E731
    snapshots = []
    trainer.create_optimizer()
    trainer.optimizer.register_step_post_hook(lambda opt, a, kw: snapshots.append(x()))
    x0 = x()
    trainer.train()
    spi = trainer.args.steps_per_iteration
    moved = [not torch.equal(snapshots[i], snapshots[i - 1] if i else x0) for i in range(len(snapshots))]
    # moves at the first epoch's two mini-batches of each iteration; AdamW's momentum must not move x afterwards
    assert moved == [(i % spi) < 2 for i in range(8)]


# -------------------------------------------------------------------------------------------------------- metrics
def test_rollout_metrics_equal_their_recomputation_from_the_buffer(tmp_path):
    trainer = make_trainer(tmp_path)
    k = 2
    (buf,), _ = micro_steps(trainer, iteration=k)
    trainer.log({})  # what the training loop logs after this micro-step's optimizer step
    m = trainer.state.log_history[-1]
    tau, lam = expected_schedule(k)
    labels = buf.labels.double().numpy()
    th, ph = (buf.completions(r).score.double().numpy() for r in ("theta", "phi"))
    d = th[0::2] - th[1::2]
    correct = np.where(d > 0, labels, np.where(d < 0, 1 - labels, 0.5))  # P(r_x orders the pair as the oracle)
    assert abs(correct.mean() - 0.5) > 0.01  # an inverted accuracy would differ
    assert m["objective/pref_accuracy"] == pytest.approx(correct.mean(), abs=1e-6)
    assert m["objective/upper_loss"] == pytest.approx(bt_nll(th[0::2], th[1::2], labels).mean(), abs=1e-5)
    assert m["objective/tau"] == pytest.approx(tau) and m["objective/lambda"] == pytest.approx(lam)
    assert m["reward/theta_mean"] == pytest.approx(th.mean(), abs=1e-5)
    assert m["reward/phi_mean"] == pytest.approx(ph.mean(), abs=1e-5)
    kl, J = {}, {}
    for r, score in (("theta", th), ("phi", ph)):
        b = buf.completions(r)
        mask = b.mask.double()
        kl[r] = ((b.logprobs.double() - b.ref_logprobs.double()) * mask).sum(1)
        J[r] = score - tau * kl[r].numpy()  # regularized return of each completion
        assert m[f"policy_{r}/kl"] == pytest.approx(kl[r].mean().item(), abs=1e-5)
        assert m[f"completions/{r}_mean_length"] == pytest.approx(mask.sum(1).mean().item())
        # entropies recomputed from unpadded forward passes
        policy = trainer.model.policy_theta if r == "theta" else trainer.model.policy_phi
        ent = torch.cat([recompute_row(policy, None, p, c, 1.0)[2] for p, c in unpadded_rows(buf, r)])
        assert m[f"policy_{r}/entropy"] == pytest.approx(ent.mean().item(), abs=1e-4)
    assert kl["theta"].abs().max() > 1e-2  # the actors differ from the reference: the KL terms matter
    gap = J["phi"].mean() - J["theta"].mean()
    assert abs(gap) > 1e-3
    assert m["objective/penalty_gap"] == pytest.approx(gap, abs=1e-5)
    texts = buf.stats.texts["theta"]
    assert m["oracle/score_theta"] == pytest.approx(np.mean(char_score(texts)), abs=1e-6)
    assert m["oracle/queries"] == len(labels) == 4


@pytest.mark.parametrize("n", [1, 2])
def test_evaluate_reports_means_over_all_prompts_and_leaves_training_untouched(tmp_path, n):
    eval_prompts = ["the cat", "a dog was very", "we love", "it is very good and", "the sun", "dark night", "fun"]
    trainer = make_trainer(tmp_path, eval_prompts=eval_prompts, per_device_eval_batch_size=3, num_eval_generations=n)
    generated = []
    generate = trainer._generate

    def spy(role, ids, mask):
        out = generate(role, ids, mask)
        generated.append((ids, mask, out))
        return out

    trainer._generate = spy
    params = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.evaluate()
    # an uneven last batch (a mean of batch means would differ); n completions of each prompt
    assert [len(ids) for ids, _, _ in generated] == [3 * n, 3 * n, n]
    assert len({tuple(out[i].tolist()) for _, _, out in generated[:1] for i in range(n)}) == n  # distinct samples
    tok, rewards, texts = trainer.processing_class, [], []
    for ids, mask, out in generated:
        for row, am, comp in zip(ids, mask, out):
            eos = (comp == tok.eos_token_id).nonzero()
            comp = comp[: int(eos[0]) + 1] if len(eos) else comp
            texts.append(tok.decode(comp, skip_special_tokens=True))
            with torch.no_grad():
                x = torch.cat([row[am.bool()], comp])[None]
                rewards.append(trainer.model.reward_model(input_ids=x).logits[0, 0].item())
    assert metrics["eval_reward/theta_mean"] == pytest.approx(np.mean(rewards), abs=1e-5)
    assert metrics["eval_oracle/score_theta"] == pytest.approx(np.mean(char_score(texts)), abs=1e-6)
    assert trainer.oracle_queries == 0
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.model.parameters()))


def test_evaluation_during_training_does_not_change_training(tmp_path):
    def run(path, **kw):
        trainer = make_trainer(path, max_steps=8, eval_prompts=PROMPTS[:3], **kw)
        trainer.train()
        return [p.detach().clone() for p in trainer.model.parameters()]

    plain = run(tmp_path / "plain")
    with_eval = run(tmp_path / "eval", eval_strategy="steps", eval_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(plain, with_eval))


def test_schedules_are_read_at_the_rollouts_iteration(tmp_path):
    """A polynomial tau and lambda inside a run: the logged values are those of k = global_step // steps_per_iteration."""
    trainer = make_trainer(tmp_path, max_steps=12)
    logged = []

    class Capture(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs))

    trainer.add_callback(Capture())
    trainer.train()
    spi = trainer.args.steps_per_iteration
    steps = [entry for entry in logged if "objective/tau" in entry and "train_runtime" not in entry]
    assert len(steps) == 12
    for step, entry in enumerate(steps):
        tau, lam = expected_schedule(step // spi)
        assert entry["objective/tau"] == pytest.approx(tau, rel=1e-6)
        assert entry["objective/lambda"] == pytest.approx(lam, rel=1e-6)
    assert math.isclose(steps[-1]["oracle/queries"], 3 * 4)  # 3 iterations x 4 pairs


def test_reward_model_loss_equals_hand_computed_values():
    r_theta = torch.tensor([1.0, 0.0, -0.5, 0.5])  # pairs (1, 0) and (-0.5, 0.5)
    r_phi = torch.tensor([2.0, 1.0, 0.0, 1.0])
    labels = torch.tensor([1.0, 0.25])
    pair_loss = torch.tensor([math.log(1 + math.exp(-1.0)), 0.25 * math.log(1 + math.exp(1.0))
                              + 0.75 * math.log(1 + math.exp(-1.0))])
    assert torch.allclose(pair_loss, bradley_terry_loss(r_theta[0::2], r_theta[1::2], labels))
    f, lam, tau = float(pair_loss.mean()), 3.0, 0.5
    nll = PreferenceNLL()

    def loss(method, objective=nll, **kw):
        args = dict(pair_loss=pair_loss, r_theta=r_theta, r_phi=None, g=None) | kw
        return reward_model_loss(objective, method, args["pair_loss"], labels, args["r_theta"], args["r_phi"], lam,
                                 tau, g=args["g"], covariance_weight=kw.get("weight", 1.0)).item()

    # penalty methods: f + lambda (mean r_x(phi) - mean r_x(theta)) = f + 3 (1.0 - 0.25), in two parts
    assert loss("single_loop", r_phi=r_phi) == pytest.approx(f + 3 * 0.75, rel=1e-6)
    assert loss("nested_loop") == pytest.approx(f - 3 * 0.25, rel=1e-6)
    assert loss("fixed_tau", pair_loss=None, r_theta=None, r_phi=r_phi) == pytest.approx(3 * 1.0, rel=1e-6)
    assert loss("partial_sgd") == pytest.approx(f, rel=1e-6)
    # covariance: f + (1/tau) sum (g_i - mean g) r_i / (N - 1); g = (2, 0, 1, 1): mean 1, centered (1, -1, 0, 0)
    g = torch.tensor([2.0, 0.0, 1.0, 1.0])
    assert loss("covariance", g=g) == pytest.approx(f + (1.0 * 1.0 - 1.0 * 0.0) / (3 * tau), rel=1e-6)
    assert loss("penalized_covariance", g=g) == pytest.approx(f + (1.0 * 1.0 - 1.0 * 0.0) / (3 * tau), rel=1e-6)
    # during the hypergradient warmup the covariance term is weighted: 0 is partial_sgd's loss
    assert loss("penalized_covariance", g=g, weight=0.25) == pytest.approx(f + 0.25 / (3 * tau), rel=1e-6)
    assert loss("covariance", g=g, weight=0.0) == pytest.approx(f, rel=1e-6)
    # win_rate: x's part of f is w * the BT-NLL
    assert loss("partial_sgd", objective=WinRate(0.3)) == pytest.approx(0.3 * f, rel=1e-6)


def test_objectives_completion_values_are_df_dpi():
    pair_loss, labels = torch.tensor([0.5, 1.5]), torch.tensor([1.0, 0.2])
    # preference_nll: f = E_{y, y'}[L(y, y')] is quadratic in pi, df/dpi(y) = 2 E_{y'}[L(y, y')]: each completion of
    # a pair gets twice the pair's loss
    torch.testing.assert_close(PreferenceNLL().completion_values(pair_loss, labels), torch.tensor([1.0, 1.0, 3.0, 3.0]))
    # win_rate: f = E_{y ~ pi, y' ~ ref}[w L - label] is linear in pi
    torch.testing.assert_close(WinRate(0.5).completion_values(pair_loss, labels), torch.tensor([0.25 - 1.0, 0.75 - 0.2]))
    torch.testing.assert_close(WinRate(0.5).value(pair_loss, labels), torch.tensor((0.25 - 1.0 + 0.75 - 0.2) / 2))
    with pytest.raises(ValueError, match="objective_weight"):
        WinRate(-0.1)
    with pytest.raises(ValueError, match="objective must be one of"):
        get_objective("accuracy")


def test_logged_losses_equal_their_recomputation(tmp_path):
    trainer = make_trainer(tmp_path)
    _, (step,) = micro_steps(trainer, iteration=0, seed=3)
    batch = step[0].batch  # the first micro-step's mini-batch, given to compute_loss once per loss part
    metrics = {key: v[-1] for key, v in trainer._metrics.items()}
    P = batch.prompt_length
    scores = {}
    for r in ("theta", "phi"):
        with torch.no_grad():
            scores[r] = torch.tensor([
                trainer.model.reward_model(input_ids=torch.cat([ids[:P][am[:P].bool()], ids[P:][m.bool()]])[None])
                .logits[0, 0].item()
                for ids, am, m in zip(batch.completions(r).input_ids, batch.completions(r).attention_mask, batch.completions(r).mask)
            ])
    th, labels = scores["theta"].double().numpy(), batch.labels.double().numpy()
    expected = bt_nll(th[0::2], th[1::2], labels).mean() + batch.penalty_lambda * (scores["phi"].mean() - scores["theta"].mean())
    assert metrics["objective/reward_loss"] == pytest.approx(float(expected), abs=1e-5)
    for r in ("theta", "phi"):
        b = batch.completions(r)
        mask = b.mask.double()
        # the first micro-step's policy equals the rollout's: ratio 1, so the PPO terms reduce to -A and (V - R)^2
        assert metrics[f"policy_{r}/approxkl"] == pytest.approx(0.0, abs=1e-10)
        pg = -(b.advantages.double() * mask).sum() / mask.sum()
        assert metrics[f"policy_{r}/policy_loss"] == pytest.approx(pg.item(), abs=1e-5)
        vf = 0.5 * (((b.values.double() - b.returns.double()) ** 2) * mask).sum() / mask.sum()
        assert vf.item() > 1e-3
        assert metrics[f"value_{r}/loss"] == pytest.approx(vf.item(), rel=1e-4)
    assert metrics["value/loss"] == pytest.approx((metrics["value_theta/loss"] + metrics["value_phi/loss"]) / 2)


def test_the_covariance_weight_ramps_over_the_warmup_and_reaches_the_loss(tmp_path):
    """hypergradient_warmup_ratio 0.5 of 8 iterations: weight k / 4, then 1; logged, and in x's loss."""
    trainer = make_trainer(tmp_path, method="penalized_covariance", objective="win_rate", max_steps=32,
                           hypergradient_warmup_ratio=0.5)
    assert trainer.args.steps_per_iteration == 4
    assert [trainer.covariance_weight(k) for k in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    (buf,), (step,) = micro_steps(trainer, iteration=1)
    batch = step[0].batch
    trainer._step_metrics = {}
    computed = trainer.compute_loss(trainer.model, LossInputs(batch, ("reward/theta",)))
    expected = reward_model_loss(trainer.objective, "penalized_covariance", batch.pair_loss, batch.labels,
                                 batch.theta.score, None, batch.penalty_lambda, batch.tau, g=batch.theta.g,
                                 covariance_weight=0.25)
    full = reward_model_loss(trainer.objective, "penalized_covariance", batch.pair_loss, batch.labels,
                             batch.theta.score, None, batch.penalty_lambda, batch.tau, g=batch.theta.g)
    assert computed.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(full.item() - expected.item()) > 1e-3  # the weight matters on this batch
    assert trainer._rollout_metrics["objective/covariance_weight"] == 0.25
    # a run by epochs (max_steps -1): the warmup is a fraction of the training loop's step count
    by_epochs = make_trainer(tmp_path / "epochs", method="penalized_covariance", objective="win_rate",
                             hypergradient_warmup_ratio=0.25)
    by_epochs.state.max_steps = 64  # set by the training loop from the epochs before the first step
    assert [by_epochs.covariance_weight(k) for k in (0, 2, 4, 5)] == [0.0, 0.5, 1.0, 1.0]


def test_schedules_equal_hand_computed_values():
    # tau: constant, polynomial tau_0 (1 + k/k_0)^(-c), exponential tau_0 exp(-c k/k_0), each floored at tau_min
    assert tau_at(7, 0.4, 0.0, "constant", 0.5, 2.0) == 0.4
    assert tau_at(6, 0.4, 0.0, "polynomial", 0.5, 2.0) == pytest.approx(0.4 * 4 ** -0.5)
    assert tau_at(6, 0.4, 0.0, "exponential", 0.5, 2.0) == pytest.approx(0.4 * math.exp(-1.5))
    assert tau_at(6, 0.4, 0.15, "polynomial", 0.5, 2.0) == pytest.approx(0.2)  # above the floor
    assert tau_at(100, 0.4, 0.15, "exponential", 0.5, 2.0) == 0.15  # floored
    # lambda: constant, or lambda_0 (1 + k/k_0)^g capped at lambda_max
    assert lambda_at(9, 2.0, "constant", 0.5, 3.0, None) == 2.0
    assert lambda_at(9, 2.0, "polynomial", 0.5, 3.0, None) == pytest.approx(4.0)
    assert lambda_at(9, 2.0, "polynomial", 0.5, 3.0, 3.0) == 3.0
    # learning-rate factor: 1, or (1 + k/k_0)^(-c)
    assert lr_factor(5, "constant", 0.5, 10.0) == 1.0
    assert lr_factor(5, "polynomial", 2.0, 5.0) == pytest.approx(0.25)


def test_evaluate_calls_the_callbacks_once_per_evaluation(tmp_path):
    calls = []

    class Count(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            calls.append((state.global_step, sorted(metrics)))

    trainer = make_trainer(tmp_path, max_steps=8, eval_prompts=PROMPTS[:2], eval_strategy="steps", eval_steps=4)
    trainer.add_callback(Count())
    trainer.train()
    trainer.evaluate()
    assert [step for step, _ in calls] == [4, 8, 8]  # the last in-training evaluation runs once
    assert calls[0][1] == ["eval_oracle/score_theta", "eval_reward/theta_mean"]
    logged = [e["step"] for e in trainer.state.log_history if "eval_reward/theta_mean" in e]
    assert logged == [4, 8, 8]


def test_the_package_lists_its_public_names():
    import bilevel_rlhf

    assert "BilevelTrainer" in dir(bilevel_rlhf) and "UpperObjective" in dir(bilevel_rlhf)
    assert set(dir(bilevel_rlhf)) == set(bilevel_rlhf.__all__)


def test_resume_last_skips_a_checkpoint_cut_short_by_a_kill(tmp_path):
    """A save killed before its last file leaves a folder without the bilevel state: `last` resumes from the newest
    complete checkpoint and says which one it skipped."""
    from bilevel_rlhf.happy_tweet.recipe import _resolve_resume
    from bilevel_rlhf.trainer import last_complete_checkpoint

    trainer = make_trainer(tmp_path, max_steps=8, save_strategy="steps", save_steps=4)
    trainer.train()
    out = trainer.args.output_dir
    assert last_complete_checkpoint(out) == (os.path.join(out, "checkpoint-8"), [])
    # the kill: checkpoint-12 has its config and weights but not the state written last
    partial = os.path.join(out, "checkpoint-12")
    os.makedirs(partial)
    for name in ("config.json", "model.safetensors", "trainer_state.json"):
        open(os.path.join(partial, name), "w").close()
    assert last_complete_checkpoint(out) == (os.path.join(out, "checkpoint-8"), [partial])
    with pytest.warns(UserWarning, match="skipping .*checkpoint-12, an incomplete checkpoint"):
        assert _resolve_resume("last", out) == os.path.join(out, "checkpoint-8")
    resumed = make_trainer(tmp_path, max_steps=12, save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=os.path.join(out, "checkpoint-8"))
    assert resumed.state.global_step == 12


@pytest.mark.parametrize("method", ["single_loop", "penalized_covariance"])
def test_missing_eos_penalty_lowers_the_actors_reward_of_completions_without_eos(tmp_path, method):
    """missing_eos_penalty p: an actor's terminal reward is its r_x score (minus g / lambda for the penalized theta)
    minus p exactly where its completion has no eos; the reference's and the scores themselves are untouched."""
    p = 0.7
    runs = {}
    for penalty in (None, p):
        torch.manual_seed(0)
        trainer = make_trainer(tmp_path / str(penalty), method=method, objective="win_rate",
                               num_iterations=2, max_completion_length=3, missing_eos_penalty=penalty)
        runs[penalty] = trainer.generate_and_score(PROMPTS[:8])
    base, pen = runs[None], runs[p]
    eos = trainer.processing_class.eos_token_id
    for role in ("theta", "phi") if method == "single_loop" else ("theta",):
        c, c0 = pen.completions(role), base.completions(role)
        torch.testing.assert_close(c.score, c0.score)  # the same samples and scores: only the reward differs
        no_eos = ~((c.input_ids[:, pen.prompt_length:] == eos) & c.mask.bool()).any(1)
        assert 0 < int(no_eos.sum()) < len(no_eos)  # both kinds of completion in the batch
        torch.testing.assert_close(c.terminal, c0.terminal - p * no_eos.float())
    assert pen.ref.terminal is None or torch.equal(pen.ref.terminal, pen.ref.score)
    if method == "single_loop":  # the penalty gap is phi's objective, eos penalty included, on both actors' samples
        trainer._log_rollout(pen)
        tau = pen.tau
        j = {r: pen.completions(r).score - p * no_eos_of(pen, r, eos).float() - tau * pen.completions(r).seq_penalty
             for r in ("theta", "phi")}
        gap = (j["phi"].mean() - j["theta"].mean()).item()
        assert trainer._rollout_metrics["objective/penalty_gap"] == pytest.approx(gap, abs=1e-5)
        unpenalized = (pen.phi.score - tau * pen.phi.seq_penalty).mean() - (pen.theta.score - tau * pen.theta.seq_penalty).mean()
        assert abs(gap - unpenalized.item()) > 1e-3  # the eos penalty moves the gap here


def no_eos_of(rollout, role, eos):
    c = rollout.completions(role)
    return ~((c.input_ids[:, rollout.prompt_length:] == eos) & c.mask.bool()).any(1)
