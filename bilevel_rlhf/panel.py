"""A panel of exact multi-token testbed instances drawn from a seed, so that no setting is tuned to one instance.

Each instance (:class:`InstanceSpec`) is a :mod:`bilevel_rlhf.testbed` problem: a tiny GPT-2 over C content tokens
and at most L tokens, a table reward r_x over its N completions, and an oracle with known scores. The panel varies
what a method's robustness depends on:

- the vocabulary and length: (C, L) from :data:`SIZES`; L = 1 is the one-token bandit (a content token or the empty
  completion), the degenerate member;
- the reference's peakedness: pi_ref's entropy over the completions, as a fraction of log N (nearly uniform at 0.92,
  very peaked at 0.2; capped at the flattest that scaling the drawn policy's logits reaches), set by
  :func:`scale_logits`: flatter than the random model by scaling its whole logits down, more peaked by scaling up
  only the per-token bias (lm_head's column on the constant hidden dimension). Scaling the whole head up would also
  scale how much every weight moves the logits, so one actor step size could not serve the family: at the testbed's
  step size such a policy collapses in its first Adam step under every method;
- the score table (:data:`SCORE_KINDS`): Gaussian, heavy-tailed (Student t, 2 degrees of freedom, clipped at 5), a few winners
  well above a flat field, near-ties;
- tau (log-uniform on [0.1, 1]), the oracle's Bradley-Terry temperature (1 or 0.5) and the objective.

The categorical axes are stratified (each value equally often, in a seeded order), so a panel of 24 covers every
combination of score kind and objective three times.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from . import testbed

__all__ = ["SCORE_KINDS", "SIZES", "InstanceSpec", "draw_panel", "drawn_instance", "build_instance", "scale_logits",
           "entropy"]

SCORE_KINDS = ("gaussian", "heavy_tailed", "few_winners", "near_ties")
SIZES = ((8, 1), (2, 3), (3, 2), (4, 2), (3, 3), (5, 2), (4, 3))  # (num_content, max_length); N = 9 .. 85
OBJECTIVES = ("preference_nll", "win_rate")
ENTROPY_RANGE = (0.2, 0.92)  # pi_ref's entropy as a fraction of log N
TAU_RANGE = (0.1, 1.0)
FLATTEST_LOG_FACTOR = -4.0  # the whole logits scaled by e^-4 at the flattest


@dataclass(frozen=True)
class InstanceSpec:
    """One panel instance; :func:`build_instance` turns it into a policy and a :class:`testbed.MultiTokenProblem`."""

    index: int
    seed: int  # the policy's initialization and the score draws
    num_content: int
    max_length: int
    entropy_fraction: float  # target entropy of pi_ref / log N
    scores: str  # one of SCORE_KINDS
    tau: float
    oracle_temperature: float
    objective: str

    @property
    def num_completions(self) -> int:
        return sum(self.num_content**n for n in range(self.max_length + 1))

    @property
    def name(self) -> str:
        return (f"#{self.index} C{self.num_content}L{self.max_length} H{self.entropy_fraction:.2f} {self.scores} "
                f"tau{self.tau:.2f} T{self.oracle_temperature:g} {self.objective}")

    def as_dict(self) -> dict:
        return {**asdict(self), "num_completions": self.num_completions}


def _stratified(rng: np.random.Generator, values, n: int) -> list:
    """`n` values, each of `values` equally often (up to one), in a random order."""
    return [values[i] for i in rng.permutation(np.resize(np.arange(len(values)), n))]


def draw_panel(n: int = 24, seed: int = 0) -> list[InstanceSpec]:
    """`n` instances drawn from `seed`; the same (n, seed) always gives the same panel."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"draw_panel: n must be an int >= 1, got {n!r}")
    rng = np.random.default_rng([seed, 20261206])
    sizes = _stratified(rng, SIZES, n)
    kinds = _stratified(rng, SCORE_KINDS, n)
    objectives = _stratified(rng, OBJECTIVES, n)
    temperatures = _stratified(rng, (1.0, 0.5), n)
    # peakedness and tau: one draw per stratum of [0, 1), shuffled (a Latin hypercube over the two)
    u_entropy = (rng.permutation(n) + rng.uniform(size=n)) / n
    u_tau = (rng.permutation(n) + rng.uniform(size=n)) / n
    lo, hi = ENTROPY_RANGE
    specs = [
        InstanceSpec(
            index=i, seed=int(rng.integers(2**31)), num_content=sizes[i][0], max_length=sizes[i][1],
            entropy_fraction=round(float(lo + (hi - lo) * u_entropy[i]), 3), scores=kinds[i],
            tau=round(float(TAU_RANGE[0] * (TAU_RANGE[1] / TAU_RANGE[0]) ** u_tau[i]), 3),
            oracle_temperature=temperatures[i], objective=objectives[i],
        )
        for i in range(n)
    ]
    # a near-uniform target can lie above what flattening the logits reaches for the drawn policy (its completions'
    # lengths stay unequally likely): capped there
    return [_within_reach(spec) for spec in specs]


def drawn_instance(n: int, seed: int, index: int) -> InstanceSpec:
    """Instance `index` of `draw_panel(n, seed)`."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise ValueError(f"instance must be one of the panel's indices 0-{n - 1}, got {index!r}")
    return draw_panel(n, seed)[index]


def _within_reach(spec: InstanceSpec) -> InstanceSpec:
    """`spec`, with its entropy fraction capped just below the flattest reference :func:`build_instance` reaches."""
    model = testbed.make_policy(seed=spec.seed, num_content=spec.num_content, max_length=spec.max_length)
    completions, _ = testbed.enumerate_completions(spec.num_content, spec.max_length)
    scale_logits(model, float(np.exp(FLATTEST_LOG_FACTOR)))
    log_p = testbed.sequence_log_probs(model, testbed.make_tokenizer(spec.num_content), completions)
    cap = np.floor(1000 * (entropy(log_p) - 0.005) / np.log(len(completions))) / 1000
    return replace(spec, entropy_fraction=float(cap)) if spec.entropy_fraction > cap else spec


def entropy(log_p: np.ndarray) -> float:
    """Entropy (nats) of a distribution given by its log-probabilities."""
    p = np.exp(log_p)
    return float(-(p[p > 0] * log_p[p > 0]).sum())


@torch.no_grad()
def scale_logits(model: torch.nn.Module, factor: float, bias_only: bool = False) -> None:
    """Multiply every allowed token's logit by `factor` (in place): the policy's distribution at temperature
    1 / factor. With `bias_only`, only the per-token bias (lm_head's column 0, which reads the constant hidden
    dimension of :func:`testbed.make_policy`). The masked tokens keep their logit (:data:`testbed.MASK_LOGIT`), so
    they stay at probability 0."""
    w = model.lm_head.weight
    allowed = w[:, 0] != testbed.MASK_LOGIT
    if bias_only:
        w[allowed, 0] *= factor
    else:
        w[allowed] *= factor


def draw_scores(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """An oracle score table of `kind` (one of SCORE_KINDS) over `n` completions."""
    if kind == "gaussian":
        return rng.standard_normal(n)
    if kind == "heavy_tailed":
        return np.clip(0.7 * rng.standard_t(2, size=n), -5.0, 5.0)
    if kind == "few_winners":
        s = 0.3 * rng.standard_normal(n)
        s[rng.choice(n, size=max(1, n // 20), replace=False)] += 2.5
        return s
    if kind == "near_ties":
        return 0.15 * rng.standard_normal(n)
    raise ValueError(f"scores must be one of {SCORE_KINDS}, got {kind!r}")


def build_instance(spec: InstanceSpec) -> tuple[torch.nn.Module, testbed.MultiTokenProblem]:
    """The instance's reference policy (a tiny GPT-2 whose completion distribution has the target entropy, within
    0.01 nats) and its problem (pi_ref, scores, oracle temperature)."""
    model = testbed.make_policy(seed=spec.seed, num_content=spec.num_content, max_length=spec.max_length)
    tok = testbed.make_tokenizer(spec.num_content)
    completions, _ = testbed.enumerate_completions(spec.num_content, spec.max_length)
    target = spec.entropy_fraction * np.log(len(completions))
    base = model.lm_head.weight.detach().clone()

    bias_only = target < entropy(testbed.sequence_log_probs(model, tok, completions))  # more peaked than drawn

    def entropy_at(log_factor: float) -> float:
        with torch.no_grad():
            model.lm_head.weight.copy_(base)
        scale_logits(model, float(np.exp(log_factor)), bias_only=bias_only)
        return entropy(testbed.sequence_log_probs(model, tok, completions))

    # entropy falls as the logits grow; bisection on log(factor): up to e^6 (then e^12) for the bias, down to e^-4
    # for the whole
    lo, hi = (0.0, 6.0) if bias_only else (FLATTEST_LOG_FACTOR, 0.0)
    if bias_only and entropy_at(hi) > target:  # a draw whose biases are close together: scale them further
        lo, hi = 6.0, 12.0
    if not entropy_at(hi) <= target <= entropy_at(lo):
        raise RuntimeError(f"{spec.name}: entropy target {target:.3f} out of reach of the logit scale")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if entropy_at(mid) > target else (lo, mid)
        if hi - lo < 1e-4:
            break
    entropy_at((lo + hi) / 2)
    scores = draw_scores(spec.scores, len(completions), np.random.default_rng(spec.seed))
    log_p = testbed.sequence_log_probs(model, tok, completions)
    log_p -= np.logaddexp.reduce(log_p)  # the float32 logits' roundoff
    problem = testbed.MultiTokenProblem(log_p, scores, spec.oracle_temperature, spec.num_content, spec.max_length)
    return model, problem
