"""The exact multi-token testbed: a real tiny GPT-2 over whole completions, everything exact by enumeration.

One prompt token "q", C content tokens t0..t{C-1} and an eos token. A completion is the trainer's: its tokens up to
and including the first eos, or L tokens when there is no eos. So the completions are (content)^n + eos for n < L
and (content)^L: N = 1 + C + ... + C^L of them (85 for C = 4, L = 3). :func:`make_policy` builds a GPT-2 that puts
exactly zero probability on every other token, so its distribution over the N completions is a proper distribution
(:func:`sequence_log_probs`), and the HF ``generate`` samples from exactly that distribution.

With a table reward r_x(y) = x[index(y)] (:class:`TableReward`) and the lower level KL-regularized to the policy
with the reward at the last token, the regularized optimum over whole completions is the Boltzmann tilt
pi*_tau(y) ∝ pi_ref(y) exp(x_y / tau): the bandit of :mod:`bilevel_rlhf.bandit` with K = N and log_pi_ref = the
sequence log-probs. :class:`MultiTokenProblem` delegates every closed form to it.

Token ids (:func:`make_tokenizer`): <unk>=0, <eos>=1, <pad>=2, q=3, t_i = 4 + i.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import SequenceClassifierOutput

from . import bandit
from .preference import ScoreOracle

__all__ = [
    "PROMPT",
    "UNK_ID",
    "EOS_ID",
    "PAD_ID",
    "PROMPT_ID",
    "FIRST_CONTENT_ID",
    "make_tokenizer",
    "make_policy",
    "enumerate_completions",
    "completion_text",
    "sequence_log_probs",
    "TableReward",
    "MultiTokenProblem",
]

PROMPT = "q"
UNK_ID, EOS_ID, PAD_ID, PROMPT_ID, FIRST_CONTENT_ID = 0, 1, 2, 3, 4
MASK_LOGIT = -1e4  # logit of every token but content and eos: exp underflows to exactly 0 (float32 and float64)


def _check_sizes(num_content: int, max_length: int) -> None:
    for name, v in (("num_content", num_content), ("max_length", max_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")


def make_tokenizer(num_content: int = 4) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: <unk>=0, <eos>=1, <pad>=2, q=3, t0.. = 4..; eos and pad special in the backend."""
    _check_sizes(num_content, 1)
    words = ["<unk>", "<eos>", "<pad>", PROMPT] + [f"t{i}" for i in range(num_content)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # eos and pad given at construction: both are registered as special, so decode(skip_special_tokens=True) drops them
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def make_policy(
    seed: int = 0,
    num_content: int = 4,
    max_length: int = 3,
    n_layer: int = 2,
    n_embd: int = 16,
    n_head: int = 2,
    init_std: float = 0.3,
) -> GPT2LMHeadModel:
    """A tiny random GPT-2 (no dropout, untied lm_head) whose next-token distribution is zero outside content + eos.

    The final layer norm has weight 0 and bias 1 in hidden dimension 0, so that dimension is the constant 1 and
    lm_head's column 0 is a per-token bias: MASK_LOGIT for the disallowed tokens. Everything else stays random
    (``init_std`` sets the spread; the default gives clearly context-dependent distributions). The caller's torch
    RNG state is left untouched.
    """
    _check_sizes(num_content, max_length)
    config = GPT2Config(
        vocab_size=FIRST_CONTENT_ID + num_content, n_positions=max(16, max_length + 1), n_embd=n_embd,
        n_layer=n_layer, n_head=n_head, initializer_range=init_std, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias[0] = 1.0
        allowed = torch.zeros(config.vocab_size, dtype=torch.bool)
        allowed[EOS_ID] = True
        allowed[FIRST_CONTENT_ID:] = True
        model.lm_head.weight[~allowed, 0] = MASK_LOGIT
    return model


def enumerate_completions(
    num_content: int = 4, max_length: int = 3
) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], int]]:
    """All completions (C = num_content, L = max_length) as token-id tuples, and their index map.

    Order: by number of content tokens n = 0..L, then lexicographically; (content)^n + (eos,) for n < L,
    (content)^L without eos.
    """
    _check_sizes(num_content, max_length)
    content = range(FIRST_CONTENT_ID, FIRST_CONTENT_ID + num_content)
    completions = [
        tuple(body) + ((EOS_ID,) if n < max_length else ())
        for n in range(max_length + 1)
        for body in product(content, repeat=n)
    ]
    return completions, {c: i for i, c in enumerate(completions)}


def completion_text(tokenizer: PreTrainedTokenizerFast, completion: Sequence[int]) -> str:
    """The trainer's text of a completion: ``decode(real tokens, skip_special_tokens=True)``, e.g. "t0 t2"."""
    return tokenizer.decode(list(completion), skip_special_tokens=True)


@torch.no_grad()
def sequence_log_probs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    completions: Sequence[Sequence[int]],
    temperature: float = 1.0,
    batch_size: int = 1024,
) -> np.ndarray:
    """Exact log pi(y | "q") of each completion ([N], float64): the sum of its tokens' log-probs (eos included),
    from batched forward passes of right-padded rows, logits / temperature, log-softmax in float64. The model is
    evaluated in eval mode (its mode is restored)."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    prompt_id = tokenizer.convert_tokens_to_ids(PROMPT)
    lengths = [len(c) for c in completions]
    if min(lengths, default=1) < 1:
        raise ValueError("every completion must have at least one token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.empty(len(completions), dtype=np.float64)
    try:
        for start in range(0, len(completions), batch_size):
            chunk = completions[start : start + batch_size]
            width = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), 1 + width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, c in enumerate(chunk):
                ids[i, : 1 + len(c)] = torch.tensor([prompt_id, *c])
                mask[i, : 1 + len(c)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
            logp = torch.log_softmax(logits.double().cpu() / temperature, dim=-1)
            token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
            out[start : start + len(chunk)] = token_logp.sum(1).numpy()
    finally:
        model.train(was_training)
    return out


class TableReward(torch.nn.Module):
    """r_x("q", y) = x[index(y)], a table over the N completions (``x``: a Parameter of size N).

    ``forward(input_ids, attention_mask=None, **kwargs)`` returns an output with ``.logits`` [B, 1]. Each row must be
    laid out as the trainer lays out the policy's own ids (``reward_processing_class=None``): the prompt "q" (left
    padding allowed), then the completion, right-padded with pad tokens; masked-out positions hold pad. The
    completion ends at its first eos, or after L tokens. Without ``attention_mask``, pad tokens are the padding.
    Any other layout raises ValueError.
    """

    def __init__(self, x: np.ndarray | torch.Tensor | None = None, num_content: int = 4, max_length: int = 3):
        super().__init__()
        self.completions, self.index = enumerate_completions(num_content, max_length)
        self.num_content, self.max_length = num_content, max_length
        n = len(self.completions)
        x = torch.zeros(n) if x is None else torch.as_tensor(x, dtype=torch.float32).detach().clone()
        if x.shape != (n,):
            raise ValueError(f"TableReward: x must have shape [{n}] (one entry per completion), got {tuple(x.shape)}")
        self.x = torch.nn.Parameter(x)

    def completion_indices(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The index of each row's completion ([B], long)."""
        if input_ids.ndim != 2:
            raise ValueError(f"TableReward: input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        rows = input_ids.tolist()
        masks = attention_mask.tolist() if attention_mask is not None else [[t != PAD_ID for t in r] for r in rows]
        out = []
        for i, (ids, mask) in enumerate(zip(rows, masks)):
            real = [j for j, m in enumerate(mask) if m]
            if not real or real != list(range(real[0], real[-1] + 1)):
                raise ValueError(f"TableReward: row {i}'s attention mask must be one contiguous block, got {mask}")
            if any(ids[j] != PAD_ID for j, m in enumerate(mask) if not m):
                raise ValueError(f"TableReward: row {i} has non-pad tokens under attention_mask = 0: {ids}")
            tokens = ids[real[0] : real[-1] + 1]
            idx = self.index.get(tuple(tokens[1:])) if tokens[0] == PROMPT_ID else None
            if idx is None:
                raise ValueError(
                    f"TableReward: row {i} must be the prompt token {PROMPT_ID} ('{PROMPT}') followed by a completion "
                    f"of content tokens {FIRST_CONTENT_ID}..{FIRST_CONTENT_ID + self.num_content - 1} ending at its "
                    f"first eos ({EOS_ID}) within {self.max_length} tokens, or {self.max_length} content tokens; got "
                    f"the real tokens {tokens}"
                )
            out.append(idx)
        return torch.tensor(out, dtype=torch.long, device=self.x.device)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.x[self.completion_indices(input_ids, attention_mask)][:, None])


@dataclass(eq=False)
class MultiTokenProblem:
    """One testbed instance: the reference policy's log-probs over the N completions, oracle scores, oracle temperature.

    Closed forms delegate to :mod:`bilevel_rlhf.bandit` with K = N (``objective`` / ``weight`` as there). Build it
    from a policy with :meth:`from_policy`. ``texts[i]`` is completion i's text as the trainer decodes it (unique).
    """

    log_pi_ref: np.ndarray  # [N] normalized sequence log-probs of the reference policy
    scores: np.ndarray  # [N] oracle score per completion
    temperature: float = 1.0  # oracle BT temperature; 0 = deterministic oracle
    num_content: int = 4
    max_length: int = 3
    completions: list[tuple[int, ...]] = field(init=False, repr=False)
    index: dict[tuple[int, ...], int] = field(init=False, repr=False)
    tokenizer: PreTrainedTokenizerFast = field(init=False, repr=False)
    texts: list[str] = field(init=False, repr=False)
    lm_bandit: bandit.LMBandit = field(init=False, repr=False)  # the same problem as a bandit with K = N

    def __post_init__(self) -> None:
        self.completions, self.index = enumerate_completions(self.num_content, self.max_length)
        n = len(self.completions)
        self.log_pi_ref = np.asarray(self.log_pi_ref, dtype=np.float64)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.log_pi_ref.shape != (n,) or self.scores.shape != (n,):
            raise ValueError(
                f"log_pi_ref and scores must have shape [{n}] (one entry per completion), "
                f"got {self.log_pi_ref.shape} and {self.scores.shape}"
            )
        self.lm_bandit = bandit.LMBandit(self.log_pi_ref, self.scores, float(self.temperature))  # validates
        self.tokenizer = make_tokenizer(self.num_content)
        self.texts = [completion_text(self.tokenizer, c) for c in self.completions]
        # unique: a completion with eos has n < L content tokens, one without has L: the words tell them apart
        if len(set(self.texts)) != n:
            raise RuntimeError("completion texts are not unique")
        self._text_index = {t: i for i, t in enumerate(self.texts)}

    @classmethod
    def from_policy(
        cls,
        model: torch.nn.Module,
        seed: int = 0,
        temperature: float = 1.0,
        score_fn: Callable[[tuple[int, ...]], float] | None = None,
        num_content: int = 4,
        max_length: int = 3,
        policy_temperature: float = 1.0,
    ) -> "MultiTokenProblem":
        """pi_ref = the model's exact distribution over the completions (sampling temperature ``policy_temperature``);
        scores = ``score_fn(token-id tuple)`` per completion (e.g. (4, 6, 1) for "t0 t2" + eos), or N(0, 1) draws
        from ``numpy.random.default_rng(seed)``."""
        completions, _ = enumerate_completions(num_content, max_length)
        log_p = sequence_log_probs(model, make_tokenizer(num_content), completions, policy_temperature)
        total = np.logaddexp.reduce(log_p)
        if abs(total) > 1e-4:
            raise ValueError(
                f"the model puts mass {1 - np.exp(total):.3g} outside the completions (see make_policy's masking)"
            )
        if score_fn is None:
            scores = np.random.default_rng(seed).standard_normal(len(completions))
        else:
            scores = np.array([float(score_fn(c)) for c in completions])
        # renormalized: the float32 logits' roundoff
        return cls(log_p - total, scores, temperature, num_content, max_length)

    # ------------------------------------------------------------------ distributions
    def policy_distribution(self, model: torch.nn.Module, temperature: float = 1.0) -> np.ndarray:
        """Exact probability of each completion under an HF causal LM ([N]; sums to 1 minus its mass elsewhere)."""
        return np.exp(sequence_log_probs(model, self.tokenizer, self.completions, temperature))

    @staticmethod
    def kl(p: np.ndarray, q: np.ndarray) -> float:
        """KL(p || q) = sum p log(p / q), 0 log 0 = 0 (inf where q = 0 < p)."""
        p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
        pos = p > 0
        with np.errstate(divide="ignore"):
            return float(np.sum(p[pos] * (np.log(p[pos]) - np.log(q[pos]))))

    def expected_score(self, pi: np.ndarray) -> float:
        """E_{y ~ pi}[oracle score]."""
        return float(np.asarray(pi) @ self.scores)

    def oracle_win_rate(self, pi: np.ndarray) -> float:
        """Probability that the oracle prefers y ~ pi to y' ~ pi_ref."""
        return bandit.oracle_win_rate(pi, self.log_pi_ref, self.scores, self.temperature)

    # ------------------------------------------------------------------ oracle
    def score_texts(self, texts: list[str]) -> list[float]:
        """Oracle score of each completion text (as the trainer decodes it)."""
        out = []
        for t in texts:
            if t not in self._text_index:
                raise ValueError(f"MultiTokenProblem: {t!r} is not the text of a completion of this testbed")
            out.append(float(self.scores[self._text_index[t]]))
        return out

    def oracle(self, mode: str | None = None, seed: int = 0) -> ScoreOracle:
        """A ScoreOracle on completion texts. Default mode: "probability" (the expected label P, exactly the bandit's)
        for temperature > 0, "deterministic" for temperature 0; "bradley_terry" samples labels."""
        if mode is None:
            mode = "probability" if self.temperature > 0 else "deterministic"
        temperature = self.temperature if self.temperature > 0 else 1.0
        return ScoreOracle(self.score_texts, mode=mode, temperature=temperature, seed=seed, name="multi_token_testbed")

    # ------------------------------------------------------------------ closed forms (bandit with K = N)
    def _args(self) -> tuple[np.ndarray, np.ndarray, float]:
        return self.log_pi_ref, self.scores, self.temperature

    def soft_optimal_policy(self, x: np.ndarray, tau: float) -> np.ndarray:
        """pi*_tau(y) ∝ pi_ref(y) exp(x_y / tau) over whole completions."""
        return bandit.soft_optimal_policy(x, self.log_pi_ref, tau)

    def upper_loss(
        self, x: np.ndarray, pi: np.ndarray, objective: str = "preference_nll", weight: float = 0.1
    ) -> float:
        return bandit.upper_loss(x, pi, self.scores, self.temperature, objective=objective, weight=weight,
                                 log_pi_ref=self.log_pi_ref)

    def phi_tau(self, x: np.ndarray, tau: float, objective: str = "preference_nll", weight: float = 0.1) -> float:
        lp, s, t = self._args()
        return bandit.phi_tau(x, lp, tau, s, t, objective=objective, weight=weight)

    def exact_hypergradient(
        self, x: np.ndarray, tau: float, objective: str = "preference_nll", weight: float = 0.1
    ) -> np.ndarray:
        lp, s, t = self._args()
        return bandit.exact_hypergradient(x, lp, tau, s, t, objective=objective, weight=weight)

    def covariance_hypergradient(
        self, x: np.ndarray, tau: float, objective: str = "preference_nll", weight: float = 0.1
    ) -> np.ndarray:
        lp, s, t = self._args()
        return bandit.covariance_hypergradient(x, lp, tau, s, t, objective=objective, weight=weight)

    def penalized_policy(
        self, x: np.ndarray, lam: float, tau: float, objective: str = "preference_nll", weight: float = 0.1
    ) -> np.ndarray:
        lp, s, t = self._args()
        return bandit.penalized_policy(x, lam, tau, lp, s, t, objective=objective, weight=weight)

    def penalty_hypergradient(
        self, x: np.ndarray, lam: float, tau: float, objective: str = "preference_nll", weight: float = 0.1
    ) -> np.ndarray:
        lp, s, t = self._args()
        return bandit.penalty_hypergradient(x, lam, tau, lp, s, t, objective=objective, weight=weight)

    def partial_sgd_fixed_point(
        self, tau: float, objective: str = "preference_nll", weight: float = 0.1, **kwargs
    ) -> np.ndarray:
        lp, s, t = self._args()
        return bandit.partial_sgd_fixed_point(lp, tau, s, t, objective=objective, weight=weight, **kwargs)

    def exact_optimum(self, tau: float, objective: str = "preference_nll", weight: float = 0.1, **kwargs) -> np.ndarray:
        lp, s, t = self._args()
        return bandit.exact_optimum(lp, tau, s, t, objective=objective, weight=weight, **kwargs)
