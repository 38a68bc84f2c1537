"""The evaluation protocol of online RLHF: a policy judged by the oracle on held-out prompts.

One evaluation samples `num_samples` completions per held-out prompt from the policy (temperature 1, full softmax)
and measures, as an :class:`EvalRecord`:
  - `score`: the oracle's mean score of the completions (oracles with `score`);
  - `win_rate`: how often the oracle prefers the policy's completion to one of the initial policy for the same
    prompt (ties 1/2). The initial policy's completions are sampled once, at the first evaluation, and reused;
  - `kl`: a Monte Carlo KL(pi || pi_ref) of the completion distributions, nats per completion: the mean over
    samples of the sum over generated positions of the exact next-token KL (chain rule of KL; unbiased, and of
    lower variance than the sampled log-ratio sum);
  - `distinct_1`, `distinct_2`, `length`.
Every evaluation draws the same noise (its own seeded RNG stream: `torch.random.fork_rng`), so successive
checkpoints are compared on common random numbers, and the training run continues with the random state it had.
Oracle calls made here are counted in `eval_queries`, apart from the training budget, and never reach training:
an oracle without `score` is judged through a deep copy, so its RNG stream stays the trainer's.

What is written here by hand: TRL 1.1 removed its `WinRateCallback` and judges, and no library computes the
exact-next-token KL estimate; sampling and masking are the trainer's own (`rl_utils.sample_completions`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ContextManager

import numpy as np
import torch

from . import rl_utils
from .judges import JudgeOracle, PairwiseJudge
from .modeling import position_ids_from_mask

__all__ = ["EvalRecord", "PolicyEvaluator", "distinct_n", "sequence_kl"]

# a policy given to the evaluator: a module, or a zero-argument function entering a context that yields one (a
# BilevelModel's `actor("theta")`, a PEFT model's `disable_adapter()` for the reference)
Actor = torch.nn.Module | Callable[[], ContextManager[torch.nn.Module]]


@dataclass
class EvalRecord:
    """One evaluation of one policy (module docstring); `step` and `train_queries` say where training was."""

    step: int
    train_queries: int | None
    score: float
    score_se: float
    win_rate: float
    win_rate_se: float
    kl: float
    kl_se: float
    distinct_1: float
    distinct_2: float
    length: float
    num_completions: int
    eval_queries: int  # cumulative oracle calls of the evaluations (scores and pairs), never part of training

    def metrics(self, prefix: str = "eval_protocol") -> dict[str, float]:
        """The logged metrics: `prefix/name` for each measured figure."""
        names = ("score", "win_rate", "kl", "distinct_1", "distinct_2", "length", "eval_queries")
        return {f"{prefix}/{n}": float(getattr(self, n)) for n in names if math.isfinite(float(getattr(self, n)))}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- metrics
def distinct_n(texts: list[str], n: int) -> float:
    """Distinct whitespace-word n-grams over all n-grams of all texts (0 when there are none; Li et al. 2016)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def completion_log_probs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, length: int
) -> torch.Tensor:
    """[N, T, V] log-softmax (float32) of `model`'s next-token distributions at the T completion positions."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": position_ids_from_mask(attention_mask)}
    # logits at position j predict token j + 1: the completion's tokens are predicted at P-1 .. P+T-2
    return torch.log_softmax(model(**kwargs).logits[:, prompt_length - 1 : prompt_length - 1 + length].float(), -1)


def kl_from_log_probs(logp: torch.Tensor, logq: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """[N] sum over masked positions of KL(p(.|s_t) || q(.|s_t)), exact over the vocabulary."""
    kl_t = (logp.exp() * (logp - logq)).sum(-1)  # [N, T]
    return (kl_t * completion_mask).sum(1)


@torch.no_grad()
def sequence_kl(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """[N] sum over completion positions t of KL(policy(.|s_t) || ref(.|s_t)) (exact over the vocabulary).

    `input_ids` = left-padded prompts (width `prompt_length`) + right-padded completions; `completion_mask` [N, T]
    is 1 on generated tokens (up to and including eos). Its mean over samples from `policy` estimates the KL of
    the completion distributions without bias.
    """
    T = completion_mask.shape[1]
    logp = completion_log_probs(policy, input_ids, attention_mask, prompt_length, T)
    logq = completion_log_probs(ref, input_ids, attention_mask, prompt_length, T)
    return kl_from_log_probs(logp, logq, completion_mask)


def _standard_error(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def _enter(actor: Actor) -> ContextManager[torch.nn.Module]:
    return contextlib.nullcontext(actor) if isinstance(actor, torch.nn.Module) else actor()


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Dropout off for the evaluation; every submodule's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# ---------------------------------------------------------------------------------------------------- evaluator
class PolicyEvaluator:
    """Evaluates policies on fixed held-out prompts with an oracle (module docstring).

    Args:
        prompts: the held-out prompts (strings), never trained on.
        tokenizer: the policy's tokenizer (left padding is set on a copy of its settings for generation).
        oracle: a preference oracle (`bilevel_rlhf.PreferenceOracle`, or any `oracle(prompts, a, b) -> labels`, NaN
            where it abstains), or a pairwise judge (`bilevel_rlhf.PairwiseJudge`, wrapped in a `JudgeOracle` seeded
            with `seed`); its `score(prompts, completions)`, when it has one, gives `score` and judges the win rate.
            Pairs without an answer are left out of the win rate.
        num_samples: completions per prompt (>= 1).
        max_new_tokens: completion length limit (>= 1).
        batch_size: rows per generation batch (>= 1).
        seed: seed of the evaluation's own RNG stream.
    """

    def __init__(self, prompts: list[str], tokenizer: Any, oracle: Any, num_samples: int = 4,
                 max_new_tokens: int = 24, batch_size: int = 64, seed: int = 0) -> None:
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("PolicyEvaluator: prompts must be a non-empty list of strings")
        for name, value in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens),
                            ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PolicyEvaluator: {name} must be an integer >= 1, got {value!r}")
        if not callable(oracle) and isinstance(oracle, PairwiseJudge):
            oracle = JudgeOracle(oracle, seed=seed)
        if not callable(oracle) and not callable(getattr(oracle, "score", None)):
            raise TypeError(f"PolicyEvaluator: the oracle must be callable or have `score`, got {type(oracle).__name__}")
        self.prompts, self.tokenizer, self.oracle = list(prompts), tokenizer, oracle
        self.num_samples, self.max_new_tokens, self.batch_size, self.seed = num_samples, max_new_tokens, batch_size, seed
        score = getattr(oracle, "score", None)
        self._score_fn = score if callable(score) else None
        self._judge = None  # a deep copy of a pairwise-only oracle: its RNG never moves the trainer's
        self.rows = [p for p in self.prompts for _ in range(num_samples)]  # sample j of prompt i: row i*n + j
        self.eval_queries = 0
        self._reference: tuple[list[str], np.ndarray | None] | None = None  # pi_ref's texts and scores

    # --- oracle ---
    def _scores(self, texts: list[str]) -> np.ndarray | None:
        if self._score_fn is None:
            return None
        raw = self._score_fn(self.rows, texts)
        if raw is None:  # a PreferenceOracle without a score
            self._score_fn = None
            return None
        scores = np.asarray(raw, dtype=np.float64)
        if scores.shape != (len(texts),) or not np.isfinite(scores).all():
            raise ValueError(f"the oracle's score must return {len(texts)} finite numbers, got shape {scores.shape}")
        self.eval_queries += len(texts)
        return scores

    def _wins(self, texts: list[str], scores: np.ndarray | None) -> np.ndarray:
        ref_texts, ref_scores = self._reference
        if scores is not None and ref_scores is not None:
            return np.where(scores > ref_scores, 1.0, np.where(scores < ref_scores, 0.0, 0.5))
        if self._judge is None:
            self._judge = copy.deepcopy(self.oracle)
        labels = np.asarray(self._judge(self.rows, texts, ref_texts), dtype=np.float64)
        self.eval_queries += len(texts)
        return labels

    # --- sampling ---
    def _samples(self, actor: Actor, ref: Actor | None, device: torch.device) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(texts, KL to `ref` per completion or empty, lengths) of `actor`'s samples for every row."""
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        texts, kls, lengths = [], [], []
        try:
            for start in range(0, len(self.rows), self.batch_size):
                enc = tok(self.rows[start : start + self.batch_size], padding=True, return_tensors="pt")
                ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
                with _enter(actor) as policy, _eval_mode(policy):
                    completion, cmask = rl_utils.sample_completions(
                        policy, ids, mask, self.max_new_tokens, tok.pad_token_id, tok.eos_token_id,
                        do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
                    full_ids, full_mask = torch.cat([ids, completion], 1), torch.cat([mask, cmask], 1)
                    if ref is not None:
                        logp = completion_log_probs(policy, full_ids, full_mask, ids.shape[1], cmask.shape[1])
                if ref is not None:
                    with _enter(ref) as ref_model, _eval_mode(ref_model):
                        logq = completion_log_probs(ref_model, full_ids, full_mask, ids.shape[1], cmask.shape[1])
                    kls.append(kl_from_log_probs(logp, logq, cmask.float()).double().cpu())
                lengths.append(cmask.sum(1).float().cpu())
                texts += rl_utils.decode_completions(tok, completion, cmask)
        finally:
            tok.padding_side = side
        kl = torch.cat(kls).numpy() if kls else np.zeros(0)
        if not np.isfinite(kl).all():
            raise FloatingPointError("non-finite KL to the reference policy in the evaluation")
        return texts, kl, torch.cat(lengths).numpy()

    @torch.no_grad()
    def evaluate(self, policy: Actor, ref: Actor, step: int = 0, train_queries: int | None = None,
                 device: torch.device | str = "cpu") -> EvalRecord:
        """Evaluate `policy` against the reference `ref` (the initial policy: its samples are the win rate's
        opponents, drawn at the first call). Neither model nor the global RNG state is changed."""
        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if self._reference is None:
                torch.manual_seed(self.seed + 1)  # the opponents' noise differs from the policy's
                ref_texts, _, _ = self._samples(ref, None, device)
                self._reference = (ref_texts, self._scores(ref_texts))
            torch.manual_seed(self.seed)
            texts, kl, lengths = self._samples(policy, ref, device)
        scores = self._scores(texts)
        wins = self._wins(texts, scores)
        wins = wins[~np.isnan(wins)]  # pairs the oracle abstained on
        nan = float("nan")
        return EvalRecord(
            step=int(step), train_queries=None if train_queries is None else int(train_queries),
            score=float(scores.mean()) if scores is not None else nan,
            score_se=_standard_error(scores) if scores is not None else nan,
            win_rate=float(wins.mean()) if len(wins) else nan, win_rate_se=_standard_error(wins) if len(wins) else nan,
            kl=float(kl.mean()), kl_se=_standard_error(kl),
            distinct_1=distinct_n(texts, 1), distinct_2=distinct_n(texts, 2), length=float(lengths.mean()),
            num_completions=len(texts), eval_queries=self.eval_queries,
        )
