"""The evaluation protocol after the fact: every saved checkpoint of a run, evaluated with an oracle.

    python scripts/evaluate_checkpoints.py outputs/happy_tweet                       # VADER, happy-tweet held-out prompts
    python scripts/evaluate_checkpoints.py RUN [RUN ...] --human mypkg.judge:score --prompts prompts.jsonl \\
        --base_model path/to/initial/policy

For each run folder, the initial policy (step 0), the policies of its `checkpoint-N/` folders and of the folder
itself (the final model, when saved there) are evaluated on the same held-out prompts with the same noise (`bilevel_rlhf.evaluation`), against
the initial policy (`--base_model`, else the `model_name_or_path` of the run's summary.json). The records go to
RUN/eval_protocol.json, the file `OracleEvalCallback` writes during training (an existing one is kept unless
`--overwrite`), so `scripts/protocol_report.py` reads both alike. Works for BilevelTrainer and TRL checkpoints; the
training queries of a checkpoint are read from its `bilevel_state_rank0.json`, else its trainer_state.json's last
logged `oracle/queries`, else left empty.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's checkpoints in step order, then the run folder itself when it holds a model."""
    found = sorted((int(m.group(1)), p) for p in run.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    if (run / "config.json").is_file() or (run / "adapter_config.json").is_file():
        state = run / "summary.json"
        step = json.loads(state.read_text()).get("global_step") if state.is_file() else None
        last = found[-1][0] if found else -1
        if step is None or step > last:
            found.append((step if step is not None else last + 1, run))
    return found


def train_queries(folder: Path) -> int | None:
    state = folder / "bilevel_state_rank0.json"
    if state.is_file():
        return int(json.loads(state.read_text())["oracle_queries"])
    trainer_state = folder / "trainer_state.json"
    if trainer_state.is_file():
        logged = [e["oracle/queries"] for e in json.loads(trainer_state.read_text()).get("log_history", [])
                  if "oracle/queries" in e]
        if logged:
            return int(logged[-1])
    summary = folder / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text()).get("oracle_queries")
    return None


def read_prompts(path: str | None, num: int, n_prompt_words: int) -> list[str]:
    """The held-out happy-tweet prompts, or a file's: JSONL with a `prompt` field, or one prompt per line."""
    if path is None:
        from bilevel_rlhf.happy_tweet.data import load_prompt_dataset

        return load_prompt_dataset("eval", n_prompt_words, 0.1)["prompt"][:num]
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--prompts: file not found: {p}")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix == ".jsonl":
        try:
            prompts = [json.loads(line)["prompt"] for line in lines]
        except (ValueError, KeyError) as e:
            raise SystemExit(f"--prompts {p}: every line must be a JSON object with a 'prompt' field ({e})") from None
    else:
        prompts = lines
    if not prompts:
        raise SystemExit(f"--prompts {p}: no prompts")
    return prompts[:num]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (holding checkpoint-N/ folders and/or a final model)")
    parser.add_argument("--human", default="vader", help="the judge: vader, vader_bt[:T] or module:callable")
    parser.add_argument("--prompts", default=None, help="held-out prompts (JSONL with 'prompt', or one per line); "
                        "default: the happy-tweet held-out prompts")
    parser.add_argument("--base_model", default=None, help="the initial policy (KL reference and win-rate opponent)")
    parser.add_argument("--num_prompts", type=int, default=64)
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--max_completion_length", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_prompt_words", type=int, default=4)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing eval_protocol.json")
    args = parser.parse_args(argv)
    for name in ("num_prompts", "num_samples", "max_completion_length", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    import torch
    from tqdm.auto import tqdm

    from bilevel_rlhf.eval_callback import RECORDS_NAME
    from bilevel_rlhf.evaluation import PolicyEvaluator
    from bilevel_rlhf.happy_tweet.evaluate import load_policy
    from bilevel_rlhf.humans import load_human

    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not run.is_dir():
            raise SystemExit(f"run folder not found: {run}")
        if (run / RECORDS_NAME).exists() and not args.overwrite:
            raise SystemExit(f"{run / RECORDS_NAME} exists (written during training?); --overwrite replaces it")
        if not checkpoints(run):
            raise SystemExit(f"{run}: no checkpoint-N folder and no saved model")
    prompts = read_prompts(args.prompts, args.num_prompts, args.n_prompt_words)
    oracle = load_human(args.human, seed=args.seed)
    for run in runs:
        base = args.base_model
        if base is None:
            summary = run / "summary.json"
            base = json.loads(summary.read_text()).get("model_name_or_path") if summary.is_file() else None
        if base is None:
            raise SystemExit(f"{run}: no summary.json naming the initial policy; pass --base_model")
        ref, tokenizer = load_policy(base)
        evaluator = PolicyEvaluator(prompts, tokenizer, oracle, num_samples=args.num_samples,
                                    max_new_tokens=args.max_completion_length, batch_size=args.batch_size, seed=args.seed)
        with torch.no_grad():  # step 0: the initial policy itself (KL 0), the start of every curve
            records = [evaluator.evaluate(ref, ref, step=0, train_queries=0)]
        for step, folder in tqdm(checkpoints(run), desc=run.name):
            policy, _ = load_policy(folder)
            with torch.no_grad():
                records.append(evaluator.evaluate(policy, ref, step=step, train_queries=train_queries(folder)))
        meta = {"num_prompts": len(prompts), "num_samples": args.num_samples, "max_new_tokens": args.max_completion_length,
                "seed": args.seed, "human": args.human, "base_model": str(base)}
        tmp = run / (RECORDS_NAME + ".tmp")
        tmp.write_text(json.dumps({**meta, "records": [r.to_dict() for r in records]}, indent=1) + "\n")
        os.replace(tmp, run / RECORDS_NAME)
        last = records[-1]
        print(f"{run}: {len(records)} evaluations; last (step {last.step}): score {last.score:.3f}, win rate "
              f"{last.win_rate:.3f}, KL {last.kl:.2f}")


if __name__ == "__main__":
    main()
