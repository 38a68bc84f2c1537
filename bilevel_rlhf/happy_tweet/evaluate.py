"""Evaluation of trained happy-tweet policies on the held-out prompts.

For each policy: `num_samples` sampled completions (temperature 1, full softmax) for each of the first
`num_prompts` held-out prompts, and
  - `vader_mean`: mean VADER compound of the completions (what the oracle scores in training), in [-1, 1];
  - `vader_frac_gt_0.5`: fraction of completions with compound > 0.5 (clearly happy);
  - `kl_to_initial`: KL(pi || pi_0) of the completion distributions, nats per completion, estimated on pi's samples
    by the sum over generated positions of the exact next-token KL,
        KL_hat = mean_i sum_t KL( pi(.|s_t^i) || pi_0(.|s_t^i) ),   s_t^i = prompt + first t tokens of sample i,
    an unbiased estimate (chain rule of KL) with lower variance than the sampled log-ratio sum; `kl_to_initial_se`
    is its standard error over samples;
  - `distinct_1`, `distinct_2`: distinct word uni-/bigrams over all n-grams of all completions (Li et al. 2016);
  - `mean_length`: completion tokens (eos included);
  - a few samples (prompt + completion, through `filter_text`);
and the upper objectives (`upper_objective_metrics`, on fresh samples):
  - `win_rate_vs_initial`: how often VADER prefers the policy's completion to one of the initial policy for the
    same prompt (ties count 1/2): the `win_rate` objective's win rate;
  - `reward_pair_nll`, `reward_pair_accuracy` (runs that saved a reward model): the final r_x's BT-NLL and
    accuracy on VADER-labelled pairs of the policy's own completions (two samples of one prompt): the
    `preference_nll` objective.
Writes `results.json`, `results.md` (a Markdown table, mean +- std over runs of the same method) and
`oracle_curve.png` (the oracle score of theta's training samples against oracle queries, from each run's
`summary.json`).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import rl_utils
from ..evaluation import distinct_n, sequence_kl  # noqa: F401 (the protocol's own metrics)
from ..modeling import position_ids_from_mask
from ..rl_utils import bradley_terry_loss

METRICS = ("vader_mean", "vader_frac_gt_0.5", "kl_to_initial", "distinct_1", "distinct_2", "mean_length")
# the upper objectives: the policy's win rate against the initial policy, and the final r_x's fit (bilevel runs)
OBJECTIVE_METRICS = ("win_rate_vs_initial", "reward_pair_nll", "reward_pair_accuracy")


# ---------------------------------------------------------------------------------------------------- loading
def load_policy(path: str | os.PathLike):
    """(model in eval mode, tokenizer) from a trained run's folder or any causal-LM folder; errors name the path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"policy folder not found: {path}")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ValueError(f"policy folder {path} has no config.json or adapter_config.json: not a saved model")
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"cannot load the policy in {path}: {type(e).__name__}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's `summary.json` (written by the recipe), or None when absent."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"corrupt run summary {path}: {e}") from None


# ---------------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Sample one completion per prompt (tokenized as the trainer does: the tokenizer's default special tokens,
    e.g. the tweet model's leading <|endoftext|>, and left padding)."""
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    completion, mask = rl_utils.sample_completions(  # the trainer's own sampling and masking
        model, enc["input_ids"], enc["attention_mask"], max_new_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id,
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
    )
    return {
        "input_ids": torch.cat([enc["input_ids"], completion], 1),
        "attention_mask": torch.cat([enc["attention_mask"], mask], 1),
        "prompt_length": enc["input_ids"].shape[1],
        "completion_mask": mask,
        "texts": rl_utils.decode_completions(tokenizer, completion, mask),
    }


def evaluate_policy(
    policy: torch.nn.Module, tokenizer: Any, ref: torch.nn.Module, prompts: list[str],
    num_samples: int = 4, max_new_tokens: int = 24, batch_size: int = 64, seed: int = 0, num_shown: int = 5,
) -> dict[str, Any]:
    """Metrics of one policy on `prompts` (see the module docstring); `ref` is the initial policy pi_0."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from .data import filter_text

    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"num_samples, max_new_tokens and batch_size must be >= 1, got "
                         f"{num_samples}, {max_new_tokens}, {batch_size}")
    ref_vocab = ref.get_output_embeddings().weight.shape[0]
    vocab = policy.get_output_embeddings().weight.shape[0]
    if vocab != ref_vocab:
        raise ValueError(f"the policy and the initial policy have different vocabularies ({vocab} vs {ref_vocab}): "
                         "the KL needs the same tokenizer")
    analyzer = SentimentIntensityAnalyzer()
    torch.manual_seed(seed)
    rows = [p for p in prompts for _ in range(num_samples)]  # sample j of prompt i at row i * num_samples + j
    texts, kls, lengths = [], [], []
    for start in range(0, len(rows), batch_size):
        batch = sample_completions(policy, tokenizer, rows[start : start + batch_size], max_new_tokens)
        kls.append(sequence_kl(policy, ref, batch["input_ids"], batch["attention_mask"], batch["prompt_length"],
                               batch["completion_mask"]))
        lengths.append(batch["completion_mask"].sum(1).float())
        texts += batch["texts"]
    kl = torch.cat(kls).double()
    if not bool(torch.isfinite(kl).all()):
        raise FloatingPointError("non-finite KL to the initial policy in the evaluation")
    scores = np.array([analyzer.polarity_scores(t)["compound"] for t in texts])
    shown = [filter_text(rows[i * num_samples] + texts[i * num_samples]) for i in range(min(num_shown, len(prompts)))]
    return {
        "vader_mean": float(scores.mean()),
        "vader_se": float(scores.std(ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else 0.0,
        "vader_frac_gt_0.5": float((scores > 0.5).mean()),
        "kl_to_initial": float(kl.mean()),
        "kl_to_initial_se": float(kl.std() / math.sqrt(len(kl))) if len(kl) > 1 else 0.0,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "mean_length": float(torch.cat(lengths).mean()),
        "num_generations": len(texts),
        "samples": shown,
    }


def _vader_labels(score_a: np.ndarray, score_b: np.ndarray) -> np.ndarray:
    """P(a preferred) under the deterministic VADER oracle: 1, 0, or 1/2 for a tie."""
    return np.where(score_a > score_b, 1.0, np.where(score_a < score_b, 0.0, 0.5))


@torch.no_grad()
def upper_objective_metrics(
    policy: torch.nn.Module, tokenizer: Any, ref: torch.nn.Module, prompts: list[str],
    reward_model: torch.nn.Module | None = None, reward_tokenizer: Any = None,
    num_samples: int = 4, max_new_tokens: int = 24, batch_size: int = 64, seed: int = 0,
) -> dict[str, float]:
    """The upper objectives of one policy (module docstring). Pairs of the policy's completions are its samples
    (2i, 2i+1) of one prompt; r_x reads the policy's token ids, or the decoded rows re-tokenized by
    `reward_tokenizer`."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    if num_samples < 2 or num_samples % 2 or batch_size % 2:
        raise ValueError(f"num_samples and batch_size must be even (pairs of one prompt's samples), got "
                         f"{num_samples} and {batch_size}")
    analyzer = SentimentIntensityAnalyzer()

    def vader(texts: list[str]) -> np.ndarray:
        return np.array([analyzer.polarity_scores(t)["compound"] for t in texts])

    torch.manual_seed(seed + 1)  # other samples than `evaluate_policy`'s
    rows = [p for p in prompts for _ in range(num_samples)]
    wins, nll, accuracy = [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        mine = sample_completions(policy, tokenizer, chunk, max_new_tokens)
        theirs = sample_completions(ref, tokenizer, chunk, max_new_tokens)
        s_mine = vader(mine["texts"])
        wins.append(_vader_labels(s_mine, vader(theirs["texts"])))
        if reward_model is None:
            continue
        if reward_tokenizer is None:
            ids, mask = mine["input_ids"], mine["attention_mask"]
        else:
            full = [tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                    for r, m in zip(mine["input_ids"], mine["attention_mask"])]
            enc = reward_tokenizer(full, padding=True, return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
        r = reward_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, 0]
        r, label = r.double(), torch.as_tensor(_vader_labels(s_mine[0::2], s_mine[1::2]))
        nll.append(bradley_terry_loss(r[0::2], r[1::2], label).numpy())
        d = (r[0::2] - r[1::2]).numpy()
        accuracy.append(np.where(d > 0, label, np.where(d < 0, 1 - label, 0.5)))
    out = {"win_rate_vs_initial": float(np.concatenate(wins).mean())}
    if reward_model is not None:
        out["reward_pair_nll"] = float(np.concatenate(nll).mean())
        out["reward_pair_accuracy"] = float(np.concatenate(accuracy).mean())
    return out


def load_reward_model(run_dir: str | os.PathLike) -> tuple[torch.nn.Module, Any] | None:
    """(r_x in eval mode, its own tokenizer or None) from a run's `reward_model/`, or None when there is none."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(run_dir) / "reward_model"
    if not (path / "config.json").is_file():
        return None
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------- several runs
def evaluate_runs(
    runs: dict[str, str], base_model: str | None = None, include_base: bool = True, num_prompts: int = 64,
    num_samples: int = 4, max_new_tokens: int = 24, batch_size: int = 64, seed: int = 0,
    n_prompt_words: int = 4, eval_fraction: float = 0.1,
) -> dict[str, Any]:
    """Evaluate every run folder of `runs` (name -> folder) against the initial policy `base_model`.

    `base_model` None: the `model_name_or_path` recorded in the first run's summary, else the embedded default.
    Each run's group (for the table) is its summary's method, else its name; an `initial` row evaluates pi_0.
    """
    from .build_model import get_default_model
    from .data import load_prompt_dataset

    if not runs and not include_base:
        raise ValueError("nothing to evaluate: give at least one run or include_base=True")
    summaries = {name: read_summary(path) for name, path in runs.items()}
    if base_model is None:
        recorded = [s["model_name_or_path"] for s in summaries.values() if s and s.get("model_name_or_path")]
        base_model = recorded[0] if recorded else str(get_default_model())
    ref, ref_tokenizer = load_policy(base_model)
    prompts = load_prompt_dataset("eval", n_prompt_words, eval_fraction)["prompt"][:num_prompts]
    kwargs = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)

    results: list[dict[str, Any]] = []
    if include_base:
        row = evaluate_policy(ref, ref_tokenizer, ref, prompts, **kwargs)
        row |= upper_objective_metrics(ref, ref_tokenizer, ref, prompts, **kwargs)
        results.append({"name": "initial", "group": "initial", "path": base_model, **row})
    for name, path in runs.items():
        policy, tokenizer = load_policy(path)
        summary = summaries[name] or {}
        row = evaluate_policy(policy, tokenizer, ref, prompts, **kwargs)
        reward = load_reward_model(path)
        row |= upper_objective_metrics(policy, tokenizer, ref, prompts, *(reward or (None, None)), **kwargs)
        results.append({
            "name": name, "group": summary.get("method", name), "path": str(path), "seed": summary.get("seed"),
            "oracle_queries": summary.get("oracle_queries"), "train_seconds": summary.get("seconds"), **row,
        })
    groups = {name: _group(s, name) for name, s in summaries.items()}
    for row in results[1 if include_base else 0 :]:
        row["group"] = groups[row["name"]]
    return {
        "base_model": base_model, "num_prompts": len(prompts), "num_samples": num_samples,
        "max_new_tokens": max_new_tokens, "seed": seed, "results": results,
        "curves": {name: (s or {}).get("oracle_curve", []) for name, s in summaries.items()},
        "groups": groups,
    }


def _group(summary: dict[str, Any] | None, name: str) -> str:
    """A run's table group: its method, with the objective when it is not the default preference_nll."""
    if not summary or "method" not in summary:
        return name
    objective = summary.get("objective", "preference_nll")
    return summary["method"] if objective in (None, "preference_nll") else f"{summary['method']} ({objective})"


def markdown_table(report: dict[str, Any]) -> str:
    """One row per group: mean (+- std over its runs when there are several) of each metric."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in report["results"]:
        groups[row["group"]].append(row)
    header = ["method", "runs", "oracle queries", "VADER mean", "frac > 0.5", "KL to initial", "distinct-1",
              "distinct-2", "length", "win rate vs initial", "r_x pair NLL", "r_x pair accuracy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(values: list[float], digits: int = 3) -> str:
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"

    for group, rows in groups.items():
        queries = [r.get("oracle_queries") for r in rows if r.get("oracle_queries") is not None]
        cells = [group, str(len(rows)), str(int(np.mean(queries))) if queries else "0"]
        cells += [cell([r[m] for r in rows], 2 if m == "mean_length" else 3) for m in METRICS]
        cells += [cell([r[m] for r in rows]) if all(m in r for r in rows) else "-" for m in OBJECTIVE_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{report['num_prompts']} held-out prompts x {report['num_samples']} samples, temperature 1, at most "
                 f"{report['max_new_tokens']} tokens; KL in nats per completion; base model {report['base_model']}.")
    return "\n".join(lines) + "\n"


def plot_curves(report: dict[str, Any], path: str | os.PathLike, smooth: int = 5) -> bool:
    """Oracle score of theta's training samples against oracle queries, one color per group; False if no curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: c for name, c in report["curves"].items() if c}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors: dict[str, str] = {}
    for name, curve in curves.items():
        group = report["groups"][name]
        x = np.array([p["oracle/queries"] for p in curve], dtype=float)
        y = np.array([p["oracle/score_theta"] for p in curve], dtype=float)
        k = max(1, min(smooth, len(y)))
        y_smooth = np.convolve(y, np.ones(k) / k, mode="valid")  # trailing moving average
        label = None if group in colors else group  # one legend entry per group (seeds share a color)
        color = colors.setdefault(group, f"C{len(colors)}")
        ax.plot(x[k - 1 :], y_smooth, color=color, label=label, lw=1.5)
    ax.set_xlabel("oracle queries (bilevel: labelled pairs; RLOO: scored completions)")
    ax.set_ylabel(f"oracle score of training samples (moving avg {smooth})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, str]:
    """Write results.json, results.md and oracle_curve.png (when curves exist); returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(output_dir / "results.json"), "markdown": str(output_dir / "results.md")}
    Path(paths["json"]).write_text(json.dumps(report, indent=1) + "\n")
    table = markdown_table(report)
    samples = ["", "Samples (first held-out prompts, profanity masked):", ""]
    for row in report["results"]:
        samples.append(f"- **{row['name']}**: " + " / ".join(f"`{s.replace('`', chr(39))}`" for s in row["samples"][:3]))
    Path(paths["markdown"]).write_text(table + "\n".join(samples) + "\n")
    if plot_curves(report, output_dir / "oracle_curve.png"):
        paths["plot"] = str(output_dir / "oracle_curve.png")
    return paths
