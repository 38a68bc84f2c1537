"""Methods side by side on the exact multi-token testbed: `BilevelTrainer` runs, scored by the exact Phi_tau.

Every run trains a real tiny GPT-2 (critics, GAE and the token-level KL in play) against a table reward r_x over the
85 completions, with soft oracle labels. At the end it reports the exact Phi_tau(x) of the learned x, the oracle's
win rate and mean score of pi*_tau(x), and each actor's exact KL to its target (phi and the one-actor theta:
pi*_tau(x); the penalized theta: its penalized optimum). Results go to a JSON file, one record per run, written
after each run (an interrupted sweep keeps what it finished).

    python scripts/testbed_compare.py --methods single_loop partial_sgd covariance --objectives preference_nll \
        --seeds 0 1 2 3 4 --iterations 300 --out outputs/testbed_compare.json
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
from transformers import PrinterCallback

from bilevel_rlhf import BilevelConfig, BilevelTrainer
from bilevel_rlhf import testbed


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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
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


if __name__ == "__main__":
    main()
