"""BilevelConfig: the training arguments of the BilevelTrainer (a TrainingArguments subclass)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .validation import field_checker, warn_unless_time_scales

METHODS = ("single_loop", "fixed_tau", "partial_sgd", "nested_loop", "covariance", "penalized_covariance")
PENALTY_METHODS = ("single_loop", "fixed_tau", "nested_loop")  # two actors, theta penalized by lambda
COVARIANCE_METHODS = ("covariance", "penalized_covariance")  # one actor; x steps along the covariance form
PENALIZED_THETA_METHODS = PENALTY_METHODS + ("penalized_covariance",)  # theta's reward is r_x - g / lambda
OBJECTIVES = ("preference_nll", "win_rate")
REGULARIZATIONS = ("kl", "entropy")
TAU_SCHEDULES = ("constant", "polynomial", "exponential", "adaptive")
LAMBDA_SCHEDULES = ("constant", "polynomial")
LR_SCHEDULES = ("constant", "polynomial")
REWARD_HEAD_INITS = ("zero", "random")
VALUE_HEAD_INITS = ("zero", "random")
ADVANTAGE_ESTIMATORS = ("gae", "rloo")
KL_ESTIMATORS = ("k1", "exact")


@dataclass
class BilevelConfig(TrainingArguments):
    r"""
    Configuration of the [`BilevelTrainer`]: the single-loop penalty actor-critic of Zeng, Bhatt, Ganesh & Koppel
    (2026) for RLHF, and its baselines.

    Only the parameters specific to bilevel training are listed; see [`~transformers.TrainingArguments`] for the
    rest. Defaults that differ from `TrainingArguments`: `bf16=False`, `logging_steps=1`,
    `remove_unused_columns=False`, `save_strategy="no"`. `learning_rate` and `lr_scheduler_type` of
    `TrainingArguments` are **not used**: the three learning rates below replace them (one parameter group per role);
    setting them gives a warning. `optim` must be an AdamW (`adamw_torch` or `adamw_torch_fused`).

    Counting, in TRL's RLOO/GRPO terms: `per_device_train_batch_size` counts **completions** per actor in one
    micro-batch of one process (a multiple of `num_generations`). One *iteration* k of the paper is one generation
    (rollout) of `per_device_train_batch_size * steps_per_generation` completions per actor and process, followed by
    `num_iterations` passes over it, each of `steps_per_generation` micro-batches, `gradient_accumulation_steps` of
    them per optimizer step. `max_steps` counts optimizer steps; the schedules are functions of k.

    Parameters:
        > Method

        method (`str`, *optional*, defaults to `"penalized_covariance"`):
            `"single_loop"` (the paper's method: decaying tau, penalty actor theta, lower-level actor phi, reward step
            every iteration), `"fixed_tau"` (the same with tau_k = tau_init, `tau_schedule` ignored),
            `"partial_sgd"` (usual RLHF alternation: one actor theta on r_x, reward model stepped along grad_x f
            alone, no phi, no penalty term), `"nested_loop"` (`nested_inner_steps` lower-level iterations per
            reward-model step), `"covariance"` (the penalty's lambda -> infinity limit: one actor theta on r_x, and
            x's gradient grad_x f + (1/tau_k) Cov(grad_x r_x(y), g(y)) over theta's completions; exact where the
            regularized lower level is a Boltzmann tilt of the reference, as in KL-regularized LM fine-tuning),
            `"penalized_covariance"` (one actor theta, penalized as in the penalty methods: its reward is
            r_x(y) - g(y) / lambda_k, so it also learns from the oracle's verdicts directly; x steps along the
            covariance form over theta's completions). The default (with `penalty_lambda=1` and
            `reward_trust_region=0.5`): on the testbed panel it ends below `partial_sgd` in 82% of the runs at 120
            iterations and 89% at 240, where `single_loop` does in 33% (docs/panel.md, docs/tuning.md).
        nested_inner_steps (`int`, *optional*, defaults to `4`):
            Lower-level (actor/critic) iterations per reward-model step for `method="nested_loop"`.
        label_every (`int`, *optional*, defaults to `1`):
            The oracle labels the pairs of every `label_every`-th iteration (k = 0, label_every, ...). The iterations
            between cost no queries: they train the actors on r_x alone (theta without its -g / lambda term), and x
            does not step. Queries are the scarce resource, actor steps are not.
        objective (`str`, *optional*, defaults to `"preference_nll"`):
            The upper-level objective f (`bilevel_rlhf.objectives`): `"preference_nll"` (r_x's BT-NLL on oracle-labelled
            pairs of theta's own completions (2i, 2i+1)) or `"win_rate"` (minus the oracle's win rate of theta's
            completion i against the reference's completion i for the same prompt, plus `objective_weight` times
            r_x's BT-NLL on those pairs: one oracle query per theta completion). A custom `UpperObjective` can be
            passed to the trainer instead.
        objective_weight (`float`, *optional*, defaults to `0.1`):
            w >= 0, the BT-NLL weight of `"win_rate"`.
        common_random_numbers (`bool`, *optional*, defaults to `False`):
            theta and phi sample their completions with shared Gumbel noise (`bilevel_rlhf.sampling`): each actor's
            distribution is unchanged, and identical actors give identical completions, so the penalty term's
            sampling noise vanishes as they agree.
        tracking_tolerance (`float`, *optional*, defaults to `0.0`):
            Two-actor methods: a rollout whose penalty gap J_tau(x, phi) - J_tau(x, theta) is below
            `-tracking_tolerance` counts as one where phi has lost track (`bilevel_rlhf.guards`).
        tracking_patience (`int`, *optional*, defaults to `3`):
            After this many such rollouts in a row the trainer warns (`TrackingWarning`) and, with `phi_resync`,
            repairs phi.
        phi_resync (`bool`, *optional*, defaults to `False`):
            Repair lost tracking by copying theta's weights, value head and optimizer moments into phi.
        reward_trust_region (`float`, *optional*, defaults to `0.5`):
            delta: cap every step of x so that max_y |change of r_x(y)| / tau_k over the rollout's completions is at
            most delta (`bilevel_rlhf.trust_region`): the actors' target moves by a bounded tilt per step, whatever
            tau_k. 0 turns the cap off (as `max_grad_norm`); a cap needs `tau_init > 0`. Not applied under
            DeepSpeed, whose engine steps inside backward (a warning says so).
        hypergradient_warmup_ratio (`float`, *optional*, defaults to `0.0`):
            Covariance methods: over this fraction of the run's iterations (from `max_steps`, or from the epochs
            when `max_steps` is not set), the weight of x's covariance term rises
            linearly from 0 to 1, so that x's step goes from the partial gradient of standard RLHF (`partial_sgd`)
            to the full hypergradient estimate, which it is for the rest of the run (a continuation: the bilevel
            correction starts from where standard RLHF leads). 0: the hypergradient from the first iteration.
        exploration_temperature (`float`, *optional*, defaults to `1.0`):
            T >= 1. On a labelled iteration each of theta's completions is sampled, with probability 1/2, at
            `temperature * T` instead of `temperature`, and every estimate over theta's completions (x's loss, theta's
            policy and value losses, its advantages' whitening) is weighted by pi(y) / q_mix(y) < 2
            (`bilevel_rlhf.exploration`): the same expectations, with the completions theta makes rare labelled more
            often. 1: off. Needs `top_k=0` and `top_p=1`.
        forward_kl_coef (`float`, *optional*, defaults to `0.0`):
            beta_F >= 0. Adds to theta's loss `beta_F * KL(pi*_tau(x) || theta)`, estimated on the reference's
            completions of the iteration, self-normalized: `-beta_F * sum_i w_i log theta(y_i)`, `y_i ~ pi_ref`,
            `w_i ∝ exp(r_x(y_i) / tau_k)` (`bilevel_rlhf.forward_kl`). Its gradient on a completion theta makes rare
            does not vanish, where the policy gradient's is proportional to its probability: it lets a nearly
            deterministic actor spread again when its target does. The reference then also generates on iterations
            it would not. 0: off. Needs `regularization="kl"`; not under DeepSpeed.
        collapse_entropy_fraction (`float`, *optional*, defaults to `0.1`):
            An actor whose mean token entropy falls below this fraction of its first rollout's is reported as
            collapsed (`CollapseWarning`); 0 turns the check off.
        log_completions (`bool`, *optional*, defaults to `False`):
            On each logging step's rollout, log a table of theta's first completions with the oracle's score, r_x's
            score and the pair's label: TensorBoard text, a W&B table, and `output_dir/completions.jsonl`
            (`bilevel_rlhf.completion_log`; TRL's convention).
        num_completions_to_print (`int`, *optional*, defaults to `8`):
            Rows of that table (the main process's first completions), >= 1.

        > Oracle failures (`bilevel_rlhf.oracle_calls`)

        oracle_retries (`int`, *optional*, defaults to `2`):
            Further tries, >= 0, of an oracle call that raised or timed out. When every try fails, the batch's pairs
            are dropped (no loss, counted in `oracle/dropped`, an `OracleDropWarning`) and the run goes on.
        oracle_timeout (`float` or `None`, *optional*, defaults to `None`):
            Seconds, > 0, an oracle call may take; a slower call is abandoned (it runs in a worker thread) and counts
            as failed. None: no limit (the call runs in the training thread).
        oracle_retry_backoff (`float`, *optional*, defaults to `1.0`):
            Seconds, >= 0, before the first retry, doubled before each next one.
        oracle_max_consecutive_failures (`int`, *optional*, defaults to `5`):
            Labelled iterations in a row whose batch was dropped, >= 1, before the run saves a checkpoint and stops
            with `OracleFailureError`. A pair the oracle abstains on (a judge's -1, a NaN label) is not a failure.

        > Lower-level regularization (tau)

        regularization (`str`, *optional*, defaults to `"kl"`):
            `"kl"`: per-token reward -tau * log(pi/pi_ref) with a frozen reference; `"entropy"`: -tau * log pi.
        tau_init (`float`, *optional*, defaults to `0.1`):
            tau_0 >= 0, the regularization weight at iteration 0.
        tau_min (`float`, *optional*, defaults to `0.0`):
            Floor of tau_k, 0 <= tau_min <= tau_init.
        tau_schedule (`str`, *optional*, defaults to `"polynomial"`):
            `"constant"`, `"polynomial"` (tau_0 (1 + k/k_0)^(-c)), `"exponential"` (tau_0 exp(-c k/k_0)) or
            `"adaptive"` (steered to `tau_target_kl` by the adaptive KL controller, `bilevel_rlhf.schedules.AdaptiveTau`,
            with horizon k_0; needs `regularization="kl"`).
        tau_decay_rate (`float`, *optional*, defaults to `0.5`):
            c >= 0 (a negative rate would make tau increase).
        tau_horizon (`float`, *optional*, defaults to `10.0`):
            k_0 > 0, in iterations.
        tau_target_kl (`float`, *optional*, defaults to `6.0`):
            `tau_schedule="adaptive"`: the target of theta's sampled sequence KL to the reference (nats), > 0.

        > Penalty (lambda)

        penalty_lambda (`float`, *optional*, defaults to `1.0`):
            lambda_0 > 0. For the penalized theta, 1 / lambda weighs the oracle's verdicts against r_x in its reward;
            for the two-actor methods, lambda also multiplies phi's tracking error in x's step (docs/tuning.md).
        penalty_lambda_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"` or `"polynomial"` (lambda_0 (1 + k/k_0)^g, capped at `penalty_lambda_max`).
        penalty_lambda_growth (`float`, *optional*, defaults to `0.5`):
            g >= 0.
        penalty_lambda_horizon (`float`, *optional*, defaults to `10.0`):
            k_0 > 0, in iterations.
        penalty_lambda_max (`float` or `None`, *optional*, defaults to `None`):
            Cap on lambda_k (>= penalty_lambda); None: no cap.

        > Learning rates (three time-scales: critic >= actor >= reward)

        actor_learning_rate (`float`, *optional*, defaults to `1e-5`):
            alpha_0: step size of the actors phi and theta (their LM weights or LoRA adapters).
        critic_learning_rate (`float`, *optional*, defaults to `1e-4`):
            beta_0: step size of the value heads.
        reward_learning_rate (`float`, *optional*, defaults to `1e-6`):
            zeta_0: step size of the reward model x.
        actor_lr_schedule / critic_lr_schedule / reward_lr_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"` or `"polynomial"` (lr_0 (1 + k/k_0)^(-c)), as a function of the iteration k.
        actor_lr_decay / critic_lr_decay / reward_lr_decay (`float`, *optional*, defaults to `0.5`):
            c >= 0 of the polynomial schedule.
        lr_horizon (`float`, *optional*, defaults to `10.0`):
            k_0 > 0 of the polynomial learning-rate schedules.
        reward_adam_beta2 (`float` or `None`, *optional*, defaults to `0.9`):
            Adam's second-moment decay for x alone, in [0, 1); None: `adam_beta2` (0.999), as the actors and critics.
            The hypergradient's scale shrinks by orders of magnitude as the policy sharpens; with a memory of about
            1,000 steps (0.999) the first, large gradients keep x's late steps orders of magnitude below its learning
            rate, with about 10 steps (0.9) they keep their size (docs/panel.md).

        > Generation

        max_prompt_length (`int`, *optional*, defaults to `64`):
            Longer prompts are truncated on the left (and counted in `completions/truncated_prompts`).
        max_completion_length (`int`, *optional*, defaults to `32`):
            Maximum number of generated tokens.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature > 0.
        top_k (`int`, *optional*, defaults to `0`):
            Top-k sampling; 0 disables it.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling, in (0, 1].
        num_generations (`int`, *optional*, defaults to `2`):
            Completions per prompt from each actor (TRL: `num_generations`). With `"preference_nll"` even and >= 2:
            theta's completions (2i, 2i+1) form the pairs the oracle labels; with `"win_rate"` any count >= 1 (each
            is compared with a completion of the reference, so 1 gives one labelled pair per prompt).
        num_eval_generations (`int`, *optional*, defaults to `1`):
            theta's completions per prompt in `evaluate()` (its means are over all of them).

        > PPO

        steps_per_generation (`int` or `None`, *optional*, defaults to `None`):
            Micro-batches per generation and pass (TRL's meaning); a multiple of `gradient_accumulation_steps`, which
            it defaults to (one optimizer step per pass).
        num_iterations (`int`, *optional*, defaults to `1`):
            Passes over each generation (TRL's mu, PPO's epochs). Not the paper's iteration k, which counts generations.
        cliprange (`float`, *optional*, defaults to `0.2`):
            PPO ratio clip epsilon > 0.
        cliprange_value (`float`, *optional*, defaults to `0.2`):
            Value clip > 0.
        vf_coef (`float`, *optional*, defaults to `0.1`):
            Weight of the value loss in each actor's loss (the value head shares the actor's trunk).
        gamma (`float`, *optional*, defaults to `1.0`):
            Discount in [0, 1].
        lam (`float`, *optional*, defaults to `0.95`):
            GAE lambda in [0, 1] (not the penalty lambda).
        whiten_rewards (`bool`, *optional*, defaults to `False`):
            Rescale the per-token rewards to unit variance before GAE.
        advantage_estimator (`str`, *optional*, defaults to `"gae"`):
            `"gae"`: per-token rewards (the KL penalty at each token, the terminal reward at the last) and GAE on the
            critic's values. `"rloo"`: one advantage per completion, its KL-penalized return minus the mean return of
            the other `num_generations - 1` completions of its prompt (Kool et al. 2019; TRL's RLOO), given to every
            token; the critics are not used (no value loss). Needs `num_generations >= 2`, and `objective="win_rate"`
            when theta is penalized (with `"preference_nll"` a completion's verdict is shared with its baseline).
        missing_eos_penalty (`float` or `None`, *optional*, defaults to `None`):
            Subtracted from an actor's terminal reward when its completion has no eos (it ran into
            `max_completion_length`), as TRL's OnlineDPO does with a reward model's score. The lower level's reward
            becomes `r_x(y) - penalty * [y has no eos]`; x's gradient is unchanged (the penalty does not depend on x).
            `None` (or 0): no penalty.
        kl_estimator (`str`, *optional*, defaults to `"k1"`):
            How the actors' KL penalty (`regularization="kl"`) enters their loss. `"k1"`: `log pi - log pi_ref` of
            each sampled token in the per-token reward (TRL's PPO). `"exact"`: at every visited state the KL of the
            whole next-token distributions, `sum_v pi_v (log pi_v - log pi_ref,v)`, as a differentiable loss term, and
            in the returns the exact KL of the states that follow: the same expected gradient, without the sampling
            noise of one token, and a pull towards pi_ref on every token of the vocabulary, sampled or not. The
            rollout keeps the reference's full next-token log-probabilities (`[N, T, vocab]` per actor).
        value_head_init (`str`, *optional*, defaults to `"random"`):
            How the critics (linear value heads on the actors' last hidden states) start: `"random"`, small random
            weights, whose values on a trained trunk are of order 1 per token, so that until the critic has learned
            the first advantages carry their random differences; or `"zero"`, V = 0.
        fuse_rollout_and_update (`bool`, *optional*, defaults to `True`):
            With one micro-step per iteration (`num_iterations = steps_per_generation = 1`),
            let the update's forward pass also give the rollout's old log-probs, values and scores: one forward pass
            per actor and one of r_x fewer per iteration, the same loss and gradients. Ignored otherwise.

        > Models

        model_init_kwargs (`dict`, *optional*):
            Keyword arguments for `from_pretrained` when `model` / `reward_model` are given as names or paths.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow models / tokenizers with custom code.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Disable dropout in the actors and the reward model (so rollout and update log-probs agree).
        reward_adapter (`bool`, *optional*, defaults to `False`):
            With a `peft_config`: r_x is a third LoRA adapter ("reward") on the actors' base, with a scalar head on
            its last real token, instead of a separate `reward_model` (pass `reward_model=None`). One copy of the base
            then serves every role, and AdamW state exists only for adapters and heads. Prefer a separate reward model
            for another architecture or tokenizer, or to start from a pretrained reward model.
        reward_head_init (`str`, *optional*, defaults to `"random"`):
            How a scalar head that the toolkit creates for r_x starts (the `reward_adapter` head, and the head the
            recipes add to a backbone): `"random"` is the usual small random initialization, a random tilt r_x / tau
            of the lower level's target before any label is seen; `"zero"` makes r_x = 0 at x_0, so the target
            pi*_tau(x_0) is the reference and the policy moves only as r_x learns from the oracle. A reward model
            passed to the trainer is used as it is.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    # --- defaults that differ from TrainingArguments ---
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (off: CPU-safe default)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the trainer reads the raw `prompt` column."}
    )
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy (`no`, `steps`, `epoch`)."})

    # --- method ---
    method: str = field(default="penalized_covariance", metadata={"help": f"One of {METHODS}."})
    nested_inner_steps: int = field(
        default=4, metadata={"help": "Lower-level iterations per reward step (method='nested_loop'), >= 1."}
    )
    label_every: int = field(
        default=1, metadata={"help": "The oracle labels every label_every-th iteration; the others train on r_x, >= 1."}
    )
    objective: str = field(default="preference_nll", metadata={"help": f"Upper-level objective, one of {OBJECTIVES}."})
    objective_weight: float = field(
        default=0.1, metadata={"help": "w >= 0: weight of r_x's BT-NLL in the win_rate objective."}
    )
    common_random_numbers: bool = field(
        default=False, metadata={"help": "theta and phi sample with shared Gumbel noise (coupled sampling)."}
    )
    tracking_tolerance: float = field(
        default=0.0, metadata={"help": "Penalty gap below -tolerance counts as lost tracking, >= 0."}
    )
    tracking_patience: int = field(
        default=3, metadata={"help": "Rollouts in a row with lost tracking before a warning (and a resync), >= 1."}
    )
    reward_trust_region: float = field(
        default=0.5, metadata={"help": "Cap on each x step's change of r_x / tau_k on the rollout, >= 0 (0: off)."}
    )
    phi_resync: bool = field(default=False, metadata={"help": "Copy theta into phi when phi has lost track."})
    hypergradient_warmup_ratio: float = field(
        default=0.0,
        metadata={"help": "Covariance methods: fraction of the run over which x's covariance term's weight rises from "
                  "0 to 1, in [0, 1] (0: off)."},
    )
    exploration_temperature: float = field(
        default=1.0,
        metadata={"help": "Labelled iterations: half of theta's completions sampled at temperature * this, "
                  "importance-weighted back, >= 1 (1: off)."},
    )
    forward_kl_coef: float = field(
        default=0.0, metadata={"help": "Weight of KL(pi*_tau(x) || theta) on the reference's completions, >= 0."}
    )
    collapse_entropy_fraction: float = field(
        default=0.1, metadata={"help": "Entropy floor, as a fraction of the first rollout's, in [0, 1)."}
    )
    log_completions: bool = field(
        default=False, metadata={"help": "Log a table of theta's completions, oracle and r_x scores each logging step."}
    )
    num_completions_to_print: int = field(default=8, metadata={"help": "Rows of the completions table, >= 1."})

    # --- oracle failures ---
    oracle_retries: int = field(default=2, metadata={"help": "Further tries of a failed oracle call, >= 0."})
    oracle_timeout: float | None = field(
        default=None, metadata={"help": "Seconds an oracle call may take, > 0 (None: no limit)."}
    )
    oracle_retry_backoff: float = field(
        default=1.0, metadata={"help": "Seconds before the first retry (doubled after each), >= 0."}
    )
    oracle_max_consecutive_failures: int = field(
        default=5, metadata={"help": "Dropped labelled iterations in a row before the run stops (with a checkpoint), >= 1."}
    )

    # --- regularization (tau) ---
    regularization: str = field(default="kl", metadata={"help": f"One of {REGULARIZATIONS}."})
    tau_init: float = field(default=0.1, metadata={"help": "tau_0 >= 0."})
    tau_min: float = field(default=0.0, metadata={"help": "Floor of tau_k, in [0, tau_init]."})
    tau_schedule: str = field(default="polynomial", metadata={"help": f"One of {TAU_SCHEDULES}."})
    tau_decay_rate: float = field(default=0.5, metadata={"help": "Decay exponent c >= 0 of the tau schedule."})
    tau_horizon: float = field(default=10.0, metadata={"help": "k_0 > 0 of the tau schedule, in iterations."})
    tau_target_kl: float = field(default=6.0, metadata={"help": "Target KL of tau_schedule='adaptive', > 0."})

    # --- penalty (lambda) ---
    penalty_lambda: float = field(default=1.0, metadata={"help": "lambda_0 > 0."})
    penalty_lambda_schedule: str = field(default="constant", metadata={"help": f"One of {LAMBDA_SCHEDULES}."})
    penalty_lambda_growth: float = field(default=0.5, metadata={"help": "Growth exponent g >= 0."})
    penalty_lambda_horizon: float = field(default=10.0, metadata={"help": "k_0 > 0, in iterations."})
    penalty_lambda_max: float | None = field(default=None, metadata={"help": "Cap on lambda_k (None: no cap)."})

    # --- learning rates ---
    actor_learning_rate: float = field(default=1e-5, metadata={"help": "alpha_0 > 0: actors' step size."})
    critic_learning_rate: float = field(default=1e-4, metadata={"help": "beta_0 > 0: value heads' step size."})
    reward_learning_rate: float = field(default=1e-6, metadata={"help": "zeta_0 > 0: reward model's step size."})
    actor_lr_schedule: str = field(default="constant", metadata={"help": f"One of {LR_SCHEDULES}."})
    critic_lr_schedule: str = field(default="constant", metadata={"help": f"One of {LR_SCHEDULES}."})
    reward_lr_schedule: str = field(default="constant", metadata={"help": f"One of {LR_SCHEDULES}."})
    actor_lr_decay: float = field(default=0.5, metadata={"help": "Polynomial decay exponent >= 0."})
    critic_lr_decay: float = field(default=0.5, metadata={"help": "Polynomial decay exponent >= 0."})
    reward_lr_decay: float = field(default=0.5, metadata={"help": "Polynomial decay exponent >= 0."})
    lr_horizon: float = field(default=10.0, metadata={"help": "k_0 > 0 of the lr schedules, in iterations."})
    reward_adam_beta2: float | None = field(
        default=0.9, metadata={"help": "Adam's beta2 for x alone, in [0, 1); None: adam_beta2."})

    # --- generation ---
    max_prompt_length: int = field(default=64, metadata={"help": "Prompt tokens kept (left truncation), >= 1."})
    max_completion_length: int = field(default=32, metadata={"help": "Generated tokens at most, >= 1."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature > 0."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling, 0 = off."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling in (0, 1]."})
    num_generations: int = field(
        default=2, metadata={"help": "Completions per prompt per actor, >= 1 (even for preference_nll)."}
    )
    num_eval_generations: int = field(
        default=1, metadata={"help": "theta's completions per prompt in evaluate(), >= 1."}
    )

    # --- PPO ---
    steps_per_generation: int | None = field(
        default=None,
        metadata={"help": "Micro-batches per generation and pass; a multiple of (and by default) gradient_accumulation_steps."},
    )
    num_iterations: int = field(default=1, metadata={"help": "Passes (PPO epochs) over each generation, >= 1."})
    cliprange: float = field(default=0.2, metadata={"help": "PPO ratio clip > 0."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip > 0."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value-loss weight >= 0."})
    gamma: float = field(default=1.0, metadata={"help": "Discount in [0, 1]."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda in [0, 1]."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Rescale per-token rewards before GAE."})
    advantage_estimator: str = field(
        default="gae",
        metadata={"help": f"One of {ADVANTAGE_ESTIMATORS}: GAE on the critic's values, or each completion's return "
                  "against its prompt's other completions (rloo, num_generations >= 2)."},
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from an actor's terminal reward when its completion has no eos (TRL's "
                  "missing_eos_penalty); >= 0, None: no penalty."},
    )
    kl_estimator: str = field(
        default="k1",
        metadata={"help": f"One of {KL_ESTIMATORS}: the sampled token's log-ratio in the reward (k1), or the exact KL "
                  "of the next-token distributions as a loss term and in the returns (exact)."},
    )
    value_head_init: str = field(
        default="random",
        metadata={"help": f"The critics' start, one of {VALUE_HEAD_INITS}: `random` (small random weights) or `zero` "
                  "(V = 0 until the critic learns)."},
    )
    fuse_rollout_and_update: bool = field(
        default=True, metadata={"help": "With one micro-step per iteration, the update's forward pass doubles as the rollout's."}
    )

    # --- models ---
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Kwargs (dict or JSON string) for from_pretrained when models are given by name/path."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models with custom code."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in actors and reward model."})
    reward_adapter: bool = field(
        default=False, metadata={"help": "With peft_config: r_x is a LoRA adapter on the actors' base plus a scalar head."}
    )
    reward_head_init: str = field(
        default="random",
        metadata={"help": f"A scalar head the toolkit creates for r_x, one of {REWARD_HEAD_INITS}: `random` (small "
                  "random weights) or `zero` (r_x = 0, so the lower level starts at the reference). A reward model "
                  "passed in is used as it is."},
    )

    def __post_init__(self) -> None:
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        self._validate_bilevel()
        super().__post_init__()
        if self.save_strategy == "steps" and self.save_steps >= 1 and int(self.save_steps) % self.steps_per_iteration:
            raise ValueError(
                f"save_steps must be a multiple of the optimizer steps per iteration = {self.steps_per_iteration} "
                f"(checkpoints are taken at iteration boundaries), got {self.save_steps}"
            )
        optim = getattr(self.optim, "value", self.optim)
        if optim not in ("adamw_torch", "adamw_torch_fused"):
            raise ValueError(
                f"optim must be adamw_torch or adamw_torch_fused (the BilevelTrainer builds one AdamW with a parameter "
                f"group per role), got {optim!r}"
            )
        if getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type) != TrainingArguments.lr_scheduler_type:
            warnings.warn(
                "lr_scheduler_type is not used by the BilevelTrainer: set actor_lr_schedule, critic_lr_schedule and "
                "reward_lr_schedule",
                stacklevel=2,
            )
        if self.max_steps > 0 and self.max_steps % self.steps_per_iteration:
            raise ValueError(
                f"max_steps must be a multiple of the optimizer steps per iteration = {self.steps_per_iteration} (a "
                f"run ends at an iteration boundary, not inside a rollout it paid oracle queries for), got "
                f"{self.max_steps}"
            )
        ignored = [name for name in ("warmup_steps", "lr_scheduler_kwargs") if getattr(self, name, None)]
        if ignored:
            warnings.warn(
                f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not used by the BilevelTrainer: its "
                "learning rates follow actor_lr_schedule, critic_lr_schedule and reward_lr_schedule",
                stacklevel=2,
            )
        if self.learning_rate != TrainingArguments.learning_rate:
            warnings.warn(
                "learning_rate is not used by the BilevelTrainer: set actor_learning_rate, critic_learning_rate and "
                "reward_learning_rate",
                stacklevel=2,
            )
        warn_unless_time_scales(self, ("critic_learning_rate", "actor_learning_rate", "reward_learning_rate"))

    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps per iteration k (one generation): num_iterations * steps_per_generation / accumulation."""
        return self.num_iterations * self.steps_per_generation // self.gradient_accumulation_steps

    @property
    def prompts_per_iteration(self) -> int:
        """Prompts per generation and process: per_device_train_batch_size * steps_per_generation / num_generations."""
        return self.per_device_train_batch_size * self.steps_per_generation // self.num_generations

    def _validate_bilevel(self) -> None:
        need = field_checker(self)

        need(self.method in METHODS, "method", f"one of {METHODS}")
        need(self.nested_inner_steps >= 1, "nested_inner_steps", ">= 1")
        need(self.label_every >= 1, "label_every", ">= 1")
        need(self.objective in OBJECTIVES, "objective", f"one of {OBJECTIVES}")
        need(self.objective_weight >= 0, "objective_weight", ">= 0")
        need(self.method not in COVARIANCE_METHODS or self.tau_init > 0, "tau_init",
             f"> 0 for method={self.method!r} (it divides by tau)")
        need(self.tracking_tolerance >= 0, "tracking_tolerance", ">= 0")
        need(self.tracking_patience >= 1, "tracking_patience", ">= 1")
        need(self.reward_head_init in REWARD_HEAD_INITS, "reward_head_init", f"one of {REWARD_HEAD_INITS}")
        need(self.value_head_init in VALUE_HEAD_INITS, "value_head_init", f"one of {VALUE_HEAD_INITS}")
        need(self.reward_trust_region >= 0, "reward_trust_region", ">= 0 (0: no cap)")
        need(0 <= self.hypergradient_warmup_ratio <= 1, "hypergradient_warmup_ratio", "in [0, 1]")
        need(self.hypergradient_warmup_ratio == 0 or self.method in COVARIANCE_METHODS, "hypergradient_warmup_ratio",
             f"0 with method={self.method!r}: it ramps in the covariance term of {COVARIANCE_METHODS}")
        need(self.reward_trust_region == 0 or self.tau_init > 0, "reward_trust_region",
             "0 when tau_init = 0 (the cap is on r_x / tau_k)")
        need(self.exploration_temperature >= 1, "exploration_temperature", ">= 1 (1: off)")
        need(self.exploration_temperature == 1 or (self.top_k == 0 and self.top_p == 1), "exploration_temperature",
             f"1 with top_k={self.top_k}, top_p={self.top_p}: its importance weights need top_k=0 and top_p=1")
        need(0 <= self.collapse_entropy_fraction < 1, "collapse_entropy_fraction", "in [0, 1)")
        need(math.isfinite(self.forward_kl_coef) and self.forward_kl_coef >= 0, "forward_kl_coef", "a number >= 0")
        need(self.forward_kl_coef == 0 or self.regularization == "kl", "forward_kl_coef",
             '0 unless regularization="kl" (its target is pi_ref * exp(r_x / tau))')
        need(self.num_completions_to_print >= 1, "num_completions_to_print", ">= 1")
        need(self.oracle_retries >= 0, "oracle_retries", ">= 0")
        need(self.oracle_timeout is None or self.oracle_timeout > 0, "oracle_timeout", "None or > 0 (seconds)")
        need(self.oracle_retry_backoff >= 0, "oracle_retry_backoff", ">= 0 (seconds)")
        need(self.oracle_max_consecutive_failures >= 1, "oracle_max_consecutive_failures", ">= 1")
        need(self.regularization in REGULARIZATIONS, "regularization", f"one of {REGULARIZATIONS}")
        need(self.tau_init >= 0, "tau_init", ">= 0")
        need(0 <= self.tau_min <= self.tau_init, "tau_min", f"in [0, tau_init={self.tau_init}]")
        need(self.tau_schedule in TAU_SCHEDULES, "tau_schedule", f"one of {TAU_SCHEDULES}")
        need(self.tau_decay_rate >= 0, "tau_decay_rate", ">= 0 (a negative rate makes tau increase)")
        need(self.tau_horizon > 0, "tau_horizon", "> 0")
        need(self.tau_target_kl > 0, "tau_target_kl", "> 0")
        need(self.tau_schedule != "adaptive" or self.regularization == "kl", "tau_schedule",
             "not 'adaptive' with regularization='entropy' (it steers the KL to the reference)")
        need(self.penalty_lambda > 0, "penalty_lambda", "> 0")
        need(self.penalty_lambda_schedule in LAMBDA_SCHEDULES, "penalty_lambda_schedule", f"one of {LAMBDA_SCHEDULES}")
        need(self.penalty_lambda_growth >= 0, "penalty_lambda_growth", ">= 0 (lambda may not decrease)")
        need(self.penalty_lambda_horizon > 0, "penalty_lambda_horizon", "> 0")
        need(
            self.penalty_lambda_max is None or self.penalty_lambda_max >= self.penalty_lambda,
            "penalty_lambda_max",
            f"None or >= penalty_lambda={self.penalty_lambda}",
        )
        for role in ("actor", "critic", "reward"):
            need(getattr(self, f"{role}_learning_rate") > 0, f"{role}_learning_rate", "> 0")
            need(getattr(self, f"{role}_lr_schedule") in LR_SCHEDULES, f"{role}_lr_schedule", f"one of {LR_SCHEDULES}")
            need(getattr(self, f"{role}_lr_decay") >= 0, f"{role}_lr_decay", ">= 0")
        need(self.lr_horizon > 0, "lr_horizon", "> 0")
        need(self.reward_adam_beta2 is None or 0 <= self.reward_adam_beta2 < 1, "reward_adam_beta2",
             "None or in [0, 1)")
        need(self.max_prompt_length >= 1, "max_prompt_length", ">= 1")
        need(self.max_completion_length >= 1, "max_completion_length", ">= 1")
        need(self.temperature > 0, "temperature", "> 0")
        need(self.top_k >= 0, "top_k", ">= 0")
        need(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        need(
            self.num_generations >= 1 and (self.objective == "win_rate" or self.num_generations % 2 == 0),
            "num_generations",
            ">= 1, and even when theta's own completions (2i, 2i+1) form the pairs (objective='preference_nll')",
        )
        need(self.num_eval_generations >= 1, "num_eval_generations", ">= 1")
        need(self.num_iterations >= 1, "num_iterations", ">= 1")
        need(self.cliprange > 0, "cliprange", "> 0")
        need(self.cliprange_value > 0, "cliprange_value", "> 0")
        need(self.vf_coef >= 0, "vf_coef", ">= 0")
        need(0 <= self.gamma <= 1, "gamma", "in [0, 1]")
        need(0 <= self.lam <= 1, "lam", "in [0, 1]")
        need(self.advantage_estimator in ADVANTAGE_ESTIMATORS, "advantage_estimator", f"one of {ADVANTAGE_ESTIMATORS}")
        need(self.missing_eos_penalty is None or (math.isfinite(self.missing_eos_penalty)
                                                  and self.missing_eos_penalty >= 0),
             "missing_eos_penalty", "None or a finite number >= 0")
        need(self.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"one of {KL_ESTIMATORS}")
        need(self.kl_estimator == "k1" or self.regularization == "kl", "kl_estimator",
             "'k1' with regularization='entropy' (the exact KL is to the reference)")
        need(self.kl_estimator == "k1" or not self.whiten_rewards, "kl_estimator",
             "'k1' with whiten_rewards=True (the exact KL term is weighted in the advantages' units)")
        need(self.advantage_estimator != "rloo" or self.num_generations >= 2, "num_generations",
             f">= 2 with advantage_estimator='rloo' (each completion's baseline is its prompt's other "
             "completions)")
        need(self.advantage_estimator != "rloo" or self.objective == "win_rate"
             or self.method not in PENALIZED_THETA_METHODS, "advantage_estimator",
             f"'gae' with method={self.method!r} and objective={self.objective!r}: rloo's baseline for a completion of "
             "theta is its pair's other completion, which shares its verdict g, so theta's gradient would be biased "
             "(use objective='win_rate')")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", ">= 1")
        need(
            self.steps_per_generation >= 1 and self.steps_per_generation % self.gradient_accumulation_steps == 0,
            "steps_per_generation",
            f"a positive multiple of gradient_accumulation_steps = {self.gradient_accumulation_steps}",
        )
        need(
            self.per_device_train_batch_size >= 1 and self.per_device_train_batch_size % self.num_generations == 0,
            "per_device_train_batch_size",
            f"a positive multiple of num_generations = {self.num_generations} (it counts completions per actor in one "
            "micro-batch, and a prompt's completions stay in one micro-batch)",
        )
