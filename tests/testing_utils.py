"""Tiny language models and a tiny word-level tokenizer for the trainer tests (built in memory; no downloads)."""

from __future__ import annotations

import torch

# 1 intra-op thread: on 2 shared cores, 2 threads are ~10x slower for these tiny models (contention)
torch.set_num_threads(1)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

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
