"""The trainer's calls to the preference oracle, and what it does when the oracle fails.

Real feedback fails: an LLM judge abstains, times out or hits a rate limit. Here, in one place:
  - a call that raises, or that gives no answer within `oracle_timeout` seconds (it runs in a worker thread, which
    is abandoned), is tried again, `oracle_retries` times, after `oracle_retry_backoff * 2^j` seconds (j = 0, 1, ...);
  - then the batch's pairs are dropped: counted, and an `OracleDropWarning` names the iteration and the error;
  - an oracle that fails on `oracle_max_consecutive_failures` labelled iterations in a row stops the run with an
    `OracleFailureError`, after the trainer has saved a checkpoint to resume from;
  - a pair the oracle abstains on (NaN label) is kept out of every loss; the other pairs of the batch are used.
An output that is not an answer (the wrong length, a label out of range: `OracleOutputError`) is a bug, not a
failure: it stops the run at once, naming the iteration.

Every pair asked is counted once, as answered, abstained or dropped (`OracleCounts`, logged as `oracle/*` and saved in
checkpoints).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .preference import OracleOutputError, check_labels

__all__ = ["OracleAnswer", "OracleCaller", "OracleCounts", "OracleDropWarning", "OracleFailureError",
           "summed_over_processes"]

PLACEHOLDER_LABEL = 0.5  # the label stored for a pair without an answer: finite, and never read through the mask


class OracleFailureError(RuntimeError):
    """The oracle failed on `oracle_max_consecutive_failures` labelled iterations in a row; the run stopped after
    saving a checkpoint (`checkpoint`, named in the message)."""

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(message)
        self.message, self.checkpoint = message, checkpoint

    def __str__(self) -> str:
        if self.checkpoint is None:
            return self.message
        return f"{self.message}; the run so far is saved in {self.checkpoint}: resume from it once the oracle works"


class OracleDropWarning(UserWarning):
    """An oracle call failed after its retries: the batch's pairs were dropped (and counted in `oracle/dropped`)."""


@dataclass(frozen=True)
class OracleAnswer:
    """The oracle's answer for one batch of pairs of this process."""

    labels: np.ndarray  # [pairs] float64 in [0, 1]; PLACEHOLDER_LABEL where `answered` is False
    answered: np.ndarray  # [pairs] bool: a label from the oracle (not abstained, not dropped)
    failed_calls: int  # calls that raised or timed out, retries included
    dropped: bool  # every try failed: no pair has an answer
    error: BaseException | None = None  # the last failed call's exception

    @property
    def counts(self) -> "OracleCounts":
        n, answered = len(self.labels), int(self.answered.sum())
        return OracleCounts(asked=n, answered=answered, abstained=0 if self.dropped else n - answered,
                            dropped=n if self.dropped else 0, failed_calls=self.failed_calls)


@dataclass
class OracleCounts:
    """Pairs asked = answered + abstained + dropped, and the failed calls (cumulative over the run, all processes)."""

    asked: int = 0
    answered: int = 0
    abstained: int = 0
    dropped: int = 0
    failed_calls: int = 0

    def __add__(self, other: "OracleCounts") -> "OracleCounts":
        return OracleCounts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def metrics(self) -> dict[str, float]:
        """The logged counters: `oracle/queries` (pairs asked), `oracle/answered`, `oracle/abstained`,
        `oracle/dropped` and `oracle/failed_calls`."""
        return {"oracle/queries": float(self.asked), "oracle/answered": float(self.answered),
                "oracle/abstained": float(self.abstained), "oracle/dropped": float(self.dropped),
                "oracle/failed_calls": float(self.failed_calls)}

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, int]) -> "OracleCounts":
        return cls(**{f.name: int(state[f.name]) for f in dataclasses.fields(cls)})


def summed_over_processes(counts: OracleCounts, stop: bool, accelerator) -> tuple[OracleCounts, bool]:
    """`counts` summed over the processes, and whether any process asks to stop: one collective, so every process
    sees the same totals and takes the same decision."""
    local = torch.tensor([*dataclasses.astuple(counts), int(stop)], dtype=torch.long, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum").tolist()
    return OracleCounts(*total[:-1]), total[-1] > 0


def _call(fn: Callable[..., Any], args: tuple, timeout: float | None) -> Any:
    """`fn(*args)`, or within `timeout` seconds in a daemon worker thread: on timeout the thread is abandoned (Python
    cannot stop it; a daemon thread does not keep the process alive at exit) and TimeoutError is raised."""
    if timeout is None:
        return fn(*args)
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(err)

    threading.Thread(target=run, name="oracle-call", daemon=True).start()
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"no answer within oracle_timeout={timeout} s") from None


class OracleCaller:
    """Calls `oracle(prompts, completions_a, completions_b)` with retries, a timeout and failure counting.

    Args:
        oracle: the preference oracle (labels in [0, 1], NaN to abstain).
        retries: further tries after a failed call (`oracle_retries`).
        timeout: seconds a call may take (`oracle_timeout`; None: no limit, the call runs in the calling thread).
            A call abandoned on timeout may still finish in the background, alongside the retry: an oracle with
            state should tolerate that.
        backoff: seconds before the first retry, doubled before each next one (`oracle_retry_backoff`).
        max_consecutive_failures: labelled iterations in a row with a dropped batch before `should_stop`.
        sleep: the wait between tries (a test replaces it).
    """

    def __init__(self, oracle: Callable[..., Any], retries: int = 2, timeout: float | None = None,
                 backoff: float = 1.0, max_consecutive_failures: int = 5,
                 sleep: Callable[[float], None] = time.sleep):
        self.oracle, self.retries, self.timeout, self.backoff = oracle, retries, timeout, backoff
        self.max_consecutive_failures, self.sleep = max_consecutive_failures, sleep
        self.name = getattr(oracle, "name", None) or type(oracle).__name__
        self.consecutive_failures = 0  # not checkpointed: a resumed run counts afresh
        self.last_error: BaseException | None = None

    @property
    def should_stop(self) -> bool:
        return self.consecutive_failures >= self.max_consecutive_failures

    def ask(self, prompts: list[str], completions_a: list[str], completions_b: list[str],
            iteration: int) -> OracleAnswer:
        """The oracle's answer for these pairs at `iteration` (see the module docstring)."""
        n = len(completions_a)
        failed, error = 0, None
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                raw = _call(self.oracle, (prompts, completions_a, completions_b), self.timeout)
                labels = check_labels(raw, n, self.name, abstain=True)
            except OracleOutputError as err:  # a bug: retrying returns the same
                raise OracleOutputError(f"iteration {iteration}: {err}") from err
            except Exception as err:  # noqa: BLE001 - any failure of the call is retried, then counted
                failed, error = failed + 1, err
                continue
            self.consecutive_failures = 0
            answered = ~np.isnan(labels)
            return OracleAnswer(np.where(answered, labels, PLACEHOLDER_LABEL), answered, failed, False, error)
        self.consecutive_failures += 1
        self.last_error = error
        warnings.warn(
            f"preference oracle {self.name!r} failed at iteration {iteration} ({failed} calls; last: "
            f"{type(error).__name__}: {error}): dropping this batch's {n} pairs ({self.consecutive_failures} failed "
            f"iteration(s) in a row, the run stops at {self.max_consecutive_failures})",
            OracleDropWarning, stacklevel=2,
        )
        return OracleAnswer(np.full(n, PLACEHOLDER_LABEL), np.zeros(n, dtype=bool), failed, True, error)

    def failure_error(self, iteration: int) -> OracleFailureError:
        """The error that stops the run at `iteration`, naming the oracle, the count and the last error."""
        # the decision is shared: the process that failed may be another one
        last = (f"last error: {type(self.last_error).__name__}: {self.last_error}" if self.should_stop
                else "on another process")
        error = OracleFailureError(
            f"preference oracle {self.name!r} failed on {self.max_consecutive_failures} labelled iterations in a row "
            f"(oracle_max_consecutive_failures), the last at iteration {iteration} ({last})"
        )
        error.__cause__ = self.last_error if self.should_stop else None
        return error
