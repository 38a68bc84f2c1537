"""The "human" named on a command line: `vader`, `vader_bt[:T]`, a reward-model folder, or `module:callable`.

A folder holding a one-output sequence classifier and its tokenizer is a gold reward model (`RewardModelOracle`:
it scores prompt + completion, the higher reward wins).

`module:callable` is imported (the current folder is on the path) and called with no arguments when it is a class
or a factory; what it gives is used as:
  - a preference oracle, when it has `score` or is a `PreferenceOracle` (labels and scores as it defines them);
  - otherwise a score function `fn(texts) -> list[float]`, wrapped in `ScoreOracle` (higher is better, ties broken
    by a fair coin from `seed`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from .preference import PreferenceOracle, ScoreOracle, VaderOracle

__all__ = ["load_human"]

FORMS = "'vader', 'vader_bt' (optionally 'vader_bt:TEMPERATURE'), a reward-model folder or 'module:callable'"


def load_human(spec: str, seed: int = 0) -> Any:
    """The oracle that `spec` names (module docstring); errors name the spec and the accepted forms."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"human: expected {FORMS}, got {spec!r}")
    if spec == "vader":
        return VaderOracle(mode="deterministic", seed=seed)
    if spec == "vader_bt" or spec.startswith("vader_bt:"):
        temperature = float(spec.partition(":")[2] or 0.1)
        return VaderOracle(mode="bradley_terry", temperature=temperature, seed=seed, name="vader_bt")
    if os.path.isdir(spec):
        from .reward_oracle import RewardModelOracle

        return RewardModelOracle(spec, seed=seed)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"human: expected {FORMS}, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"human {spec!r}: cannot import {attr!r} from module {module_name!r}: {e}") from e
    if inspect.isclass(obj):
        obj = obj()
    elif callable(obj) and not isinstance(obj, PreferenceOracle) and _takes_no_arguments(obj):
        obj = obj()  # a factory
    if isinstance(obj, PreferenceOracle) or callable(getattr(obj, "score", None)):
        return obj
    if callable(obj):
        return ScoreOracle(obj, mode="deterministic", seed=seed, name=attr)
    raise TypeError(f"human {spec!r}: {type(obj).__name__} is neither a preference oracle nor a score function")


def _takes_no_arguments(fn: Any) -> bool:
    """Whether `fn()` is a valid call (a factory), as opposed to a score function `fn(texts)`."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind is p.VAR_KEYWORD for p in params)
