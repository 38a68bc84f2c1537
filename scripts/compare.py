"""Compare the bilevel methods with TRL's OnlineDPO and RLOO on the happy-tweet task (or any task of the generic
recipe), same oracle budget and seeds.

    python scripts/compare.py                              # 1 seed, defaults of recipes/happy_tweet/config.yaml
    python scripts/compare.py --seeds 0 1 2 --queries 1600 --output_dir outputs/compare
    python scripts/compare.py --methods single_loop rloo -- --actor_learning_rate 1e-4   # recipe overrides
    python scripts/compare.py --recipe generic --config recipes/movie_reviews/config.yaml \
        --methods penalized_covariance partial_sgd online_dpo --seeds 0 1 2 --queries 1600 --eval_every_queries 160

With `--recipe generic` the runs use the generic recipe (`bilevel-rlhf`) and its config's prompts, model and human,
and every method is judged by the evaluation protocol (`--eval_every_queries`, then scripts/protocol_report.py).

Each bilevel method runs the recipe (`python -m bilevel_rlhf.happy_tweet.recipe`, one subprocess per run) once per
objective in `--objectives`, with `max_steps` set so that it uses `--queries` oracle queries. Every run labels one
pair per prompt and iteration: preference_nll runs get `--num_generations 2` (theta's two completions form the
pair), win_rate runs `--num_generations 1` (theta's completion against one of the initial policy); overrides after
`--` come later and win. Runs are named METHOD-seedS, or METHOD_win_rate-seedS. The reference point is TRL's
`RLOOTrainer` optimizing the VADER compound score directly (reward function = the oracle's score):
an oracle-reward upper bound, not a bilevel method; its "queries" are scored completions (each one scalar score,
more information than one pairwise label). It uses the same model, prompts, completion length, temperature,
learning rate (the actor's), completions per prompt (2), PPO epochs (`num_iterations`) and mini-batches
(`steps_per_generation`) as the bilevel runs, and `--rloo_beta` as its KL coefficient. Runs whose summary.json says
"completed" are skipped, so an interrupted comparison continues where it stopped. Finally every run is evaluated
(scripts/evaluate_happy_tweet.py) into OUTPUT_DIR/eval: results.json, results.md, oracle_curve.png.
TRL's OnlineDPO (`trl.experimental.online_dpo`) is what a TRL user with a pairwise human runs: it scores two
completions per prompt with the oracle's score, makes the higher one the chosen one, and counts one query per pair.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
BILEVEL_METHODS = ("single_loop", "fixed_tau", "partial_sgd", "nested_loop", "covariance", "penalized_covariance")
OBJECTIVES = ("preference_nll", "win_rate")
METHODS = BILEVEL_METHODS + ("rloo", "online_dpo")
TRL_METHODS = ("rloo", "online_dpo")


class Task:
    """What the comparison needs from a recipe: its module, arguments, policy path, prompts and human. `happy_tweet`
    is the happy-tweet recipe; `generic` the generic recipe (`bilevel-rlhf`: your prompts, model and human)."""

    def __init__(self, recipe: str = "happy_tweet"):
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
        self.recipe = recipe
        self.module = "bilevel_rlhf.happy_tweet.recipe" if recipe == "happy_tweet" else "bilevel_rlhf.recipe"

    def parse(self, config: str, overrides: list[str]):
        from importlib import import_module

        return import_module(self.module).make_parser().parse_args_and_config(["--config", config] + overrides)

    def model_path(self, script_args, model_args) -> str:
        from bilevel_rlhf.happy_tweet.recipe import resolve_model_path

        return resolve_model_path(model_args.model_name_or_path, getattr(script_args, "model_cache_dir", None))

    def train_prompts(self, script_args):
        if self.recipe == "generic":
            from bilevel_rlhf.recipe import load_prompts

            return load_prompts(script_args)[0]
        from bilevel_rlhf.happy_tweet.data import load_prompt_dataset

        return load_prompt_dataset("train", script_args.n_prompt_words, script_args.eval_fraction,
                                   script_args.tweets_path).select_columns(["prompt"])

    def oracle(self, script_args, seed: int):
        if self.recipe == "generic":
            from bilevel_rlhf.humans import load_human

            return load_human(script_args.human, seed if script_args.human_seed is None else script_args.human_seed)
        from bilevel_rlhf.happy_tweet.recipe import make_oracle

        return make_oracle(script_args, seed)

    def protocol_prompts(self, script_args) -> list[str]:
        if self.recipe == "generic":
            from bilevel_rlhf.recipe import load_prompts

            return list(load_prompts(script_args)[1]["prompt"][: script_args.eval_protocol_prompts])
        from bilevel_rlhf.happy_tweet.recipe import protocol_prompts

        return protocol_prompts(script_args)


RECIPES = ("happy_tweet", "generic")
TASK = Task()  # set by main's --recipe


def parse_recipe_args(config: str, overrides: list[str]):
    return TASK.parse(config, overrides)


def completed(run_dir: Path, queries: int) -> bool:
    """Whether run_dir holds a completed run that used `queries` oracle queries (else it is run again)."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    s = json.loads(summary.read_text())
    return s.get("status") == "completed" and s.get("oracle_queries") == queries


# every run labels one pair per prompt and iteration, whatever the YAML's objective: theta's two completions
# (preference_nll), or one theta completion against one of the reference (win_rate); the micro-batch (completions
# per actor) grows with the completions per prompt, so both objectives see the YAML's prompts per iteration.
# Overrides after `--` win.
GENERATIONS = {"preference_nll": 2, "win_rate": 1}


def objective_args(objective: str, config: str) -> list[str]:
    import yaml

    yaml_args = yaml.safe_load(Path(config).read_text())
    prompts = yaml_args["per_device_train_batch_size"] // yaml_args.get("num_generations", 1)  # per micro-batch
    n = GENERATIONS[objective]
    return ["--objective", objective, "--num_generations", str(n), "--per_device_train_batch_size", str(prompts * n)]


def run_bilevel(method: str, objective: str, seed: int, max_steps: int, run_dir: Path, config: str,
                overrides: list[str], eval_steps: int = 0) -> None:
    cmd = [sys.executable, "-m", TASK.module, "--config", config, *objective_args(objective, config),
           *overrides, "--method", method, "--objective", objective, "--seed", str(seed), "--max_steps", str(max_steps),
           "--output_dir", str(run_dir), "--save_strategy", "no", "--report_to", "none",
           "--eval_protocol_steps", str(eval_steps)]
    print("+ " + " ".join(cmd), flush=True)
    # the caller's folder: relative paths of the config (data, output, a module:callable human) mean the same as for
    # the in-process TRL runs; the repository stays importable without an install
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run(cmd, check=True, env=env)


class CountingScore:
    """A TRL reward function: the oracle's score of each completion, counting queries: scored completions (RLOO), or
    pairs (OnlineDPO, which scores two completions per prompt to pick the chosen one: `per=2`)."""

    def __init__(self, oracle, per: int = 1):
        self.oracle, self.queries, self.curve, self.per = oracle, 0, [], per
        self.__name__ = f"{oracle.name}_score"

    def __call__(self, prompts, completions, **kwargs):
        scores = self.oracle.score(list(prompts), list(completions))
        self.queries += len(completions) // self.per
        self.curve.append({"oracle/queries": float(self.queries), "oracle/score_theta": float(sum(scores) / len(scores))})
        return scores


def _run_trl(method: str, trainer_cls, trl_args, reward: CountingScore, seed: int, run_dir: Path, script_args, a,
             model_args, t0: float, note: str, eval_steps: int = 0, **extra) -> None:
    """Train a TRL baseline from the recipe's model on the recipe's prompts, save it, and write its summary.json.
    `eval_steps` > 0: the evaluation protocol every that many steps, against the recipe's model as the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bilevel_rlhf.eval_callback import OracleEvalCallback
    from bilevel_rlhf.recipe import SUMMARY_NAME

    path = TASK.model_path(script_args, model_args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    prompts = TASK.train_prompts(script_args)
    trainer = trainer_cls(model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=[reward], args=trl_args,
                          train_dataset=prompts, processing_class=tokenizer)
    if eval_steps > 0:
        trainer.add_callback(OracleEvalCallback(  # its own oracle instance and frozen pi_0: evaluation stays apart
            trainer, TASK.protocol_prompts(script_args), eval_steps, oracle=TASK.oracle(script_args, seed),
            ref_model=AutoModelForCausalLM.from_pretrained(path).to(trainer.accelerator.device).eval(),
            train_queries=lambda: reward.queries, num_samples=script_args.eval_protocol_samples))
    trainer.train()
    trainer.save_model(str(run_dir))
    summary = {"status": "completed", "method": method, "seed": seed,
               "oracle": getattr(script_args, "oracle", None) or getattr(script_args, "human", None),
               "model_name_or_path": path, "oracle_queries": reward.queries, "seconds": round(time.time() - t0, 1),
               "global_step": trainer.state.global_step, **extra, "oracle_curve": reward.curve,
               "log_history": trainer.state.log_history, "note": note}
    (run_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=1, default=str))


def run_rloo(seed: int, queries: int, run_dir: Path, config: str, overrides: list[str], beta: float,
             eval_every: int = 0) -> None:
    """TRL RLOO on the oracle's score with the bilevel runs' sampling and optimization settings."""
    from trl import RLOOConfig, RLOOTrainer

    script_args, a, model_args = parse_recipe_args(config, [*objective_args("preference_nll", config), *overrides])
    t0 = time.time()
    iterations = max(1, queries // (a.per_device_train_batch_size * a.steps_per_generation))
    args = RLOOConfig(  # the same counting as BilevelConfig: completions per micro-batch, micro-batches per generation
        output_dir=str(run_dir), seed=seed, use_cpu=a.use_cpu, bf16=False, report_to="none", save_strategy="no",
        per_device_train_batch_size=a.per_device_train_batch_size, steps_per_generation=a.steps_per_generation,
        num_generations=a.num_generations, num_iterations=a.num_iterations,
        gradient_accumulation_steps=a.gradient_accumulation_steps, max_steps=iterations * a.steps_per_iteration,
        learning_rate=a.actor_learning_rate, lr_scheduler_type="constant", max_grad_norm=a.max_grad_norm,
        max_completion_length=a.max_completion_length, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
        epsilon=a.cliprange, beta=beta, disable_dropout=True, logging_steps=a.logging_steps,
        dataloader_num_workers=0,
    )
    per_step = a.per_device_train_batch_size * a.steps_per_generation // a.steps_per_iteration  # queries per step
    _run_trl("rloo", RLOOTrainer, args, CountingScore(TASK.oracle(script_args, seed)), seed, run_dir, script_args, a,
             model_args, t0, "queries = scored completions (one scalar oracle score each)",
             eval_steps=eval_every and max(1, eval_every // per_step), iterations=iterations, beta=beta)


def run_online_dpo(seed: int, queries: int, run_dir: Path, config: str, overrides: list[str], beta: float,
                   eval_every: int = 0) -> None:
    """TRL's OnlineDPO with the oracle's score as its reward function: two completions per prompt, the higher-scored
    one chosen; one query per pair. The same model, prompts, completion length, temperature and actor learning rate
    as the bilevel runs; `--dpo_beta` is its KL coefficient."""
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    script_args, a, model_args = parse_recipe_args(config, [*objective_args("preference_nll", config), *overrides])
    t0 = time.time()
    B = a.prompts_per_iteration  # prompts per step: one pair each
    args = OnlineDPOConfig(
        output_dir=str(run_dir), seed=seed, use_cpu=a.use_cpu, bf16=False, report_to="none", save_strategy="no",
        per_device_train_batch_size=B, max_steps=max(1, queries // B), learning_rate=a.actor_learning_rate,
        lr_scheduler_type="constant", max_grad_norm=a.max_grad_norm, max_new_tokens=a.max_completion_length,
        temperature=a.temperature, top_k=a.top_k if a.top_k > 0 else None, top_p=a.top_p, beta=[beta],
        disable_dropout=True, logging_steps=a.logging_steps, dataloader_num_workers=0,
    )
    _run_trl("online_dpo", OnlineDPOTrainer, args, CountingScore(TASK.oracle(script_args, seed), per=2), seed, run_dir,
             script_args, a, model_args, t0, "queries = pairs (two scored completions each)",
             eval_steps=eval_every and max(1, eval_every // B), beta=beta)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        default=["penalized_covariance", "nested_loop", "single_loop", "partial_sgd", "online_dpo", "rloo"])
    parser.add_argument("--objectives", nargs="+", default=["win_rate"], choices=OBJECTIVES,
                        help="upper objectives of the bilevel methods (each bilevel method runs with each)")
    parser.add_argument("--queries", type=int, default=960, help="oracle queries per run (default 960)")
    parser.add_argument("--recipe", choices=RECIPES, default="happy_tweet",
                        help="happy_tweet (default), or generic: the generic recipe (bilevel-rlhf) with --config's task, "
                             "e.g. recipes/movie_reviews/config.yaml; its runs are read with scripts/protocol_report.py")
    parser.add_argument("--config", default=None, help="the recipe's YAML (default: recipes/happy_tweet/config.yaml)")
    parser.add_argument("--output_dir", default="outputs/happy_tweet_compare")
    parser.add_argument("--rloo_beta", type=float, default=0.05, help="RLOO's KL coefficient (default 0.05)")
    parser.add_argument("--dpo_beta", type=float, default=0.1, help="OnlineDPO's KL coefficient (default 0.1)")
    parser.add_argument("--eval_prompts", type=int, default=64)
    parser.add_argument("--skip_eval", action="store_true",
                        help="train only (evaluate several invocations' runs together with scripts/evaluate_happy_tweet.py)")
    parser.add_argument("--eval_samples", type=int, default=4)
    parser.add_argument("--eval_every_queries", type=int, default=0,
                        help="run the evaluation protocol (eval_protocol.json in each run: oracle score, win rate, KL, "
                             "distinct-n and length on held-out prompts) every this many training queries, for every "
                             "method alike; 0: off (default). Then scripts/protocol_report.py draws the frontier")
    args = parser.parse_args(argv)
    global TASK
    TASK = Task(args.recipe)
    if args.config is None:
        if args.recipe != "happy_tweet":
            parser.error("--recipe generic needs --config (the task's YAML, e.g. recipes/movie_reviews/config.yaml)")
        args.config = str(ROOT / "recipes/happy_tweet/config.yaml")
    if args.recipe == "generic" and not args.skip_eval:
        args.skip_eval = True  # the final table is VADER's happy-tweet evaluation: read the protocol instead
        print("--recipe generic: no final happy-tweet evaluation; run scripts/protocol_report.py on the output folder "
              "(with --eval_every_queries > 0)", file=sys.stderr)
    if args.queries < 1:
        parser.error(f"--queries must be >= 1, got {args.queries}")
    if args.eval_every_queries < 0:
        parser.error(f"--eval_every_queries must be >= 0, got {args.eval_every_queries}")

    # the TRL baselines take the preference_nll settings: two completions per prompt
    needed = set(args.objectives) | ({"preference_nll"} if set(args.methods) & set(TRL_METHODS) else set())
    configs = {obj: parse_recipe_args(args.config, [*objective_args(obj, args.config), *overrides])[1] for obj in sorted(needed)}
    cfg = next(iter(configs.values()))
    out = Path(args.output_dir)
    runs: dict[str, str] = {}
    t0 = time.time()
    for seed in args.seeds:
        for method in args.methods:
            for objective in (args.objectives if method not in TRL_METHODS else [None]):
                c = configs[objective or "preference_nll"]
                completions = c.per_device_train_batch_size * c.steps_per_generation * c.world_size  # per actor, iteration
                # labelled pairs per iteration: theta's (2i, 2i+1), or each theta completion against the reference's
                pairs = completions if objective == "win_rate" else completions // 2
                # label_every > 1: the iterations between labelled ones cost no queries
                iterations = max(1, args.queries // pairs) * getattr(c, "label_every", 1)
                name = method if objective in (None, "preference_nll") else f"{method}_{objective}"
                run_dir = out / f"{name}-seed{seed}"
                runs[run_dir.name] = str(run_dir)
                if method == "rloo":
                    expected = max(1, args.queries // completions) * completions
                elif method == "online_dpo":
                    B = cfg.prompts_per_iteration * cfg.world_size
                    expected = max(1, args.queries // B) * B
                else:
                    expected = max(1, args.queries // pairs) * pairs
                if completed(run_dir, expected):
                    print(f"= {run_dir} already completed", flush=True)
                    continue
                if method == "rloo":
                    run_rloo(seed, args.queries, run_dir, args.config, overrides, args.rloo_beta,
                             args.eval_every_queries)
                elif method == "online_dpo":
                    run_online_dpo(seed, args.queries, run_dir, args.config, overrides, args.dpo_beta,
                                   args.eval_every_queries)
                else:
                    # labelled iterations per evaluation, as steps (query-free iterations between them count)
                    every = args.eval_every_queries and max(1, args.eval_every_queries // pairs) * getattr(c, "label_every", 1)
                    run_bilevel(method, objective, seed, iterations * c.steps_per_iteration, run_dir, args.config,
                                overrides, every * c.steps_per_iteration)
    train_seconds = time.time() - t0
    if args.skip_eval:
        print(f"training {train_seconds:.0f} s; runs: " + ", ".join(runs.values()))
        return

    from bilevel_rlhf.happy_tweet.evaluate import evaluate_runs, markdown_table, write_report

    report = evaluate_runs(runs, num_prompts=args.eval_prompts, num_samples=args.eval_samples,
                           max_new_tokens=cfg.max_completion_length, seed=0)
    report["command"] = " ".join([sys.executable, *sys.argv])
    report["seeds"], report["queries"], report["train_seconds"] = args.seeds, args.queries, round(train_seconds, 1)
    paths = write_report(report, out / "eval")
    print(markdown_table(report))
    print(f"training {train_seconds:.0f} s; written: " + ", ".join(paths.values()))


if __name__ == "__main__":
    main()
