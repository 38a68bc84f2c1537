"""Step time of the happy-tweet recipe on a quiet machine and beside a busy core, per torch thread count.

    python scripts/thread_check.py                       # 1 and 2 threads, 24 optimizer steps each, quiet and busy
    python scripts/thread_check.py --threads 1 2 4 --max_steps 40

For each thread count it runs the recipe (`recipes/happy_tweet/config.yaml`, no saving, no evaluation) twice: alone,
and beside a single-threaded busy loop (one Python process spinning on one core, as another user's job would). It
prints the training seconds of each run and the busy/quiet ratio. The recipe's default (`torch_threads: 1`) is
chosen from these figures (docs/happy_tweet.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def run_recipe(threads: int, max_steps: int, config: str, out: str) -> float:
    """Seconds of `trainer.train` (from summary.json's log history: train_runtime) for one run."""
    cmd = [sys.executable, "-m", "bilevel_rlhf.happy_tweet.recipe", "--config", config, "--torch_threads", str(threads),
           "--max_steps", str(max_steps), "--output_dir", out, "--save_strategy", "no", "--report_to", "none",
           "--num_eval_prompts", "0", "--disable_tqdm", "true"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = json.loads((Path(out) / "summary.json").read_text())["log_history"]
    return float(next(e["train_runtime"] for e in history if "train_runtime" in e))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to compare")
    p.add_argument("--max_steps", type=int, default=24, help="optimizer steps per run (a multiple of 4)")
    p.add_argument("--config", default="recipes/happy_tweet/config.yaml")
    p.add_argument("--output", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    results = {"cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(), "max_steps": args.max_steps,
               "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            quiet = run_recipe(threads, args.max_steps, args.config, f"{tmp}/quiet{threads}")
            stop = mp.Event()
            spinner = mp.Process(target=_spin, args=(stop,), daemon=True)
            spinner.start()
            time.sleep(1.0)
            try:
                busy = run_recipe(threads, args.max_steps, args.config, f"{tmp}/busy{threads}")
            finally:
                stop.set()
                spinner.join()
            row = {"threads": threads, "quiet_s": round(quiet, 1), "busy_s": round(busy, 1),
                   "busy_over_quiet": round(busy / quiet, 2)}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
