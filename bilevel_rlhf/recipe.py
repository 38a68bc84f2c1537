"""The generic RLHF recipe: your prompts, your causal LM, your human (TRL script shape).

    bilevel-rlhf --dataset_name prompts.jsonl --model_name_or_path path/to/causal-lm --human mypkg.judge:score \
        --output_dir outputs/mine [--use_peft --lora_r 16] [--method partial_sgd] [any BilevelConfig field]
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m bilevel_rlhf.recipe --config my.yaml

Arguments: `RecipeArguments` (data, human, reward model, evaluation), `BilevelConfig` and TRL's `ModelConfig`
(`model_name_or_path`, `dtype`, `use_peft`, `lora_r`, ...), from a YAML (`--config`) and the command line.

- **Prompts**: `dataset_name` is a local JSONL/JSON/CSV/Parquet file, a folder written by `Dataset.save_to_disk`, a
  folder of such files, or a hub dataset (online only); `prompt_column` names the column. The held-out prompts are
  `dataset_test_split` when the dataset has it, else an `eval_fraction` of the training split (one fixed split).
- **Human**: `vader`, `vader_bt[:T]` or `module:callable` (`bilevel_rlhf.load_human`).
- **Policy**: `model_name_or_path`, any causal LM; none: the embedded 4-layer tweet GPT-2 (built on first use).
- **Reward model**: `reward_model_name_or_path`, else the policy's backbone with a fresh scalar head.

Writes into `output_dir`: theta (top level), phi (`phi/`), r_x (`reward_model/`), the critics, checkpoints, TensorBoard
logs, `summary.json` and, with `eval_protocol_steps`, `eval_protocol.json` (docs/evaluation.md). Ctrl-C or SIGTERM
stops at the next iteration boundary after a checkpoint; `--resume_from_checkpoint last` continues. The happy-tweet
recipe (`bilevel_rlhf.happy_tweet.recipe`) is this recipe with the tweet data, model and oracles built in.
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
from trl import ScriptArguments

from .modeling import zero_fresh_heads
from .validation import field_checker

SUMMARY_NAME = "summary.json"
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class RecipeArguments(ScriptArguments):
    """Script arguments of the generic recipe: TRL's `ScriptArguments` (dataset_name, dataset_config,
    dataset_train_split, dataset_test_split, ...) plus the prompt column, the human, the reward model and evaluation."""

    prompt_column: str = field(default="prompt", metadata={"help": "The dataset column holding the prompts."})
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Held-out fraction of the training split when the dataset has no "
                                "`dataset_test_split`, in (0, 1)."})
    max_train_prompts: int | None = field(default=None, metadata={"help": "Use only the first N training prompts."})
    num_eval_prompts: int = field(
        default=128, metadata={"help": "Held-out prompts scored after training (theta's r_x and oracle score); 0: none."})
    human: str = field(
        default="vader", metadata={"help": "The simulated human: vader, vader_bt[:T] or module:callable (a "
                                   "PreferenceOracle, an object with `score`, or a score function of texts)."})
    human_seed: int | None = field(default=None, metadata={"help": "Seed of the human's RNG; None: `seed`."})
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Initial reward model (a one-output sequence classifier, or any backbone: a "
                                "scalar head is added); None: the policy's backbone with a fresh scalar head."})
    eval_protocol_steps: int = field(
        default=0, metadata={"help": "Run the evaluation protocol (docs/evaluation.md) every N optimizer steps; 0: off."})
    eval_protocol_prompts: int = field(default=64, metadata={"help": "Held-out prompts of the evaluation protocol."})
    eval_protocol_samples: int = field(default=4, metadata={"help": "Completions per prompt in the evaluation protocol."})
    torch_threads: int = field(
        default=1, metadata={"help": "torch intra-op threads; 0: torch's default. 1 suits small models on shared "
                             "cores (docs/happy_tweet.md)."})

    def __post_init__(self) -> None:
        need = field_checker(self)
        need(isinstance(self.dataset_name, str) and bool(self.dataset_name), "dataset_name",
             "a local file (.jsonl/.json/.csv/.parquet), a datasets folder, or a hub dataset name")
        need(bool(self.prompt_column), "prompt_column", "a column name")
        need(0 < self.eval_fraction < 1, "eval_fraction", "in (0, 1)")
        need(self.max_train_prompts is None or self.max_train_prompts >= 1, "max_train_prompts", "None or >= 1")
        need(self.num_eval_prompts >= 0, "num_eval_prompts", ">= 0")
        need(isinstance(self.eval_protocol_steps, int) and self.eval_protocol_steps >= 0, "eval_protocol_steps",
             "an integer >= 0 (0: off)")
        need(self.eval_protocol_prompts >= 1, "eval_protocol_prompts", "an integer >= 1")
        need(self.eval_protocol_samples >= 1, "eval_protocol_samples", "an integer >= 1")
        need(isinstance(self.torch_threads, int) and self.torch_threads >= 0, "torch_threads", "an integer >= 0")


# ---------------------------------------------------------------------------------------------------- data
def _load_dataset(name: str, config: str | None):
    """A DatasetDict or Dataset from a file, a save_to_disk folder, a folder of data files, or the hub."""
    import datasets

    path = Path(name).expanduser()
    if path.is_file():
        kind = DATA_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"dataset_name: {path} is not a .jsonl, .json, .csv or .parquet file")
        return datasets.load_dataset(kind, data_files=str(path))
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path), config)
    if path.is_absolute() or name.startswith((".", "~")) or path.suffix.lower() in DATA_SUFFIXES:
        raise FileNotFoundError(f"dataset_name: {path} not found")
    try:
        return datasets.load_dataset(name, config)
    except Exception as e:  # offline, unknown name, ...
        raise ValueError(f"dataset_name: cannot load {name!r} from the hub ({type(e).__name__}: {e}); give a local "
                         "file or folder") from e


def load_prompts(args: RecipeArguments):
    """(train, held-out) Datasets with one `prompt` column (module docstring); errors name the dataset and column."""
    import datasets

    data = _load_dataset(args.dataset_name, args.dataset_config)
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({args.dataset_train_split: data})
    if args.dataset_train_split not in data:
        raise ValueError(f"dataset_train_split: {args.dataset_name} has no split {args.dataset_train_split!r} "
                         f"(splits: {sorted(data)})")
    train = data[args.dataset_train_split]
    if args.prompt_column not in train.column_names:
        raise ValueError(f"prompt_column: {args.dataset_name} has no column {args.prompt_column!r} "
                         f"(columns: {train.column_names})")
    if args.dataset_test_split in data:
        held_out = data[args.dataset_test_split]
    else:
        if len(train) < 2:
            raise ValueError(f"dataset_name: {args.dataset_name} has {len(train)} prompt(s); a held-out part needs 2+")
        parts = train.train_test_split(test_size=args.eval_fraction, seed=0)  # the same for every training seed
        train, held_out = parts["train"], parts["test"]
    train, held_out = (d.rename_column(args.prompt_column, "prompt") if args.prompt_column != "prompt" else d
                       for d in (train, held_out))
    for name, d in (("training", train), ("held-out", held_out)):
        bad = [i for i, p in enumerate(d["prompt"]) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ValueError(f"{args.dataset_name}: {name} prompt {bad[0]} (column {args.prompt_column!r}) is not a "
                             "non-empty string")
    if args.max_train_prompts is not None:
        train = train.select(range(min(args.max_train_prompts, len(train))))
    return train.select_columns(["prompt"]), held_out.select_columns(["prompt"])


# ---------------------------------------------------------------------------------------------------- models
def _load(kind: str, name: str, **kwargs: Any):
    """from_pretrained with an error naming the path (corrupt weights, missing files, offline hub ids)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .happy_tweet.build_model import quiet_transformers

    cls = {"causal_lm": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification,
           "tokenizer": AutoTokenizer}[kind]
    try:
        if kind == "reward":  # a new scalar head on a causal-LM checkpoint: its missing-weights report is expected
            with quiet_transformers():
                return cls.from_pretrained(name, **kwargs)
        return cls.from_pretrained(name, **kwargs)
    except Exception as e:  # from_pretrained raises OSError, ValueError, safetensors errors, ...
        raise ValueError(f"cannot load {kind.replace('_', ' ')} from {name}: {type(e).__name__}: {e}") from e


def load_models(policy_path: str, reward_path: str | None, training_args, model_args) -> dict[str, Any]:
    """Policy, reward model and their tokenizers (reward tokenizer None when it shares the policy's); `reward_path`
    None: the policy's backbone with a fresh scalar head (zero, or seeded by `training_args.seed`:
    `reward_head_init`)."""
    kwargs: dict[str, Any] = {"trust_remote_code": training_args.trust_remote_code}
    if model_args.dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, model_args.dtype)
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    tokenizer = _load("tokenizer", policy_path, trust_remote_code=training_args.trust_remote_code)
    policy = _load("causal_lm", policy_path, **kwargs)
    if training_args.reward_adapter:  # r_x is a LoRA adapter on the policy's base, built by the trainer
        if reward_path is not None:
            raise ValueError("reward_model_name_or_path must be None with reward_adapter=True (r_x is an adapter on "
                             "the policy's base)")
        return {"policy_path": policy_path, "reward_path": None, "policy": policy, "tokenizer": tokenizer,
                "reward_model": None, "reward_tokenizer": None}

    reward_path = reward_path or policy_path
    torch.manual_seed(training_args.seed)  # the fresh scalar head
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reward_kwargs = dict(kwargs, num_labels=1)
    if reward_path == policy_path:
        reward_kwargs["pad_token_id"] = pad_id  # the head scores the last non-pad token
    reward_model, info = _load("reward", reward_path, output_loading_info=True, **reward_kwargs)
    if training_args.reward_head_init == "zero":
        zero_fresh_heads(reward_model, info["missing_keys"])
    reward_tokenizer = None
    if reward_path != policy_path:
        reward_tokenizer = _load("tokenizer", reward_path, trust_remote_code=training_args.trust_remote_code)
    return {"policy_path": policy_path, "reward_path": reward_path, "policy": policy, "tokenizer": tokenizer,
            "reward_model": reward_model, "reward_tokenizer": reward_tokenizer}


# ---------------------------------------------------------------------------------------------------- callbacks
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
        print(f"\n[bilevel-rlhf] {signal.Signals(signum).name}: stopping after this iteration (checkpoint first); "
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


def _resolve_resume(resume: str | bool | None, output_dir: str) -> str | None:
    """`last`/`true`: the newest complete checkpoint in output_dir (error if none; newer incomplete ones, cut short
    by a kill while saving, are skipped with a warning); a path: that folder (checked)."""
    from .trainer import last_complete_checkpoint

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


# ---------------------------------------------------------------------------------------------------- training
def prepare_run(training_args, torch_threads: int) -> str | None:
    """Threads and seed set, the checkpoint to resume from resolved (before any loading: bad input fails fast)."""
    from transformers import set_seed

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    set_seed(training_args.seed)
    return _resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)


def train_and_save(training_args, model_args, models: dict[str, Any], oracle, train_dataset, eval_dataset,
                   resume: str | None, t_start: float, protocol: tuple[list[str], int, int] | None = None,
                   extra: dict[str, Any] | None = None, tag: str = "bilevel-rlhf") -> dict[str, Any]:
    """Train `BilevelTrainer` (stoppable by a signal, with the evaluation protocol `(prompts, steps, samples)` when
    given), save every role, evaluate, and write `summary.json` (with `extra`); returns the summary."""
    from trl import get_peft_config

    from .eval_callback import OracleEvalCallback
    from .trainer import BilevelTrainer

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
        print(f"[{tag}] device {trainer.accelerator.device} x {trainer.accelerator.num_processes} process(es), "
              f"parameters {dtype}, mixed precision {trainer.accelerator.mixed_precision}, "
              f"torch threads {torch.get_num_threads()}", file=sys.stderr)
    if protocol is not None:
        prompts, steps, samples = protocol
        trainer.add_callback(OracleEvalCallback(trainer, prompts, steps, num_samples=samples))
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
        **(extra or {}),
        "log_history": history,
    }
    if trainer.accelerator.is_main_process:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, SUMMARY_NAME), "w") as fh:
            json.dump(_jsonable(summary), fh, indent=1)
        if interrupted:
            print(f"[{tag}] stopped at step {stopper.stopped_at}; resume with "
                  f"--resume_from_checkpoint last --output_dir {training_args.output_dir}", file=sys.stderr)
        else:
            print(f"[{tag}] done in {summary['seconds']} s: {summary['oracle_queries']} oracle queries, "
                  f"theta saved to {training_args.output_dir}", file=sys.stderr)
    trainer.accelerator.wait_for_everyone()
    return summary


def main(script_args: RecipeArguments, training_args, model_args) -> dict[str, Any]:
    """Train one method on the user's task (module docstring); returns the summary."""
    from .humans import load_human

    t_start = time.time()
    resume = prepare_run(training_args, script_args.torch_threads)
    train_dataset, held_out = load_prompts(script_args)
    eval_dataset = held_out.select(range(min(script_args.num_eval_prompts, len(held_out))))
    oracle = load_human(script_args.human,
                        training_args.seed if script_args.human_seed is None else script_args.human_seed)
    from .happy_tweet.recipe import resolve_model_path

    # no policy named: the embedded tweet GPT-2 (built on first use), as in the happy-tweet recipe
    models = load_models(resolve_model_path(model_args.model_name_or_path), script_args.reward_model_name_or_path,
                         training_args, model_args)
    protocol = None
    if script_args.eval_protocol_steps > 0:
        protocol = (list(held_out["prompt"][: script_args.eval_protocol_prompts]), script_args.eval_protocol_steps,
                    script_args.eval_protocol_samples)
    return train_and_save(training_args, model_args, models, oracle, train_dataset,
                          eval_dataset if len(eval_dataset) else None, resume, t_start, protocol,
                          extra={"human": script_args.human, "script_args": asdict(script_args)})


def _cpu_without_accelerator() -> None:
    """The recipe trains on the accelerator when there is one, else on the CPU. Without one, `ACCELERATE_USE_CPU`
    tells `TrainingArguments` so before it sets up its devices (as `use_cpu=True` would): without it, the processes
    of a multi-process CPU launch would each train alone instead of joining one gloo process group."""
    xpu = getattr(torch, "xpu", None)
    if not (torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu is not None and xpu.is_available())):
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def recipe_parser(script_arguments: type):
    """TrlParser over (script_arguments, BilevelConfig, ModelConfig); `--config recipe.yaml` gives defaults."""
    from trl import ModelConfig, TrlParser

    from .config import BilevelConfig

    _cpu_without_accelerator()
    return TrlParser((script_arguments, BilevelConfig, ModelConfig))


def make_parser():
    """The generic recipe's parser: (RecipeArguments, BilevelConfig, ModelConfig)."""
    return recipe_parser(RecipeArguments)


def run_recipe(parser, train, argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv` (default: sys.argv[1:]; `--config recipe.yaml` plus overrides) and `train` on the three argument
    objects; returns the summary."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return train(*parser.parse_args_and_config(argv))


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv` and run `main`; returns the summary."""
    return run_recipe(make_parser(), main, argv)


def exit_process_group(run_fn) -> None:
    """Run a recipe as a console script, then leave the process group of a multi-process launch (a gloo thread alive
    at interpreter exit can abort the process)."""
    from accelerate import PartialState

    run_fn()
    PartialState().destroy_process_group()


def cli() -> None:
    """Console script `bilevel-rlhf`."""
    exit_process_group(run)


if __name__ == "__main__":
    cli()
