"""The guards (`bilevel_rlhf.guards`): lost tracking and collapse detected and warned by name, phi repaired from theta;
on the exact testbed, a phi that has lost track recovers only with the resync."""

import os
import warnings

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

import testing_utils
from bilevel_rlhf import BilevelConfig, BilevelTrainer, panel, testbed
from bilevel_rlhf.guards import CollapseWarning, GuardRecord, TrackingGuard, TrackingWarning, copy_actor


def test_tracking_guard_warns_after_patience_and_asks_for_a_resync():
    guard = TrackingGuard(tolerance=0.1, patience=3, resync=True, collapse_fraction=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k, gap in enumerate([-0.5, -0.5, -0.05, -0.5, -0.5]):  # -0.05 is within the tolerance: the run restarts
            guard.check({"objective/penalty_gap": gap}, k)
    assert guard.record.longest_streak == 2 and not guard.record.resync_due
    with pytest.warns(TrackingWarning, match=r"iteration 5: .* = -0\.5 .* 3 iterations; re-synchronising"):
        logged = guard.check({"objective/penalty_gap": -0.5}, 5)
    assert guard.record.resync_due and guard.record.streak == 0 and guard.record.negative_gap_iterations == 5
    assert logged["guard/negative_gap_iterations"] == 5.0
    # detection without the repair: the warning says how to turn it on
    passive = TrackingGuard(tolerance=0.0, patience=2, resync=False, collapse_fraction=0.1)
    passive.check({"objective/penalty_gap": -1.0}, 0)
    with pytest.warns(TrackingWarning, match="set phi_resync=True"):
        passive.check({"objective/penalty_gap": -1.0}, 1)
    assert not passive.record.resync_due


def test_collapse_guard_warns_below_the_fraction_of_the_first_entropy():
    guard = TrackingGuard(tolerance=0.0, patience=3, resync=False, collapse_fraction=0.1)
    guard.check({"policy_theta/entropy": 2.0, "policy_phi/entropy": 1.0}, 0)
    guard.check({"policy_theta/entropy": 0.21, "policy_phi/entropy": 0.5}, 1)
    assert guard.record.collapses == 0
    with pytest.warns(CollapseWarning, match=r"iteration 2: theta collapsed: .* 0\.19, below 0\.1 x its initial 2"):
        guard.check({"policy_theta/entropy": 0.19, "policy_phi/entropy": 0.5}, 2)
    assert guard.record.collapses == 1
    assert GuardRecord.from_state_dict(guard.record.state_dict()) == guard.record


@pytest.mark.parametrize("peft", [False, True])
def test_copy_actor_copies_weights_value_head_and_optimizer_moments(tmp_path, peft):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM") if peft else None
    trainer = testing_utils.make_trainer(tmp_path, ["a"] * 4, method="single_loop", peft_config=peft_config,
                                         per_device_train_batch_size=4, max_steps=1)
    model = trainer.model
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape))
    optimizer = trainer.create_optimizer()
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.randn(p.shape),
                                  "exp_avg_sq": torch.rand(p.shape)}
    copy_actor(model, optimizer, source="theta", target="phi")
    from bilevel_rlhf.guards import _role_parameters

    theta, phi = _role_parameters(model, "theta"), _role_parameters(model, "phi")
    assert len(theta) == len(phi) > 2
    for (n, p), (_, q) in zip(theta, phi):
        assert p is not q and torch.equal(p, q), n
        assert torch.equal(optimizer.state[p]["exp_avg"], optimizer.state[q]["exp_avg"]), n
        assert optimizer.state[p]["exp_avg"] is not optimizer.state[q]["exp_avg"]


def _lost_phi_run(tmp_path, phi_resync: bool) -> tuple[BilevelTrainer, testbed.MultiTokenProblem, list]:
    """single_loop on the exact testbed with phi pushed far from the reference (its logits x 4) and actors too slow
    to come back by themselves: theta beats phi at phi's own objective from the first rollout."""
    policy = testbed.make_policy(seed=0)
    problem = testbed.MultiTokenProblem.from_policy(policy, seed=0)
    config = BilevelConfig(
        output_dir=str(tmp_path), method="single_loop", seed=0, per_device_train_batch_size=64, num_generations=2,
        max_completion_length=3, max_prompt_length=2, tau_init=0.5, tau_schedule="constant", penalty_lambda=2.0,
        actor_learning_rate=1e-7, critic_learning_rate=1e-7, reward_learning_rate=1e-7, max_steps=6,
        common_random_numbers=True, use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no",
        tracking_patience=2, phi_resync=phi_resync,
    )
    trainer = BilevelTrainer(policy, testbed.TableReward(), problem.oracle(), config,
                             Dataset.from_dict({"prompt": [testbed.PROMPT] * 32}), processing_class=testbed.make_tokenizer())
    panel.scale_logits(trainer.model.policy_phi, 4.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return trainer, problem, [w for w in caught if issubclass(w.category, TrackingWarning)]


def test_lost_tracking_is_detected_and_repaired_by_the_resync(tmp_path):
    trainer, problem, caught = _lost_phi_run(tmp_path / "resync", phi_resync=True)
    ref = np.exp(problem.log_pi_ref)
    assert caught and "iteration 1:" in str(caught[0].message)
    assert trainer.guard.record.phi_resyncs >= 1
    kl_repaired = problem.kl(problem.policy_distribution(trainer.model.policy_phi), ref)
    # without the repair the loss of track is still reported, and phi stays where it was
    passive, _, caught_passive = _lost_phi_run(tmp_path / "passive", phi_resync=False)
    assert caught_passive and passive.guard.record.phi_resyncs == 0
    assert passive.guard.record.negative_gap_iterations == 6
    kl_lost = problem.kl(problem.policy_distribution(passive.model.policy_phi), ref)
    assert kl_repaired < 0.01 < 1.0 < kl_lost, (kl_repaired, kl_lost)


def _one_x_step(tmp_path, trust_region):
    policy = testbed.make_policy(seed=0)
    problem = testbed.MultiTokenProblem.from_policy(policy, seed=0)
    reward = testbed.TableReward()
    config = BilevelConfig(
        output_dir=str(tmp_path), method="covariance", seed=0, per_device_train_batch_size=32, num_generations=2,
        max_completion_length=3, max_prompt_length=2, tau_init=0.5, tau_schedule="constant",
        actor_learning_rate=1e-3, critic_learning_rate=1e-3, reward_learning_rate=0.1, max_steps=1,
        use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", reward_trust_region=trust_region,
    )
    trainer = BilevelTrainer(policy, reward, problem.oracle(), config,
                             Dataset.from_dict({"prompt": [testbed.PROMPT] * 16}), processing_class=testbed.make_tokenizer())
    trainer.train()
    return reward.x.detach().double().numpy(), trainer


def test_reward_trust_region_caps_the_tilt_change_by_scaling_the_step(tmp_path):
    """A table reward: the step moves only the sampled completions' entries, so max |dx| / tau is the measured
    change; the capped step is the uncapped one scaled by delta / change, and the change is then delta."""
    free, _ = _one_x_step(tmp_path / "free", 0.0)
    capped, trainer = _one_x_step(tmp_path / "capped", 0.01)
    change_free = np.abs(free).max() / 0.5
    assert change_free > 0.1  # Adam's first step moves each sampled entry by about the learning rate
    np.testing.assert_allclose(capped, free * (0.01 / change_free), rtol=1e-4, atol=1e-9)
    assert np.abs(capped).max() / 0.5 == pytest.approx(0.01, rel=1e-4)
    assert trainer.state.log_history[0]["reward/trust_scale"] == pytest.approx(0.01 / change_free, rel=1e-4)


def test_adaptive_tau_follows_the_controller_formula():
    from bilevel_rlhf.schedules import AdaptiveTau

    c = AdaptiveTau(tau_init=0.1, target_kl=4.0, horizon=10.0, tau_min=0.05)
    assert c.update(5.0) == pytest.approx(0.1 * (1 + 0.2 / 10))  # the error 0.25 is clipped at 0.2
    assert c.update(4.4) == pytest.approx(0.1 * 1.02 * (1 + 0.1 / 10))
    for _ in range(200):  # far below the target: tau shrinks to its floor
        c.update(0.0)
    assert c.value == 0.05


def test_adaptive_tau_steers_the_trainer_and_is_checkpointed(tmp_path):
    """theta's logits pushed far from the reference: its KL is above any small target, so tau grows each iteration
    by the controller's factor, and a resumed run continues from the saved value."""
    trainer = testing_utils.make_trainer(tmp_path, ["a", "b"] * 4, method="partial_sgd", tau_schedule="adaptive",
                                         tau_init=0.1, tau_target_kl=1e-3, tau_horizon=5.0, max_steps=3,
                                         per_device_train_batch_size=4, num_iterations=1, steps_per_generation=1,
                                         save_strategy="steps", save_steps=1)
    with torch.no_grad():
        for p in trainer.model.policy_theta.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    taus = []

    class Taus(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            taus.append(logs.get("objective/tau"))

    trainer.add_callback(Taus())
    trainer.train()
    taus = [t for t in taus if t is not None]
    np.testing.assert_allclose(taus[:3], [0.1, 0.1 * 1.04, 0.1 * 1.04**2], rtol=1e-6)
    assert trainer.adaptive_tau.value == pytest.approx(0.1 * 1.04**3)
    resumed = testing_utils.make_trainer(tmp_path, ["a", "b"] * 4, method="partial_sgd", tau_schedule="adaptive",
                                         tau_init=0.1, tau_target_kl=1e-3, tau_horizon=5.0, max_steps=3,
                                         per_device_train_batch_size=4, num_iterations=1, steps_per_generation=1)
    resumed._load_from_checkpoint(os.path.join(trainer.args.output_dir, "checkpoint-3"))
    assert resumed.adaptive_tau.value == pytest.approx(0.1 * 1.04**3)


def test_label_every_queries_the_oracle_on_labelled_iterations_only(tmp_path):
    """label_every = 2 over 4 iterations: the oracle is called at iterations 0 and 2; x moves only there; at the
    unlabelled iterations theta's terminal reward is r_x (no -g / lambda) and the reference does not generate."""
    calls = []
    oracle = testing_utils.happy_oracle()
    counting = type(oracle)(lambda texts: [t.split().count("happy") for t in texts], name="happy")

    def labelled_oracle(prompts, a, b):
        calls.append(len(prompts))
        return counting(prompts, a, b)

    trainer = testing_utils.make_trainer(tmp_path, ["a", "b"] * 4, oracle=labelled_oracle, method="penalized_covariance",
                                         objective="win_rate", num_generations=1, per_device_train_batch_size=4,
                                         num_iterations=1, steps_per_generation=2, max_steps=8, label_every=2,
                                         reward_learning_rate=1e-2)
    rollouts = testing_utils.record_rollouts(trainer)
    x_before = []
    trainer.add_callback(type("X", (TrainerCallback,), {"on_step_begin": lambda self, *a, **k: x_before.append(
        [p.detach().clone() for p in trainer.model.reward_model.parameters()])})())
    trainer.train()
    assert [r.iteration for r in rollouts] == [0, 1, 2, 3]
    assert calls == [8, 8] and trainer.oracle_queries == 16
    for r in rollouts:
        labelled = r.iteration % 2 == 0
        assert (r.labels is not None) == labelled and (r.ref is not None) == labelled
        if not labelled:  # theta's reward is r_x alone
            assert torch.equal(r.theta.terminal, r.theta.score)
        else:
            assert not torch.allclose(r.theta.terminal, r.theta.score)
    # 2 optimizer steps per iteration: x changes across steps of iterations 0 and 2 only
    x_after = x_before[1:] + [[p.detach() for p in trainer.model.reward_model.parameters()]]
    moved = [any(not torch.equal(a, b) for a, b in zip(x0, x1)) for x0, x1 in zip(x_before, x_after)]
    assert moved == [True, True, False, False, True, True, False, False]
