"""Agreement of a local LLM judge (`LocalLLMJudge`) with VADER on happy-tweet pairs: an interface check, no benchmark.

    python scripts/judge_agreement.py --model outputs/smollm2-135m-instruct --num_pairs 200 --threads 1

Each pair is one held-out prompt of the happy-tweet task (`load_prompt_dataset("eval")`, a seeded sample) with two
completions: by default two samples of the tweet GPT-2 (`--policy`, default the embedded model, temperature 1), or
with `--completions tweets` the prompt's own tweet ending against the ending of the next sampled held-out tweet.
VADER's verdict (the higher compound score of the completion wins, as the recipe's `vader` human) is the reference;
pairs that VADER ties are left out of the agreement. The judge reads every pair in both orders:

- `judge(..., shuffle_order=True)`: the verdict the trainer would get; agreement with VADER over the pairs that VADER
  does not tie and the judge does not abstain on, with a 95% Wilson interval; abstain rate; seconds per pair;
- each pair shown as (first, second) and as (second, first), no shuffling (the order `judge` did not show is one more
  pass): the fraction answering "A" in each order (position bias; 0.5 is none), the fraction of pairs whose two
  verdicts pick the same completion, and the agreement of the both-orders verdict, the sign of
  margin(first, second) - margin(second, first), where margin is log p(A) - log p(B).

Writes the figures and the machine to `--output` (JSON) and prints them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default); (nan, nan) when n is 0."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if successes == 0 else max(0.0, center - half)), (1.0 if successes == n else min(1.0, center + half))


def rate(successes: int, n: int) -> dict:
    low, high = wilson_interval(successes, n)
    return {"rate": successes / n if n else math.nan, "ci95": [low, high], "n": n}


def make_pairs(args, rng) -> tuple[list[str], list[list[str]]]:
    """`args.num_pairs` (prompt, [first, second]) from held-out prompts sampled with `rng`."""
    import torch

    from bilevel_rlhf.happy_tweet.data import load_prompt_dataset

    data = load_prompt_dataset("eval", n_prompt_words=args.n_prompt_words)
    if args.num_pairs > len(data):
        raise SystemExit(f"error: --num_pairs {args.num_pairs} exceeds the {len(data)} held-out prompts")
    order = rng.permutation(len(data))
    rows = [data[int(i)] for i in order[: args.num_pairs]]
    prompts = [r["prompt"] for r in rows]
    if args.completions == "tweets":
        other = data[int(order[args.num_pairs])] if args.num_pairs < len(data) else rows[0]
        endings = [r["completion"] for r in rows[1:]] + [other["completion"]]
        return prompts, [[r["completion"], e] for r, e in zip(rows, endings)]

    from bilevel_rlhf.happy_tweet.build_model import get_default_model
    from bilevel_rlhf.happy_tweet.evaluate import load_policy, sample_completions

    policy, tokenizer = load_policy(args.policy or get_default_model())
    torch.manual_seed(args.seed)
    texts: list[str] = []
    doubled = [p for p in prompts for _ in range(2)]  # pair i = rows 2i, 2i + 1
    for start in range(0, len(doubled), 64):
        texts += sample_completions(policy, tokenizer, doubled[start : start + 64], args.max_completion_length)["texts"]
    return prompts, [[texts[2 * i], texts[2 * i + 1]] for i in range(len(prompts))]


def machine(device) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(device), "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the judge: an instruct causal-LM folder")
    parser.add_argument("--num_pairs", type=int, default=200)
    parser.add_argument("--completions", choices=["policy", "tweets"], default="policy",
                        help="policy: two samples of --policy per prompt; tweets: real tweet endings")
    parser.add_argument("--policy", default=None, help="the sampling policy (default: the embedded tweet GPT-2)")
    parser.add_argument("--max_completion_length", type=int, default=24)
    parser.add_argument("--n_prompt_words", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per forward pass of the judge")
    parser.add_argument("--margin", type=float, default=0.0, help="the judge abstains when |logit margin| <= this")
    parser.add_argument("--seed", type=int, default=0, help="prompt sample, completions and the judge's shuffling")
    parser.add_argument("--device", default=None, help="the judge's device (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--output", default="outputs/judge_agreement.json")
    args = parser.parse_args(argv)
    for name in ("num_pairs", "max_completion_length", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    import numpy as np
    import torch

    from bilevel_rlhf.llm_judge import LocalLLMJudge
    from bilevel_rlhf.preference import VaderOracle

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prompts, pairs = make_pairs(args, np.random.default_rng(args.seed))
    n = len(pairs)

    vader = VaderOracle()
    score_a = np.array(vader.score(prompts, [p[0] for p in pairs]))
    score_b = np.array(vader.score(prompts, [p[1] for p in pairs]))
    decisive = score_a != score_b
    reference = np.where(score_a > score_b, 0, 1)  # VADER's verdict where decisive

    judge = LocalLLMJudge.from_pretrained(args.model, batch_size=args.batch_size, device=device, margin=args.margin,
                                          seed=args.seed)
    start = time.perf_counter()
    verdict = np.array(judge.judge(prompts, pairs, shuffle_order=True))
    seconds = time.perf_counter() - start
    # log p(A) - log p(B) of each pair as given and swapped: the judge showed one order, one more pass shows the other
    flips, shown = judge.last_flips, judge.last_margins
    other = judge.answer_margins(prompts, [p if flip else p[::-1] for p, flip in zip(pairs, flips)])
    forward, backward = np.where(flips, other, shown), np.where(flips, shown, other)
    v_forward, v_backward = np.array(judge.verdicts(forward)), np.array(judge.verdicts(backward))

    answered = verdict >= 0
    scored = decisive & answered
    both = np.isfinite(forward) & np.isfinite(backward) & (forward != backward)
    both_verdict = np.where(forward - backward > 0, 0, 1)  # A in the first order, B in the swapped one: the first
    consistent_n = int(((v_forward >= 0) & (v_backward >= 0)).sum())
    report = {
        "model": str(args.model),
        "num_pairs": n,
        "completions": args.completions,
        "policy": None if args.completions == "tweets" else str(args.policy or "embedded tweet GPT-2"),
        "seed": args.seed,
        "margin": args.margin,
        "vader_ties": int((~decisive).sum()),
        "agreement": rate(int((verdict[scored] == reference[scored]).sum()), int(scored.sum())),
        "abstain_rate": float((~answered).mean()),
        "position_bias": {
            "answers_A_given_order": rate(int((v_forward == 0).sum()), int((v_forward >= 0).sum())),
            "answers_A_swapped_order": rate(int((v_backward == 0).sum()), int((v_backward >= 0).sum())),
            "order_consistent": rate(int(((v_forward >= 0) & (v_backward >= 0) & (v_forward != v_backward)).sum()),
                                     consistent_n),
            "mean_margin_logp_A_minus_B": float(np.nanmean(np.concatenate([forward, backward]))),
        },
        "agreement_both_orders": rate(int((both_verdict[decisive & both] == reference[decisive & both]).sum()),
                                      int((decisive & both).sum())),
        "seconds_per_pair": seconds / n,
        "machine": machine(judge.device),
        "command": "python scripts/judge_agreement.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    a, pb = report["agreement"], report["position_bias"]
    print(f"{n} pairs, {report['vader_ties']} tied by VADER; judge {args.model} on {judge.device}")
    print(f"agreement with VADER (shuffled order): {a['rate']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] "
          f"over {a['n']} pairs; abstain rate {report['abstain_rate']:.3f}")
    print(f"answers A: {pb['answers_A_given_order']['rate']:.3f} (given order), "
          f"{pb['answers_A_swapped_order']['rate']:.3f} (swapped); order-consistent "
          f"{pb['order_consistent']['rate']:.3f}; both-orders agreement {report['agreement_both_orders']['rate']:.3f} "
          f"over {report['agreement_both_orders']['n']} pairs")
    print(f"{report['seconds_per_pair']:.3f} s per pair; wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
