"""Preference oracles: the "human" that labels pairs of completions.

An oracle is called as ``oracle(prompts, completions_a, completions_b) -> labels``, one label per
pair: 1.0 when ``a`` is preferred, 0.0 when ``b`` is, or a probability in [0, 1]; NaN when the oracle
abstains on that pair (the trainer leaves the pair out of every loss). Any callable with that
signature works with the trainer, which checks every output with :func:`check_labels`; subclass
:class:`PreferenceOracle` to also get ``score`` (for logging) and checkpointable RNG state. A pairwise
judge (``bilevel_rlhf.judges``) becomes an oracle through ``JudgeOracle``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

__all__ = ["OracleOutputError", "PreferenceOracle", "ScoreOracle", "VaderOracle", "check_labels"]


class OracleOutputError(ValueError):
    """An oracle (or its score function, or its judge) returned something that is not an answer: the wrong length,
    a value out of range, the wrong type. A bug, not a passing failure: the trainer stops instead of retrying."""


def check_labels(labels: Any, n: int, oracle_name: str, abstain: bool = False) -> np.ndarray:
    """Validate an oracle's output: ``n`` finite numbers in [0, 1] (with ``abstain``, NaN too: no answer for that
    pair). Returns them as float64 ``[n]``; raises `OracleOutputError` naming the oracle and the first bad index."""
    try:
        arr = np.asarray(labels, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise OracleOutputError(
            f"preference oracle {oracle_name!r} must return {n} numbers in [0, 1], got {labels!r}") from err
    if arr.shape != (n,):
        raise OracleOutputError(
            f"preference oracle {oracle_name!r} must return one label per pair: expected shape ({n},), got {arr.shape}"
        )
    bad = ~np.isfinite(arr) & ~(abstain & np.isnan(arr))
    if bad.any():
        raise OracleOutputError(
            f"preference oracle {oracle_name!r} returned a non-finite label at index {int(np.argmax(bad))}: "
            f"{arr[bad][0]}"
        )
    out = (arr < 0.0) | (arr > 1.0)
    if out.any():
        raise OracleOutputError(
            f"preference oracle {oracle_name!r} returned a label outside [0, 1] at index {int(np.argmax(out))}: "
            f"{arr[out][0]}"
        )
    return arr


def _check_texts(name: str, field: str, texts: Any, n: int | None = None) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"preference oracle {name!r}: {field} must be a list of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"preference oracle {name!r}: {field}[{i}] must be a str, got {type(t).__name__}")
    if n is not None and len(texts) != n:
        raise ValueError(f"preference oracle {name!r}: {field} has {len(texts)} entries, expected {n} (one per prompt)")
    return texts


class PreferenceOracle:
    """Base class of preference oracles.

    Subclasses implement ``__call__(prompts, completions_a, completions_b) -> list[float]`` (labels in
    [0, 1], 1.0 when ``a`` is preferred, NaN for a pair they abstain on) and may override ``score``
    (a per-text quality used for logging, e.g. the mean oracle score of the policy's samples) and
    ``state_dict`` / ``load_state_dict`` (JSON-able random state, saved in checkpoints).
    """

    name: str = "oracle"

    def __call__(self, prompts: list[str], completions_a: list[str], completions_b: list[str]) -> list[float]:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(prompts, completions_a, completions_b)")

    def score(self, prompts: list[str], completions: list[str]) -> list[float] | None:
        """Per-completion score where the oracle has one, else None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (e.g. the RNG) needed to reproduce future labels."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class ScoreOracle(PreferenceOracle):
    """Turn a per-text score function into a preference oracle.

    Args:
        score_fn: ``score_fn(texts: list[str]) -> list[float]``, one finite score per text, higher is
            better. The text scored is the completion, or ``prompt + completion`` (plain string
            concatenation) when ``include_prompt=True``. Both sides of all pairs are scored in one call.
        mode: ``"deterministic"``: label 1.0 if score_a > score_b, 0.0 if less, ties broken by a fair
            coin from the seeded RNG. ``"bradley_terry"``: label ~ Bernoulli(sigmoid((score_a - score_b)
            / temperature)), sampled from the seeded RNG. ``"probability"``: the label is that
            probability itself (a soft label, no sampling).
        temperature: Bradley-Terry temperature (> 0), used by ``"bradley_terry"`` and ``"probability"``.
        seed: seed of the ``numpy.random.Generator`` (PCG64) used for ties and sampling.
        include_prompt: score ``prompt + completion`` instead of the completion alone.
        name: name used in error messages and logs.
    """

    MODES = ("deterministic", "bradley_terry", "probability")

    def __init__(
        self,
        score_fn: Callable[[list[str]], Sequence[float]],
        mode: Literal["deterministic", "bradley_terry", "probability"] = "deterministic",
        temperature: float = 1.0,
        seed: int = 0,
        include_prompt: bool = False,
        name: str | None = None,
    ) -> None:
        self.name = name if name is not None else getattr(score_fn, "__name__", type(self).__name__)
        if not callable(score_fn):
            raise TypeError(f"preference oracle {self.name!r}: score_fn must be callable, got {type(score_fn).__name__}")
        if mode not in self.MODES:
            raise ValueError(f"preference oracle {self.name!r}: mode must be one of {self.MODES}, got {mode!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"preference oracle {self.name!r}: temperature must be a finite number > 0, got {temperature!r}")
        self.score_fn = score_fn
        self.mode = mode
        self.temperature = float(temperature)
        self.seed = seed
        self.include_prompt = include_prompt
        self.rng = np.random.default_rng(seed)

    def _scores(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        texts = [p + c for p, c in zip(prompts, completions)] if self.include_prompt else completions
        raw = self.score_fn(texts)
        try:
            scores = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise OracleOutputError(
                f"preference oracle {self.name!r}: score_fn must return {len(texts)} numbers, got {raw!r}"
            ) from err
        if scores.shape != (len(texts),):
            raise OracleOutputError(
                f"preference oracle {self.name!r}: score_fn must return one score per text: "
                f"expected shape ({len(texts)},), got {scores.shape}"
            )
        bad = ~np.isfinite(scores)
        if bad.any():
            i = int(np.argmax(bad))
            raise OracleOutputError(
                f"preference oracle {self.name!r}: score_fn returned a non-finite score {scores[i]} for text {i}: "
                f"{texts[i][:80]!r}"
            )
        return scores

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """The score function's value of each completion (or prompt + completion)."""
        completions = _check_texts(self.name, "completions", completions)
        prompts = _check_texts(self.name, "prompts", prompts, len(completions))
        return self._scores(prompts, completions).tolist()

    def __call__(self, prompts: list[str], completions_a: list[str], completions_b: list[str]) -> list[float]:
        prompts = _check_texts(self.name, "prompts", prompts)
        n = len(prompts)
        completions_a = _check_texts(self.name, "completions_a", completions_a, n)
        completions_b = _check_texts(self.name, "completions_b", completions_b, n)
        scores = self._scores(prompts + prompts, completions_a + completions_b)
        diff = scores[:n] - scores[n:]
        if self.mode == "deterministic":
            labels = (diff > 0).astype(np.float64)
            ties = diff == 0
            if ties.any():  # draw only for ties, so the RNG stream depends only on the tie count
                labels[ties] = (self.rng.random(int(ties.sum())) < 0.5).astype(np.float64)
            return labels.tolist()
        # sigmoid(z) = 0.5 * (1 + tanh(z / 2)): no overflow for large |z|
        prob = 0.5 * (1.0 + np.tanh(diff / (2.0 * self.temperature)))
        if self.mode == "probability":
            return prob.tolist()
        return (self.rng.random(n) < prob).astype(np.float64).tolist()

    def state_dict(self) -> dict[str, Any]:
        """The RNG state as plain JSON-able data (PCG64 ``bit_generator.state``)."""
        return {"name": self.name, "mode": self.mode, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" not in state:
            raise ValueError(f"preference oracle {self.name!r}: state_dict has no 'rng' entry (keys: {sorted(state)})")
        self.rng.bit_generator.state = state["rng"]


class VaderOracle(ScoreOracle):
    """The paper's rule-based human: VADER sentiment (``compound`` score in [-1, 1]), happier wins.

    ``SentimentIntensityAnalyzer().polarity_scores(text)["compound"]`` from the ``vaderSentiment``
    package; the other arguments are :class:`ScoreOracle`'s. The compound score lies in [-1, 1], so
    a Bradley-Terry temperature around 0.1-0.5 gives informative sampled labels.
    """

    def __init__(
        self,
        mode: Literal["deterministic", "bradley_terry", "probability"] = "deterministic",
        temperature: float = 1.0,
        seed: int = 0,
        include_prompt: bool = False,
        name: str = "vader",
    ) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        super().__init__(
            self.compound, mode=mode, temperature=temperature, seed=seed, include_prompt=include_prompt, name=name
        )

    def compound(self, texts: list[str]) -> list[float]:
        """VADER compound score of each text."""
        return [self.analyzer.polarity_scores(t)["compound"] for t in texts]
