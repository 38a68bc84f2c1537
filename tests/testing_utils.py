"""What the trainer tests share: a tiny word-level tokenizer and tiny GPT-2 models (built in memory; no downloads),
the "happy" oracle, `make_trainer`, and spies on the trainer's public methods."""

from __future__ import annotations

import dataclasses

import torch

# 1 intra-op thread: on 2 shared cores, 2 threads are ~10x slower for these tiny models (contention)
torch.set_num_threads(1)
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from bilevel_rlhf.config import BilevelConfig
from bilevel_rlhf.preference import ScoreOracle
from bilevel_rlhf.rollout import LossInputs, Rollout
from bilevel_rlhf.trainer import BilevelTrainer

WORDS = (
    "the a cat dog sun rain happy sad good bad day night love hate is was very not and but we you they it "
    "great awful smile cry nice ugly bright dark warm cold fun dull joy pain"
).split()
EOS = "<eos>"


def make_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS (+ <unk>, <eos>, optionally <pad>); ids: <unk>=0, <eos>=1, <pad>=2."""
    specials = ["<unk>", EOS] + (["<pad>"] if with_pad else [])
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=EOS)
    if with_pad:
        tok.pad_token = "<pad>"
    return tok


def gpt2_config(tok: PreTrainedTokenizerFast, **overrides) -> GPT2Config:
    kwargs = dict(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def make_policy(tok: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config(tok, **overrides))


def make_reward_model(tok: PreTrainedTokenizerFast, seed: int = 1, **overrides) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(gpt2_config(tok, **{"num_labels": 1, **overrides}))


def happy_oracle(mode: str = "deterministic") -> ScoreOracle:
    """Prefers the completion with more 'happy' tokens."""
    return ScoreOracle(lambda texts: [t.split().count("happy") for t in texts], mode=mode, name="happy")


def make_config(tmp_path, **fields) -> BilevelConfig:
    """A BilevelConfig writing under tmp_path/out, on the CPU, reporting nowhere, seed 0, method single_loop, no trust region;
    `fields` override these."""
    # the paper's two-actor method without the trust region on x's steps, unless a test names them (the config's
    # defaults are penalized_covariance and a trust region of 0.5)
    base = dict(output_dir=str(tmp_path / "out"), method="single_loop", reward_trust_region=0.0, use_cpu=True,
                report_to="none", disable_tqdm=True, seed=0)
    return BilevelConfig(**{**base, **fields})


def make_trainer(tmp_path, prompts: list[str], oracle=None, tok=None, policy=None, peft_config=None,
                 eval_prompts: list[str] | None = None, objective_instance=None, **config) -> BilevelTrainer:
    """A BilevelTrainer on the tiny GPT-2 policy (`policy`, default `make_policy(tok)`) and reward model, training on
    `prompts`; `oracle` defaults to `happy_oracle()`, `objective_instance` is the trainer's `objective` argument, and
    `config` are BilevelConfig fields (`make_config`). Each test file wraps it with its own defaults."""
    tok = tok or make_tokenizer()
    return BilevelTrainer(
        policy or make_policy(tok), make_reward_model(tok), oracle or happy_oracle(), make_config(tmp_path, **config),
        Dataset.from_dict({"prompt": prompts}),
        eval_dataset=Dataset.from_dict({"prompt": eval_prompts}) if eval_prompts else None,
        processing_class=tok, peft_config=peft_config, objective=objective_instance,
    )


def record_rollouts(trainer: BilevelTrainer) -> list[Rollout]:
    """The rollouts that `trainer.generate_and_score` returns from now on, in order (call once per trainer)."""
    rollouts = []
    generate_and_score = trainer.generate_and_score

    def recording(prompts):
        rollouts.append(generate_and_score(prompts))
        return rollouts[-1]

    trainer.generate_and_score = recording
    return rollouts


def record_loss_inputs(trainer: BilevelTrainer) -> list[LossInputs]:
    """What `trainer.compute_loss` is given from now on, in order (call once per trainer): `training_step` passes the
    micro-step's batch as `LossInputs(batch, parts, outputs)`, once per group of loss parts; fused, each group's batch
    is completed from the forward passes so far, so the last one holds every stage of the rollout. Recorded without
    the forward outputs, which hold the autograd graph."""
    calls = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        calls.append(dataclasses.replace(inputs, outputs=None) if isinstance(inputs, LossInputs) else inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return calls
