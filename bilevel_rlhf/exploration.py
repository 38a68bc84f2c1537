"""Exploring labelled completions: a flatter sample for the oracle, importance-weighted back to theta.

x learns r_x only where theta's completions are labelled. Under a peaked policy the best completions are rare, and a
hypergradient step sharpens pi*_tau(x) onto the best completion sampled so far, so the others stay unlabelled
(docs/panel.md: the exploration stall). With `exploration_temperature` T > 1, on a labelled iteration each of theta's
completions is drawn from the mixture

    q_mix(y) = pi(y) / 2 + q(y) / 2,   pi = theta at `temperature`,  q = theta at `temperature * T` (token by token),

(each row picks pi or q with probability 1/2), and every estimate over theta's completions is weighted by

    w(y) = pi(y) / q_mix(y) = 1 / (1/2 + q(y) / (2 pi(y)))  in (0, 2),

so that E_{q_mix}[w h] = E_pi[h] for any h: the x-gradient and theta's policy gradient keep their expectation. The
mixture (the balance heuristic of multiple importance sampling, "defensive" importance sampling) bounds the weights
by 2, where a pure tempered proposal's would be unbounded. A pair's estimate depends on both of its completions, so
a completion's weight is its pair's: the product of the two completions' w (theta's pairs (2i, 2i + 1)), or its own
(a pair against the reference, whose completion is drawn from the reference itself).

`log q` and `log pi` of a sampled completion come from the logits of the generation pass (both temperatures, one
softmax each), so the weights are known before any loss is computed. They assume sampling from the full softmax
(`top_k=0`, `top_p=1`), which the config requires.
"""

from __future__ import annotations

import torch

__all__ = ["draw_row_temperatures", "mixture_weights", "pair_row_weights"]


def draw_row_temperatures(rows: int, exploration_temperature: float, device: torch.device | str) -> torch.Tensor:
    """[rows] each 1 or `exploration_temperature`, with probability 1/2 each (the global torch generator)."""
    explore = torch.rand(rows) < 0.5
    return torch.where(explore, float(exploration_temperature), 1.0).to(device)


def mixture_weights(logits: torch.Tensor, completion: torch.Tensor, mask: torch.Tensor, temperature: float,
                    exploration_temperature: float) -> torch.Tensor:
    """w(y) = pi(y) / q_mix(y) of each completion ([N]) from the generation's raw logits ([N, T, vocab], step t
    predicting token t), its ids ([N, T]) and mask ([N, T], 1 up to the first eos)."""
    logits = logits.double()
    ids = completion[..., None]
    log_pi = torch.log_softmax(logits / temperature, -1).gather(-1, ids).squeeze(-1)
    log_q = torch.log_softmax(logits / (temperature * exploration_temperature), -1).gather(-1, ids).squeeze(-1)
    m = mask.double()
    log_ratio = ((log_q - log_pi) * m).sum(1)  # log q(y) / pi(y)
    return (1.0 / (0.5 + 0.5 * torch.exp(log_ratio))).float()


def pair_row_weights(weights: torch.Tensor, against_reference: bool) -> torch.Tensor:
    """Each completion's weight as its pair's: its own against the reference, else the product over (2i, 2i + 1)."""
    if against_reference:
        return weights
    return (weights[0::2] * weights[1::2]).repeat_interleave(2)
