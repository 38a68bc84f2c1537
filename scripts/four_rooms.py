"""HPGD's Four-Rooms benchmark: exact hypergradient ascent on every (reg_lambda, c_UL) setting of their Table 1, with
their optimizer (global-norm clip 1.0, then SGD at a constant learning rate) and their reporting (per run, the mean
leader value over the last 10% of the iterations; per setting, the best learning rate's mean over seeds).

    python scripts/four_rooms.py                                # 9 settings x 4 learning rates x 1 seed, 10,000 steps
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


def run_one(reg_lambda: float, c_ul: float, learning_rate: float, iterations: int, seed: int) -> dict:
    problem = four_rooms(c_ul)
    x0 = np.random.default_rng(seed).normal(0.0, 0.01, size=problem.dim)  # HPGD's initialization
    t0 = time.perf_counter()
    out = exact_ascent(problem, x0, reg_lambda, learning_rate, iterations)
    tail = out["values"][-max(1, iterations // 10):]
    return {"reg_lambda": reg_lambda, "c_ul": c_ul, "learning_rate": learning_rate, "seed": seed,
            "iterations": iterations, "tail_mean": float(np.mean(tail)), "final": out["value"],
            "initial": out["values"][0], "seconds": round(time.perf_counter() - t0, 1)}


def table(runs: list[dict]) -> str:
    lines = ["| reg_lambda | c_UL | exact (ours) | best lr | HPGD | AMD | Zero-Order |", "|---|---|---|---|---|---|---|"]
    for (lam, c), published in HPGD_TABLE.items():
        cell = [r for r in runs if r["reg_lambda"] == lam and r["c_ul"] == c]
        if not cell:
            continue
        by_lr: dict[float, list[float]] = {}
        for r in cell:
            by_lr.setdefault(r["learning_rate"], []).append(r["tail_mean"])
        lr, values = max(by_lr.items(), key=lambda kv: np.mean(kv[1]))
        se = np.std(values) / np.sqrt(len(values))
        cols = " | ".join(f"{m:.2f} ± {s:.3f}" for m, s in published.values())
        lines.append(f"| {lam} | {c:g} | {np.mean(values):.3f} ± {se:.3f} | {lr} | {cols} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=[f"{lam},{c}" for lam, c in HPGD_TABLE],
                   help="reg_lambda,c_UL pairs (default: the 9 of HPGD's Table 1)")
    p.add_argument("--learning_rates", type=float, nargs="+", default=[0.5, 0.1, 0.05, 0.01])
    p.add_argument("--iterations", type=int, default=10_000)
    p.add_argument("--seeds", type=int, default=1, help="initializations per (setting, learning rate)")
    p.add_argument("--output_dir", default="outputs/four_rooms")
    args = p.parse_args(argv)
    if args.iterations < 10:
        p.error(f"--iterations must be >= 10, got {args.iterations}")
    settings = []
    for s in args.settings:
        lam, c = (float(v) for v in s.split(","))
        if (lam, int(c)) not in HPGD_TABLE or c != int(c):
            p.error(f"--settings: {s} is not one of HPGD's (reg_lambda, c_UL) pairs {list(HPGD_TABLE)}")
        settings.append((lam, int(c)))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for lam, c in settings:
        for lr in args.learning_rates:
            for seed in range(args.seeds):
                runs.append(run_one(lam, c, lr, args.iterations, seed))
                print(json.dumps(runs[-1]), flush=True)
                (out / "results.json").write_text(json.dumps({"arguments": vars(args), "runs": runs}, indent=1))
    (out / "table.md").write_text(table(runs) + "\n")
    print(table(runs))


if __name__ == "__main__":
    sys.exit(main())
