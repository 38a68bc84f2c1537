"""HPGD's Four-Rooms benchmark: every (reg_lambda, c_UL) setting of their Table 1, with their optimizer (global-norm
clip 1.0, then SGD at a constant learning rate) and their reporting (per run, the mean leader value over the last 10%
of the iterations; per setting, the best learning rate's mean over seeds). Methods: `exact` (exact hypergradient
ascent, 10,000 steps); `penalty` (HPGD's protocol with the penalty direction: followers at their exact soft best
responses, the direction estimated from walkers, `walkers.sampled_penalty_ascent`, on a budget of --transitions);
`single_loop` (the penalty actor-critic from samples only, `walkers.sampled_single_loop`: its followers never see the
model, their critics evaluate them on the transitions sampled so far; on a budget of --transitions; tau = reg_lambda).

    python scripts/four_rooms.py                                # exact: 9 settings x 4 learning rates x 1 seed
    python scripts/four_rooms.py --methods penalty --learning_rates 0.5 --seeds 3 --transitions 2.048e7
    python scripts/four_rooms.py --methods single_loop --seeds 10 --transitions 1e8
    python scripts/four_rooms.py --settings 0.003,1 --learning_rates 0.5 --iterations 2000

Writes `results.json` and `table.md` (ours beside HPGD's published columns) to --output_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 104-state solves: BLAS threads only contend

from bilevel_rlhf.gridworld.four_rooms import HPGD_TABLE, four_rooms  # noqa: E402
from bilevel_rlhf.gridworld.tabular import exact_ascent  # noqa: E402
from bilevel_rlhf.gridworld.walkers import sampled_penalty_ascent, sampled_single_loop  # noqa: E402


def run_one(method: str, reg_lambda: float, c_ul: float, learning_rate: float, args, seed: int) -> dict:
    """One run; its values are the leader's value under the reg_lambda best response, recorded 1,000 times (the
    single loop: 200 times, since its many short iterations would otherwise spend most of the run on exact solves)."""
    problem = four_rooms(c_ul)
    x0 = np.random.default_rng(seed).normal(0.0, 0.01, size=problem.dim)  # HPGD's initialization
    t0 = time.perf_counter()
    if method == "exact":
        iterations = args.iterations
        out = exact_ascent(problem, x0, reg_lambda, learning_rate, iterations, record_every=max(1, iterations // 1000))
        transitions = 0
    elif method == "penalty":
        iterations = max(1, int(args.transitions) // (2 * args.batch * args.walker_steps))
        out = sampled_penalty_ascent(problem, x0, reg_lambda, args.penalty_lambda, learning_rate, iterations,
                                     args.batch, args.walker_steps, seed=seed, record_every=max(1, iterations // 1000),
                                     common_random_numbers=args.penalty_common_random_numbers)
        transitions = out["transitions"]
    else:
        iterations = max(1, int(args.transitions) // (2 * args.batch + args.explore))
        out = sampled_single_loop(problem, x0, iterations, args.batch, reg_lambda, args.penalty_lambda, learning_rate,
                                  actor_step=args.actor_step, critic_sweeps=args.critic_sweeps, explore=args.explore,
                                  common_random_numbers=args.common_random_numbers,
                                  seed=seed, record_every=max(1, iterations // 200))
        transitions = out["transitions"]
    tail = out["values"][-max(1, len(out["values"]) // 10):]
    return {"method": method, "reg_lambda": reg_lambda, "c_ul": c_ul, "learning_rate": learning_rate, "seed": seed,
            "iterations": iterations, "transitions": transitions, "tail_mean": float(np.mean(tail)),
            "final": problem.value(out["x"], reg_lambda), "seconds": round(time.perf_counter() - t0, 1)}


def table(runs: list[dict]) -> str:
    methods = sorted({r["method"] for r in runs})
    head = " | ".join(f"{m} (ours) | best lr" for m in methods)
    lines = [f"| reg_lambda | c_UL | {head} | HPGD | AMD | Zero-Order |", "|---|---|" + "---|---|" * len(methods)
             + "---|---|---|"]
    for (lam, c), published in HPGD_TABLE.items():
        cells = []
        for method in methods:
            by_lr: dict[float, list[float]] = {}
            for r in runs:
                if r["method"] == method and r["reg_lambda"] == lam and r["c_ul"] == c:
                    by_lr.setdefault(r["learning_rate"], []).append(r["tail_mean"])
            if not by_lr:
                cells.append("- | -")
                continue
            lr, values = max(by_lr.items(), key=lambda kv: np.mean(kv[1]))
            se = np.std(values) / np.sqrt(len(values))  # HPGD's: the population std over seeds / sqrt(seeds)
            cells.append(f"{np.mean(values):.3f} ± {se:.3f} | {lr}")
        if all(cell == "- | -" for cell in cells):
            continue
        cols = " | ".join(f"{m:.2f} ± {s:.3f}" for m, s in published.values())
        lines.append(f"| {lam} | {c:g} | {' | '.join(cells)} | {cols} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=[f"{lam},{c}" for lam, c in HPGD_TABLE],
                   help="reg_lambda,c_UL pairs (default: the 9 of HPGD's Table 1)")
    p.add_argument("--methods", nargs="+", default=["exact"], choices=["exact", "penalty", "single_loop"])
    p.add_argument("--learning_rates", type=float, nargs="+", default=[0.5, 0.1, 0.05, 0.01], help="x's step sizes")
    p.add_argument("--iterations", type=int, default=10_000, help="exact: ascent steps")
    p.add_argument("--seeds", type=int, default=1, help="initializations (and sampling streams) per (setting, lr)")
    p.add_argument("--transitions", type=float, default=1e8, help="sampled methods: environment transitions per run")
    p.add_argument("--batch", type=int, default=128, help="sampled methods: walkers per actor (a transition per step)")
    p.add_argument("--walker_steps", type=int, default=20, help="penalty: walker steps per direction estimate")
    p.add_argument("--penalty_lambda", type=float, default=100.0)
    p.add_argument("--explore", type=int, default=32, help="single_loop: exploring starts per iteration (model only)")
    p.add_argument("--actor_step", type=float, default=0.5, help="single_loop: the actors' natural step, in (0, 1]")
    p.add_argument("--critic_sweeps", type=int, default=1, help="single_loop: critic backups per iteration")
    p.add_argument("--penalty_common_random_numbers", action=argparse.BooleanOptionalAction, default=True,
                   help="penalty: theta's walkers draw phi's uniforms (coupled samples); "
                        "--no-penalty_common_random_numbers: independent walkers")
    p.add_argument("--common_random_numbers", action=argparse.BooleanOptionalAction, default=True,
                   help="single_loop: theta's walkers draw phi's uniforms (coupled samples); "
                        "--no-common_random_numbers: independent walkers")
    p.add_argument("--output_dir", default="outputs/four_rooms")
    args = p.parse_args(argv)
    if args.iterations < 10:
        p.error(f"--iterations must be >= 10, got {args.iterations}")
    if args.batch < 1 or args.transitions < 2 * args.batch + max(args.explore, 0):
        p.error(f"--transitions must cover at least one step of 2 x --batch walkers and --explore, got "
                f"{args.transitions:g}, {args.batch}, {args.explore}")
    if args.explore < 0 or args.critic_sweeps < 1 or not 0.0 < args.actor_step <= 1.0:
        p.error(f"--explore must be >= 0, --critic_sweeps >= 1 and --actor_step in (0, 1], got {args.explore}, "
                f"{args.critic_sweeps}, {args.actor_step}")
    settings = []
    for s in args.settings:
        lam, c = (float(v) for v in s.split(","))
        if (lam, int(c)) not in HPGD_TABLE or c != int(c):
            p.error(f"--settings: {s} is not one of HPGD's (reg_lambda, c_UL) pairs {list(HPGD_TABLE)}")
        settings.append((lam, int(c)))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for method in args.methods:
        for lam, c in settings:
            for lr in args.learning_rates:
                for seed in range(args.seeds):
                    runs.append(run_one(method, lam, c, lr, args, seed))
                    print(json.dumps(runs[-1]), flush=True)
                    (out / "results.json").write_text(json.dumps({"arguments": vars(args), "runs": runs}, indent=1))
    (out / "table.md").write_text(table(runs) + "\n")
    print(table(runs))


if __name__ == "__main__":
    sys.exit(main())
