"""Where the regularized optimum of the default GridWorld lies, per tau: for each tau, the goal position minimizing
the exact Phi_tau over a dense grid of positions, and the unregularized Phi (tau = 0) there, against the global best.

    python scripts/gridworld_regularized_optima.py                   # step 0.05, tau 0.1 ... 0.002
    python scripts/gridworld_regularized_optima.py --step 0.25 --taus 0.1 0.02

A method that minimized Phi_tau exactly at its final tau would end at the Phi printed for that tau.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 100-state solves: BLAS threads only contend

from bilevel_rlhf.gridworld import build_problem, load_config  # noqa: E402
from bilevel_rlhf.gridworld.problem import batched_phi, position_grid  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "gridworld" / "config.yaml"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(CONFIG), help="a GridWorld recipe YAML (parameterization: position)")
    p.add_argument("--step", type=float, default=0.05, help="spacing of the grid of goal positions")
    p.add_argument("--taus", type=float, nargs="+", default=[0.1, 0.05, 0.02, 0.01, 0.005, 0.002])
    args = p.parse_args(argv)
    problem = build_problem(load_config(args.config))
    if problem.parameterization != "position":
        p.error(f"--config: parameterization must be 'position', got {problem.parameterization!r}")
    if args.step <= 0 or min(args.taus) <= 0:
        p.error(f"--step and --taus must be > 0, got {args.step}, {args.taus}")
    xs = position_grid(problem, args.step)
    phi = batched_phi(problem, xs, 0.0)
    best = float(phi.min())
    within = phi <= best + 0.01 * abs(best)
    r, c = xs[np.argmin(phi)]
    print(f"{len(xs)} positions (step {args.step}); best Phi {best:.4f} at ({r:.2f}, {c:.2f}); "
          f"{int(within.sum())} within 1% of it")
    print("| tau | argmin Phi_tau | Phi_tau there | Phi there | gap to best | within 1% |")
    print("|---|---|---|---|---|---|")
    rows = []
    for tau in args.taus:
        phi_tau = batched_phi(problem, xs, tau)
        i = int(np.argmin(phi_tau))
        rows.append({"tau": tau, "x": xs[i].tolist(), "phi_tau": float(phi_tau[i]), "phi": float(phi[i])})
        print(f"| {tau:g} | ({xs[i][0]:.2f}, {xs[i][1]:.2f}) | {phi_tau[i]:.4f} | {phi[i]:.4f} | "
              f"{phi[i] - best:.4f} | {'yes' if within[i] else 'no'} |")
    return {"best": best, "within": int(within.sum()), "rows": rows}


if __name__ == "__main__":
    main()
    sys.exit(0)
