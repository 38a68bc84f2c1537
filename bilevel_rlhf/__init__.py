"""bilevel-rlhf: bilevel reinforcement learning for RLHF on the Hugging Face stack.

The public API is importable from here; heavy submodules (transformers, trl) load lazily so
that the tabular GridWorld backend imports in a fraction of a second.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # --- GridWorld (tabular) backend ---
    "DEFAULT_LAYOUT": ".gridworld",
    "GoalProblem": ".gridworld",
    "GridMDP": ".gridworld",
    "GridWorldConfig": ".gridworld",
    "RunResult": ".gridworld",
    "TabularMDP": ".gridworld",
    "build_problem": ".gridworld",
    "exact_hypergradient": ".gridworld",
    "global_search": ".gridworld",
    "hard_value_iteration": ".gridworld",
    "make_grid": ".gridworld",
    "occupancy": ".gridworld",
    "policy_evaluation": ".gridworld",
    "run_method": ".gridworld",
    "soft_value_iteration": ".gridworld",
    # --- language-model trainer ---
    "BilevelConfig": ".config",
    "BilevelTrainer": ".trainer",
    "load_value_heads": ".modeling",
    "Completions": ".rollout",
    "Rollout": ".rollout",
    # --- upper-level objectives ---
    "PreferenceNLL": ".objectives",
    "UpperObjective": ".objectives",
    "WinRate": ".objectives",
    # --- preference oracles ---
    "PreferenceOracle": ".preference",
    "ScoreOracle": ".preference",
    "VaderOracle": ".preference",
    "check_labels": ".preference",
    "compute_gae": ".rl_utils",
    "masked_whiten": ".rl_utils",
    "bradley_terry_loss": ".rl_utils",
    # --- happy tweet: data and the default small GPT-2 ---
    "TweetModelConfig": ".happy_tweet",
    "filter_text": ".happy_tweet",
    "get_default_model": ".happy_tweet",
    "get_default_reward_model_init": ".happy_tweet",
    "load_prompt_dataset": ".happy_tweet",
    "load_tweets": ".happy_tweet",
    # --- benchmark (scripts/benchmark.py) ---
    "BenchmarkArguments": ".benchmark",
    "run_benchmark": ".benchmark",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'bilevel_rlhf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
