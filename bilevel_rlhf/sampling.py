"""Coupled sampling: two policies draw completions with common random numbers (Gumbel-max).

The penalty term lambda * (mean grad_x r_x over phi's completions - mean over theta's) is a difference of two
estimates. Drawn independently it is not zero even when theta = phi, and lambda multiplies that noise. With the
Gumbel-max trick, y_t = argmax_v (log p_t(v) + G_t(v)) with G_t(v) i.i.d. Gumbel(0, 1), samples y_t from p_t exactly.
Sharing the noise G (per row, token position and vocabulary entry) between the two actors keeps each actor's marginal
distribution exact, makes identical policies produce identical completions (the penalty estimate is then exactly
zero), and degrades gracefully as the policies separate.

`GumbelNoise` is a `transformers` logits processor: `generate(do_sample=False, logits_processor=[...])` then takes the
argmax of the perturbed log-probabilities. The noise of position t is drawn from a generator seeded with (seed, t), so
it does not depend on the batch's generation history, only on the row and the position.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

__all__ = ["GumbelNoise", "RowTemperature", "coupled_sampling_processors"]

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: distinct (seed, t) give distinct generator seeds


class GumbelNoise(LogitsProcessor):
    """Adds Gumbel(0, 1) noise, drawn from a generator seeded with (seed, position), to the log-probabilities.

    Args:
        seed: the shared seed (one per rollout); two calls with the same seed and rows see the same noise. A list of
            seeds splits the batch into as many equal blocks of rows, block j drawing its noise from seed j exactly
            as a call with that seed alone would (one batch for several actors: `bilevel_rlhf.adapters`).
        prompt_length: the (padded) prompt width, so that the position t counts generated tokens.
    """

    def __init__(self, seed: int | list[int], prompt_length: int):
        self.seeds = [int(s) for s in seed] if isinstance(seed, (list, tuple)) else [int(seed)]
        self.prompt_length = int(prompt_length)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.prompt_length
        if scores.shape[0] % len(self.seeds):
            raise ValueError(f"GumbelNoise: {scores.shape[0]} rows do not split into {len(self.seeds)} equal blocks")
        shape = (scores.shape[0] // len(self.seeds), *scores.shape[1:])
        noise = []
        for seed in self.seeds:
            generator = torch.Generator(device=scores.device).manual_seed((seed * _MIX + t) % 2**63)
            noise.append(torch.rand(shape, generator=generator, device=scores.device, dtype=torch.float64))
        u = torch.cat(noise)
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
        # float64: ties between the noisy scores of two tokens are then impossible in practice
        return torch.log_softmax(scores.double(), dim=-1) + gumbel


class RowTemperature(LogitsProcessor):
    """Divides row i's logits by its own temperature `temperatures[i]` (`TemperatureLogitsWarper`, per row)."""

    def __init__(self, temperatures: torch.Tensor):
        self.temperatures = temperatures

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.temperatures):
            raise ValueError(f"RowTemperature: {scores.shape[0]} rows, {len(self.temperatures)} temperatures")
        return scores / self.temperatures.to(scores.device, scores.dtype)[:, None]


def coupled_sampling_processors(
    seed: int | list[int], prompt_length: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    row_temperatures: torch.Tensor | None = None,
) -> LogitsProcessorList:
    """The processors that make greedy decoding sample exactly like `generate(do_sample=True, temperature, top_k,
    top_p)`: the same warpers in the same order, then the shared Gumbel noise (one seed per block of rows). With
    `row_temperatures` ([rows]), row i samples at `temperature * row_temperatures[i]`."""
    processors = LogitsProcessorList()
    if row_temperatures is not None:
        processors.append(RowTemperature(temperature * row_temperatures))
    elif temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k and top_k > 0:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    processors.append(GumbelNoise(seed, prompt_length))
    return processors
