"""`RewardModelOracle`: a one-output sequence classifier as the simulated human (the gold reward model of the
reward-overoptimization literature, Gao, Schulman & Hilton 2022).

It scores `prompt + completion` (or the completion alone) with its own tokenizer, in batches, under
`torch.no_grad`, on its own device, and labels pairs as `ScoreOracle` does: deterministically (the higher reward
wins) or by Bradley-Terry sampling at a temperature.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from .preference import ScoreOracle

__all__ = ["RewardModelOracle"]


class RewardModelOracle(ScoreOracle):
    """A reward model as the human.

    Args:
        model: a folder (or hub name, online) of a sequence classifier with one output, or the model itself.
        tokenizer: its tokenizer; None: loaded from `model`'s folder (an error when it has none).
        mode, temperature, seed, name: as in `ScoreOracle` (`"deterministic"` or `"bradley_terry"` labels).
        include_prompt: score `prompt + completion` (default: a reward model judges the answer to its prompt).
        batch_size: texts per forward pass.
        max_length: truncation of the scored texts (None: the tokenizer's limit).
        device: where the reward model runs (default: CUDA when available, else the CPU).
    """

    def __init__(self, model: str | os.PathLike | torch.nn.Module, tokenizer: Any = None,
                 mode: Literal["deterministic", "bradley_terry", "probability"] = "deterministic",
                 temperature: float = 1.0, seed: int = 0, include_prompt: bool = True, batch_size: int = 32,
                 max_length: int | None = None, device: str | torch.device | None = None, name: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        where = str(model) if not isinstance(model, torch.nn.Module) else type(model).__name__
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"RewardModelOracle({where}): batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(model, torch.nn.Module):
            path = Path(model)
            if path.exists() and not (path / "config.json").is_file():
                raise ValueError(f"RewardModelOracle: {path} has no config.json: not a saved model folder")
            try:
                model = AutoModelForSequenceClassification.from_pretrained(str(model))
            except Exception as e:
                raise ValueError(f"RewardModelOracle: cannot load a sequence classifier from {where}: "
                                 f"{type(e).__name__}: {e}") from e
            files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
            if tokenizer is None and path.is_dir() and not any((path / f).is_file() for f in files):
                raise ValueError(f"RewardModelOracle: {path} has no loadable tokenizer (none of {', '.join(files)}); "
                                 "save the tokenizer with the model or pass tokenizer=")
            if tokenizer is None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(str(path if path.exists() else where))
                except Exception as e:
                    raise ValueError(f"RewardModelOracle: {where} has no loadable tokenizer ({type(e).__name__}); "
                                     "save the tokenizer with the model or pass tokenizer=") from e
        if tokenizer is None:
            raise ValueError(f"RewardModelOracle({where}): pass the reward model's tokenizer")
        labels = getattr(model.config, "num_labels", None)
        if labels != 1:
            raise ValueError(f"RewardModelOracle({where}): a reward model has one output (num_labels=1), this one has "
                             f"{labels}")
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"RewardModelOracle({where}): the tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:  # the head reads the last non-pad token
            model.config.pad_token_id = tokenizer.pad_token_id
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer, self.batch_size, self.max_length = tokenizer, batch_size, max_length
        super().__init__(self.reward, mode=mode, temperature=temperature, seed=seed, include_prompt=include_prompt,
                         name=name or (Path(where).name if isinstance(where, str) else where))

    @torch.no_grad()
    def reward(self, texts: list[str]) -> list[float]:
        """The reward model's output for each text."""
        out = []
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "right"  # positions 0..n-1 for every row
        try:
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                out.append(self.model(**enc).logits[:, 0].float().cpu())
        finally:
            self.tokenizer.padding_side = side
        return torch.cat(out).tolist() if out else []
