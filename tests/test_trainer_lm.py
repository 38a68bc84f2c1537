"""BilevelTrainer on a tiny random GPT-2: learning, methods, saving, resuming."""

from __future__ import annotations

import json
import os

import pytest
import testing_utils
import torch
from datasets import Dataset
from safetensors.torch import load_file
from testing_utils import happy_oracle, make_config, make_policy, make_reward_model, make_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from bilevel_rlhf.config import BilevelConfig
from bilevel_rlhf.modeling import load_policy, load_roles, load_value_heads
from bilevel_rlhf.trainer import BilevelTrainer

PROMPTS = ["the cat is", "a dog was", "we love the", "it is very", "the day was", "they hate a", "you and we", "the sun is"]


# this file's defaults: 16 prompts x 2 completions per iteration, 2 passes, learning rates that move a tiny model in 30 steps
CONFIG = dict(
    per_device_train_batch_size=32, max_steps=4, num_iterations=2, max_completion_length=4, max_prompt_length=8,
    num_generations=2, actor_learning_rate=3e-3, critic_learning_rate=3e-3, reward_learning_rate=1e-3,
    penalty_lambda=1.0, tau_init=0.01, logging_steps=1,
)


def config(tmp_path, **kw) -> BilevelConfig:
    return make_config(tmp_path, **{**CONFIG, **kw})


def make_trainer(tmp_path, tok=None, **kw) -> BilevelTrainer:
    """`testing_utils.make_trainer` on PROMPTS * 4 with this file's defaults."""
    return testing_utils.make_trainer(tmp_path, PROMPTS * 4, tok=tok, **{**CONFIG, **kw})


def happy_frequency(policy, tok, n: int = 256) -> float:
    """Fraction of 4-token samples containing 'happy' (fixed seed, same prompt)."""
    torch.manual_seed(123)
    ids = tok(["the day was"] * n, return_tensors="pt").input_ids
    out = policy.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=True, top_k=0,
                          pad_token_id=tok.pad_token_id)
    return (out[:, ids.shape[1] :] == tok.convert_tokens_to_ids("happy")).any(1).float().mean().item()


def test_single_loop_raises_the_preferred_token_frequency(tmp_path):
    tok = make_tokenizer()
    trainer = make_trainer(tmp_path, tok, max_steps=30, logging_steps=10)
    before = happy_frequency(trainer.model.policy_theta, tok)
    trainer.train()
    after = happy_frequency(trainer.model.policy_theta, tok)
    assert after > 2.5 * before and after > 0.3, (before, after)
    logs = trainer.state.log_history[0]
    for name in ("objective/tau", "objective/lambda", "objective/upper_loss", "objective/pref_accuracy",
                 "objective/penalty_gap", "reward/phi_mean", "reward/theta_mean", "oracle/score_theta",
                 "oracle/queries", "policy_phi/kl", "policy_phi/entropy", "policy_theta/kl", "policy_theta/entropy",
                 "value/loss", "policy/approxkl", "policy/clipfrac", "completions/theta_mean_length",
                 "time/generation", "time/scoring", "time/update", "objective/reward_loss"):
        assert name in logs, name
    # 16 prompts x 2 completions = 16 pairs per iteration, 2 optimizer steps per iteration
    assert trainer.state.log_history[-2]["oracle/queries"] == 16 * 15
    assert trainer.oracle_queries == 16 * 15


def test_lora_trains_and_saves(tmp_path):
    from peft import LoraConfig, PeftModel

    tok = make_tokenizer()
    # lm_head is adapted too: LoRA inside a random 2-layer GPT-2 alone moves the token distribution very slowly
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc", "lm_head"], lora_dropout=0.0)
    # untied embeddings: merging a LoRA on a tied lm_head would change the input embeddings too; the base is
    # loaded from a folder, which adapter_config.json records (so from_pretrained(saved dir) finds it)
    make_policy(tok, tie_word_embeddings=False).save_pretrained(tmp_path / "base")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    # win_rate with coupled sampling, the recipe's setting: theta, phi and the reference generate in one stacked
    # batch; theta also gets the oracle's direct signal, so 30 steps raise 'happy' on every seed tried (0-3)
    trainer = make_trainer(tmp_path, tok, peft_config=lora, max_steps=30, logging_steps=10, policy=policy,
                           actor_learning_rate=1e-2, critic_learning_rate=1e-2, objective="win_rate",
                           num_generations=1, per_device_train_batch_size=16, common_random_numbers=True)
    peft_model = trainer.model.policy_theta
    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    with trainer.model.actor("theta") as policy:
        before = happy_frequency(policy, tok)
    trainer.train()
    with trainer.model.actor("theta") as policy:
        after = happy_frequency(policy, tok)
    assert after > 2.5 * before and after > 0.3, (before, after)
    # the base is frozen and shared; the reference (adapters off) is still the initial model
    for n, p in peft_model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    assert trainer.model.policy_phi is None and trainer.model.ref_policy is None
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "adapter_config.json").is_file() and (out / "phi" / "adapter_config.json").is_file()
    # load theta back: the frozen base plus theta's adapter, merged
    theta = PeftModel.from_pretrained(make_policy(tok, tie_word_embeddings=False), str(out)).merge_and_unload()
    auto = AutoModelForCausalLM.from_pretrained(str(out))  # base from adapter_config.json + theta's adapter
    with trainer.model.actor("theta") as policy:
        ids = torch.tensor([[3, 4, 5, 6]])
        mask = torch.ones_like(ids)
        expected = policy(ids, attention_mask=mask).logits
    torch.testing.assert_close(theta(ids, attention_mask=mask).logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(auto(ids, attention_mask=mask).logits, expected, atol=1e-4, rtol=1e-4)
    with trainer.model.actor("ref") as ref:
        assert not torch.allclose(ref(ids, attention_mask=mask).logits, expected, atol=1e-3)
    # the checkpoint loader restores both adapters, the critics and r_x into a fresh trainer
    fresh = make_trainer(tmp_path / "fresh", tok, peft_config=lora, policy=make_policy(tok, tie_word_embeddings=False))
    load_roles(fresh.model, str(out))
    trained = dict(trainer.model.named_parameters())
    for n, p in fresh.model.named_parameters():
        torch.testing.assert_close(p, trained[n], msg=n)


def test_save_model_round_trip(tmp_path):
    tok = make_tokenizer()
    trainer = make_trainer(tmp_path, tok, max_steps=2)
    trainer.train()
    out = str(tmp_path / "final")
    trainer.save_model(out)
    theta = AutoModelForCausalLM.from_pretrained(out)
    phi = load_policy(out, "phi")
    reward = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "reward_model"))
    for loaded, trained in ((theta, trainer.model.policy_theta), (phi, trainer.model.policy_phi),
                            (reward, trainer.model.reward_model)):
        for (n, p), (_, q) in zip(loaded.state_dict().items(), trained.state_dict().items()):
            torch.testing.assert_close(p, q, msg=n)
    heads = load_value_heads(os.path.join(out, "value_heads.safetensors"))
    torch.testing.assert_close(heads["theta"].summary.weight, trainer.model.value_theta.summary.weight)
    torch.testing.assert_close(heads["phi"].summary.bias, trainer.model.value_phi.summary.bias)
    assert set(load_file(os.path.join(out, "value_heads.safetensors"))) == {
        "theta.summary.weight", "theta.summary.bias", "phi.summary.weight", "phi.summary.bias"}
    with open(os.path.join(out, "bilevel_config.json")) as fh:
        assert json.load(fh)["method"] == "single_loop"
    assert not any(f.endswith((".bin", ".pt", ".pth")) for _, _, fs in os.walk(out) for f in fs)  # no pickles


def _all_parameters(trainer: BilevelTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_resume_equals_uninterrupted(tmp_path):
    # 2 iterations x 2 optimizer steps, checkpoint, 2 more == 4 iterations in one go; a sampling oracle checks
    # that its RNG state is restored too
    kw = dict(max_steps=8, save_strategy="steps", save_steps=4, oracle=happy_oracle("bradley_terry"))
    full = make_trainer(tmp_path / "full", **kw)
    full.train()
    part = make_trainer(tmp_path / "part", **{**kw, "max_steps": 4, "oracle": happy_oracle("bradley_terry")})
    part.train()
    resumed = make_trainer(tmp_path / "part", **{**kw, "oracle": happy_oracle("bradley_terry")})
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "out" / "checkpoint-4"))
    a, b = _all_parameters(full), _all_parameters(resumed)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=1e-4, msg=n)
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h and h["step"] > 4]
    assert len(losses(full)) == 4
    assert losses(full) == pytest.approx(losses(resumed), rel=1e-4, abs=1e-6)
    assert resumed.oracle_queries == full.oracle_queries == 4 * 16
    assert resumed.preference_oracle.state_dict() == full.preference_oracle.state_dict()
    state = json.load(open(tmp_path / "part" / "out" / "checkpoint-4" / "bilevel_state_rank0.json"))
    assert state["iteration"] == 2 and state["oracle_queries"] == 32 and state["oracle_state"]["rng"]


@pytest.mark.parametrize("broken", ["model.safetensors", "reward_model/model.safetensors", "value_heads.safetensors",
                                    "bilevel_state_rank0.json"])
def test_resume_from_a_corrupt_checkpoint_names_it_and_the_file(tmp_path, broken):
    make_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=4).train()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    (checkpoint / broken).write_bytes((checkpoint / broken).read_bytes()[:40])  # truncated by a kill
    resumed = make_trainer(tmp_path, max_steps=8, save_strategy="steps", save_steps=4)
    with pytest.raises(RuntimeError, match=rf"cannot resume from {checkpoint}: .*{broken}.*earlier checkpoint"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_tensorboard_logs_go_to_the_output_dir_even_when_evaluating_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    trainer = make_trainer(tmp_path, report_to="tensorboard", eval_prompts=PROMPTS)
    trainer.evaluate()  # logs before train(): transformers' callback would open ./runs
    trainer.train()
    assert not (tmp_path / "runs").exists()
    (logdir,) = (tmp_path / "out" / "runs").iterdir()
    assert any(f.name.startswith("events.out.tfevents") for f in logdir.iterdir())


def test_evaluate_reports_theta_reward_and_oracle_score_without_queries(tmp_path):
    trainer = make_trainer(tmp_path, eval_prompts=PROMPTS)
    metrics = trainer.evaluate()
    assert set(metrics) == {"eval_reward/theta_mean", "eval_oracle/score_theta"}
    assert all(v == v for v in metrics.values()) and trainer.oracle_queries == 0


def test_each_epoch_rolls_out_every_prompt_once_in_a_new_order(tmp_path):
    seen = []

    class Recording(BilevelTrainer):
        def generate_and_score(self, prompts):
            seen.append(list(prompts))
            return super().generate_and_score(prompts)

    tok = make_tokenizer()
    trainer = Recording(make_policy(tok), make_reward_model(tok), happy_oracle(),
                        config(tmp_path, per_device_train_batch_size=4, max_steps=24, steps_per_generation=2),
                        Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok)
    trainer.train()  # 8 prompts, 4 per iteration, 4 optimizer steps per iteration: 2 iterations per epoch
    epochs = [seen[0] + seen[1], seen[2] + seen[3], seen[4] + seen[5]]
    assert len(seen) == 6 and all(sorted(e) == sorted(PROMPTS) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, activation_checkpointing=True)
    trainer.train()  # Trainer turns it on through BilevelModel.activation_checkpointing_enable
    model = trainer.model
    assert model.policy_theta.is_activation_checkpointing and model.reward_model.is_activation_checkpointing
    batch = trainer.generate_and_score(PROMPTS * 2)  # a fresh rollout

    def gradients():
        model.zero_grad()
        trainer.compute_loss(model, batch).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    with_checkpointing = gradients()
    for m in (model.policy_theta, model.policy_phi, model.reward_model):
        m.activation_checkpointing_disable()
    without = gradients()
    assert with_checkpointing.keys() == without.keys() and len(without) > 10
    for n, g in without.items():
        torch.testing.assert_close(with_checkpointing[n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_partial_sgd_has_one_actor_and_no_penalty(tmp_path):
    trainer = make_trainer(tmp_path, method="partial_sgd", max_steps=2)
    assert trainer.model.policy_phi is None and trainer.model.value_phi is None
    trainer.train()
    logs = trainer.state.log_history[0]
    assert "reward/phi_mean" not in logs and "objective/penalty_gap" not in logs
    # with no phi the reward loss is the BT-NLL alone: equal to the upper loss of the same rollout at step 1
    assert logs["objective/reward_loss"] == pytest.approx(logs["objective/upper_loss"], rel=1e-5)
    out = str(tmp_path / "final")
    trainer.save_model(out)
    assert not os.path.exists(os.path.join(out, "phi"))
    with pytest.raises(FileNotFoundError, match="holds no phi: it was saved by method='partial_sgd'"):
        load_policy(out, "phi")
    theta = load_policy(out)
    for (n, p), (_, q) in zip(theta.state_dict().items(), trainer.model.policy_theta.state_dict().items()):
        torch.testing.assert_close(p, q, msg=n)
    with pytest.raises(FileNotFoundError, match="no saved theta"):
        load_policy(str(tmp_path / "missing"))


def test_nested_loop_updates_x_every_inner_steps_iterations(tmp_path):
    trainer = make_trainer(tmp_path, method="nested_loop", nested_inner_steps=2, max_steps=2, num_iterations=1)
    x0 = {n: p.detach().clone() for n, p in trainer.model.reward_model.named_parameters()}
    trainer.train()  # iterations 0 and 1: x moves only at iteration 1
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert "objective/reward_loss" not in logs[0] and "objective/reward_loss" in logs[1]
    moved = any(not torch.equal(p, x0[n]) for n, p in trainer.model.reward_model.named_parameters())
    assert moved


def test_fixed_tau_keeps_tau_and_schedules_decay(tmp_path):
    fixed = make_trainer(tmp_path, method="fixed_tau", tau_init=0.2, tau_schedule="polynomial")
    assert [fixed.schedule(k)[0] for k in (0, 5, 50)] == [0.2, 0.2, 0.2]
    single = make_trainer(tmp_path, tau_init=0.2, tau_schedule="polynomial", tau_decay_rate=1.0, tau_horizon=10,
                          tau_min=0.05, penalty_lambda_schedule="polynomial", penalty_lambda_growth=1.0,
                          penalty_lambda_horizon=10, penalty_lambda_max=3.0)
    assert single.schedule(10) == pytest.approx((0.1, 2.0))
    assert single.schedule(1000) == pytest.approx((0.05, 3.0))


def test_zero_critics_start_at_v_zero_and_learn(tmp_path):
    """`value_head_init="zero"`: both critics give V = 0 everywhere before training and move with it; `"random"`
    (the default) does not start at 0."""
    tok = make_tokenizer()
    trainer = make_trainer(tmp_path, tok, max_steps=2, value_head_init="zero")
    heads = (trainer.model.value_theta, trainer.model.value_phi)
    assert all(torch.count_nonzero(p) == 0 for head in heads for p in head.parameters())
    trainer.train()
    assert all(torch.count_nonzero(head.summary.weight) > 0 for head in heads)
    assert torch.count_nonzero(make_trainer(tmp_path, tok, max_steps=2).model.value_theta.summary.weight) > 0
