"""Bad input, safety and the small pieces of the trainer: config validation, dataset/oracle/reward-model errors,
value-head shapes and masks, prompt truncation, empty completions."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from test_trainer_lm import PROMPTS, config, make_trainer
from testing_utils import happy_oracle, make_policy, make_reward_model, make_tokenizer

from bilevel_rlhf.config import BilevelConfig
from bilevel_rlhf.modeling import ValueHead
from bilevel_rlhf.preference import ScoreOracle
from bilevel_rlhf.trainer import BilevelTrainer


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(tau_init=-0.1), "tau_init"),
        (dict(tau_init=0.1, tau_min=0.2), "tau_min"),
        (dict(tau_decay_rate=-1.0), "tau_decay_rate"),
        (dict(tau_schedule="increasing"), "tau_schedule"),
        (dict(penalty_lambda=0.0), "penalty_lambda"),
        (dict(penalty_lambda_growth=-0.5), "penalty_lambda_growth"),
        (dict(penalty_lambda_max=0.5, penalty_lambda=1.0), "penalty_lambda_max"),
        (dict(method="bilevel"), "method"),
        (dict(regularization="l2"), "regularization"),
        (dict(num_generations=3), "num_generations"),
        (dict(num_generations=0), "num_generations"),
        (dict(per_device_train_batch_size=3), "per_device_train_batch_size"),  # not a multiple of num_generations
        (dict(steps_per_generation=3, gradient_accumulation_steps=2), "steps_per_generation"),
        (dict(save_strategy="steps", save_steps=3, steps_per_generation=2, per_device_train_batch_size=4), "save_steps"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(gamma=1.5), "gamma"),
        (dict(lam=-0.1), "lam"),
        (dict(cliprange=0.0), "cliprange"),
        (dict(reward_learning_rate=0.0), "reward_learning_rate"),
        (dict(max_completion_length=0), "max_completion_length"),
        (dict(nested_inner_steps=0), "nested_inner_steps"),
    ],
)
def test_config_rejects_invalid_values_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        BilevelConfig(output_dir=str(tmp_path), **overrides)


def test_config_warns_when_time_scales_are_inverted(tmp_path):
    with pytest.warns(UserWarning, match="time-scales"):
        BilevelConfig(output_dir=str(tmp_path), actor_learning_rate=1e-3, critic_learning_rate=1e-4)


def test_config_warns_that_learning_rate_is_not_used(tmp_path):
    with pytest.warns(UserWarning, match="learning_rate is not used"):
        BilevelConfig(output_dir=str(tmp_path), learning_rate=1e-3)
    with pytest.warns(UserWarning, match="lr_scheduler_type is not used"):
        BilevelConfig(output_dir=str(tmp_path), lr_scheduler_type="cosine")


def test_config_rejects_optimizers_other_than_adamw(tmp_path):
    with pytest.raises(ValueError, match="optim must be adamw_torch or adamw_torch_fused.*'adafactor'"):
        BilevelConfig(output_dir=str(tmp_path), optim="adafactor")
    BilevelConfig(output_dir=str(tmp_path), optim="adamw_torch")  # both AdamW spellings are accepted


def _build(tmp_path, dataset=None, reward_model=None, oracle=None, tok=None, **kw):
    tok = tok or make_tokenizer()
    return BilevelTrainer(
        make_policy(tok), reward_model or make_reward_model(tok), oracle or happy_oracle(), config(tmp_path, **kw),
        dataset if dataset is not None else Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=tok,
    )


def test_dataset_errors_are_raised_before_training(tmp_path):
    with pytest.raises(ValueError, match="'prompt' column"):
        _build(tmp_path, Dataset.from_dict({"text": PROMPTS}))
    with pytest.raises(ValueError, match="train_dataset is empty"):
        _build(tmp_path, Dataset.from_dict({"prompt": []}))
    with pytest.raises(ValueError, match="fewer than one iteration needs"):
        _build(tmp_path, Dataset.from_dict({"prompt": PROMPTS[:3]}), per_device_train_batch_size=8)


def test_reward_model_with_two_outputs_is_rejected(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="exactly one output"):
        _build(tmp_path, reward_model=make_reward_model(tok, num_labels=2), tok=tok)


def test_oracle_with_wrong_length_or_non_finite_labels_stops_the_run(tmp_path):
    short = lambda prompts, a, b: [1.0] * (len(prompts) - 1)
    short.name = "short_oracle"
    trainer = _build(tmp_path, oracle=short, max_steps=2)
    with pytest.raises(ValueError, match="short_oracle"):
        trainer.train()
    nan = ScoreOracle(lambda texts: [float("nan")] * len(texts), name="nan_oracle")
    trainer = _build(tmp_path, oracle=nan, max_steps=2)
    with pytest.raises(ValueError, match="nan_oracle"):
        trainer.train()


def test_non_finite_reward_stops_the_run_naming_quantity_and_iteration(tmp_path):
    tok = make_tokenizer()
    reward_model = make_reward_model(tok)
    with torch.no_grad():
        reward_model.score.weight.fill_(float("nan"))
    trainer = _build(tmp_path, reward_model=reward_model, tok=tok, max_steps=2)
    with pytest.raises(FloatingPointError, match="r_x score.*iteration 0"):
        trainer.train()


def test_tokenizer_without_pad_gets_eos_with_a_warning(tmp_path):
    tok = make_tokenizer(with_pad=False)
    with pytest.warns(UserWarning, match="no pad token"):
        trainer = _build(tmp_path, tok=tok, max_steps=2)
    assert tok.pad_token == tok.eos_token
    trainer.train()  # pad == eos: completions still end at the first eos


def test_long_prompts_are_truncated_on_the_left_and_counted(tmp_path):
    long_prompt = "the cat is very happy and the dog is very sad but we love the sun"
    dataset = Dataset.from_dict({"prompt": [long_prompt, "the cat is", "a dog", "we"] * 4})
    trainer = _build(tmp_path, dataset, per_device_train_batch_size=4, max_prompt_length=4, max_steps=2)
    ids, mask, truncated = trainer._tokenize_prompts([long_prompt, "a dog"])
    assert truncated == 1 and ids.shape == (2, 4)
    assert trainer.processing_class.decode(ids[0]) == "we love the sun"  # the last four words
    assert mask[1].tolist() == [0, 0, 1, 1]  # left padding
    trainer.train()
    assert trainer.state.log_history[0]["completions/truncated_prompts"] >= 1


def test_empty_completions_are_scored(tmp_path):
    tok = make_tokenizer()
    policy = make_policy(tok, tie_word_embeddings=False)
    with torch.no_grad():  # the last hidden state is e_0 whatever the input; eos gets all the mass
        policy.transformer.ln_f.weight.zero_()
        policy.transformer.ln_f.bias.zero_()
        policy.transformer.ln_f.bias[0] = 1.0
        policy.lm_head.weight.zero_()
        policy.lm_head.weight[:, 0] = -30.0
        policy.lm_head.weight[tok.eos_token_id, 0] = 30.0
    seen = []

    def oracle(prompts, a, b):
        seen.extend(a + b)
        return [0.5] * len(prompts)

    trainer = BilevelTrainer(policy, make_reward_model(tok), oracle, config(tmp_path, max_steps=2),
                             Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=tok)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["completions/theta_empty_fraction"] == 1.0 and logs["completions/theta_mean_length"] == 1.0
    assert math.isfinite(logs["reward/theta_mean"]) and math.isfinite(logs["loss"])
    assert seen and set(seen) == {""}


def test_value_head_shapes_and_completion_masks(tmp_path):
    head = ValueHead(16)
    assert head(torch.randn(3, 5, 16)).shape == (3, 5)
    trainer = make_trainer(tmp_path)
    eos, pad = trainer.processing_class.eos_token_id, trainer.processing_class.pad_token_id
    ids = torch.tensor([[5, 6, eos, 7], [eos, pad, pad, pad], [5, 6, 7, 8]])
    assert trainer._completion_mask(ids).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    # log-probs, entropies and values are [N, T], and left padding of the prompt does not change them
    model = trainer.model
    prompt = torch.tensor([[pad, pad, 4, 5], [9, 8, 4, 5]])
    pmask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    completion = torch.tensor([[6, 7, 8], [6, 7, 8]])
    out = model.policy_forward("theta", torch.cat([prompt, completion], 1),
                               torch.cat([pmask, torch.ones_like(completion)], 1), 4, 1.0)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, 3) for k in ("logprobs", "entropy", "values")}
    alone = model.policy_forward("theta", torch.tensor([[4, 5, 6, 7, 8]]), torch.ones(1, 5, dtype=torch.long), 2, 1.0)
    for key in ("logprobs", "values"):
        torch.testing.assert_close(out[key][0], alone[key][0], atol=1e-5, rtol=1e-5)


def test_models_load_from_paths_with_safetensors(tmp_path):
    tok = make_tokenizer()
    make_policy(tok).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    make_reward_model(tok).save_pretrained(tmp_path / "rm")
    trainer = BilevelTrainer(str(tmp_path / "policy"), str(tmp_path / "rm"), happy_oracle(), config(tmp_path),
                             Dataset.from_dict({"prompt": PROMPTS * 4}))
    assert trainer.processing_class.pad_token == "<pad>" and trainer.processing_class.padding_side == "left"
    assert trainer.model.reward_model.config.num_labels == 1
    assert not trainer.args.trust_remote_code


def test_config_parses_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(BilevelConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--method", "nested_loop", "--tau_init", "0.2",
         "--model_init_kwargs", '{"revision": "main"}', "--penalty_lambda_max", "50"]
    )
    assert (args.method, args.tau_init, args.penalty_lambda_max) == ("nested_loop", 0.2, 50.0)
    assert args.model_init_kwargs == {"revision": "main"} and args.bf16 is False
