"""The embedded default policy: a small GPT-2 pretrained on the tweets, then fine-tuned to continue prompts.

Build (deterministic for a given torch thread count, pinned to `BUILD_THREADS` = 1 by default; about 3-5 minutes
on 2 CPU cores):
  1. a byte-level BPE (`tokenizers`, `vocab_size` tokens) trained on the training tweets;
  2. pretraining: causal LM on the training tweets' text, `<|endoftext|> text <|endoftext|>`
     (HF `Trainer`);
  3. SFT: the same model on prompt -> completion pairs of the training tweets (first
     `n_prompt_words` words -> the rest + EOS), loss on the completion only (HF `Trainer`).
Held-out tweets (`is_eval_id`) are used for neither; their losses are reported in `build_info.json`.

Tokenizer conventions the trainer and recipe rely on: the tokenizer prepends `<|endoftext|>` (the BOS,
also the EOS) to every text it encodes (`add_special_tokens=True`, the default); `<pad>` is a
separate token, set as `pad_token_id` in the model config, so GPT-2's sequence-classification head
finds the last real token with either padding side. Left-padded batches need explicit
`position_ids = attention_mask.cumsum(-1) - 1` (clamped at 0) in a plain forward pass: GPT-2 numbers
positions from the first column otherwise (`generate` does this itself).

The built model is cached in `$BILEVEL_RLHF_CACHE/models/tweet-gpt2-<hash>` (default cache:
`~/.cache/bilevel_rlhf`), the hash covering the build config, the tweets file and `BUILD_VERSION`,
so a changed config builds a new folder. Builds write to a temporary folder renamed at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..validation import field_checker

logger = logging.getLogger(__name__)
BUILD_VERSION = 1  # bump when the build procedure changes in a way the config does not show
BUILD_THREADS = 1  # torch CPU threads of a build: a fixed count makes builds bit-identical whatever the core count
MODEL_PREFIX = "tweet-gpt2"
BOS_EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "build_info.json")


@dataclass
class TweetModelConfig:
    """Everything that determines the built model (its hash names the cache folder)."""

    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size, special tokens included (>= 260)."})
    n_layer: int = field(default=4, metadata={"help": "Transformer blocks."})
    n_head: int = field(default=4, metadata={"help": "Attention heads per block (divides n_embd)."})
    n_embd: int = field(default=128, metadata={"help": "Model width."})
    n_positions: int = field(default=128, metadata={"help": "Longest sequence the model can see, in tokens."})
    max_length: int = field(default=96, metadata={"help": "Training sequences are cut to this many tokens."})
    dropout: float = field(default=0.2, metadata={"help": "Residual, embedding and attention dropout."})
    n_prompt_words: int = field(default=4, metadata={"help": "Words of a tweet given as the SFT prompt."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Held-out fraction of tweets (hashed ids)."})
    pretrain_epochs: float = field(default=8.0, metadata={"help": "Pretraining epochs over the training tweets."})
    sft_epochs: float = field(default=2.0, metadata={"help": "SFT epochs over the training prompts."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0, optimizer steps per stage instead of epochs."})
    batch_size: int = field(default=32, metadata={"help": "Sequences per optimizer step."})
    pretrain_learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate, pretraining."})
    sft_learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate, SFT."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Linear warmup fraction of each stage."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=0, metadata={"help": "Seed for initialization, shuffling and dropout."})
    max_tweets: int | None = field(default=None, metadata={"help": "Use only the first N tweets (cut-down builds)."})

    def __post_init__(self) -> None:
        need = field_checker(self, "TweetModelConfig.")

        for name in ("n_layer", "n_head", "n_embd", "n_positions", "max_length", "n_prompt_words", "batch_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        need(isinstance(self.vocab_size, int) and 260 <= self.vocab_size <= 65536, "vocab_size", "an integer in [260, 65536]")
        need(self.n_embd % self.n_head == 0, "n_embd", f"a multiple of n_head={self.n_head}")
        need(self.max_length <= self.n_positions, "max_length", f"<= n_positions={self.n_positions}")
        need(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        need(0.0 < self.eval_fraction < 1.0, "eval_fraction", "in (0, 1)")
        need(self.pretrain_epochs > 0, "pretrain_epochs", "> 0")
        need(self.sft_epochs >= 0, "sft_epochs", ">= 0 (0 skips SFT)")
        need(isinstance(self.max_steps, int) and (self.max_steps == -1 or self.max_steps >= 1), "max_steps", "-1 or >= 1")
        for name in ("pretrain_learning_rate", "sft_learning_rate"):
            need(0.0 < getattr(self, name) < 1.0, name, "in (0, 1)")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "in [0, 1)")
        need(self.weight_decay >= 0.0, "weight_decay", ">= 0")
        need(isinstance(self.seed, int), "seed", "an integer")
        need(self.max_tweets is None or (isinstance(self.max_tweets, int) and self.max_tweets >= 20),
             "max_tweets", "None or an integer >= 20")

    @classmethod
    def cut_down(cls, seed: int = 0) -> "TweetModelConfig":
        """A seconds-long build for tests: 300 tweets, a 1-layer width-32 model, 4 steps per stage."""
        return cls(vocab_size=300, n_layer=1, n_head=2, n_embd=32, n_positions=128, max_tweets=300,
                   max_steps=4, batch_size=8, seed=seed)


def default_cache_dir() -> Path:
    """`$BILEVEL_RLHF_CACHE` if set, else `~/.cache/bilevel_rlhf`."""
    env = os.environ.get("BILEVEL_RLHF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bilevel_rlhf"


def config_hash(config: TweetModelConfig, tweets_path: str | os.PathLike | None = None) -> str:
    """12 hex digits of sha256 over the config, the tweets file's bytes and BUILD_VERSION."""
    from .data import TWEETS_PATH

    tweets_path = Path(TWEETS_PATH if tweets_path is None else tweets_path)
    if not tweets_path.is_file():
        raise FileNotFoundError(f"tweets file not found: {tweets_path}")
    payload = json.dumps({"config": asdict(config), "build_version": BUILD_VERSION,
                          "tweets_sha256": hashlib.sha256(tweets_path.read_bytes()).hexdigest()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    """Byte-level BPE trained on `texts`; prepends BOS to every encoded text; `<pad>` is its own token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[BOS_EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_EOS_TOKEN} $A", pair=f"{BOS_EOS_TOKEN} $A $B", special_tokens=[(BOS_EOS_TOKEN, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_EOS_TOKEN, eos_token=BOS_EOS_TOKEN,
                                   pad_token=PAD_TOKEN, model_max_length=model_max_length)


def _stage_args(config: TweetModelConfig, output_dir: str, epochs: float, learning_rate: float, progress: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=64, num_train_epochs=epochs, max_steps=config.max_steps,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay, seed=config.seed, data_seed=config.seed, use_cpu=True,
        bf16=False, fp16=False, save_strategy="no", eval_strategy="no", logging_steps=10,
        report_to="none", disable_tqdm=not progress, dataloader_num_workers=0, remove_unused_columns=False,
        train_sampling_strategy="group_by_length",  # batches of similar length: about half the padding
    )


def _StopOnNonFinite(stage: str):
    """A TrainerCallback that stops the build at the first non-finite logged loss or gradient norm."""
    from transformers import TrainerCallback

    class StopOnNonFinite(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for quantity in ("loss", "grad_norm"):
                value = (logs or {}).get(quantity)
                if value is not None and not math.isfinite(float(value)):
                    raise FloatingPointError(f"{stage} {quantity} is {value} at step {state.global_step}")

    return StopOnNonFinite()


def _final_train_loss(trainer, train_output) -> float:
    """Mean training loss over the last (at most 5) logging intervals, or the stage mean if none was logged."""
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    return sum(losses[-5:]) / len(losses[-5:]) if losses else float(train_output.training_loss)


def build_tweet_model(
    output_dir: str | os.PathLike,
    config: TweetModelConfig | None = None,
    tweets_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    threads: int = BUILD_THREADS,
) -> dict[str, Any]:
    """Build the tweet GPT-2 into `output_dir` (atomically) and return its build info (losses, timings).

    `progress=True` shows the Trainer's progress bars and loss logs. The build runs on `threads` torch CPU threads
    (restored afterwards): the thread count changes the floating-point summation order, so only builds with the same
    count are bit-identical, and RL runs started from two such builds visibly diverge.
    """
    import torch

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        info = _build(output_dir, config, tweets_path, overwrite, progress, threads)
    finally:
        torch.set_num_threads(previous_threads)
    return info


def _build(output_dir, config, tweets_path, overwrite, progress, threads) -> dict[str, Any]:
    from transformers import DataCollatorForSeq2Seq, GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, set_seed

    from .data import TWEETS_PATH, is_eval_id, load_tweets, split_prompt

    config = TweetModelConfig() if config is None else config
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"model folder already exists: {output_dir} (pass overwrite=True to replace it)")
    tweets_path = Path(TWEETS_PATH if tweets_path is None else tweets_path)
    t_start = time.perf_counter()

    tweets = load_tweets(tweets_path)
    if config.max_tweets is not None:
        tweets = tweets.select(range(min(config.max_tweets, len(tweets))))
    columns = tweets.to_dict()  # plain lists: iterating a datasets Column is slow
    rows = list(zip(columns["id"], columns["text"]))
    train_texts = [text for tid, text in rows if not is_eval_id(tid, config.eval_fraction)]
    eval_texts = [text for tid, text in rows if is_eval_id(tid, config.eval_fraction)]
    if not train_texts or not eval_texts:
        raise ValueError(f"need training and held-out tweets, got {len(train_texts)} and {len(eval_texts)}")

    tokenizer = train_tokenizer(train_texts, config.vocab_size, config.n_positions)
    eos = tokenizer.eos_token_id

    def lm_example(text: str) -> dict[str, list[int]]:
        ids = (tokenizer(text)["input_ids"] + [eos])[: config.max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

    def sft_example(prompt: str, completion: str) -> dict[str, list[int]]:
        prompt_ids = tokenizer(prompt)["input_ids"]  # with BOS
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
        ids = (prompt_ids + completion_ids)[: config.max_length]
        labels = ([-100] * len(prompt_ids) + completion_ids)[: config.max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def sft_examples(texts: list[str]) -> list[dict[str, list[int]]]:
        pairs = (split_prompt(t, config.n_prompt_words) for t in texts)
        return [sft_example(*p) for p in pairs if p is not None]

    from datasets import Dataset

    def as_dataset(examples: list[dict[str, list[int]]]) -> Dataset:
        return Dataset.from_dict({k: [e[k] for e in examples] for k in ("input_ids", "attention_mask", "labels")})

    pretrain_train = as_dataset([lm_example(t) for t in train_texts])
    pretrain_eval = as_dataset([lm_example(t) for t in eval_texts])
    sft_train, sft_eval = as_dataset(sft_examples(train_texts)), as_dataset(sft_examples(eval_texts))

    set_seed(config.seed)  # the model's initialization
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=config.dropout,
        embd_pdrop=config.dropout, attn_pdrop=config.dropout, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    info: dict[str, Any] = {"config": asdict(config), "config_hash": config_hash(config, tweets_path),
                            "build_version": BUILD_VERSION, "torch_threads": threads, "n_train_tweets": len(train_texts),
                            "n_eval_tweets": len(eval_texts), "n_parameters": model.num_parameters()}
    with tempfile.TemporaryDirectory(prefix="tweet-gpt2-trainer-") as trainer_dir:
        stages = [("pretrain", pretrain_train, pretrain_eval, config.pretrain_epochs, config.pretrain_learning_rate)]
        if config.sft_epochs > 0:
            stages.append(("sft", sft_train, sft_eval, config.sft_epochs, config.sft_learning_rate))
        for name, train_ds, eval_ds, epochs, lr in stages:
            t_stage = time.perf_counter()
            trainer = Trainer(model=model, args=_stage_args(config, trainer_dir, epochs, lr, progress),
                              train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
                              processing_class=tokenizer, callbacks=[_StopOnNonFinite(name)])
            trainer.remove_callback(PrinterCallback)  # quiet unless progress=True (then tqdm replaces it)
            train_output = trainer.train()
            eval_loss = float(trainer.evaluate()["eval_loss"])
            train_loss = _final_train_loss(trainer, train_output)
            for quantity, value in (("train_loss", train_loss), ("eval_loss", eval_loss)):
                if not math.isfinite(value):
                    raise FloatingPointError(f"{name} {quantity} is {value} at step {trainer.state.global_step}")
            info[name] = {"train_loss": train_loss, "eval_loss": eval_loss, "steps": trainer.state.global_step,
                          "seconds": round(time.perf_counter() - t_stage, 1)}
            model = trainer.model

    model.eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    info["build_seconds"] = round(time.perf_counter() - t_start, 1)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "build_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    write_folder_atomically(output_dir, write, overwrite=overwrite)
    return info


def write_folder_atomically(output_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `write(tmp)` on a fresh sibling temporary folder, then rename it to `output_dir`.

    Readers never see a half-written folder; on any error the temporary folder is removed.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; a cache folder is shared like any other
        for item in tmp.iterdir():
            if item.is_file():
                os.chmod(item, 0o666 & ~umask)
        if overwrite and output_dir.exists():
            shutil.rmtree(output_dir)
        os.rename(tmp, output_dir)  # fails if another process published output_dir meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def check_model_dir(path: str | os.PathLike) -> Path:
    """Check that `path` is a complete tweet-model folder; raise an error naming the path if not."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path} (build it with scripts/build_tweet_model.py "
                                f"or bilevel_rlhf.happy_tweet.get_default_model())")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise ValueError(f"model folder {path} is incomplete (missing {', '.join(missing)}); delete it and rebuild")
    for name in ("config.json", "build_info.json", "tokenizer.json", "tokenizer_config.json"):
        try:
            json.loads((path / name).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"model folder {path} is corrupt: {name} is not valid JSON ({e}); "
                             f"delete it and rebuild") from None
    from safetensors import safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"model folder {path} is corrupt: model.safetensors cannot be read ({e}); "
                         f"delete it and rebuild") from None
    return path


def load_tweet_model(path: str | os.PathLike):
    """Check `path` and load (AutoModelForCausalLM, AutoTokenizer) from it, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"cannot load the model folder {path}: {e}") from e
    return model.eval(), tokenizer


def get_default_model(
    cache_dir: str | os.PathLike | None = None,
    build_if_missing: bool = True,
    config: TweetModelConfig | None = None,
) -> Path:
    """Path of the default tweet GPT-2, `<cache_dir>/models/tweet-gpt2-<hash>`, built on first use.

    `cache_dir` defaults to `default_cache_dir()`. With `build_if_missing=False` a missing model raises
    FileNotFoundError naming the path; an existing but incomplete/corrupt folder always raises.
    """
    config = TweetModelConfig() if config is None else config
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    path = root / "models" / f"{MODEL_PREFIX}-{config_hash(config)}"
    if path.exists():
        return check_model_dir(path)
    if not build_if_missing:
        raise FileNotFoundError(f"default model not built: {path} (call get_default_model(build_if_missing=True) "
                                f"or run scripts/build_tweet_model.py --output_dir {path})")
    logger.warning("building the default tweet model into %s (a few minutes on 2 CPU cores, once)", path)
    try:
        build_tweet_model(path, config, progress=True)
    except FileExistsError:
        pass  # another process finished the same build first
    except OSError:
        if not path.exists():  # rename failed for another reason than a concurrent build
            raise
    return check_model_dir(path)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' logging at error level inside the block: for loads whose warnings are expected (a reward model's
    new scalar head on a causal-LM checkpoint is reported as missing weights)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def get_default_reward_model_init(path: str | os.PathLike | None = None, **kwargs: Any):
    """The reward model's default initialization: the tweet GPT-2 backbone with a fresh scalar head.

    `AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`; `path` defaults to
    `get_default_model()`. The head is initialized from torch's global RNG: seed first. It scores the
    last non-`<pad>` token of each row (either padding side; left padding needs explicit position_ids).
    """
    from transformers import AutoModelForSequenceClassification

    path = check_model_dir(get_default_model() if path is None else path)
    with quiet_transformers():  # the fresh head's "MISSING ... train on your downstream task" report is expected
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    if model.config.pad_token_id is None:
        raise ValueError(f"model config in {path} has no pad_token_id: the scalar head could not find the last token")
    return model


__all__ = [
    "TweetModelConfig", "build_tweet_model", "check_model_dir", "config_hash", "default_cache_dir",
    "get_default_model", "get_default_reward_model_init", "load_tweet_model", "train_tokenizer",
    "write_folder_atomically",
]
