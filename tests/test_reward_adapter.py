"""r_x as a third LoRA adapter on the actors' base (`BilevelConfig.reward_adapter`): one base for every role, each
part of the loss reaching only its own role, the score read at the last real token, saving, loading and resuming."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from test_docs import TRAINER_DOC, _python_block
from test_trainer_math import PROMPTS
from testing_utils import happy_oracle, make_config, make_policy, make_reward_model, make_tokenizer

from bilevel_rlhf import BilevelTrainer
from bilevel_rlhf.modeling import AdapterRewardModel, load_roles, position_ids_from_mask

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0)


def _trainer(tmp_path, tok=None, policy=None, **kw) -> BilevelTrainer:
    tok = tok or make_tokenizer()
    fields = dict(reward_adapter=True, per_device_train_batch_size=8, max_completion_length=4, max_prompt_length=8,
                  actor_learning_rate=1e-3, critic_learning_rate=1e-3, reward_learning_rate=1e-3, **kw)
    return BilevelTrainer(policy or make_policy(tok), None, happy_oracle(), make_config(tmp_path, **fields),
                          Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=tok, peft_config=LORA)


def _storages(module: torch.nn.Module) -> int:
    return len({p.untyped_storage().data_ptr() for p in module.parameters()})


def _adapter(name: str, model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.policy_theta.named_parameters() if f".{name}." in n}


def test_one_base_serves_every_role_and_only_adapters_and_heads_train(tmp_path):
    trainer = _trainer(tmp_path)
    model = trainer.model
    assert isinstance(model.reward_model, AdapterRewardModel)
    assert set(model.policy_theta.peft_config) == {"theta", "phi", "reward"}
    # the base is held once: the wrapper's storages are the PEFT model's plus the heads' (2 value heads with a weight
    # and a bias each, r_x's head with a weight)
    assert _storages(model) == _storages(model.policy_theta) + 2 * 2 + 1
    groups = {role: {id(p) for p in params} for role, params in model.role_parameters().items()}
    reward = {id(p) for p in _adapter("reward", model).values()} | {id(model.reward_model.score.weight)}
    actors = {id(p) for name in ("theta", "phi") for p in _adapter(name, model).values()}
    assert groups["reward"] == reward and groups["actor"] == actors
    base = {n: p.detach().clone() for n, p in model.policy_theta.named_parameters() if "lora_" not in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    for n, p in model.policy_theta.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    moved = lambda params: any(not torch.equal(p, before[n]) for n, p in params)  # noqa: E731
    named = dict(model.named_parameters())
    for name in ("theta", "phi", "reward"):
        assert moved([(n, named[n]) for n in named if f".{name}." in n and "lora_" in n]), name
    assert moved([("reward_model.score.weight", model.reward_model.score.weight)])


def test_each_role_gets_gradients_only_from_its_own_forward(tmp_path):
    trainer = _trainer(tmp_path)
    model, tok = trainer.model, trainer.processing_class
    with torch.no_grad():  # move every adapter away from zero, so that each one enters its forward pass
        for n, p in model.policy_theta.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    enc = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    score = model.reward_forward(enc.input_ids, enc.attention_mask).sum()
    theta = list(_adapter("theta", model).values())
    reward = list(_adapter("reward", model).values())
    grads = torch.autograd.grad(score, theta + reward + [model.reward_model.score.weight], allow_unused=True)
    assert all(g is None for g in grads[: len(theta)])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[len(theta) :])
    out = model.policy_forward("theta", enc.input_ids, enc.attention_mask, 1, 1.0, with_entropy=False)
    grads = torch.autograd.grad(out["logprobs"].sum(), theta + reward, allow_unused=True)
    assert all(g is not None for g in grads[: len(theta)]) and all(g is None for g in grads[len(theta) :])
    # every adapter stays trainable whichever forward ran last
    assert all(p.requires_grad for name in ("theta", "phi", "reward") for p in _adapter(name, model).values())


def test_the_score_is_the_head_on_the_last_real_token_with_the_reward_adapter(tmp_path):
    tok = make_tokenizer()
    trainer = _trainer(tmp_path, tok)
    model = trainer.model
    with torch.no_grad():
        for n, p in model.policy_theta.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    texts = ["the cat is very happy", "a dog", "we love the sun and the day"]
    tok.padding_side = "left"
    left = tok(texts, return_tensors="pt", padding=True)
    tok.padding_side = "right"
    right = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model.reward_forward(left.input_ids, left.attention_mask)
        torch.testing.assert_close(scores, model.reward_forward(right.input_ids, right.attention_mask), atol=1e-5, rtol=1e-5)
        peft_model = model.policy_theta
        peft_model.set_adapter("reward")
        for i, text in enumerate(texts):
            ids = tok(text, return_tensors="pt").input_ids
            hidden = peft_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
            assert float(scores[i]) == pytest.approx(float(model.reward_model.score(hidden)), abs=1e-5)
        with peft_model.disable_adapter():  # the adapter matters: the bare base scores differently
            ids = tok(texts[0], return_tensors="pt").input_ids
            bare = model.reward_model.score(peft_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1])
        assert abs(float(bare) - float(scores[0])) > 1e-4
    assert position_ids_from_mask(left.attention_mask).shape == left.input_ids.shape


def test_save_load_and_resume(tmp_path):
    tok = make_tokenizer()
    policy = make_policy(tok)
    policy.save_pretrained(tmp_path / "base")
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1)
    full = _trainer(tmp_path / "full", tok, make_policy(tok), **kw)
    full.train()
    part = _trainer(tmp_path / "part", tok, make_policy(tok), **{**kw, "max_steps": 2})
    part.train()
    resumed = _trainer(tmp_path / "part", tok, make_policy(tok), **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "out" / "checkpoint-2"))
    a, b = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=1e-4, msg=n)

    out = tmp_path / "saved"
    full.save_model(str(out))
    files = {p.name for p in (out / "reward_model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "score.safetensors"} <= files
    assert json.loads((out / "bilevel_config.json").read_text())["reward_adapter"] is True
    enc = tok(PROMPTS[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = full.model.reward_forward(enc.input_ids, enc.attention_mask)
        # the documented way back: the initial policy + the saved adapter and head
        loaded = AdapterRewardModel.from_saved(make_policy(tok), str(out / "reward_model"))
        got = loaded(enc.input_ids, enc.attention_mask).logits[:, 0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # docs/trainer.md's example of it, as written
        namespace = {"initial_policy": make_policy(tok), "input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
        block = _python_block(TRAINER_DOC.read_text(), "AdapterRewardModel.from_saved")
        exec(block.replace('"dir/reward_model"', repr(str(out / "reward_model"))), namespace)
        torch.testing.assert_close(namespace["scores"], expected, atol=1e-5, rtol=1e-5)
        # the checkpoint loader restores every role into a fresh trainer
        fresh = _trainer(tmp_path / "fresh", tok, make_policy(tok))
        load_roles(fresh.model, str(out))
        torch.testing.assert_close(fresh.model.reward_forward(enc.input_ids, enc.attention_mask), expected)


def test_bad_combinations_are_refused(tmp_path):
    tok = make_tokenizer()
    data = Dataset.from_dict({"prompt": PROMPTS * 4})
    with pytest.raises(ValueError, match="reward_adapter=True needs peft_config"):
        BilevelTrainer(make_policy(tok), None, happy_oracle(), make_config(tmp_path, reward_adapter=True), data,
                       processing_class=tok)
    with pytest.raises(ValueError, match="reward_model and reward_processing_class must be None"):
        BilevelTrainer(make_policy(tok), make_reward_model(tok), happy_oracle(),
                       make_config(tmp_path, reward_adapter=True), data, processing_class=tok, peft_config=LORA)
    with pytest.raises(ValueError, match="reward_model is required"):
        BilevelTrainer(make_policy(tok), None, happy_oracle(), make_config(tmp_path), data, processing_class=tok)


def test_the_adapter_head_starts_at_zero_when_asked(tmp_path):
    """`reward_head_init="zero"`: r_x = 0 at x_0, so theta's first target is the reference; random by default."""
    assert torch.count_nonzero(_trainer(tmp_path, reward_head_init="zero").model.reward_model.score.weight) == 0
    assert torch.count_nonzero(_trainer(tmp_path).model.reward_model.score.weight) > 0
