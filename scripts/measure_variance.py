"""Variance of the reward model's gradient (the hypergradient estimate) at theta = phi, with and without coupled
sampling, on the happy-tweet model.

At the start of a run theta = phi = the initial policy, so the penalty term lambda (mean grad r_x over phi's
completions - mean over theta's) is zero in expectation; drawn independently, its sample estimate is not. This script
draws `--rollouts` rollouts at the recipe's settings (each x-step's mini-batch, as the trainer forms it) and reports
the total variance E||h - E h||^2 of x's gradient h for independent sampling, for independent sampling with four
times the completions per actor (what a larger completion count for the penalty term buys), for coupled sampling
(`common_random_numbers`), and for grad_x f alone (`partial_sgd`), and their ratios.

    python scripts/measure_variance.py --config recipes/happy_tweet/config.yaml --rollouts 32 \
        --method single_loop --objective preference_nll --num_generations 2 --per_device_train_batch_size 16 \
        --penalty_lambda 10

Arguments it does not know override the recipe's YAML (the figures of docs/algorithm.md use the line above).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def gradients(script_args, training_args, model_args, rollouts: int, seed: int) -> np.ndarray:
    """[rollouts, dim(x)]: x's gradient on the first mini-batch of `rollouts` fresh rollouts at theta = phi."""
    from bilevel_rlhf import BilevelTrainer
    from bilevel_rlhf.rollout import LossInputs
    from bilevel_rlhf.happy_tweet.data import load_prompt_dataset
    from bilevel_rlhf.happy_tweet.recipe import load_models, make_oracle

    prompts = load_prompt_dataset("train", script_args.n_prompt_words, script_args.eval_fraction,
                                  script_args.tweets_path).select_columns(["prompt"])
    models = load_models(script_args, training_args, model_args)
    trainer = BilevelTrainer(models["policy"], models["reward_model"], make_oracle(script_args, seed), training_args,
                             prompts, processing_class=models["tokenizer"],
                             reward_processing_class=models["reward_tokenizer"])
    reward = [p for p in trainer.model.reward_model.parameters() if p.requires_grad]
    B = training_args.prompts_per_iteration
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    out = []
    for _ in range(rollouts):
        rows = rng.choice(len(prompts), size=B, replace=False)
        # private on purpose: no public method returns the first mini-batch (x's step) of a fresh rollout
        trainer._micro_step = 0  # the first micro-step of an iteration: a fresh rollout, x's step
        batch = trainer._prepare_inputs([{"prompt": prompts[int(i)]["prompt"]} for i in rows])
        parts = tuple(p for group in trainer.loss_parts(batch) for p in group if p.startswith("reward/"))
        loss = trainer.compute_loss(trainer.model, LossInputs(batch, parts))
        grads = torch.autograd.grad(loss, reward)
        out.append(torch.cat([g.flatten() for g in grads]).double().numpy())
    return np.stack(out)


def total_variance(g: np.ndarray) -> float:
    return float(((g - g.mean(0)) ** 2).sum(1).mean() * len(g) / (len(g) - 1))


def main(argv: list[str] | None = None) -> dict:
    from bilevel_rlhf.happy_tweet.recipe import make_parser

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="recipes/happy_tweet/config.yaml")
    p.add_argument("--rollouts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--output", default=None, help="write the figures as JSON here")
    args, overrides = p.parse_known_args(argv)
    if args.rollouts < 2:
        p.error(f"--rollouts must be >= 2, got {args.rollouts}")
    torch.set_num_threads(args.threads)
    results = {}
    base = make_parser().parse_args_and_config(["--config", args.config, *overrides])[1]
    n, batch = base.num_generations, base.per_device_train_batch_size
    for name, extra in (("independent", ["--common_random_numbers", "false"]),
                        # more completions per actor instead of coupling: what a separate, larger completion count for
                        # the penalty term buys (here the labelled pairs grow too, which only lowers grad f's share)
                        (f"independent_{4 * n}_generations",
                         ["--common_random_numbers", "false", "--num_generations", str(4 * n),
                          "--per_device_train_batch_size", str(4 * batch)]),  # the same prompts
                        ("coupled", ["--common_random_numbers", "true"]),
                        ("grad_f_alone", ["--method", "partial_sgd"])):
        script_args, training_args, model_args = make_parser().parse_args_and_config(
            ["--config", args.config, "--report_to", "none", "--output_dir", "/tmp/measure_variance",
             "--save_strategy", "no", *overrides, *extra])
        t0 = time.perf_counter()
        g = gradients(script_args, training_args, model_args, args.rollouts, args.seed)
        results[name] = {"total_variance": total_variance(g), "mean_norm": float(np.linalg.norm(g.mean(0))),
                         "seconds": round(time.perf_counter() - t0, 1)}
        print(name, json.dumps(results[name]), flush=True)
    results["variance_ratio_independent_over_coupled"] = (results["independent"]["total_variance"]
                                                          / results["coupled"]["total_variance"])
    results["settings"] = {"config": args.config, "rollouts": args.rollouts, "seed": args.seed,
                           "threads": args.threads, "overrides": overrides,
                           "penalty_lambda": training_args.penalty_lambda}
    print(f"variance of x's gradient at theta = phi: independent / coupled = "
          f"{results['variance_ratio_independent_over_coupled']:.1f}x "
          f"(coupled / grad_f alone = {results['coupled']['total_variance'] / results['grad_f_alone']['total_variance']:.2f})")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
