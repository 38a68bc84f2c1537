"""Methods side by side on the exact multi-token testbed: `BilevelTrainer` runs, scored by the exact Phi_tau.

Every run trains a real tiny GPT-2 (critics, GAE and the token-level KL in play) against a table reward r_x over the
85 completions, with soft oracle labels. At the end it reports the exact Phi_tau(x) of the learned x, the oracle's
win rate and mean score of pi*_tau(x), and each actor's exact KL to its target (phi and the one-actor theta:
pi*_tau(x); the penalized theta: its penalized optimum). Results go to a JSON file, one record per run, written
after each run (an interrupted sweep keeps what it finished).

    python scripts/testbed_compare.py --methods single_loop partial_sgd covariance --objectives preference_nll \
        --seeds 0 1 2 3 4 --iterations 300 --out outputs/testbed_compare.json

With ``--panel N`` the methods run instead on N instances drawn from ``--panel_seed`` (`bilevel_rlhf.panel`: the
reference's peakedness, the score table, tau, the vocabulary and length, the objective vary; one setting for all),
and the summary reports per method the fraction of runs that end below `partial_sgd`'s run on the same instance and
seed, the mean gap to the best known Phi_tau, the failures (collapsed actors, lost tracking) and the time. A method
may carry config overrides: ``single_loop@phi_resync=true``. ``--resume`` skips the runs already in ``--out``.
``--trace_every K`` also records, every K iterations of each run, the exact Phi_tau of x and theta's exact entropy,
its target's and its KL to it (the record's ``"trace"``, printed as it goes).

    python scripts/testbed_compare.py --panel 24 --seeds 0 1 2 --iterations 150 \
        --methods partial_sgd covariance single_loop penalized_covariance --out outputs/panel.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import numpy as np
import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback

from bilevel_rlhf import BilevelConfig, BilevelTrainer
from bilevel_rlhf import panel, testbed
from bilevel_rlhf.config import PENALIZED_THETA_METHODS, PENALTY_METHODS


def run(method: str, objective: str, seed: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    tok = testbed.make_tokenizer()
    policy = testbed.make_policy(seed=args.problem_seed)
    problem = testbed.MultiTokenProblem.from_policy(policy, seed=args.problem_seed)
    reward = testbed.TableReward()
    with tempfile.TemporaryDirectory() as out:
        config = BilevelConfig(
            output_dir=out, method=method, objective=objective, objective_weight=args.weight, seed=seed,
            per_device_train_batch_size=2 * args.prompts, num_generations=2, max_completion_length=3, max_prompt_length=2,
            tau_init=args.tau, tau_schedule=args.tau_schedule, tau_min=args.tau_min, tau_decay_rate=args.tau_decay_rate,
            tau_horizon=args.tau_horizon, penalty_lambda=args.penalty_lambda,
            penalty_lambda_schedule=args.penalty_lambda_schedule, penalty_lambda_growth=args.penalty_lambda_growth,
            penalty_lambda_horizon=args.penalty_lambda_horizon,
            actor_learning_rate=args.actor_lr, critic_learning_rate=args.critic_lr, reward_learning_rate=args.reward_lr,
            max_steps=args.iterations, common_random_numbers=args.crn and method != "covariance",
            use_cpu=True, report_to="none", disable_tqdm=True, logging_steps=10**9, save_strategy="no",
            vf_coef=0.1, gamma=1.0, lam=0.95,
        )
        trainer = BilevelTrainer(policy, reward, problem.oracle(), config,
                                 Dataset.from_dict({"prompt": [testbed.PROMPT] * args.prompts}), processing_class=tok)
        trainer.remove_callback(PrinterCallback)  # one line per run is printed below instead
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    x = reward.x.detach().double().numpy()
    x = x - x.mean()
    obj = dict(objective=objective, weight=args.weight)
    tau_end = trainer.schedule(args.iterations - 1)[0]  # the lower level's tau at the last iteration
    eval_tau = args.eval_tau if args.eval_tau is not None else args.tau
    pi_star = problem.soft_optimal_policy(x, tau_end)
    record = {
        "method": method, "objective": objective, "seed": seed, "iterations": args.iterations,
        "queries": trainer.oracle_queries, "seconds": round(seconds, 1), "tau_end": tau_end, "eval_tau": eval_tau,
        "phi_tau": problem.phi_tau(x, eval_tau, **obj),
        "win_rate": problem.oracle_win_rate(pi_star), "mean_score": problem.expected_score(pi_star),
        "kl_theta_to_pi_star": problem.kl(problem.policy_distribution(trainer.model.policy_theta), pi_star),
    }
    if trainer.model.policy_phi is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target = problem.penalized_policy(x, trainer.schedule(args.iterations - 1)[1], tau_end, **obj)
        record["kl_phi_to_pi_star"] = problem.kl(problem.policy_distribution(trainer.model.policy_phi), pi_star)
        record["kl_theta_to_penalized"] = problem.kl(problem.policy_distribution(trainer.model.policy_theta), target)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["single_loop", "partial_sgd", "covariance"])
    p.add_argument("--objectives", nargs="+", default=["preference_nll", "win_rate"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--prompts", type=int, default=64, help="prompts per iteration (2 completions each)")
    p.add_argument("--tau", type=float, default=0.5, help="tau_init")
    p.add_argument("--tau_schedule", default="constant", choices=["constant", "polynomial", "exponential"])
    p.add_argument("--tau_min", type=float, default=0.0)
    p.add_argument("--tau_decay_rate", type=float, default=0.5)
    p.add_argument("--tau_horizon", type=float, default=10.0)
    p.add_argument("--eval_tau", type=float, default=None, help="tau of the reported exact Phi_tau (default: --tau)")
    p.add_argument("--penalty_lambda", type=float, default=2.0)
    p.add_argument("--penalty_lambda_schedule", default="constant", choices=["constant", "polynomial"])
    p.add_argument("--penalty_lambda_growth", type=float, default=0.5)
    p.add_argument("--penalty_lambda_horizon", type=float, default=10.0)
    p.add_argument("--weight", type=float, default=0.1, help="objective_weight of win_rate")
    p.add_argument("--actor_lr", type=float, default=3e-3)
    p.add_argument("--critic_lr", type=float, default=1e-2)
    p.add_argument("--reward_lr", type=float, default=1e-2)
    p.add_argument("--crn", action=argparse.BooleanOptionalAction, default=True,
                   help="coupled sampling for the two-actor methods")
    p.add_argument("--problem_seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/testbed_compare.json")
    p.add_argument("--panel", type=int, default=0, help="run on this many instances drawn by --panel_seed")
    p.add_argument("--panel_seed", type=int, default=0)
    p.add_argument("--instances", type=int, nargs="+", default=None,
                   help="--panel: run only these instances of the drawn panel (by index)")
    p.add_argument("--resume", action="store_true", help="--panel: skip the runs already in --out")
    p.add_argument("--trace_every", type=int, default=0,
                   help="--panel: every this many iterations record Phi_tau and theta's entropy and KL to pi*_tau(x)")
    p.add_argument("--baseline", default="partial_sgd",
                   help="--panel: the method every run is compared with (one of --methods, with its overrides)")
    args = p.parse_args()
    if args.trace_every < 0 or (args.trace_every and not args.panel):
        raise SystemExit(f"--trace_every: expected an int >= 0, with --panel; got {args.trace_every}")
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.panel:
        return main_panel(args)
    problem = testbed.MultiTokenProblem.from_policy(testbed.make_policy(seed=args.problem_seed), seed=args.problem_seed)
    reference = {}
    eval_tau = args.eval_tau if args.eval_tau is not None else args.tau
    for objective in args.objectives:
        obj = dict(objective=objective, weight=args.weight)
        x_fp = problem.partial_sgd_fixed_point(args.tau, **obj)
        reference[objective] = {"phi_tau_at_x0": problem.phi_tau(np.zeros(len(problem.scores)), eval_tau, **obj),
                                "phi_tau_at_partial_sgd_fixed_point": problem.phi_tau(x_fp, eval_tau, **obj)}
        print(objective, {k: round(v, 4) for k, v in reference[objective].items()}, flush=True)
    records = []
    for objective in args.objectives:
        for method in args.methods:
            for seed in args.seeds:
                rec = run(method, objective, seed, args)
                records.append(rec)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
                with open(args.out + ".tmp", "w") as fh:
                    json.dump({"settings": vars(args), "reference": reference, "runs": records}, fh, indent=1)
                os.replace(args.out + ".tmp", args.out)
    print(f"\nmean exact Phi_tau (tau = {eval_tau}) over seeds:")
    for objective in args.objectives:
        for method in args.methods:
            vals = [r["phi_tau"] for r in records if r["method"] == method and r["objective"] == objective]
            print(f"  {objective:15s} {method:12s} {np.mean(vals):.4f} +- {np.std(vals):.4f}  ({len(vals)} seeds)")


def parse_method(spec: str) -> tuple[str, dict]:
    """"name@field=value,field=value" -> (name, overrides); values are JSON (true, 0.1, "x") or plain strings."""
    name, _, rest = spec.partition("@")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--methods: {spec!r}: expected name@field=value[,field=value...], got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


class ExactTrace(TrainerCallback):
    """Every `every` iterations: the exact Phi_tau of x, and theta's exact entropy, its target pi*_tau(x)'s entropy
    and the KL between them (`rows`, printed as they come)."""

    def __init__(self, problem, reward, spec: panel.InstanceSpec, weight: float, every: int, policy, label: str):
        self.problem, self.reward, self.spec, self.weight, self.every = problem, reward, spec, weight, every
        self.policy, self.label, self.rows = policy, label, []  # policy: () -> theta's module

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return
        x = self.reward.x.detach().double().numpy()
        x = x - x.mean()
        target = self.problem.soft_optimal_policy(x, self.spec.tau)
        dist = self.problem.policy_distribution(self.policy())
        row = {"iteration": state.global_step,
               "phi_tau": self.problem.phi_tau(x, self.spec.tau, objective=self.spec.objective, weight=self.weight),
               "theta_entropy": entropy(dist), "target_entropy": entropy(target),
               "theta_kl_to_target": self.problem.kl(dist, target),
               "theta_top": np.sort(dist)[::-1][:3].tolist(), "target_top": np.sort(target)[::-1][:3].tolist()}
        self.rows.append(row)
        print(f"    {self.label} it {row['iteration']:4d}: Phi_tau {row['phi_tau']:.4f}, theta's entropy "
              f"{row['theta_entropy']:.3f} (pi*_tau(x): {row['target_entropy']:.3f}), KL {row['theta_kl_to_target']:.3f}, "
              f"top probabilities {np.round(row['theta_top'], 3)} ({np.round(row['target_top'], 3)})", flush=True)


def entropy(p: np.ndarray) -> float:
    """Entropy (nats) of a distribution given by its probabilities (zeros allowed)."""
    with np.errstate(divide="ignore"):
        return panel.entropy(np.log(p))


def run_panel_instance(spec: panel.InstanceSpec, method: str, seed: int, args: argparse.Namespace) -> dict:
    """One run of `method` (with overrides) on a panel instance: the exact Phi_tau of the learned x, and the actors'
    exact entropies and KLs to their targets at the end; the trainer's guard record."""
    name, overrides = parse_method(method)
    policy, problem = panel.build_instance(spec)
    torch.manual_seed(seed)
    C, L = spec.num_content, spec.max_length
    reward = testbed.TableReward(num_content=C, max_length=L)
    obj = dict(objective=spec.objective, weight=args.weight)
    with tempfile.TemporaryDirectory() as out:
        settings = dict(
            output_dir=out, method=name, objective=spec.objective, objective_weight=args.weight, seed=seed,
            per_device_train_batch_size=2 * args.prompts, num_generations=2, max_completion_length=L,
            max_prompt_length=2, tau_init=spec.tau, tau_schedule="constant", penalty_lambda=args.penalty_lambda,
            actor_learning_rate=args.actor_lr, critic_learning_rate=args.critic_lr, reward_learning_rate=args.reward_lr,
            max_steps=args.iterations, common_random_numbers=args.crn and name in PENALTY_METHODS,  # two actors
            use_cpu=True, report_to="none", disable_tqdm=True, logging_steps=10**9, save_strategy="no",
            vf_coef=0.1, gamma=1.0, lam=0.95,
        )
        settings.update(overrides)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = BilevelConfig(**settings)
            trainer = BilevelTrainer(policy, reward, problem.oracle(), config,
                                     Dataset.from_dict({"prompt": [testbed.PROMPT] * args.prompts}),
                                     processing_class=testbed.make_tokenizer(C))
            trainer.remove_callback(PrinterCallback)
            trace = None
            if getattr(args, "trace_every", 0):
                trace = ExactTrace(problem, reward, spec, args.weight, args.trace_every,
                                   lambda: trainer.model.policy_theta, f"{method} seed {seed}")
                trainer.add_callback(trace)
            t0 = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - t0
    x = reward.x.detach().double().numpy()
    x = x - x.mean()
    pi_star = problem.soft_optimal_policy(x, spec.tau)
    record = {"instance": spec.index, "method": method, "seed": seed, "iterations": args.iterations,
              "queries": trainer.oracle_queries, "seconds": round(seconds, 1),
              "phi_tau": problem.phi_tau(x, spec.tau, **obj), "guard": trainer.guard.record.state_dict(),
              "warnings": sorted({type(w.message).__name__ for w in caught
                                  if type(w.message).__name__ in ("TrackingWarning", "CollapseWarning")})}
    kept = [h["exploration/effective_sample_fraction"] for h in trainer.state.log_history
            if "exploration/effective_sample_fraction" in h]  # logged rollouts only: logging_steps=1 for all
    if trace is not None:
        record["trace"] = trace.rows
    if kept:
        record["effective_sample_fraction"] = {"mean": float(np.mean(kept)), "min": float(np.min(kept))}
    targets = {"theta": pi_star}
    if name in PENALIZED_THETA_METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the run's own lambda at its last iteration: a method's override and schedule, not --penalty_lambda
            _, lam = trainer.schedule(args.iterations - 1)
            try:
                targets["theta"] = problem.penalized_policy(x, lam, spec.tau, **obj)
            except RuntimeError as err:  # lam * tau small: the penalized objective has no maximum where Newton ends
                # scored against pi*_tau(x), the penalized optimum's lambda -> infinity limit, and said so
                record["theta_target_note"] = f"pi*_tau(x): {err}"
    if trainer.model.policy_phi is not None:
        targets["phi"] = pi_star
    collapsed = []
    for role, target in targets.items():
        dist = problem.policy_distribution(getattr(trainer.model, f"policy_{role}"))
        h, h_target, kl = entropy(dist), entropy(target), problem.kl(dist, target)
        record[f"{role}_entropy"], record[f"{role}_target_entropy"], record[f"{role}_kl_to_target"] = h, h_target, kl
        if h < 0.25 * h_target and kl > 0.5:  # onto a few completions its target does not concentrate on
            collapsed.append(role)
    record["collapsed"] = collapsed
    return record


def instance_reference(spec: panel.InstanceSpec, weight: float) -> dict:
    """Exact Phi_tau at x = 0, at partial_sgd's fixed point and at the bilevel optimum (a local one: Newton from
    two starts; the summary's best known value is the smallest of it, the fixed point's and every run's end)."""
    _, problem = panel.build_instance(spec)
    obj = dict(objective=spec.objective, weight=weight)
    n = len(problem.scores)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed_point = problem.phi_tau(problem.partial_sgd_fixed_point(spec.tau, **obj), spec.tau, **obj)
        optimum = problem.phi_tau(problem.exact_optimum(spec.tau, **obj), spec.tau, **obj)
    return {**spec.as_dict(), "phi_tau_at_x0": problem.phi_tau(np.zeros(n), spec.tau, **obj),
            "phi_tau_at_partial_sgd_fixed_point": fixed_point, "phi_tau_at_optimum": optimum,
            "phi_tau_best": min(optimum, fixed_point),
            "ref_entropy": panel.entropy(problem.log_pi_ref)}


def summarize_panel(references: list[dict], records: list[dict], methods: list[str],
                    baseline: str = "partial_sgd") -> list[dict]:
    """Per method: wins against the baseline's run (partial_sgd's by default) on the same instance and seed, the gap
    to the best known Phi_tau, the failures and the time."""
    ref = {r["index"]: dict(r) for r in references}
    for r in records:  # a run may end below the Newton optimum (a local one): the best known is the lowest seen
        ref[r["instance"]]["phi_tau_best"] = min(ref[r["instance"]]["phi_tau_best"], r["phi_tau"])
    psgd = {(r["instance"], r["seed"]): r["phi_tau"] for r in records if r["method"] == baseline}
    rows = []
    for method in methods:
        runs = [r for r in records if r["method"] == method]
        if not runs:
            continue
        paired = [r for r in runs if (r["instance"], r["seed"]) in psgd]
        below = [r["phi_tau"] < psgd[r["instance"], r["seed"]] for r in paired]
        # a tie: within 2% of what the instance allows to gain (Phi_tau at x = 0 minus the best known)
        tol = {i: 0.02 * max(ref[i]["phi_tau_at_x0"] - ref[i]["phi_tau_best"], 1e-12) for i in ref}
        not_worse = [r["phi_tau"] <= psgd[r["instance"], r["seed"]] + tol[r["instance"]] for r in paired]
        gaps = [r["phi_tau"] - ref[r["instance"]]["phi_tau_best"] for r in runs]
        closed = [(ref[r["instance"]]["phi_tau_at_x0"] - r["phi_tau"])
                  / max(ref[r["instance"]]["phi_tau_at_x0"] - ref[r["instance"]]["phi_tau_best"], 1e-12) for r in runs]
        rows.append({
            "method": method, "runs": len(runs),
            "below_baseline": float(np.mean(below)) if below else float("nan"),
            "not_worse_than_baseline": float(np.mean(not_worse)) if not_worse else float("nan"),
            "mean_gap_to_best": float(np.mean(gaps)), "median_fraction_of_gain": float(np.median(closed)),
            "collapsed_runs": sum(bool(r["collapsed"]) for r in runs),
            "lost_tracking_runs": sum(r["guard"]["longest_streak"] >= 10 for r in runs),
            "phi_resyncs": sum(r["guard"]["phi_resyncs"] for r in runs),
            "mean_seconds": float(np.mean([r["seconds"] for r in runs])),
        })
    return rows


def print_panel_table(rows: list[dict], iterations: int, n_instances: int, seeds: list[int],
                      baseline: str = "partial_sgd") -> None:
    print(f"\npanel: {n_instances} instances x {len(seeds)} seeds, {iterations} iterations per run")
    print(f"| method | runs | below {baseline} | within 2% of {baseline} or below | mean gap to best Phi_tau "
          "| median fraction of the gain | collapsed runs | lost-tracking runs (>= 10 in a row) | phi resyncs | s/run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['runs']} | {r['below_baseline']:.2f} | {r['not_worse_than_baseline']:.2f} "
              f"| {r['mean_gap_to_best']:.4f} | {r['median_fraction_of_gain']:.2f} | {r['collapsed_runs']} "
              f"| {r['lost_tracking_runs']} | {r['phi_resyncs']} | {r['mean_seconds']:.1f} |")


def main_panel(args: argparse.Namespace) -> None:
    specs = panel.draw_panel(args.panel, args.panel_seed)
    if args.instances is not None:
        bad = sorted(set(args.instances) - {s.index for s in specs})
        if bad:
            raise SystemExit(f"--instances: {bad} not in the panel's indices 0-{len(specs) - 1}")
        specs = [s for s in specs if s.index in set(args.instances)]
    state = {"references": [], "runs": []}
    if args.resume and os.path.isfile(args.out):
        with open(args.out) as fh:
            state = json.load(fh)
    done = {(r["instance"], r["method"], r["seed"]) for r in state["runs"]}
    have_ref = {r["index"] for r in state["references"]}

    def save() -> None:
        with open(args.out + ".tmp", "w") as fh:
            json.dump({"settings": vars(args), **state}, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)

    for spec in specs:
        if spec.index not in have_ref:
            state["references"].append(instance_reference(spec, args.weight))
            save()
        ref = next(r for r in state["references"] if r["index"] == spec.index)
        print(f"{spec.name}: Phi_tau at x0 {ref['phi_tau_at_x0']:.4f}, partial_sgd fixed point "
              f"{ref['phi_tau_at_partial_sgd_fixed_point']:.4f}, best {ref['phi_tau_best']:.4f}", flush=True)
        for seed in args.seeds:
            for method in args.methods:
                if (spec.index, method, seed) in done:
                    continue
                rec = run_panel_instance(spec, method, seed, args)
                state["runs"].append(rec)
                save()
                print(f"  {method:40s} seed {seed}: Phi_tau {rec['phi_tau']:.4f} collapsed {rec['collapsed']} "
                      f"resyncs {rec['guard']['phi_resyncs']} {rec['seconds']:.1f}s", flush=True)
    rows = summarize_panel(state["references"], state["runs"], args.methods, args.baseline)
    print_panel_table(rows, args.iterations, len(specs), args.seeds, args.baseline)


if __name__ == "__main__":
    main()
