"""The typed records of one iteration: each role's completions (`Completions`) and the iteration (`Rollout`).

A rollout is built in three stages, each a new record (`dataclasses.replace`), never an update in place:
  1. sampled: ids, masks, the reference's log-probs, the oracle's labels and which pairs it answered
     (`BilevelTrainer.generate_and_score`);
  2. scored: r_x of every completion, each actor's terminal reward and theta's g = df/dpi (`with_scores`);
  3. evaluated: each actor's old log-probs, values and entropies, then its advantages and returns (`with_advantages`).
Without fusion the trainer does all three before the update. Fused (one micro-step per iteration), the update's own
forward pass gives stages 2 and 3, so the PPO ratio is exactly 1; that is the one place where the paths differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

ACTORS = ("theta", "phi")


@dataclass(frozen=True)
class Completions:
    """One role's completions ("theta", "phi" or the reference "ref"); row i answers prompt i // num_generations.

    The prompt is left-padded to the rollout's `prompt_length`, the completion right-padded to a common width T.
    """

    input_ids: torch.Tensor  # [N, P + T] prompt + completion
    attention_mask: torch.Tensor  # [N, P + T]
    mask: torch.Tensor  # [N, T]: 1 up to and including the first eos
    reward_input_ids: torch.Tensor  # r_x's inputs for the same rows (re-tokenized when r_x has its own tokenizer)
    reward_attention_mask: torch.Tensor
    ref_logprobs: torch.Tensor | None = None  # [N, T] the reference's log-probs (KL regularization)
    ref_full_logprobs: torch.Tensor | None = None  # [N, T, vocab] its next-token distributions (kl_estimator exact)
    # [N] importance weight of each row (its pair's pi / q_mix: `bilevel_rlhf.exploration`); None: every row 1
    weight: torch.Tensor | None = None
    # stage 2: scored
    score: torch.Tensor | None = None  # [N] r_x
    terminal: torch.Tensor | None = None  # [N] the reward the actor maximizes at its last token
    g: torch.Tensor | None = None  # [N] df/dpi of each completion (theta)
    # stage 3: evaluated
    logprobs: torch.Tensor | None = None  # [N, T] old log-probs
    values: torch.Tensor | None = None  # [N, T] old values V(s_t)
    entropy: torch.Tensor | None = None  # [N, T]
    advantages: torch.Tensor | None = None  # [N, T] whitened GAE
    returns: torch.Tensor | None = None  # [N, T]
    seq_penalty: torch.Tensor | None = None  # [N] the regularizer summed over the completion
    kl_coef: torch.Tensor | None = None  # [N] kl_estimator exact: the exact KL's weight in the loss, tau / scale(A)

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, idx: torch.Tensor) -> "Completions":
        """The records of rows `idx`."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)
                                            if getattr(self, f.name) is not None})

    def policy_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.ref_full_logprobs is not None:  # the actor's pass then gives the exact KL of each position
            inputs["ref_full_logprobs"] = self.ref_full_logprobs
        return inputs

    def reward_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.reward_input_ids, "attention_mask": self.reward_attention_mask}


@dataclass(frozen=True)
class RolloutStats:
    """What only the logs use: the prompts and texts (oracle scores), the completion ids, truncations, timings."""

    prompts: list[str]
    texts: dict[str, list[str]]
    completion_ids: dict[str, torch.Tensor]
    truncated_prompts: int
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Rollout:
    """One iteration k of this process (or a mini-batch of it): the roles' completions and the labelled pairs.

    Pair p is theta's completion p against the reference's completion p (an objective `against_reference`), or
    theta's completions (2p, 2p + 1).
    """

    iteration: int
    tau: float  # tau_k
    penalty_lambda: float  # lambda_k
    prompt_length: int
    labels: torch.Tensor | None  # [pairs] the oracle's preference for the pair's first completion, in [0, 1];
    # None on an unlabelled iteration (label_every > 1, or no pair answered on any process): no x step, every
    # actor's reward is r_x
    reward_step: bool  # whether x trains on this batch
    fused: bool  # whether the update's forward pass also gives stages 2 and 3
    theta: Completions
    phi: Completions | None = None
    ref: Completions | None = None  # the reference's completions: for an objective that compares against them,
    # or for the forward KL (`forward_kl_coef`)
    # [pairs] bool: the pairs the oracle answered (not abstained, not dropped); the others enter no loss and their
    # labels are placeholders. None: every pair of a labelled iteration
    answered: torch.Tensor | None = None
    pair_loss: torch.Tensor | None = None  # [pairs] r_x's BT-NLL of each pair (stage 2)
    stats: RolloutStats | None = None

    @property
    def actors(self) -> list[str]:
        """The trained roles present: "theta", and "phi" for the penalty methods."""
        return [r for r in ACTORS if getattr(self, r) is not None]

    @property
    def generators(self) -> list[str]:
        """Every role with completions: the actors and the reference."""
        return self.actors + (["ref"] if self.ref is not None else [])

    def completions(self, role: str) -> Completions:
        return getattr(self, role)

    @property
    def answered_pairs(self) -> torch.Tensor:
        """[pairs] bool: the answered pairs (a labelled rollout only)."""
        if self.answered is not None:
            return self.answered
        return torch.ones(self.labels.shape, dtype=torch.bool, device=self.labels.device)

    def with_roles(self, **roles: Completions) -> "Rollout":
        return dataclasses.replace(self, **roles)

    def minibatch(self, rows: torch.Tensor, pairs: torch.Tensor, reward_step: bool) -> "Rollout":
        """Rows `rows` of every role and pairs `pairs` of the labels (the pairs those rows form)."""
        return dataclasses.replace(
            self,
            labels=None if self.labels is None else self.labels[pairs],
            answered=None if self.answered is None else self.answered[pairs],
            reward_step=reward_step,
            fused=False,
            pair_loss=None if self.pair_loss is None else self.pair_loss[pairs],
            stats=None,
            **{r: self.completions(r).rows(rows) for r in self.generators},
        )


@dataclass(frozen=True)
class LossInputs:
    """What `BilevelTrainer.compute_loss` gets for one forward/backward: a batch, its loss parts, and (fused) the
    forward pass's outputs, already run with gradients by `training_step`."""

    batch: Rollout
    parts: tuple[str, ...]
    outputs: dict[str, Any] | None = None
