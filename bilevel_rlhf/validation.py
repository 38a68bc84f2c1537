"""One validator for every config dataclass (`BilevelConfig`, `GridWorldConfig`, the recipes' arguments): a failed
check raises ValueError naming the field, what it must be, and the value it got, before any work starts."""

from __future__ import annotations

from typing import Any, Callable


def field_checker(config: Any, owner: str = "") -> Callable[[bool, str, str], None]:
    """`need(ok, name, allowed)` for the fields of `config`: raises `ValueError("{owner}{name} must be {allowed}, got
    {value!r}")` when `ok` is false. `owner` prefixes the field for configs that are not the obvious one (e.g.
    "TweetModelConfig.")."""

    def need(ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{owner}{name} must be {allowed}, got {getattr(config, name)!r}")

    return need
