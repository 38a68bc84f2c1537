"""Reading evaluation-protocol records the way the field compares online RLHF methods.

- **Reward-KL frontier** (Gao et al. 2022; the DPO paper's sentiment experiment): every evaluated checkpoint of
  every run is a point (KL to the reference, oracle score); a method's frontier is the upper envelope of its points,
  the best score reached at a KL of at most k.
- **Matched KL**: each run's score where its KL first reaches k (linear between the two evaluations around the
  crossing), mean and 95% interval over the runs of a setting that reach k.
- **Query curves**: score and win rate against training oracle queries, mean and 95% t-interval over seeds, and
  the queries a curve needs to reach a target.
Runs are folders holding `eval_protocol.json` (`OracleEvalCallback`) and, where the recipe wrote one, `summary.json`
and `bilevel_config.json`, from which the method and its KL weight are read.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .eval_callback import read_eval_records
from .evaluation import EvalRecord

__all__ = ["RunCurve", "load_run", "group_by", "upper_envelope", "envelope_at", "value_at_kl", "queries_to_reach",
           "mean_curve", "matched_kl_rows", "frontier_comparison"]


@dataclass
class RunCurve:
    """One run's evaluation records, with its method, setting (method and KL weight) and seed."""

    name: str
    method: str
    setting: str
    seed: int | None
    records: list[EvalRecord]

    def series(self, metric: str) -> np.ndarray:
        return np.array([getattr(r, metric) for r in self.records], dtype=float)


def load_run(run_dir: str | os.PathLike) -> RunCurve:
    """A run folder's records; method from `summary.json`, KL weight from its `beta` (TRL baselines) or
    `bilevel_config.json`'s `tau_init` (a `tau_schedule` other than the default polynomial decay, and zero
    initial r_x or value heads, are named in the method)."""
    run_dir = Path(run_dir)
    records = read_eval_records(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: eval_protocol.json holds no records")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    method = summary.get("method", run_dir.name)
    weight = summary.get("beta")
    name = "beta"
    config = run_dir / "bilevel_config.json"
    if weight is None and config.is_file():
        bilevel = json.loads(config.read_text())
        weight, name = bilevel.get("tau_init"), "tau_0"
        schedule = bilevel.get("tau_schedule", "polynomial")
        if schedule != "polynomial":  # another schedule is another method on the frontier
            method = f"{method}, tau {schedule}"
        for key, tag in (("reward_head_init", "zero r_x head"), ("value_head_init", "zero critics")):
            if bilevel.get(key, "random") == "zero":  # another start is another method on the frontier
                method = f"{method}, {tag}"
        if bilevel.get("advantage_estimator", "gae") != "gae":  # another estimator is another method
            method = f"{method}, {bilevel['advantage_estimator']} advantages"
        if bilevel.get("hypergradient_warmup_ratio", 0):
            method = f"{method}, warmup {bilevel['hypergradient_warmup_ratio']:g}"
    setting = method if weight is None else f"{method} ({name} {weight:g})"
    return RunCurve(run_dir.name, method, setting, summary.get("seed"), records)


# ---------------------------------------------------------------------------------------------------- frontier
def upper_envelope(kl: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points of (kl, score) not beaten by a point of lower or equal KL: increasing in both, a step function."""
    order = np.lexsort((-score, kl))  # by KL, the best score first among equal KLs
    xs, ys, best = [], [], -math.inf
    for i in order:
        if score[i] > best:
            xs.append(kl[i])
            ys.append(score[i])
            best = score[i]
    return np.array(xs), np.array(ys)


def envelope_at(env_kl: np.ndarray, env_score: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The envelope's value at each k: the best score at KL <= k (NaN below its first point)."""
    idx = np.searchsorted(env_kl, k, side="right") - 1
    return np.where(idx >= 0, env_score[np.clip(idx, 0, None)], np.nan)


def frontier_comparison(a: list[RunCurve], b: list[RunCurve], metric: str = "score", grid: int = 200) -> dict:
    """Where A's frontier lies at or above B's over the KL range both cover: the fraction of a KL grid, and the
    smallest and largest difference A - B there."""
    envs = []
    for runs in (a, b):
        kl = np.concatenate([r.series("kl") for r in runs])
        envs.append(upper_envelope(kl, np.concatenate([r.series(metric) for r in runs])))
    lo = max(envs[0][0][0], envs[1][0][0])
    hi = min(envs[0][0][-1], envs[1][0][-1])
    if not hi > lo:
        return {"kl_range": [float(lo), float(hi)], "fraction_at_or_above": float("nan"), "min_diff": float("nan"),
                "max_diff": float("nan")}
    k = np.linspace(lo, hi, grid)
    diff = envelope_at(*envs[0], k) - envelope_at(*envs[1], k)
    return {"kl_range": [float(lo), float(hi)], "fraction_at_or_above": float((diff >= 0).mean()),
            "min_diff": float(diff.min()), "max_diff": float(diff.max())}


# ---------------------------------------------------------------------------------------------------- matched KL
def value_at_kl(run: RunCurve, k: float, metric: str = "score") -> float:
    """`metric` where the run's KL first reaches k, linear between the evaluations around the crossing; NaN when it
    never does."""
    kl, y = run.series("kl"), run.series(metric)
    above = np.nonzero(kl >= k)[0]
    if len(above) == 0:
        return float("nan")
    j = int(above[0])
    if j == 0:
        return float(y[0])
    t = (k - kl[j - 1]) / (kl[j] - kl[j - 1])
    return float(y[j - 1] + t * (y[j] - y[j - 1]))


def _mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (NaN half-width for one value)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    if n == 1:
        return float(values[0]), float("nan")
    return float(values.mean()), float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def matched_kl_rows(runs: list[RunCurve], kls: list[float], metric: str = "score") -> dict[str, list[dict]]:
    """Per setting, at each k: mean, 95% half-width and the number of runs that reach k."""
    out: dict[str, list[dict]] = {}
    for setting, members in group_by(runs, "setting").items():
        rows = []
        for k in kls:
            v = np.array([value_at_kl(r, k, metric) for r in members])
            v = v[np.isfinite(v)]
            mean, half = _mean_ci(v)
            rows.append({"kl": k, "mean": mean, "ci95": half, "runs": int(len(v)), "of": len(members)})
        out[setting] = rows
    return out


# ---------------------------------------------------------------------------------------------------- query curves
def mean_curve(runs: list[RunCurve], metric: str) -> dict[str, np.ndarray]:
    """Mean and 95% t-interval over runs at each evaluation index (runs of a setting are evaluated at the same
    steps; cut to the shortest run); x is the mean training queries there."""
    n = min(len(r.records) for r in runs)
    x = np.array([[r.records[i].train_queries or 0 for i in range(n)] for r in runs], dtype=float).mean(0)
    y = np.array([r.series(metric)[:n] for r in runs])
    stats = [_mean_ci(y[:, i]) for i in range(n)]
    mean = np.array([s[0] for s in stats])
    half = np.nan_to_num(np.array([s[1] for s in stats]))
    return {"queries": x, "mean": mean, "lo": mean - half, "hi": mean + half}


def queries_to_reach(queries: np.ndarray, values: np.ndarray, target: float) -> float:
    """Training queries at which a curve first reaches `target` (linear between evaluations); inf if never."""
    above = np.nonzero(values >= target)[0]
    if len(above) == 0:
        return math.inf
    j = int(above[0])
    if j == 0:
        return float(queries[0])
    t = (target - values[j - 1]) / (values[j] - values[j - 1])
    return float(queries[j - 1] + t * (queries[j] - queries[j - 1]))


def group_by(runs: list[RunCurve], key: str) -> dict[str, list[RunCurve]]:
    """Runs by `key` ("method" or "setting"), in first-seen order."""
    groups: dict[str, list[RunCurve]] = defaultdict(list)
    for r in runs:
        groups[getattr(r, key)].append(r)
    return dict(groups)


# ---------------------------------------------------------------------------------------------------- plots
def plot_frontier(runs: list[RunCurve], path: str | os.PathLike, metric: str = "score", ylabel: str = "oracle score"):
    """Every checkpoint of every run a faint point (one color per method, one marker per setting), the upper
    envelope per method a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = "o^sDvP*X"
    for c, (method, members) in enumerate(group_by(runs, "method").items()):
        color = f"C{c}"
        for m, (setting, group) in enumerate(group_by(members, "setting").items()):
            kl = np.concatenate([r.series("kl") for r in group])
            ax.scatter(kl, np.concatenate([r.series(metric) for r in group]), s=12, alpha=0.35, color=color,
                       marker=markers[m % len(markers)], label=setting)
        env = upper_envelope(np.concatenate([r.series("kl") for r in members]),
                             np.concatenate([r.series(metric) for r in members]))
        ax.step(*env, where="post", color=color, lw=2, label=f"{method}: frontier")
    ax.set_xlabel("KL to the initial policy (nats per completion)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_query_curves(runs: list[RunCurve], path: str | os.PathLike, metrics: tuple[str, ...] = ("score", "win_rate"),
                      labels: tuple[str, ...] = ("oracle score", "win rate vs initial"),
                      target: tuple[str, float] | None = None):
    """Each metric against training queries: the mean over seeds per setting with its 95% interval; `target`
    (label, score) draws a dashed line on the first metric's panel (a baseline's final mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.0), squeeze=False)
    for ax, metric, label in zip(axes[0], metrics, labels):
        for c, (setting, members) in enumerate(group_by(runs, "setting").items()):
            curve = mean_curve(members, metric)
            ax.plot(curve["queries"], curve["mean"], color=f"C{c}", label=f"{setting} (n={len(members)})")
            ax.fill_between(curve["queries"], curve["lo"], curve["hi"], color=f"C{c}", alpha=0.15)
        ax.set_xlabel("training oracle queries")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if target is not None:
        axes[0][0].axhline(target[1], color="k", ls="--", lw=1, label=target[0])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
