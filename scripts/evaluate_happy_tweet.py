"""Evaluate trained happy-tweet policies on the held-out prompts; write JSON, a Markdown table and a plot.

    python scripts/evaluate_happy_tweet.py outputs/happy_tweet                       # one run (+ the initial policy)
    python scripts/evaluate_happy_tweet.py single_loop=outputs/sl partial_sgd=outputs/psgd --output_dir outputs/eval

A run is `NAME=FOLDER` or just `FOLDER` (named after the folder). Metrics and estimators:
`bilevel_rlhf/happy_tweet/evaluate.py`. The initial policy (the KL reference) is the `model_name_or_path`
recorded in the first run's summary.json, else `--base_model`, else the embedded default.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_runs(items: list[str]) -> dict[str, str]:
    runs: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        if not name or not path:
            raise SystemExit(f"error: a run must be NAME=FOLDER or FOLDER, got {item!r}")
        if name in runs:
            raise SystemExit(f"error: run name {name!r} given twice (use NAME=FOLDER)")
        runs[name] = path
    return runs


def main(argv: list[str] | None = None) -> dict:
    from bilevel_rlhf.happy_tweet.evaluate import evaluate_runs, markdown_table, write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", help="NAME=FOLDER or FOLDER of trained policies")
    parser.add_argument("--base_model", default=None, help="initial policy (KL reference) folder")
    parser.add_argument("--no_base", action="store_true", help="do not evaluate the initial policy itself")
    parser.add_argument("--num_prompts", type=int, default=64, help="held-out prompts (default 64)")
    parser.add_argument("--num_samples", type=int, default=4, help="completions per prompt (default 4)")
    parser.add_argument("--max_completion_length", type=int, default=24, help="tokens per completion (default 24)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_prompt_words", type=int, default=4)
    parser.add_argument("--output_dir", default="outputs/happy_tweet_eval")
    args = parser.parse_args(argv)
    for name in ("num_prompts", "num_samples", "max_completion_length", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    import torch

    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    report = evaluate_runs(
        parse_runs(args.runs), base_model=args.base_model, include_base=not args.no_base,
        num_prompts=args.num_prompts, num_samples=args.num_samples, max_new_tokens=args.max_completion_length,
        batch_size=args.batch_size, seed=args.seed, n_prompt_words=args.n_prompt_words,
    )
    paths = write_report(report, args.output_dir)
    print(markdown_table(report))
    print("written: " + ", ".join(paths.values()), file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
