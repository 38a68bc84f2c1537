"""A complete bilevel-RLHF pipeline. Runs offline: it builds a tiny GPT-2 and a word-level tokenizer on the spot;
replace the two paths with any causal LM and any one-output sequence classifier (hub names or local folders)."""

import tempfile

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from bilevel_rlhf import BilevelConfig, BilevelTrainer, ScoreOracle

workdir = tempfile.mkdtemp()

# 1. A policy and a reward model (tiny, random, saved as safetensors).
words = "<unk> <eos> <pad> the a cat dog sun day is was very happy sad good bad and".split()
backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
gpt2 = GPT2Config(vocab_size=len(words), n_layer=2, n_head=2, n_embd=32, eos_token_id=1, pad_token_id=2, num_labels=1)
GPT2LMHeadModel(gpt2).save_pretrained(f"{workdir}/policy")
tokenizer.save_pretrained(f"{workdir}/policy")
GPT2ForSequenceClassification(gpt2).save_pretrained(f"{workdir}/reward")

# 2. Prompts: any datasets.Dataset with a "prompt" column.
dataset = Dataset.from_dict({"prompt": ["the cat is", "a dog was", "the sun is", "the day was"] * 8})

# 3. The "human": an oracle that prefers the completion with the higher score (here: how many times it says happy).
oracle = ScoreOracle(lambda texts: [text.split().count("happy") for text in texts], name="happiness")

# 4. Configure and train: the single-loop penalty actor-critic, decaying tau, three learning rates.
args = BilevelConfig(
    output_dir=f"{workdir}/run",
    method="single_loop",
    per_device_train_batch_size=16,  # completions per actor and micro-batch: 8 prompts x 2
    num_generations=2,  # theta's completions per prompt: one pair for the oracle
    max_completion_length=6,
    max_steps=6,
    tau_init=0.05,
    penalty_lambda=1.0,
    critic_learning_rate=3e-3,
    actor_learning_rate=3e-3,
    reward_learning_rate=1e-3,
    use_cpu=True,
)
trainer = BilevelTrainer(
    model=f"{workdir}/policy",
    reward_model=f"{workdir}/reward",
    preference_oracle=oracle,
    args=args,
    train_dataset=dataset,
)
trainer.train()
trainer.save_model(f"{workdir}/final")

# 5. Load the results back: theta at the top level, phi in phi/, the learned reward model in reward_model/.
policy = AutoModelForCausalLM.from_pretrained(f"{workdir}/final")
reward_model = AutoModelForSequenceClassification.from_pretrained(f"{workdir}/final/reward_model")
tokenizer = AutoTokenizer.from_pretrained(f"{workdir}/final")
inputs = tokenizer(["the cat is"], return_tensors="pt")
sample = policy.generate(**inputs, max_new_tokens=6, do_sample=True, pad_token_id=tokenizer.pad_token_id)
print(tokenizer.decode(sample[0]), "| oracle queries:", trainer.oracle_queries)
