"""A local LLM as a pairwise judge: an example of the judge interface, not a claim of judging quality.

`LocalLLMJudge` follows the signature of TRL's (removed) ``BasePairwiseJudge``::

    judge(prompts: list[str], completions: list[list[str]], shuffle_order: bool = True) -> list[int]

Each ``completions[i]`` is a pair; the answer is 0 when the first is preferred, 1 when the second is, and -1 when the
judge abstains. The model is shown a short pairwise question (through the tokenizer's chat template when it has one)
and the verdict is read from the next-token log-probabilities of "A" and "B": no text is generated. It abstains when
``|log p(A) - log p(B)| <= margin`` or when those log-probabilities are not finite.

With ``shuffle_order`` each pair is shown in a random order, drawn from the judge's own seeded generator, and the
verdict is mapped back to the caller's order (an abstention stays -1), so a judge that always answers "A" gives
balanced verdicts instead of always preferring the first completion.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

__all__ = ["HAPPIER_TEMPLATE", "LocalLLMJudge"]

# The question of the happy-tweet example. A template has the fields {prompt}, {a} and {b} (the two completions as
# shown, without the prompt) and asks for a one-letter answer, A or B.
HAPPIER_TEMPLATE = (
    "Here is the start of a tweet and two possible continuations.\n\n"
    "Start: {prompt}\n"
    "A: {prompt}{a}\n"
    "B: {prompt}{b}\n\n"
    "Which continuation of the tweet is happier? Answer A or B."
)
_PLAIN_SUFFIX = "\nAnswer:"  # after the question when the tokenizer has no chat template
_ANSWERS = ("A", "B")


class LocalLLMJudge:
    """A causal LM as a pairwise judge (TRL's ``BasePairwiseJudge`` interface), the verdict read from the next-token
    probabilities of "A" and "B".

    Args:
        model: a causal LM (``AutoModelForCausalLM``); it is put in eval mode and moved to `device`.
        tokenizer: its tokenizer. With a chat template the question is one user message followed by the generation
            prompt; without one it is the plain text followed by ``"\\nAnswer:"``.
        template: the question, with the fields ``{prompt}``, ``{a}`` and ``{b}`` (default: which continuation of the
            tweet is happier).
        batch_size: pairs per forward pass.
        device: where the model runs (default: the model's current device).
        margin: abstain (-1) when ``|log p(A) - log p(B)| <= margin``; 0 abstains on exact ties only.
        seed: seed of the generator that shuffles the order of each pair.
        name: the judge's name in errors and logs.

    Raises:
        ValueError: neither "A" nor " A" (or neither "B" nor " B") is a single known token of the tokenizer, the
            template lacks a field, or `batch_size` / `margin` is out of range; at a call, a question longer than
            the model's positions (naming the pair) or a malformed pair.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        template: str = HAPPIER_TEMPLATE,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        margin: float = 0.0,
        seed: int = 0,
        name: str = "local_llm_judge",
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"{name}: batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0.0 <= margin < float("inf"):
            raise ValueError(f"{name}: margin must be a finite number >= 0, got {margin!r}")
        for field in ("prompt", "a", "b"):
            if "{" + field + "}" not in template:
                raise ValueError(f"{name}: template must contain the field {{{field}}}, got {template!r}")
        try:
            template.format(prompt="", a="", b="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{name}: template must have only the fields {{prompt}}, {{a}}, {{b}} (literal braces "
                             f"doubled): {type(e).__name__}: {e}") from None
        self.name = name
        self.tokenizer = tokenizer
        self.template = template
        self.batch_size = batch_size
        self.margin = float(margin)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.last_flips = np.zeros(0, dtype=bool)  # of the last `judge` call
        self.last_margins = np.zeros(0)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_positions = limit if isinstance(limit, int) and limit > 0 else None
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.answer_ids = {answer: self._answer_token_ids(answer) for answer in _ANSWERS}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = 0 if pad is None else int(pad)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: Any = None, **kwargs: Any) -> "LocalLLMJudge":
        """Load the model (``AutoModelForCausalLM``) and tokenizer from `path` (a local folder or a hub name);
        `kwargs` are the constructor's (`template`, `batch_size`, `device`, `margin`, `seed`, `name`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
        except Exception as e:
            raise ValueError(f"cannot load a causal LM and its tokenizer from {path}: {type(e).__name__}: {e}") from e
        kwargs.setdefault("name", f"local_llm_judge:{os.fspath(path)}")
        return cls(model, tokenizer, **kwargs)

    # ------------------------------------------------------------------------------------------------ tokens
    def _answer_token_ids(self, answer: str) -> list[int]:
        """The ids of `answer` and of its leading-space variant that are single known tokens."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        ids: list[int] = []
        for text in (answer, " " + answer):
            encoded = self.tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] != unk and encoded[0] not in ids:
                ids.append(int(encoded[0]))
        if not ids:
            raise ValueError(
                f"{self.name}: the tokenizer has no single token for the answer {answer!r} (tried {answer!r} and "
                f"{' ' + answer!r}); a LocalLLMJudge reads the verdict from the next-token probabilities of 'A' and "
                f"'B', so it needs a tokenizer with both")
        return ids

    def build_prompt(self, prompt: str, a: str, b: str) -> str:
        """The text the model reads for one pair shown as (A, B)."""
        question = self.template.format(prompt=prompt, a=a, b=b)
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        return question + _PLAIN_SUFFIX

    # ------------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def answer_margins(self, prompts: list[str], completions: list[list[str]]) -> np.ndarray:
        """``log p(A) - log p(B)`` of each pair shown in the given order, no shuffling (NaN where not finite).

        ``log p(A)`` is the log of the total next-token probability of "A" and " A" (those that are tokens)."""
        pairs = _check_inputs(self.name, prompts, completions)
        margins = np.empty(len(pairs), dtype=np.float64)
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            texts = [self.build_prompt(p, a, b) for p, (a, b) in chunk]
            # the chat template already holds the special tokens; a plain prompt gets the tokenizer's defaults
            rows = [self.tokenizer.encode(t, add_special_tokens=not self.use_chat_template) for t in texts]
            if self.max_positions is not None and max(map(len, rows)) > self.max_positions:
                i = int(np.argmax([len(r) > self.max_positions for r in rows]))
                raise ValueError(f"{self.name}: the question for pair {start + i} has {len(rows[i])} tokens, more "
                                 f"than the model's {self.max_positions} positions (shorten the template or the texts)")
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):  # left padding: every row's last position is its last real token
                input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
                attention_mask[i, width - len(row):] = 1
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                position_ids=position_ids.to(self.device),
            ).logits[:, -1, :].float()
            logp = torch.log_softmax(logits, dim=-1)
            log_a = torch.logsumexp(logp[:, self.answer_ids["A"]], dim=-1)
            log_b = torch.logsumexp(logp[:, self.answer_ids["B"]], dim=-1)
            diff = (log_a - log_b).cpu().double().numpy()
            finite = np.isfinite(log_a.cpu().numpy()) & np.isfinite(log_b.cpu().numpy()) & np.isfinite(diff)
            margins[start : start + len(chunk)] = np.where(finite, diff, np.nan)
        return margins

    def verdicts(self, margins: np.ndarray) -> list[int]:
        """0 ("A") where the margin is above `margin`, 1 ("B") where it is below ``-margin``, -1 otherwise."""
        out = np.full(len(margins), -1, dtype=np.int64)
        finite = np.isfinite(margins)
        out[finite & (margins > self.margin)] = 0
        out[finite & (margins < -self.margin)] = 1
        return out.tolist()

    def judge(self, prompts: list[str], completions: list[list[str]], shuffle_order: bool = True) -> list[int]:
        """0 if ``completions[i][0]`` is preferred, 1 if ``completions[i][1]`` is, -1 if the judge abstains.

        After the call, `last_flips` (bool per pair: shown as (second, first)) and `last_margins` (``answer_margins``
        of the pairs as shown) describe it, for diagnostics."""
        pairs = _check_inputs(self.name, prompts, completions)
        flips = self.rng.random(len(pairs)) < 0.5 if shuffle_order else np.zeros(len(pairs), dtype=bool)
        shown = [[b, a] if flip else [a, b] for flip, (_, (a, b)) in zip(flips, pairs)]
        self.last_flips = flips
        self.last_margins = self.answer_margins([p for p, _ in pairs], shown)
        answers = self.verdicts(self.last_margins)
        return [a if a < 0 or not flip else 1 - a for a, flip in zip(answers, flips)]

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The shuffling generator's state (PCG64 ``bit_generator.state``, plain JSON-able data)."""
        return {"name": self.name, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" not in state:
            raise ValueError(f"{self.name}: state_dict has no 'rng' entry (keys: {sorted(state)})")
        self.rng.bit_generator.state = state["rng"]

    def __repr__(self) -> str:
        return (f"LocalLLMJudge(name={self.name!r}, device={str(self.device)!r}, batch_size={self.batch_size}, "
                f"margin={self.margin}, chat_template={self.use_chat_template})")


def _check_inputs(name: str, prompts: list[str], completions: list[list[str]]) -> list[tuple[str, tuple[str, str]]]:
    """(prompt, (first, second)) per pair; errors name the judge and the first offending index."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"{name}: prompts must be a list of strings, got {type(prompts).__name__}")
    if isinstance(completions, str) or not isinstance(completions, (list, tuple)):
        raise TypeError(f"{name}: completions must be a list of pairs of strings, got {type(completions).__name__}")
    if len(prompts) != len(completions):
        raise ValueError(f"{name}: {len(prompts)} prompts but {len(completions)} completion pairs")
    pairs = []
    for i, (prompt, pair) in enumerate(zip(prompts, completions)):
        if not isinstance(prompt, str):
            raise TypeError(f"{name}: prompts[{i}] must be a string, got {type(prompt).__name__}")
        if (isinstance(pair, str) or not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(c, str) for c in pair)):
            raise ValueError(f"{name}: completions[{i}] must be a pair of strings, got {pair!r:.120}")
        pairs.append((prompt, (pair[0], pair[1])))
    return pairs
