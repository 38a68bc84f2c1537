"""The fused rollout/update forward (one micro-step per iteration) gives the plain path's loss and gradients."""

from __future__ import annotations

import weakref

import pytest
import testing_utils
import torch
from testing_utils import record_loss_inputs

from bilevel_rlhf.trainer import BilevelTrainer

PROMPTS = ["the cat is", "a dog was", "we love the", "it is very"]
# this file's defaults: one iteration of 4 prompts, a schedule that weighs the penalty terms
CONFIG = dict(per_device_train_batch_size=8, max_completion_length=4, max_prompt_length=8, num_generations=2,
              penalty_lambda=2.0, tau_init=0.1)


def make_trainer(tmp_path, fuse: bool, peft: bool = False, **kw) -> BilevelTrainer:
    """`testing_utils.make_trainer` on PROMPTS with this file's defaults; `fuse`: fuse_rollout_and_update."""
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], task_type="CAUSAL_LM",
                                 init_lora_weights=False)  # random B: the adapters differ from the base at once
    return testing_utils.make_trainer(tmp_path, PROMPTS, peft_config=peft_config, fuse_rollout_and_update=fuse,
                                      **{**CONFIG, **kw})


def loss_and_grads(trainer: BilevelTrainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and gradients of all loss parts on one fresh rollout (`compute_loss` completes a fused one)."""
    torch.manual_seed(7)  # the same samples on both paths
    trainer.model.train()
    rollout = trainer.generate_and_score(PROMPTS)
    loss = trainer.compute_loss(trainer.model, rollout)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("method, peft, objective", [
    ("single_loop", False, "preference_nll"), ("partial_sgd", False, "preference_nll"),
    ("nested_loop", False, "preference_nll"), ("single_loop", True, "preference_nll"),
    ("single_loop", False, "win_rate"), ("covariance", False, "preference_nll"), ("covariance", True, "win_rate"),
])
def test_fused_forward_matches_the_plain_path(tmp_path, method, peft, objective):
    kw = dict(method=method, nested_inner_steps=2, objective=objective)
    fused = make_trainer(tmp_path / "fused", True, peft, **kw)
    plain = make_trainer(tmp_path / "plain", False, peft, **kw)
    assert fused.fuse_rollout_and_update and not plain.fuse_rollout_and_update
    loss_f, grads_f = loss_and_grads(fused)
    loss_p, grads_p = loss_and_grads(plain)
    torch.testing.assert_close(loss_f, loss_p, atol=1e-6, rtol=1e-5)
    assert grads_f.keys() == grads_p.keys()
    # every trained role gets a gradient (nested_loop: not x at iteration 0, which is not a reward iteration)
    assert any(n.startswith("reward_model") for n in grads_f) == (method != "nested_loop")
    assert any(n.startswith("policy_theta") for n in grads_f) and any(n.startswith("value_theta") for n in grads_f)
    if peft and method != "covariance":  # both adapters get their own gradient through the one shared base
        assert any(".phi." in n for n in grads_f) and any(".theta." in n for n in grads_f)
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_p[n], atol=1e-6, rtol=1e-4, msg=n)


def test_fusing_needs_one_micro_step_per_iteration(tmp_path):
    assert not make_trainer(tmp_path, True, num_iterations=2).fuse_rollout_and_update
    assert not make_trainer(tmp_path, True, steps_per_generation=2, per_device_train_batch_size=4).fuse_rollout_and_update
    assert not make_trainer(tmp_path, True, gradient_accumulation_steps=2, per_device_train_batch_size=4).fuse_rollout_and_update


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_policy_forward_matches_log_softmax_and_entropy(tmp_path, temperature):
    trainer = make_trainer(tmp_path, True)
    model = trainer.model
    ids = torch.tensor([[4, 5, 6, 7, 8], [9, 4, 5, 6, 7]])
    mask = torch.ones_like(ids)
    out = model.policy_forward("theta", ids, mask, 2, temperature)
    logits = model.policy_theta(input_ids=ids, attention_mask=mask).logits[:, 1:-1] / temperature
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out["logprobs"], logp.gather(-1, ids[:, 2:, None]).squeeze(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["entropy"], -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=1e-5)
    lean = model.policy_forward("theta", ids, mask, 2, temperature, with_values=False, with_entropy=False)
    assert set(lean) == {"logprobs"}


class SavedTensorMeter:
    """Bytes of the activations autograd holds for backward (parameters excluded), and their peak."""

    def __init__(self):
        self.live, self.peak = 0, 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if not (t.is_leaf and t.requires_grad):
            nbytes = t.untyped_storage().nbytes()
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, nbytes)
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


@pytest.mark.parametrize("fuse", [True, False])
def test_one_backward_per_part_gives_the_joint_gradients_with_one_part_held_at_a_time(tmp_path, fuse):
    joint = make_trainer(tmp_path / "joint", fuse)
    meter_joint = SavedTensorMeter()
    with meter_joint.hooks():
        loss_j, grads_j = loss_and_grads(joint)

    trainer = make_trainer(tmp_path / "parts", fuse)
    calls = []
    forward = trainer.model.forward

    def recording_forward(**kw):
        calls.append({name: len(kw[name]["input_ids"]) for name in ("phi", "theta", "reward") if kw.get(name)})
        return forward(**kw)

    trainer.model.forward = recording_forward
    loss_inputs = record_loss_inputs(trainer)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test does not run
    torch.manual_seed(7)
    meter = SavedTensorMeter()
    with meter.hooks():
        loss = trainer.training_step(trainer.model, [{"prompt": p} for p in PROMPTS])
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    # one forward/backward per part, r_x first (on theta's completions, then phi's), none over more than N rows
    N = len(PROMPTS) * 2
    assert calls == [{"reward": N}, {"reward": N}, {"theta": N}, {"phi": N}]
    torch.testing.assert_close(loss, loss_j, atol=1e-6, rtol=1e-5)
    assert grads.keys() == grads_j.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads_j[n], atol=1e-6, rtol=1e-4, msg=n)
    # the graph of one part at a time: the peak of held activations is well below the joint pass's
    assert 0 < meter.peak < 0.7 * meter_joint.peak, (meter.peak, meter_joint.peak)
    assert trainer._metrics["policy/approxkl"]
    # the batch of the last loss part holds every stage, fused (from the update's own forward passes) or not
    for r in ("theta", "phi"):
        c = loss_inputs[-1].batch.completions(r)
        assert all(t is not None for t in (c.score, c.terminal, c.logprobs, c.values, c.advantages, c.returns))
    if fuse:  # the PPO ratio of the fused update is exactly 1
        assert float(trainer._metrics["policy/approxkl"][-1]) == 0.0


@pytest.mark.parametrize("fuse", [True, False])
def test_training_step_takes_a_rollout_from_generate_and_score(tmp_path, fuse):
    trainer = make_trainer(tmp_path, fuse)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test does not run
    trainer.model.train()
    rollout = trainer.generate_and_score(PROMPTS)
    loss = trainer.training_step(trainer.model, rollout)
    assert torch.isfinite(loss) and trainer._metrics["policy/approxkl"]
    assert any(p.grad is not None for p in trainer.model.reward_model.parameters())
