"""bilevel-rlhf: bilevel reinforcement learning for RLHF on the Hugging Face stack.

The package root exports what a trainer user needs: the config and trainer, the rollout types, the upper-level
objectives, the preference oracles and pairwise judges. Everything else lives in its subpackage or module, one
meaning per name:

- `bilevel_rlhf.gridworld`: the tabular GridWorld backend (`GridWorldConfig`, `build_problem`, `run_method`, the
  exact solvers, `GoalProblem.hypergradient`, ...);
- `bilevel_rlhf.rl_utils`: `compute_gae`, `masked_whiten`, `bradley_terry_loss`;
- `bilevel_rlhf.happy_tweet`: the tweet data and the default small GPT-2 (`load_tweets`, `get_default_model`, ...);
- `bilevel_rlhf.bandit`, `bilevel_rlhf.testbed`, `bilevel_rlhf.panel`: the exact one-token bandit, the exact
  multi-token testbed, and panels of its instances drawn by seed;
- `bilevel_rlhf.guards`, `bilevel_rlhf.trust_region`: the trainer's lost-tracking and collapse guards, and the trust
  region on the reward model's steps;
- `bilevel_rlhf.schedules`: the trainer's schedules (`tau_at`, `lambda_at`, `lr_factor`);
- `bilevel_rlhf.frontier`: protocol records read as the field reads them (reward-KL envelopes, matched KL, query
  curves), behind `scripts/protocol_report.py`.

Submodules load lazily, so `import bilevel_rlhf` does not import transformers or trl, and the tabular GridWorld
backend imports in a fraction of a second.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # --- language-model trainer ---
    "BilevelConfig": ".config",
    "BilevelTrainer": ".trainer",
    "AdapterRewardModel": ".modeling",
    "load_policy": ".modeling",
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
    "RewardModelOracle": ".reward_oracle",
    "load_human": ".humans",
    "OracleOutputError": ".preference",
    # --- pairwise judges (TRL's protocol) and failing oracles ---
    "PairwiseJudge": ".judges",
    "JudgeOracle": ".judges",
    "ScoreJudge": ".judges",
    "LocalLLMJudge": ".llm_judge",
    "OracleFailureError": ".oracle_calls",
    # --- the evaluation protocol (oracle score, win rate, KL, diversity on held-out prompts) ---
    "EvalRecord": ".evaluation",
    "PolicyEvaluator": ".evaluation",
    "OracleEvalCallback": ".eval_callback",
    "read_eval_records": ".eval_callback",
    # --- warnings of the guards (to filter or to turn into errors) ---
    "CollapseWarning": ".guards",
    "TrackingWarning": ".guards",
    "OracleDropWarning": ".oracle_calls",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'bilevel_rlhf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
