"""Pairwise judges as the human: TRL's judge protocol, and the adapters between judges and preference oracles.

A pairwise judge (TRL's `BasePairwiseJudge`, removed in TRL 1.1, and its `PairRMJudge`, `HfPairwiseJudge`,
`OpenAIPairwiseJudge`) answers ``judge(prompts, completions, shuffle_order=True) -> list[int]``: for pair i,
``completions[i] = [first, second]`` and the verdict is 0 when the first completion is preferred, 1 when the second
is, and -1 when the judge failed to decide (it abstains).

- `JudgeOracle` makes a judge into the trainer's oracle ``(prompts, completions_a, completions_b) -> labels``:
  label 1.0 when ``a`` is preferred, 0.0 when ``b`` is, NaN when the judge abstains. It shuffles the order itself
  (a seeded, checkpointed coin per pair; the verdict is mapped back), so position bias averages out over the pairs.
  The trainer wraps a judge passed as its oracle in one (seeded with `args.seed`).
- `ScoreJudge` makes a judge from per-text scores: a `ScoreOracle` (`VaderOracle`, `RewardModelOracle`) or a
  score function.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from .preference import OracleOutputError, PreferenceOracle, ScoreOracle, _check_texts

__all__ = ["ABSTAIN", "JudgeOracle", "PairwiseJudge", "ScoreJudge", "check_verdicts"]

ABSTAIN = -1  # a judge's verdict when it could not decide


@runtime_checkable
class PairwiseJudge(Protocol):
    """TRL's pairwise judge: for each prompt i and pair ``completions[i] = [first, second]``, the index of the
    preferred completion (0: the first, 1: the second), or -1 when the judge failed to decide. With
    ``shuffle_order`` the judge itself shuffles each pair against position bias (and maps its verdict back)."""

    def judge(self, prompts: list[str], completions: list[list[str]], shuffle_order: bool = True) -> list[int]: ...


def _judge_name(judge: Any) -> str:
    return getattr(judge, "name", None) or type(judge).__name__


def check_verdicts(verdicts: Any, n: int, judge_name: str) -> np.ndarray:
    """Validate a judge's output: a list (or tuple) of ``n`` verdicts, each 0, 1 or -1. Returns them as int64
    ``[n]``; raises `OracleOutputError` naming the judge and the first bad index."""
    if not isinstance(verdicts, (list, tuple)):
        raise OracleOutputError(f"judge {judge_name!r} must return a list of {n} verdicts (0, 1 or -1), got "
                                f"{type(verdicts).__name__}")
    if len(verdicts) != n:
        raise OracleOutputError(f"judge {judge_name!r} must return one verdict per pair: expected {n}, got "
                                f"{len(verdicts)} (first missing or extra index: {min(n, len(verdicts))})")
    for i, v in enumerate(verdicts):
        # bool is an int subclass, but True is not a verdict
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v not in (0, 1, ABSTAIN):
            raise OracleOutputError(f"judge {judge_name!r} returned {v!r} at index {i}: a verdict is 0 (the first "
                                    "completion preferred), 1 (the second) or -1 (abstain)")
    return np.asarray(verdicts, dtype=np.int64).reshape(n)


class JudgeOracle(PreferenceOracle):
    """A pairwise judge as the trainer's preference oracle.

    Args:
        judge: any object with TRL's ``judge(prompts, completions, shuffle_order=True) -> list[int]``
            (`PairwiseJudge`).
        shuffle_order: show each pair in a random order (a fair coin per pair from this adapter's own generator)
            and map the verdict back. The judge is always called with ``shuffle_order=False``: the adapter's coin is
            seeded and checkpointed, a judge's own shuffling is neither.
        seed: seed of that generator (``numpy.random.default_rng``, PCG64).
        name: name in error messages and logs (default: the judge's ``name`` or its class name).

    Returns labels 1.0 (``a`` preferred), 0.0 (``b`` preferred) or NaN (the judge abstained: -1).
    """

    def __init__(self, judge: PairwiseJudge, shuffle_order: bool = True, seed: int = 0, name: str | None = None):
        if not callable(getattr(judge, "judge", None)):
            raise TypeError(f"JudgeOracle: {type(judge).__name__} has no judge(prompts, completions, shuffle_order) "
                            "method (bilevel_rlhf.judges.PairwiseJudge)")
        self.judge = judge
        self.name = name or _judge_name(judge)
        self.shuffle_order = bool(shuffle_order)
        self.rng = np.random.default_rng(seed)

    def __call__(self, prompts: list[str], completions_a: list[str], completions_b: list[str]) -> list[float]:
        prompts = _check_texts(self.name, "prompts", prompts)
        n = len(prompts)
        completions_a = _check_texts(self.name, "completions_a", completions_a, n)
        completions_b = _check_texts(self.name, "completions_b", completions_b, n)
        # swapped[i]: b is shown first. Drawn before the call, so a call abandoned on timeout draws nothing later.
        swapped = self.rng.random(n) < 0.5 if self.shuffle_order else np.zeros(n, dtype=bool)
        pairs = [[b, a] if s else [a, b] for a, b, s in zip(completions_a, completions_b, swapped)]
        verdicts = check_verdicts(self.judge.judge(prompts, pairs, shuffle_order=False), n, self.name)
        first_preferred = verdicts == 0
        a_preferred = first_preferred != swapped  # the first shown is a unless swapped
        return np.where(verdicts == ABSTAIN, np.nan, a_preferred.astype(np.float64)).tolist()

    def score(self, prompts: list[str], completions: list[str]) -> list[float] | None:
        """The judge's own ``score(prompts, completions)`` where it has one (e.g. a `ScoreJudge`), else None."""
        score = getattr(self.judge, "score", None)
        return score(prompts, completions) if callable(score) else None

    def state_dict(self) -> dict[str, Any]:
        """The shuffling generator's state, and the judge's own ``state_dict()`` where it has one."""
        judge_state = getattr(self.judge, "state_dict", None)
        return {"name": self.name, "rng": self.rng.bit_generator.state,
                "judge": judge_state() if callable(judge_state) else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" not in state:
            raise ValueError(f"JudgeOracle {self.name!r}: state_dict has no 'rng' entry (keys: {sorted(state)})")
        self.rng.bit_generator.state = state["rng"]
        load = getattr(self.judge, "load_state_dict", None)
        if state.get("judge") is not None and callable(load):
            load(state["judge"])


class ScoreJudge:
    """A `PairwiseJudge` from per-text scores: the higher score wins (or a Bradley-Terry draw).

    Args:
        scorer: a `ScoreOracle` (e.g. `VaderOracle`, `RewardModelOracle`), used as it is, or a score function
            ``score_fn(texts) -> list[float]``, wrapped in a `ScoreOracle` with the arguments below.
        mode, temperature, seed, include_prompt: `ScoreOracle`'s, for a score function (`"deterministic"` or
            `"bradley_terry"`: a verdict is a choice, not a probability).
        name: name in error messages and logs.

    Scores have no position bias, so ``shuffle_order`` changes nothing; a tie is broken by the oracle's seeded coin.
    """

    def __init__(self, scorer: ScoreOracle | Callable[[list[str]], Sequence[float]],
                 mode: Literal["deterministic", "bradley_terry"] = "deterministic", temperature: float = 1.0,
                 seed: int = 0, include_prompt: bool = False, name: str | None = None):
        if not isinstance(scorer, ScoreOracle):
            if not callable(scorer):
                raise TypeError(f"ScoreJudge: scorer must be a ScoreOracle or a score function, got "
                                f"{type(scorer).__name__}")
            scorer = ScoreOracle(scorer, mode=mode, temperature=temperature, seed=seed, include_prompt=include_prompt,
                                 name=name)
        if scorer.mode == "probability":
            raise ValueError(f"ScoreJudge {scorer.name!r}: mode 'probability' gives soft labels, not verdicts; use "
                             "'deterministic' or 'bradley_terry'")
        self.oracle = scorer
        self.name = name or scorer.name

    def judge(self, prompts: list[str], completions: list[list[str]], shuffle_order: bool = True) -> list[int]:
        if isinstance(completions, str) or not isinstance(completions, Sequence):
            raise TypeError(f"ScoreJudge {self.name!r}: completions must be a list of [first, second] pairs")
        for i, pair in enumerate(completions):
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise TypeError(f"ScoreJudge {self.name!r}: completions[{i}] must be a pair [first, second]")
        labels = self.oracle(list(prompts), [p[0] for p in completions], [p[1] for p in completions])
        return [0 if label == 1.0 else 1 for label in labels]  # label 1.0: the first wins

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return self.oracle.score(prompts, completions)

    def state_dict(self) -> dict[str, Any]:
        return self.oracle.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.oracle.load_state_dict(state)
