"""Write the movie-review task's prompts (`bilevel_rlhf.movie_reviews.prompt_splits`) as a datasets folder.

    python scripts/prepare_movie_reviews.py                                  # outputs/movie_reviews/prompts
    python scripts/prepare_movie_reviews.py --output_dir DIR --n_prompt_words 6 --fit_gold

The folder (`DatasetDict.save_to_disk`: train / test) is what recipes/movie_reviews/config.yaml reads.
`--fit_gold` also fits (and caches) the gold reward model now and prints its held-out fit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bilevel_rlhf.movie_reviews import gold_reward, prompt_splits  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="outputs/movie_reviews/prompts")
    parser.add_argument("--n_prompt_words", type=int, default=6)
    parser.add_argument("--eval_fraction", type=float, default=0.1)
    parser.add_argument("--fit_gold", action="store_true", help="fit and cache the gold reward model too")
    args = parser.parse_args(argv)
    splits = prompt_splits(args.n_prompt_words, args.eval_fraction)
    splits.save_to_disk(args.output_dir)
    print(f"{args.output_dir}: {len(splits['train'])} training and {len(splits['test'])} held-out prompts, "
          f"e.g. {splits['test'][0]['prompt']!r}")
    if args.fit_gold:
        _, metrics = gold_reward(eval_fraction=args.eval_fraction)
        print("gold reward model: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in metrics.items()))


if __name__ == "__main__":
    main()
