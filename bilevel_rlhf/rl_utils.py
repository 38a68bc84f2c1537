"""Per-token RL arithmetic for the language-model trainer: masked statistics, GAE, the
Bradley-Terry loss and the per-token regularization penalty.

Conventions: tensors are ``[B, T]`` over completion tokens, right-padded; ``mask`` is 1 on real
completion tokens and 0 on the padding after the end (bool or float). Log-probabilities of sampled
tokens come from ``trl.trainer.utils.selective_log_softmax`` (not re-implemented here).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "compute_gae",
    "bradley_terry_loss",
    "token_kl_penalty",
    "completion_mask",
    "sample_completions",
    "decode_completions",
]


def _as_float_mask(mask: torch.Tensor, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have the shape of the values {tuple(like.shape)}, got {tuple(mask.shape)}")
    return mask.to(like.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (over all entries, or along ``dim``).

    Raises ``ValueError`` when the mask selects nothing (``dim=None``); along ``dim`` a row with an
    empty mask gives NaN (as ``0/0``), which callers must not produce.
    """
    m = _as_float_mask(mask, x)
    if dim is None:
        count = m.sum()
        if count.item() == 0:
            raise ValueError("masked_mean: the mask selects no entry (mask.sum() == 0)")
        return (x * m).sum() / count
    return (x * m).sum(dim=dim) / m.sum(dim=dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the entries where ``mask`` is 1 (Bessel-corrected if ``unbiased``)."""
    m = _as_float_mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        count = m.sum()
        if count.item() < 2:
            raise ValueError(
                f"masked_var: unbiased variance needs at least 2 selected entries, the mask selects {count.item():g}"
            )
        var = var * count / (count - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Normalize ``x`` to zero mean and unit variance using only the entries where ``mask`` is 1.

    As in TRL's PPO: ``(x - mean) / sqrt(var + 1e-8)`` with the unbiased masked variance; with
    ``shift_mean=False`` the mean is added back (only the scale changes; used for rewards).
    Entries where ``mask`` is 0 are set to 0 in the output. With ``weights`` (the shape of ``x``, e.g. importance
    weights), the mean and the variance are weighted means over the masked entries (Bessel-corrected by their count).
    """
    m = _as_float_mask(mask, x)
    mean, scale = whitening_stats(x, m, weights)
    whitened = (x - mean) / scale
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m


def whitening_stats(x: torch.Tensor, mask: torch.Tensor,
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and the scale ``sqrt(var + 1e-8)`` that `masked_whiten` uses (same arguments)."""
    m = _as_float_mask(mask, x)
    if weights is None:
        mean, var = masked_mean(x, m), masked_var(x, m)
    else:  # under a float mask masked_mean and masked_var are weighted; Bessel's factor counts the entries
        w = m * _as_float_mask(weights, x, "weights")
        count = m.sum()
        if count.item() < 2:
            raise ValueError(f"masked_whiten: the variance needs at least 2 selected entries, got {count.item():g}")
        mean, var = masked_mean(x, w), masked_var(x, w, unbiased=False) * count / (count - 1)
    return mean, torch.sqrt(var + 1e-8)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation on right-padded ``[B, T]`` episodes.

    With ``m`` the mask and the value after the last real token equal to 0 (the episode ends):
    ``delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t`` and ``A_t = sum_{s >= t} (gamma*lam)^(s-t) delta_s``
    over real tokens. ``returns = A + V`` (the critic's regression target). Both outputs are 0 where
    ``mask`` is 0. Rewards and values at padded positions are ignored.

    Computed as one matrix product with the upper-triangular discount matrix
    ``D[t, s] = (gamma*lam)^(s-t)`` (s >= t) instead of a reverse scan over T: same result, no Python loop.
    """
    if rewards.ndim != 2:
        raise ValueError(f"compute_gae: rewards must be [B, T], got shape {tuple(rewards.shape)}")
    if values.shape != rewards.shape:
        raise ValueError(
            f"compute_gae: values must have the shape of rewards {tuple(rewards.shape)}, got {tuple(values.shape)}"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"compute_gae: gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"compute_gae: lam must be in [0, 1], got {lam}")
    m = _as_float_mask(mask, rewards)
    if bool((m[:, 1:] > m[:, :-1]).any()):
        raise ValueError("compute_gae: mask must be right-padded (each row 1...1 0...0)")
    T = rewards.shape[1]
    values = values * m  # V = 0 on padding, so V_{t+1} = 0 after the last real token
    next_values = F.pad(values[:, 1:], (0, 1))  # V_{t+1}, 0 after position T-1
    delta = (rewards + gamma * next_values - values) * m  # TD errors, 0 on padding
    # D[t, s] = (gamma*lam)^(s-t) for s >= t else 0; A = delta @ D^T
    t = torch.arange(T, device=rewards.device)
    lag = t[None, :] - t[:, None]  # s - t
    discount = torch.where(
        lag >= 0,
        torch.tensor(gamma * lam, dtype=rewards.dtype, device=rewards.device) ** lag.clamp(min=0).to(rewards.dtype),
        torch.zeros((), dtype=rewards.dtype, device=rewards.device),
    )
    advantages = delta @ discount.T
    returns = (advantages + values) * m
    return advantages, returns


def bradley_terry_loss(r_a: torch.Tensor, r_b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley-Terry negative log-likelihood.

    ``-(l * log sigmoid(r_a - r_b) + (1 - l) * log sigmoid(r_b - r_a))`` with ``l`` in [0, 1] the
    probability that ``a`` is preferred (1.0: a wins, 0.0: b wins). Returns a tensor of r_a's shape.
    """
    if r_a.shape != r_b.shape or r_a.shape != labels.shape:
        raise ValueError(
            "bradley_terry_loss: r_a, r_b and labels must have one shape, got "
            f"{tuple(r_a.shape)}, {tuple(r_b.shape)}, {tuple(labels.shape)}"
        )
    d = r_a - r_b
    labels = labels.to(d.dtype)
    return -(labels * F.logsigmoid(d) + (1.0 - labels) * F.logsigmoid(-d))


def token_kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    kind: Literal["kl", "entropy"],
) -> torch.Tensor:
    """Per-token regularization penalty; the shaped per-token reward is ``-tau * penalty_t``.

    - ``kind="kl"``: ``logprobs - ref_logprobs``, the k1 estimator of KL(pi || pi_ref) used by TRL's PPO
      (its sum over a sampled completion is an unbiased estimate of the sequence KL).
    - ``kind="entropy"``: ``logprobs`` (``ref_logprobs`` is ignored and may be None); the expected
      reward ``-tau * E[log pi]`` is ``tau`` times the entropy.

    Both are log-probabilities of the sampled tokens, ``[B, T]``; padded positions are not masked here.
    """
    if kind == "kl":
        if ref_logprobs is None:
            raise ValueError("token_kl_penalty: kind='kl' needs ref_logprobs")
        if ref_logprobs.shape != logprobs.shape:
            raise ValueError(
                f"token_kl_penalty: ref_logprobs must have shape {tuple(logprobs.shape)}, got {tuple(ref_logprobs.shape)}"
            )
        return logprobs - ref_logprobs
    if kind == "entropy":
        return logprobs
    raise ValueError(f"token_kl_penalty: kind must be 'kl' or 'entropy', got {kind!r}")


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """``[N, T]`` long mask of the real tokens of generated completions: 1 up to and including the first eos, 0 after
    it (all ones for a row without eos, or when ``eos_token_id`` is None). An eos-only completion keeps its one
    token: it is scored, not dropped."""
    T = completion_ids.shape[1]
    positions = torch.arange(T, device=completion_ids.device)
    if eos_token_id is None:
        return torch.ones_like(completion_ids)
    is_eos = completion_ids == eos_token_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(positions[:1], T - 1))
    return (positions[None, :] <= first[:, None]).long()


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None,
    output_logits: bool = False,
    **sampling: Any,
) -> tuple[torch.Tensor, ...]:
    """Completions of left-padded prompts from `model.generate(**sampling)`: the ids after the prompt, with pad after
    the first eos, and their `completion_mask`; with `output_logits`, also the generation's raw next-token logits
    ``[N, T, vocab]`` (before any logits processor). The trainer's rollout and evaluation and the happy-tweet
    evaluation all sample through here."""
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id, output_logits=output_logits,
                         return_dict_in_generate=output_logits, **sampling)
    completion = (out.sequences if output_logits else out)[:, prompt_ids.shape[1] :]
    mask = completion_mask(completion, eos_token_id)
    completion = torch.where(mask.bool(), completion, pad_token_id)
    return (completion, mask, torch.stack(out.logits, 1)) if output_logits else (completion, mask)


def decode_completions(tokenizer: Any, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The text of each completion's real tokens. The padding is cut by the mask, not by `skip_special_tokens`, which
    keeps a pad token that the tokenizer's backend does not mark as special."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(completion_ids, mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)  # one call: the fast tokenizer decodes the batch

