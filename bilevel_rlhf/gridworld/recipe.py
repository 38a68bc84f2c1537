"""The GridWorld recipe: every configured method over several seeds, evaluated exactly.

Writes to ``output_dir``: results.json, instance.npz, curves.png, heatmap.png, table.md, and prints
the table. Run ``bilevel-gridworld --config recipes/gridworld/config.yaml --seeds 3``.
"""

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .algorithms import RunResult, build_problem, initial_x, run_method
from .config import GridWorldConfig, parse_args
from .plots import plot_curves, plot_heatmaps
from .problem import GoalProblem, global_search


def samples_to_reach(run: dict, threshold: float) -> int | None:
    """First recorded sample count at which exact Phi <= threshold (None if never)."""
    for n, v in zip(run["curve_samples"], run["curve_phi"]):
        if v <= threshold:
            return int(n)
    return None


def summarize(runs: dict[str, list[dict]], best_phi: float) -> dict[str, dict]:
    """Per method: final Phi mean/std over seeds, gap to the global best, samples to within 1%, seconds."""
    threshold = best_phi + 0.01 * abs(best_phi)
    out = {}
    for method, seeds in runs.items():
        phis = np.array([r["phi"] for r in seeds])
        reach = [samples_to_reach(r, threshold) for r in seeds]
        hit = [n for n in reach if n is not None]
        out[method] = {
            "phi_mean": float(phis.mean()), "phi_std": float(phis.std()),
            "gap_mean": float(phis.mean() - best_phi),
            "phi_tau_mean": float(np.mean([r["phi_tau"] for r in seeds])),
            "samples_to_1pct_median": float(np.median(hit)) if hit else None,
            "seeds_reaching_1pct": len(hit), "n_seeds": len(seeds),
            "samples_mean": float(np.mean([r["samples"] for r in seeds])),
            "seconds_mean": float(np.mean([r["seconds"] for r in seeds])),
        }
    return out


def format_table(summary: dict[str, dict], best_phi: float) -> str:
    lines = [
        f"Global best Phi = {best_phi:.4f}; 'to 1%' = samples until Phi <= best + 1% |best| (median over the seeds that reach it)",
        "| method | final Phi (mean +- std) | gap to best | to 1% (samples) | samples used | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        reach = "never" if s["samples_to_1pct_median"] is None else f"{s['samples_to_1pct_median']:.3g}"
        reach += f" ({s['seeds_reaching_1pct']}/{s['n_seeds']} seeds)"
        lines.append(f"| {method} | {s['phi_mean']:.4f} +- {s['phi_std']:.4f} | {s['gap_mean']:.4f} | {reach} | "
                     f"{s['samples_mean']:.3g} | {s['seconds_mean']:.1f} |")
    return "\n".join(lines)


def save_instance(problem: GoalProblem, runs: dict[str, list[dict]], path: Path) -> None:
    """The instance as plain arrays, enough to recompute Phi without this package. Per method the
    unsuffixed keys hold seed 0; ``_seed<k>`` keys hold every seed."""
    arrays = {
        "P": problem.mdp.P, "rho": problem.mdp.rho, "gamma": np.float64(problem.mdp.gamma),
        "designer_cost": problem.designer_cost, "coords": problem.grid.coords,
        "hazard": problem.grid.hazard, "target": problem.grid.target, "wall": problem.grid.wall,
    }
    for method, seeds in runs.items():
        for r in seeds:
            x = np.asarray(r["x"])
            reward, cost = problem.reward(x), np.float64(problem.placement_cost(x))
            arrays[f"reward_final_{method}_seed{r['seed']}"] = reward
            arrays[f"placement_cost_{method}_seed{r['seed']}"] = cost
            arrays[f"x_final_{method}_seed{r['seed']}"] = x
            if r["seed"] == seeds[0]["seed"]:
                arrays[f"reward_final_{method}"], arrays[f"placement_cost_{method}"] = reward, cost
    np.savez(path, **arrays)


def run_recipe(cfg: GridWorldConfig) -> dict:
    """Run every method on every seed, write the outputs, return the results dict."""
    cfg.validate()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    problem = build_problem(cfg)
    x0 = initial_x(problem, cfg)
    t0 = time.perf_counter()
    search = global_search(problem, step=cfg.search_step, refine_step=cfg.search_refine_step)
    search_seconds = time.perf_counter() - t0
    runs: dict[str, list[dict]] = {}
    bar = tqdm(total=len(cfg.methods) * cfg.seeds, desc="gridworld", disable=not cfg.progress)
    for method in cfg.methods:
        runs[method] = []
        for seed in range(cfg.seeds):
            bar.set_postfix_str(f"{method} seed {seed}")
            if method in ("exact", "exact_decay") and seed > 0:
                # deterministic (no sampling): identical on every seed, computed once
                result = RunResult(**{**runs[method][0], "x": np.asarray(runs[method][0]["x"]), "seed": seed})
            else:
                result = run_method(problem, cfg, method, seed)
            runs[method].append(result.to_dict())
            bar.update(1)
    bar.close()
    summary = summarize(runs, search["phi"])
    results = {
        "config": dataclasses.asdict(cfg),
        "global_best": {"phi": search["phi"], "x": np.asarray(search["x"]).tolist(), "method": search["method"],
                        "seconds": search_seconds},
        "phi_start": float(problem.phi(x0)), "phi_tau0_start": float(problem.phi(x0, cfg.tau_init)),
        "x0": x0.tolist(),
        "notes": {
            "phi": "exact Phi(x_final), tau = 0: hard value iteration with uniform tie-breaking",
            "phi_tau": "exact Phi_tau(x_final) at the method's final tau (tau_final)",
            "samples": "environment transitions; exact uses the model and spends none",
            "exact": "exact and exact_decay are deterministic: computed once and repeated for every seed",
            "instance.npz": "unsuffixed per-method keys hold seed 0; _seed<k> keys hold every seed",
        },
        "runs": runs,
        "summary": summary,
    }
    with open(out / "results.json", "w") as fh:
        json.dump(results, fh, indent=1)
    save_instance(problem, runs, out / "instance.npz")
    plot_curves(runs, search["phi"], results["phi_start"], str(out / "curves.png"))
    finals = {"start": x0, "global best": np.asarray(search["x"])}
    finals.update({m: np.asarray(seeds[0]["x"]) for m, seeds in runs.items()})
    plot_heatmaps(problem, finals, str(out / "heatmap.png"))
    table = format_table(summary, search["phi"])
    (out / "table.md").write_text(table + "\n")
    print(table)
    return results


def cli(argv: list[str] | None = None) -> None:
    """Console entry point: ``bilevel-gridworld --config FILE --output_dir DIR [--field value ...]``."""
    run_recipe(parse_args(argv))


if __name__ == "__main__":
    cli()
