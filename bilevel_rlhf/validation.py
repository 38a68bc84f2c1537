"""One validator for every config dataclass (`BilevelConfig`, `GridWorldConfig`, the recipes' arguments): a failed
check raises ValueError naming the field, what it must be, and the value it got, before any work starts."""

from __future__ import annotations

import warnings
from typing import Any, Callable


def field_checker(config: Any, owner: str = "") -> Callable[[bool, str, str], None]:
    """`need(ok, name, allowed)` for the fields of `config`: raises `ValueError("{owner}{name} must be {allowed}, got
    {value!r}")` when `ok` is false. `owner` prefixes the field for configs that are not the obvious one (e.g.
    "TweetModelConfig.")."""

    def need(ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{owner}{name} must be {allowed}, got {getattr(config, name)!r}")

    return need


def warn_unless_time_scales(config: Any, fields: tuple[str, str, str], decays: bool = False) -> None:
    """Warn (not raise) unless the three time-scales of the analysis are in order: `fields` name the critic's,
    the actor's and x's step sizes, which must not increase (critic fastest), or, with `decays`, their decay
    powers, which must not decrease."""
    values = [getattr(config, name) for name in fields]
    keys = [-v for v in values] if decays else values  # one comparison for both orders
    if not keys[0] >= keys[1] >= keys[2]:
        op = "<=" if decays else ">="
        warnings.warn(
            f"the three time-scales of the analysis need {fields[0]} {op} {fields[1]} {op} {fields[2]}; got "
            f"{values[0]}, {values[1]}, {values[2]}",
            stacklevel=4,
        )

