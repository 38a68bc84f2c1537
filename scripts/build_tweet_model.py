"""Build the default happy-tweet policy (small GPT-2 pretrained + SFT on the tweets) into a folder.

    python scripts/build_tweet_model.py                          # into the cache, as get_default_model()
    python scripts/build_tweet_model.py --output_dir outputs/tweet-gpt2 --seed 1
    python scripts/build_tweet_model.py --output_dir /tmp/tiny --cut_down   # seconds, for tests

Prints the build info (final pretrain/SFT train and held-out losses, timings) as JSON and, with
--samples N, N sampled continuations of held-out prompts (profanity masked for display).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally

from bilevel_rlhf.happy_tweet.build_model import (  # noqa: E402
    BUILD_THREADS,
    MODEL_PREFIX,
    TweetModelConfig,
    build_tweet_model,
    config_hash,
    default_cache_dir,
    load_tweet_model,
)
from bilevel_rlhf.happy_tweet.data import filter_text, load_prompt_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="folder to create (default: <cache>/models/tweet-gpt2-<config hash>)")
    parser.add_argument("--max_steps", type=int, default=None, help="optimizer steps per stage (overrides epochs)")
    parser.add_argument("--epochs", type=float, default=None, help="pretraining epochs (SFT keeps its default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cut_down", action="store_true", help="tiny model, 300 tweets, 4 steps per stage")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--samples", type=int, default=0, help="print this many held-out continuations")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=BUILD_THREADS,
                        help=f"torch CPU threads of the build (default {BUILD_THREADS}); another count gives slightly "
                             "different weights")
    args = parser.parse_args(argv)

    config = TweetModelConfig.cut_down(seed=args.seed) if args.cut_down else TweetModelConfig(seed=args.seed)
    overrides = {"max_steps": args.max_steps, "pretrain_epochs": args.epochs}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})  # re-validated
    output_dir = args.output_dir or default_cache_dir() / "models" / f"{MODEL_PREFIX}-{config_hash(config)}"

    info = build_tweet_model(output_dir, config, overwrite=args.overwrite, progress=not args.quiet,
                             threads=args.threads)
    print(json.dumps(info, indent=2, sort_keys=True))
    print(f"model written to {output_dir}")

    if args.samples > 0:
        print_samples(output_dir, args.samples, config.n_prompt_words, args.seed)
    return 0


def print_samples(model_dir: Path, n: int, n_prompt_words: int, seed: int) -> None:
    """Sample continuations of the first n held-out prompts (profanity masked) and their mean VADER compound."""
    import torch
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    model, tokenizer = load_tweet_model(model_dir)
    prompts = list(load_prompt_dataset("eval", n_prompt_words=n_prompt_words)["prompt"][:n])
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, top_k=0, max_new_tokens=48)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    for prompt, completion in zip(prompts, completions):
        print(f"{filter_text(prompt)!r} -> {filter_text(completion)!r}")
    vader = SentimentIntensityAnalyzer()
    full = [vader.polarity_scores(p + c)["compound"] for p, c in zip(prompts, completions)]
    only = [vader.polarity_scores(c)["compound"] for c in completions]
    print(f"mean VADER compound over {len(prompts)} samples: prompt+completion {sum(full) / len(full):.3f}, "
          f"completion {sum(only) / len(only):.3f}")


if __name__ == "__main__":
    sys.exit(main())
