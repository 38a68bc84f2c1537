"""BilevelTrainer: the single-loop penalty actor-critic (Zeng, Bhatt, Ganesh & Koppel, 2026) on `transformers.Trainer`.

One *iteration* k (docs/algorithm.md, "Language models"; docs/trainer.md):
  1. rollout (`generate_and_score`: a typed `Rollout`, replayed by the iteration's micro-steps): theta samples
     `num_generations` completions per prompt; phi samples as many (with theta's noise under
     `common_random_numbers`); the upper objective (`bilevel_rlhf.objectives`) says
     which pairs the oracle labels: theta's (2i, 2i+1), or theta's completion i against the reference's completion i
     (`win_rate`; retries, timeouts and dropped batches: `bilevel_rlhf.oracle_calls`; a pair without an answer enters
     no loss, and its completions get g = 0); r_x scores everything; per-token reward -tau_k * penalty_t plus the terminal score (phi and the
     one-actor methods' theta: r_x; the penalized theta: r_x - g / lambda_k, g = df/dpi); GAE per critic.
  2. `num_iterations` passes over the rollout, each of `steps_per_generation` micro-batches (TRL's counting; one
     optimizer step per `gradient_accumulation_steps` of them). The loss is the sum of the parts'
     losses (disjoint parameter sets, one parameter group and learning rate per role):
       phi, theta: PPO-clip + vf_coef * clipped value loss;
       x (reward model), during the first pass only, so each sample enters x's gradient once per iteration:
         `reward_model_loss`: f's x-part + lambda_k * (mean r_x(phi) - mean r_x(theta)) for the penalty methods,
         f's x-part + (1/tau_k) Cov(r_x, g) over theta's completions for `covariance`, f's x-part for partial_sgd.
     Each part runs its own forward/backward in turn (`loss_parts`; gradient accumulation over the parts), so only
     one part's activations are held at a time: the peak is the largest part's, not their sum.
  3. tau_k, lambda_k and the learning rates are functions of k = global_step // args.steps_per_iteration.
With one micro-step per iteration (num_iterations = steps_per_generation = 1) the rollout
does not run the actors (nor r_x when x is trained): the update's forward pass, with gradients, also gives the old
log-probs, values and scores (`fuse_rollout_and_update`; `training_step` runs it and completes the rollout from it).
Checkpoints are taken at iteration boundaries only (validated in the config), so no rollout is ever lost.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
import warnings
from collections import defaultdict
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
)
from trl.trainer.utils import disable_dropout_in_model

from .adapters import stacked_adapters, supports_stacked_adapters
from .completion_log import CompletionLogger
from .config import COVARIANCE_METHODS, PENALIZED_THETA_METHODS, PENALTY_METHODS, BilevelConfig
from .exploration import draw_row_temperatures, mixture_weights, pair_row_weights
from .forward_kl import forward_kl_loss
from .guards import GuardRecord, TrackingGuard
from .modeling import CONFIG_NAME, REWARD_ADAPTER, AdapterRewardModel, BilevelModel, load_roles, save_roles
from .judges import JudgeOracle, PairwiseJudge
from .objectives import (
    UpperObjective,
    answered_completion_values,
    answered_completions,
    answered_value,
    answered_x_loss,
    get_objective,
)
from .oracle_calls import OracleCaller, OracleCounts, OracleFailureError, summed_over_processes
from .rollout import ACTORS, Completions, LossInputs, Rollout, RolloutStats
from .sampling import coupled_sampling_processors
from .rl_utils import (
    bradley_terry_loss,
    completion_mask,
    compute_gae,
    decode_completions,
    masked_mean,
    masked_whiten,
    sample_completions,
    token_kl_penalty,
    whitening_stats,
)
from .schedules import AdaptiveTau, lambda_at, lr_factor, tau_at, warmup_weight
from .trust_region import RewardTrustRegion

STATE_NAME = "bilevel_state_rank{rank}.json"


def last_complete_checkpoint(output_dir: str) -> tuple[str | None, list[str]]:
    """The newest `checkpoint-*` folder of `output_dir` that a save finished, and the newer ones skipped as incomplete.
    The trainer writes the rank-0 bilevel state file last, so a checkpoint without it was cut short (a kill while
    saving)."""
    if not os.path.isdir(output_dir):
        return None, []
    found = sorted(
        (int(name.split("-")[1]), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if name.startswith("checkpoint-") and name.split("-")[1].isdigit() and os.path.isdir(os.path.join(output_dir, name))
    )
    skipped = []
    for _, path in reversed(found):
        if os.path.isfile(os.path.join(path, STATE_NAME.format(rank=0))) and os.path.isfile(
            os.path.join(path, "trainer_state.json")
        ):
            return path, skipped
        skipped.append(path)
    return None, skipped


def reward_model_loss(
    objective: UpperObjective,
    method: str,
    pair_loss: torch.Tensor | None,
    labels: torch.Tensor,
    r_theta: torch.Tensor | None,
    r_phi: torch.Tensor | None,
    lambda_k: float,
    tau_k: float,
    g: torch.Tensor | None = None,
    answered: torch.Tensor | None = None,
    covariance_weight: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss of the reward model x; its gradient is the hypergradient estimate h_k. With f's x-part F = `objective`'s
    `x_loss(pair_loss, labels)` on the answered pairs (`answered`, [pairs] bool; None: all):
        penalty methods (single_loop, fixed_tau, nested_loop):  F + lambda_k * (mean r_x(phi) - mean r_x(theta));
        covariance, penalized_covariance:
                      F + (1/tau_k) * sum_i (g_i - mean g) r_x(y_i) / (N - 1), y_i theta's N completions in
                      answered pairs, g detached:
                      the lambda -> infinity limit of the penalty, (1/tau) Cov(grad_x r_x, g); the covariance
                      term times `covariance_weight` (below 1 during `hypergradient_warmup_ratio`);
        partial_sgd:  F alone.
    With `weights` ([N], each theta completion's importance weight: `bilevel_rlhf.exploration`), each mean over
    theta's completions or pairs is weighted: F on the weighted pair losses (exact for an `x_loss` that is a mean of
    them, as the built-in objectives' are), the covariance's mean of g a weighted mean.
    It is a theta term plus a phi term, so the phi term (``r_phi``) and the theta term (``pair_loss``, ``r_theta``)
    may each be None: the trainer runs r_x on each actor's completions in turn.
    """
    loss = torch.zeros((), device=labels.device)
    if pair_loss is not None:
        answered = torch.ones_like(labels, dtype=torch.bool) if answered is None else answered
        if weights is not None:  # a pair's weight is carried by each of its completions
            pair_loss = pair_loss * (weights if objective.against_reference else weights[0::2])
        loss = answered_x_loss(objective, pair_loss, labels, answered)
        if method in PENALTY_METHODS:  # the lower-level gap: every completion, answered or not
            loss = loss - lambda_k * (r_theta.mean() if weights is None else (weights * r_theta).mean())
        elif method in COVARIANCE_METHODS:  # Cov(r_x, g) over the completions that have a g
            rows = answered_completions(answered, objective.against_reference)
            g_a, r_a = g[rows], r_theta[rows]
            if len(g_a):
                if weights is None:
                    centred = g_a - g_a.mean()
                else:
                    w_a = weights[rows]
                    centred = w_a * (g_a - (w_a * g_a).sum() / w_a.sum().clamp_min(1e-12))
                loss = loss + covariance_weight * (centred * r_a).sum() / (max(len(g_a) - 1, 1) * tau_k)
    if r_phi is not None:
        loss = loss + lambda_k * r_phi.mean()
    return loss


class IterationSampler(Sampler):
    """Shuffled prompt indices; each global batch of `batch_size` is repeated `repeat_count` times in a row.

    One repeat per micro-step of an iteration (GRPO's pattern): the trainer generates on the first and replays the
    buffer on the others. The permutation of epoch e is drawn from a generator seeded with (seed, e), so it does not
    depend on how many epochs were iterated before (resuming mid-run gives the same order). Incomplete batches are
    dropped.
    """

    def __init__(self, num_samples: int, batch_size: int, repeat_count: int, seed: int):
        self.num_samples, self.batch_size, self.repeat_count, self.seed = num_samples, batch_size, repeat_count, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        for start in range(0, self.num_samples - self.batch_size + 1, self.batch_size):
            chunk = order[start : start + self.batch_size]
            for _ in range(self.repeat_count):
                yield from chunk

    def __len__(self) -> int:
        return (self.num_samples // self.batch_size) * self.batch_size * self.repeat_count


def _check_prompt_dataset(dataset: Any, name: str) -> None:
    if dataset is None:
        raise ValueError(f"{name} is required (a datasets.Dataset with a 'prompt' column)")
    columns = getattr(dataset, "column_names", None)
    if columns is None or not hasattr(dataset, "__len__"):
        raise TypeError(f"{name} must be a map-style datasets.Dataset with a 'prompt' column, got {type(dataset)}")
    if "prompt" not in columns:
        raise ValueError(f"{name} must have a 'prompt' column, found columns {columns}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: it needs at least one prompt")


def _check_finite(name: str, value: torch.Tensor, iteration: int) -> None:
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"non-finite {name} at iteration {iteration}; stopping the run")


def _identity(features: list[dict]) -> list[dict]:
    return features


class _SamplerEpochCallback(TrainerCallback):
    """Keeps the sampler's epoch in step with the Trainer's (accelerate does not forward set_epoch to it)."""

    def __init__(self, trainer: "BilevelTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer._sampler is not None:
            self.trainer._sampler.set_epoch(int(state.epoch or 0))


class BilevelTrainer(Trainer):
    """Trainer for bilevel RLHF: actors phi and theta, their critics, and the reward model x, in one HF training loop.

    Args:
        model: the initial policy (a causal LM or its name/path); theta and phi start from it, and it is the frozen
            reference for `regularization="kl"`.
        reward_model: the reward model r_x (a sequence classifier with one output, or its name/path); None with
            `args.reward_adapter`, where r_x is a LoRA adapter on the policy's base.
        preference_oracle: callable `(prompts, completions_a, completions_b) -> labels` in [0, 1] (1: a preferred,
            NaN: abstains), e.g. `bilevel_rlhf.ScoreOracle`; its optional `score(prompts, completions)` is logged. Or
            a pairwise judge (TRL's `judge(prompts, completions, shuffle_order)`, `bilevel_rlhf.PairwiseJudge`),
            wrapped in a `JudgeOracle` seeded with `args.seed`. Failed calls: `bilevel_rlhf.oracle_calls`.
        args: a `BilevelConfig`.
        train_dataset: a `datasets.Dataset` with a `prompt` column (strings).
        eval_dataset: optional prompts for `evaluate()` (theta's mean r_x and oracle score, no updates).
        processing_class: the policy tokenizer (loaded from `model` when None).
        reward_processing_class: the reward model's tokenizer; None means r_x reads the policy's token ids directly
            (left-padded prompt + right-padded completion; a sequence classifier scores its rightmost non-pad
            token, so with pad == eos the score is read at the last token before the eos).
        peft_config: a `peft` config: one frozen base with LoRA adapters "theta" and "phi" (reference = adapters off).
        callbacks: extra `TrainerCallback`s.
        objective: an `UpperObjective` instance (your own); None builds the built-in `args.objective`.
    """

    _tag_names = ["trl", "bilevel-rlhf"]

    def __init__(
        self,
        model: str | torch.nn.Module,
        reward_model: str | torch.nn.Module | None,
        preference_oracle: Callable[[list[str], list[str], list[str]], Any],
        args: BilevelConfig,
        train_dataset: Any,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        reward_processing_class: PreTrainedTokenizerBase | None = None,
        peft_config: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        objective: UpperObjective | None = None,
    ):
        if not isinstance(args, BilevelConfig):
            raise TypeError(f"args must be a BilevelConfig, got {type(args).__name__}")
        if not callable(preference_oracle) and isinstance(preference_oracle, PairwiseJudge):
            preference_oracle = JudgeOracle(preference_oracle, seed=args.seed)
        if not callable(preference_oracle):
            raise TypeError("preference_oracle must be callable (prompts, completions_a, completions_b) -> labels, "
                            "or a pairwise judge with judge(prompts, completions, shuffle_order)")
        if objective is None:
            objective = get_objective(args.objective, args.objective_weight)
        for name in ("x_loss", "completion_values", "value"):
            if not callable(getattr(objective, name, None)):
                raise TypeError(f"objective must implement UpperObjective.{name} (see bilevel_rlhf.objectives)")
        if not objective.against_reference and args.num_generations % 2:
            raise ValueError(
                f"num_generations must be even for objective {objective.name!r}, which pairs theta's completions "
                f"(2i, 2i+1), got {args.num_generations}"
            )
        _check_prompt_dataset(train_dataset, "train_dataset")
        if eval_dataset is not None:
            _check_prompt_dataset(eval_dataset, "eval_dataset")
        global_prompts = args.prompts_per_iteration * args.world_size
        if len(train_dataset) < global_prompts:
            raise ValueError(
                f"train_dataset has {len(train_dataset)} prompts, fewer than one iteration needs "
                f"(per_device_train_batch_size * steps_per_generation / num_generations * world_size = {global_prompts})"
            )

        # --- models (safetensors only; remote code only when the user allows it) ---
        load_kwargs = dict(args.model_init_kwargs or {})
        load_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        load_kwargs["use_safetensors"] = True
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, **load_kwargs)
        if args.reward_adapter:
            if peft_config is None:
                raise ValueError("reward_adapter=True needs peft_config: r_x is a LoRA adapter on the actors' base")
            if reward_model is not None or reward_processing_class is not None:
                raise ValueError(
                    "reward_model and reward_processing_class must be None with reward_adapter=True (r_x is the "
                    "LoRA adapter 'reward' on the policy's base, with a scalar head, reading the policy's tokens)"
                )
        elif reward_model is None:
            raise ValueError("reward_model is required (or set reward_adapter=True and pass peft_config)")
        if isinstance(reward_model, str):
            reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model, num_labels=1, **load_kwargs)
        num_labels = getattr(getattr(reward_model, "config", None), "num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"reward_model must have exactly one output (config.num_labels == 1), got {num_labels}")

        # --- tokenizers ---
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(
                model.config._name_or_path, trust_remote_code=args.trust_remote_code
            )
        if processing_class.pad_token is None:
            if processing_class.eos_token is None:
                raise ValueError("processing_class has neither a pad token nor an eos token; set tokenizer.pad_token")
            warnings.warn("processing_class has no pad token; using its eos token for padding", stacklevel=2)
            processing_class.pad_token = processing_class.eos_token
        processing_class.padding_side = "left"  # prompts are left-padded for generation
        if reward_processing_class is not None:
            if reward_processing_class.pad_token is None:
                warnings.warn("reward_processing_class has no pad token; using its eos token", stacklevel=2)
                reward_processing_class.pad_token = reward_processing_class.eos_token
            reward_processing_class.padding_side = "right"
        rm_config = getattr(reward_model, "config", None)
        if rm_config is not None and getattr(rm_config, "pad_token_id", None) is None:
            # sequence classifiers find the last token through pad_token_id
            tok = reward_processing_class or processing_class
            rm_config.pad_token_id = tok.pad_token_id

        # --- roles ---
        has_phi = args.method in PENALTY_METHODS
        # the reference policy: the KL anchor, and the opponent of an objective that compares against it
        needs_ref = args.regularization == "kl" or objective.against_reference
        use_peft = peft_config is not None
        if args.disable_dropout:
            disable_dropout_in_model(model)
            if reward_model is not None:
                disable_dropout_in_model(reward_model)
        if use_peft:
            from peft import get_peft_model

            # one config object per adapter: PEFT writes into the configs it is given
            theta = get_peft_model(model, copy.deepcopy(peft_config), adapter_name="theta")
            # every role on one base: theta's and phi's adapters, and r_x's with reward_adapter
            adapters = ["theta"] + (["phi"] if has_phi else []) + ([REWARD_ADAPTER] if args.reward_adapter else [])
            for name in adapters[1:]:
                theta.add_adapter(name, copy.deepcopy(peft_config))
            theta.set_requires_grad(adapters, requires_grad=True)
            phi, ref = None, None
        else:
            ref = copy.deepcopy(model) if needs_ref else None
            phi = copy.deepcopy(model) if has_phi else None
            theta = model
        torch.manual_seed(args.seed)  # value-head (and reward-head) initialization
        if args.reward_adapter:
            reward_model = AdapterRewardModel(theta, head_init=args.reward_head_init)
        wrapper = BilevelModel(theta, phi, ref, reward_model, use_peft=use_peft, has_phi=has_phi,
                               value_head_init=args.value_head_init)

        self.preference_oracle = preference_oracle
        self.objective = objective
        self.reward_processing_class = reward_processing_class
        self.oracle_caller = OracleCaller(preference_oracle, args.oracle_retries, args.oracle_timeout,
                                          args.oracle_retry_backoff, args.oracle_max_consecutive_failures)
        self.oracle_counts = OracleCounts()  # every process's pairs: asked = answered + abstained + dropped
        self.adaptive_tau = None if args.tau_schedule != "adaptive" or args.method == "fixed_tau" else AdaptiveTau(
            args.tau_init, args.tau_target_kl, args.tau_horizon, args.tau_min)
        self.guard = TrackingGuard(args.tracking_tolerance, args.tracking_patience, args.phi_resync,
                                   args.collapse_entropy_fraction)
        self.completion_logger = CompletionLogger(self, args.num_completions_to_print) if args.log_completions else None
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._step_metrics: dict[str, torch.Tensor] = {}  # this micro-step's loss statistics, gathered once at its end
        self._rollout_metrics: dict[str, float] = {}
        self._buffer: Rollout | None = None  # this iteration's rollout, replayed by its micro-steps
        self._micro_step: int | None = None
        self._sampler: IterationSampler | None = None
        self._rollout_seconds = 0.0

        super().__init__(
            model=wrapper,
            args=args,
            data_collator=_identity,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
        )
        # one dataloader batch = one iteration's prompts of this process (`per_device_train_batch_size` counts
        # completions per micro-batch, as in TRL's RLOO/GRPO); the sampler repeats it for each micro-step
        self._train_batch_size = args.prompts_per_iteration
        self.add_callback(_SamplerEpochCallback(self))
        self._warn_engine_not_started()
        if args.reward_trust_region > 0:
            if self.is_deepspeed_enabled:  # its engine steps inside backward: no step to measure and scale back
                warnings.warn("reward_trust_region is not applied under DeepSpeed (its engine steps inside backward); "
                              "x's steps are uncapped", stacklevel=2)
            else:
                self.add_callback(RewardTrustRegion(self, args.reward_trust_region))
        if self.is_deepspeed_enabled and args.forward_kl_coef > 0:
            raise ValueError("forward_kl_coef > 0 is not supported under DeepSpeed (its part needs a forward pass of its "
                             "own); set forward_kl_coef=0 or use DDP or FSDP2")
        if self.is_deepspeed_enabled and args.max_grad_norm > 0:
            warnings.warn(f"under DeepSpeed, max_grad_norm={args.max_grad_norm} clips the global norm of all roles' "
                          "gradients together (its engine clips them), not each role's separately; set "
                          "max_grad_norm=0 to train without clipping, or use DDP or FSDP2 for per-role clipping",
                          stacklevel=2)
        if self.is_deepspeed_enabled and (args.num_iterations > 1 or args.label_every > 1
                                          or args.method == "nested_loop"):
            warnings.warn("under DeepSpeed, x (the reward model) keeps moving in the optimizer steps that give it no "
                          "gradient (after the first pass over a rollout, num_iterations > 1, or in iterations that do "
                          "not update x): its optimizer steps every parameter, with a zero gradient where there is none, "
                          "so Adam's momentum moves x; elsewhere x stays. num_iterations=1 with an x-update every "
                          "iteration avoids it", stacklevel=2)
        self._tensorboard_in_output_dir()

    def _warn_engine_not_started(self) -> None:
        """An accelerate config (`accelerate launch`) that asks for FSDP where accelerate does not start it trains with
        plain data parallelism instead, silently: say so."""
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.is_fsdp_enabled:
            warnings.warn(f"the accelerate config asks for FSDP, but accelerate runs {self.accelerator.distributed_type} "
                          "here: it starts FSDP only on GPU-type devices (not with use_cpu, nor on a machine without a "
                          "GPU), so nothing is sharded; every process holds the whole model", stacklevel=3)

    def _tensorboard_in_output_dir(self) -> None:
        """TensorBoard logs go to output_dir/runs/<date>_<host> (transformers' own choice at the start of training)
        also when evaluate() logs before train(): transformers' callback would otherwise open its writer in ./runs.
        $TENSORBOARD_LOGGING_DIR still wins."""
        from transformers.integrations import TensorBoardCallback
        from transformers.integrations.integration_utils import default_logdir

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = os.path.join(self.args.output_dir, default_logdir())

    @property
    def oracle_queries(self) -> int:
        """Pairs sent to the oracle so far, every process's (answered, abstained or dropped)."""
        return self.oracle_counts.asked

    # ------------------------------------------------------------------ schedules
    @property
    def micro_steps_per_iteration(self) -> int:
        return self.args.num_iterations * self.args.steps_per_generation

    def covariance_weight(self, k: int) -> float:
        """Weight of x's covariance term at iteration k: rises from 0 to 1 over `hypergradient_warmup_ratio` of the
        run's iterations."""
        a = self.args
        steps = self.state.max_steps if self.state.max_steps > 0 else a.max_steps  # the loop's count, epochs resolved
        return warmup_weight(k, a.hypergradient_warmup_ratio * steps / a.steps_per_iteration)

    def schedule(self, k: int) -> tuple[float, float]:
        """(tau_k, lambda_k) at iteration k."""
        a = self.args
        if a.method == "fixed_tau":
            tau = a.tau_init
        elif self.adaptive_tau is not None:  # the controller's value: only for the current iteration
            tau = self.adaptive_tau.value
        else:
            tau = tau_at(k, a.tau_init, a.tau_min, a.tau_schedule, a.tau_decay_rate, a.tau_horizon)
        penalty_lambda = lambda_at(
            k, a.penalty_lambda, a.penalty_lambda_schedule, a.penalty_lambda_growth, a.penalty_lambda_horizon,
            a.penalty_lambda_max,
        )
        return tau, penalty_lambda

    @property
    def fuse_rollout_and_update(self) -> bool:
        """Whether the rollout's actor and r_x forward passes double as the update's (one micro-step per iteration,
        the usual RLOO/GRPO setting): it saves one forward pass per actor and one of r_x per iteration."""
        return self.micro_steps_per_iteration == 1 and self.args.fuse_rollout_and_update

    def is_labelled_iteration(self, k: int) -> bool:
        """Whether the oracle labels iteration k's pairs: every `label_every`-th iteration, from k = 0."""
        return k % self.args.label_every == 0

    def is_reward_iteration(self, k: int) -> bool:
        """Whether iteration k updates x: every labelled iteration, or every `nested_inner_steps`-th for
        nested_loop."""
        if self.args.method == "nested_loop":
            return (k + 1) % self.args.nested_inner_steps == 0 and self.is_labelled_iteration(k)
        return self.is_labelled_iteration(k)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """AdamW with one parameter group per role: actor, critic, reward (three step sizes; x's own beta2)."""
        if self.optimizer is None:
            groups = self._unwrapped_model().role_parameters()
            a = self.args
            self.optimizer = torch.optim.AdamW(
                [
                    {"params": groups["actor"], "lr": a.actor_learning_rate, "name": "actor"},
                    {"params": groups["critic"], "lr": a.critic_learning_rate, "name": "critic"},
                    {"params": groups["reward"], "lr": a.reward_learning_rate, "name": "reward",
                     "betas": (a.adam_beta1, a.adam_beta2 if a.reward_adam_beta2 is None else a.reward_adam_beta2)},
                ],
                betas=(a.adam_beta1, a.adam_beta2),
                eps=a.adam_epsilon,
                weight_decay=a.weight_decay,
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """LambdaLR with one factor per group, each a function of the iteration k = step // steps_per_iteration."""
        if self.lr_scheduler is None:
            a, steps = self.args, self.args.steps_per_iteration

            def factor(role: str):
                schedule, decay = getattr(a, f"{role}_lr_schedule"), getattr(a, f"{role}_lr_decay")
                return lambda step: lr_factor(step // steps, schedule, decay, a.lr_horizon)

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, [factor("actor"), factor("critic"), factor("reward")]
            )
        return self.lr_scheduler

    def _clip_grad_norm(self, model) -> torch.Tensor:
        """Clip each role's gradient separately to max_grad_norm: a global clip would let the reward model's
        lambda-scaled gradient shrink the actors' steps (and couple the three time-scales). Returns the total norm.
        Under DeepSpeed the gradients live in its engine, which clips their global norm itself (warned at start-up)."""
        if self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        norms = {}
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                norms[group["name"]] = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
        for name, norm in norms.items():
            self._metrics[f"grad_norm/{name}"].append(float(norm))
        return torch.stack(list(norms.values())).pow(2).sum().sqrt()

    # ------------------------------------------------------------------ data
    def _get_train_sampler(self, train_dataset=None) -> Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        self._sampler = IterationSampler(
            len(dataset),
            batch_size=self.args.prompts_per_iteration * self.args.world_size,
            repeat_count=self.micro_steps_per_iteration,
            seed=self.args.seed,
        )
        return self._sampler

    # ------------------------------------------------------------------ rollout
    def _tokenize_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Left-padded prompt ids/mask, truncated on the left to max_prompt_length; and the truncation count."""
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("every 'prompt' must be a string")
        enc = self.processing_class(prompts, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError(f"prompt {int((lengths == 0).nonzero()[0])} of the batch is empty after tokenization")
        truncated = int((lengths > self.args.max_prompt_length).sum())
        ids, mask = ids[:, -self.args.max_prompt_length :], mask[:, -self.args.max_prompt_length :]
        device = self.accelerator.device
        return ids.to(device), mask.to(device), truncated

    @torch.no_grad()
    def _generate(
        self, role: str, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, noise_seed: int | None = None
    ) -> torch.Tensor:
        """Sampled completion ids [N, T] from `role` (pad after the first eos; `rl_utils.sample_completions`). With a
        `noise_seed`, sampled by Gumbel-max with the noise of that seed (`bilevel_rlhf.sampling`): the same
        distribution, shared noise."""
        a, tok = self.args, self.processing_class
        unwrapped = self._unwrapped_model()
        if noise_seed is None:
            sampling = dict(do_sample=True, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
        else:
            sampling = self._gumbel_sampling(noise_seed, prompt_ids.shape[1])
        with unwrapped.actor(role) as policy:
            completion, _ = sample_completions(policy, prompt_ids, prompt_mask, a.max_completion_length,
                                               tok.pad_token_id, tok.eos_token_id, **sampling)
        return completion

    @torch.no_grad()
    def _generate_exploring(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, noise_seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """theta's completions [N, T], each row drawn at `temperature` or `temperature * exploration_temperature`
        (probability 1/2 each, by Gumbel-max), and each completion's importance weight pi / q_mix [N] from the
        generation's own logits (`bilevel_rlhf.exploration`)."""
        a, tok = self.args, self.processing_class
        unwrapped = self._unwrapped_model()
        seed = int(torch.randint(0, 2**62, ())) if noise_seed is None else noise_seed
        rows = draw_row_temperatures(len(prompt_ids), a.exploration_temperature, prompt_ids.device)
        processors = coupled_sampling_processors(seed, prompt_ids.shape[1], a.temperature, a.top_k, a.top_p,
                                                 row_temperatures=rows)
        with unwrapped.actor("theta") as policy:
            completion, mask, logits = sample_completions(
                policy, prompt_ids, prompt_mask, a.max_completion_length, tok.pad_token_id, tok.eos_token_id,
                output_logits=True, do_sample=False, logits_processor=processors, temperature=None, top_k=None,
                top_p=None,
            )
        return completion, mixture_weights(logits, completion, mask, a.temperature, a.exploration_temperature)

    def _stacks_roles(self, unwrapped: BilevelModel, roles: list[str]) -> bool:
        """Whether `roles` generate in one batch (`_generate_stacked`): LoRA actors on one base, more than one role,
        and adapters that `bilevel_rlhf.adapters.stacked_adapters` computes exactly."""
        adapters = [r for r in roles if r != "ref"]
        # the stacked weights are read outside the layers' forward, where FSDP may hold only a shard of them
        return (unwrapped.use_peft and len(roles) > 1 and not self.is_fsdp_enabled
                and supports_stacked_adapters(unwrapped.policy_theta, adapters))

    def _generate_stacked(
        self, roles: list[str], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, crn_seed: int | None
    ) -> dict[str, torch.Tensor]:
        """Every role's completions from one `generate` call: the prompts repeated once per role, block j through
        role j's adapter (the reference, last, through the bare base). Each block is sampled by Gumbel-max with the
        noise `_generate` draws for its seed: theta and phi share `crn_seed` under common random numbers, every other
        block has a seed of its own. So each role's samples are those of its own `_generate` call with that seed."""
        a, tok = self.args, self.processing_class
        seeds = [crn_seed if crn_seed is not None and r != "ref" else int(torch.randint(0, 2**62, ())) for r in roles]
        peft_model = self._unwrapped_model().policy_theta
        n = prompt_ids.shape[0]
        with stacked_adapters(peft_model, [r for r in roles if r != "ref"], n):
            completion, _ = sample_completions(
                peft_model, prompt_ids.repeat(len(roles), 1), prompt_mask.repeat(len(roles), 1),
                a.max_completion_length, tok.pad_token_id, tok.eos_token_id,
                **self._gumbel_sampling(seeds, prompt_ids.shape[1]),
            )
        return dict(zip(roles, completion.split(n)))

    def _gumbel_sampling(self, seed: int | list[int], prompt_length: int) -> dict[str, Any]:
        """`generate` arguments that sample by Gumbel-max with the noise of `seed` (one per block of rows): greedy
        decoding of the warped, noised log-probabilities (`bilevel_rlhf.sampling`)."""
        a = self.args
        processors = coupled_sampling_processors(seed, prompt_length, a.temperature, a.top_k, a.top_p)
        return dict(do_sample=False, logits_processor=processors, temperature=None, top_k=None, top_p=None)

    def _completion_mask(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """1 up to and including the first eos (`rl_utils.completion_mask`)."""
        return completion_mask(completion_ids, self.processing_class.eos_token_id)

    def _decode(self, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """The text of each completion's real tokens (`rl_utils.decode_completions`)."""
        return decode_completions(self.processing_class, completion_ids, mask)

    def _reward_inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs of r_x for prompt + completion rows: the policy's own ids, or the text of each row's real tokens
        re-tokenized by reward_processing_class. The whole row is decoded at once (as TRL does): decoding the prompt
        and the completion apart and joining the strings would merge words where a tokenizer drops the leading
        space of a completion decoded on its own."""
        if self.reward_processing_class is None:
            return ids, mask
        texts = self._decode(ids, mask)
        enc = self.reward_processing_class(texts, padding=True, return_tensors="pt")
        return enc["input_ids"].to(ids.device), enc["attention_mask"].to(ids.device)

    def _advantages(self, score, logprobs, ref_logprobs, values, mask, tau, weights=None, exact_kl=None):
        """Per-token reward -tau * penalty_t (+ score at the last token), GAE, whitened advantages. With
        `advantage_estimator="rloo"`: each completion's return minus the mean of its prompt's other completions'.
        With importance `weights` ([N], exploration) the whitening's mean and scale are theta's, weighted back.
        With `exact_kl` ([N, T], kl_estimator exact) the penalty in token t's reward is the exact KL of state t + 1
        (state t's own is the loss term's, whose gradient is exact); the last value returned is that term's weight,
        tau over the whitening's scale, in the units of the whitened advantages."""
        a = self.args
        maskf = mask.float()
        w = None if weights is None else weights[:, None].expand_as(maskf)
        penalty = token_kl_penalty(logprobs, ref_logprobs, a.regularization) * maskf
        seq_penalty = penalty.sum(1)
        if exact_kl is not None:
            # E[grad log pi(a_t | s_t) * KL(s_t')] = 0 for t' <= t: only the states after t are credited to a_t
            penalty = torch.nn.functional.pad((exact_kl * maskf)[:, 1:], (0, 1))
        if a.advantage_estimator == "rloo":
            totals = (score - tau * penalty.sum(1)).view(-1, a.num_generations)  # rows of one prompt are adjacent
            baseline = (totals.sum(1, keepdim=True) - totals) / (a.num_generations - 1)
            advantages = (totals - baseline).reshape(-1, 1) * maskf
            # no critic: its targets are its own values, and the value loss is switched off in `_ppo_loss`
            returns = values * maskf
        else:
            rewards = -tau * penalty
            last = mask.sum(1) - 1
            rewards[torch.arange(len(last), device=mask.device), last] += score
            if a.whiten_rewards:
                rewards = masked_whiten(rewards, maskf, shift_mean=False, weights=w)
            advantages, returns = compute_gae(rewards, values, maskf, a.gamma, a.lam)
        mean, scale = whitening_stats(advantages, maskf, w)  # masked_whiten's, kept for the KL term's weight
        return (advantages - mean) / scale * maskf, returns, seq_penalty, tau / scale

    def _pair_loss(self, scores: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """r_x's BT-NLL of each labelled pair: theta's completion i against the reference's completion i, or theta's
        completions (2i, 2i+1), as the objective compares them."""
        if self.objective.against_reference:
            return bradley_terry_loss(scores["theta"], scores["ref"], labels)
        return bradley_terry_loss(scores["theta"][0::2], scores["theta"][1::2], labels)

    def with_scores(self, rollout: Rollout, scores: dict[str, torch.Tensor]) -> Rollout:
        """Stage 2: `rollout` with r_x's scores (role -> [N], no graph) and the terminal rewards: r_x for phi and for
        theta under partial_sgd and covariance; r_x - g / lambda_k for the penalized theta (the penalty methods and
        penalized_covariance), which maximizes J_tau - f / lambda,
        with g = df/dpi of each of its completions from the objective; minus `missing_eos_penalty` for an actor's
        completion without eos. Given theta's scores, also the pairs' losses."""
        k, new = rollout.iteration, {}
        penalty = self.args.missing_eos_penalty
        for role, s in scores.items():
            _check_finite(f"r_x score of {role}'s completions", s, k)
            c, terminal = rollout.completions(role), s
            if penalty is not None and role != "ref":  # the actors' reward, as TRL's missing_eos_penalty
                has_eos = ((c.input_ids[:, rollout.prompt_length:] == self.processing_class.eos_token_id)
                           & c.mask.bool()).any(1)
                terminal = s - penalty * (~has_eos).float()
            new[role] = dataclasses.replace(c, score=s, terminal=terminal)
        rollout = rollout.with_roles(**new)
        if "theta" not in scores or rollout.labels is None:  # unlabelled: theta's reward is r_x alone
            return rollout
        theta, labels = rollout.theta, rollout.labels
        pair_loss = self._pair_loss({r: rollout.completions(r).score for r in scores}, labels)
        # a completion whose pair has no answer gets no oracle term: g = 0
        g = answered_completion_values(self.objective, pair_loss, labels, rollout.answered_pairs)
        if not isinstance(g, torch.Tensor) or g.shape != theta.score.shape:
            raise ValueError(
                f"objective {self.objective.name!r}: completion_values must return one value per completion of theta "
                f"(shape {tuple(theta.score.shape)}), got {getattr(g, 'shape', type(g).__name__)}"
            )
        _check_finite(f"objective {self.objective.name!r} completion values", g, k)
        g = g.detach()
        penalized = self.args.method in PENALIZED_THETA_METHODS
        terminal = theta.terminal - g / rollout.penalty_lambda if penalized else theta.terminal
        theta = dataclasses.replace(theta, g=g, terminal=terminal)
        return dataclasses.replace(rollout, theta=theta, pair_loss=pair_loss)

    def with_advantages(self, rollout: Rollout, role: str, out: dict[str, torch.Tensor]) -> Rollout:
        """Stage 3: `rollout` with `role`'s old log-probs, values and entropies (`out`, no graph), advantages and
        returns."""
        c = rollout.completions(role)
        _check_finite(f"{role} log-probabilities", out["logprobs"], rollout.iteration)
        _check_finite(f"{role} values", out["values"], rollout.iteration)
        exact_kl = out.get("kl")
        advantages, returns, seq_penalty, kl_coef = self._advantages(
            c.terminal, out["logprobs"], c.ref_logprobs, out["values"], c.mask, rollout.tau, weights=c.weight,
            exact_kl=exact_kl,
        )
        c = dataclasses.replace(c, logprobs=out["logprobs"], values=out["values"], entropy=out["entropy"],
                                advantages=advantages, returns=returns, seq_penalty=seq_penalty,
                                kl_coef=None if exact_kl is None else kl_coef.expand(len(c)))
        return rollout.with_roles(**{role: c})

    @torch.no_grad()
    def generate_and_score(self, prompts: list[str]) -> Rollout:
        """One iteration's rollout on this process's `prompts`: generate, label, score, advantages. Fused, the scores
        of an x-step and everything the actors compute are left to the update's forward pass (`training_step`)."""
        a, tok = self.args, self.processing_class
        k = self.state.global_step // a.steps_per_iteration
        tau, penalty_lambda = self.schedule(k)
        unwrapped = self._unwrapped_model()
        self.guard.before_rollout(unwrapped, self.optimizer)  # a resync the last rollout asked for
        actors = ["theta", "phi"] if unwrapped.has_phi else ["theta"]
        labelled = self.is_labelled_iteration(k)
        exploring = labelled and a.exploration_temperature != 1.0
        # the reference also generates when the objective compares theta's completions with its own, and for the
        # forward KL's estimate (`bilevel_rlhf.forward_kl`)
        with_ref = (self.objective.against_reference and labelled) or a.forward_kl_coef > 0
        generators = actors + (["ref"] if with_ref else [])
        n = a.num_generations

        # --- generate
        t0 = time.perf_counter()
        prompt_ids, prompt_mask, truncated = self._tokenize_prompts(prompts)
        P = prompt_ids.shape[1]
        rep_ids, rep_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
        # common random numbers: theta and phi share one noise seed (row i of both sees the same noise); the
        # reference never does, so that its completions stay independent of theta's in the pairs they form
        seed = int(torch.randint(0, 2**62, ())) if a.common_random_numbers else None
        stacked = self._stacks_roles(unwrapped, generators)
        weights = None
        if stacked and not exploring:  # LoRA actors: every role's rows in one batch of the shared base
            completions = self._generate_stacked(generators, rep_ids, rep_mask, seed)
        else:
            completions = {r: self._generate(r, rep_ids, rep_mask, noise_seed=seed if r != "ref" else None)
                           for r in generators if not (exploring and r == "theta")}
            if exploring:
                completions["theta"], weights = self._generate_exploring(rep_ids, rep_mask, noise_seed=seed)
                weights = pair_row_weights(weights, self.objective.against_reference)
        masks = {r: self._completion_mask(c) for r, c in completions.items()}
        T = max(c.shape[1] for c in completions.values())
        for r in generators:  # a common width T, pad after each first eos (as _generate returns them), masked out
            pad = T - completions[r].shape[1]
            completions[r] = torch.nn.functional.pad(completions[r], (0, pad), value=tok.pad_token_id)
            masks[r] = torch.nn.functional.pad(masks[r], (0, pad), value=0)
        texts = {r: self._decode(completions[r], masks[r]) for r in generators}
        rep_prompts = [p for p in prompts for _ in range(n)]
        t_generation = time.perf_counter() - t0

        # --- label: theta's completion i against the reference's completion i, or theta's pairs (2i, 2i+1)
        t0 = time.perf_counter()
        labels = answered = None
        reward_step = self.is_reward_iteration(k)
        if labelled:
            if self.objective.against_reference:
                pair_prompts, side_a, side_b = rep_prompts, texts["theta"], texts["ref"]
            else:
                pair_prompts, side_a, side_b = rep_prompts[0::2], texts["theta"][0::2], texts["theta"][1::2]
            answer = self.oracle_caller.ask(pair_prompts, side_a, side_b, k)  # retries; a failed batch is dropped
            counts, stop = summed_over_processes(answer.counts, self.oracle_caller.should_stop, self.accelerator)
            self.oracle_counts += counts
            if stop:  # every process gets here: the decision is reduced; `_prepare_inputs` saves a checkpoint
                raise self.oracle_caller.failure_error(k)
            if counts.answered:
                labels = torch.as_tensor(answer.labels, dtype=torch.float32, device=prompt_ids.device)
                answered = torch.as_tensor(answer.answered, device=prompt_ids.device)
            else:  # no answer on any process: x does not step, and the actors train on r_x alone
                reward_step = False

        ids = {r: torch.cat([rep_ids, completions[r]], 1) for r in generators}
        attention = {r: torch.cat([rep_mask, masks[r]], 1) for r in generators}
        ref_logprobs, ref_full_logprobs = {}, {}
        if a.regularization == "kl":
            # stacked: the actors' rows in one pass of the reference; otherwise one role at a time, since the
            # [N, T, vocab] logits are the peak memory of a pass
            ref_groups = [actors] if stacked else [[r] for r in actors]
            exact = a.kl_estimator == "exact"
            for group in ref_groups:
                out = unwrapped.policy_forward(
                    "ref", torch.cat([ids[r] for r in group]), torch.cat([attention[r] for r in group]), P, a.temperature,
                    with_values=False, with_entropy=False, with_full_logprobs=exact,
                )
                ref_logprobs.update(zip(group, out["logprobs"].split(len(rep_prompts))))
                if exact:
                    ref_full_logprobs.update(zip(group, out["full_logprobs"].split(len(rep_prompts))))
        roles = {}
        for r in generators:
            reward_ids, reward_mask = self._reward_inputs(ids[r], attention[r])
            roles[r] = Completions(ids[r], attention[r], masks[r], reward_ids, reward_mask, ref_logprobs=ref_logprobs.get(r),
                                   ref_full_logprobs=ref_full_logprobs.get(r),
                                   weight=weights if r == "theta" else None)
        rollout = Rollout(
            iteration=k, tau=tau, penalty_lambda=penalty_lambda, prompt_length=P, labels=labels, answered=answered,
            reward_step=reward_step, fused=self.fuse_rollout_and_update, **roles,
        )

        # --- score (fused x-steps: the update's forward pass of r_x scores), advantages (fused: the update's)
        if not (rollout.fused and rollout.reward_step):
            scores = unwrapped.reward_forward(
                torch.cat([roles[r].reward_input_ids for r in generators]),
                torch.cat([roles[r].reward_attention_mask for r in generators]),
            )
            rollout = self.with_scores(rollout, dict(zip(generators, scores.split(len(rep_prompts)))))
        if not rollout.fused:
            if stacked and len(actors) > 1:  # theta's and phi's old log-probs and values in one pass of the base
                outs = unwrapped.stacked_policy_forward(
                    tuple(actors), torch.cat([ids[r] for r in actors]), torch.cat([attention[r] for r in actors]), P,
                    a.temperature,
                    ref_full_logprobs=torch.cat([ref_full_logprobs[r] for r in actors]) if ref_full_logprobs else None,
                )
            else:
                outs = {r: unwrapped.policy_forward(r, ids[r], attention[r], P, a.temperature,
                                                    ref_full_logprobs=ref_full_logprobs.get(r)) for r in actors}
            for r in actors:
                rollout = self.with_advantages(rollout, r, outs[r])
        stats = RolloutStats(rep_prompts, texts, completions, truncated,
                             {"time/generation": t_generation, "time/scoring": time.perf_counter() - t0})
        return dataclasses.replace(rollout, stats=stats)

    def _log_rollout(self, rollout: Rollout) -> None:
        """The rollout's metrics (averaged over processes), logged with the optimizer steps of its iteration."""
        tok, stats, theta = self.processing_class, rollout.stats, rollout.theta
        tau, labels = rollout.tau, rollout.labels
        m: dict[str, torch.Tensor | float] = {
            "objective/tau": tau,
            "reward/theta_mean": theta.score.mean(),
            "completions/truncated_prompts": float(stats.truncated_prompts),
            **stats.seconds,
        }
        answered_means = {}  # means over the answered pairs: weighted by each process's count when gathered
        if labels is not None:  # a labelled iteration (every one unless label_every > 1) with answers
            if self.objective.against_reference:
                d = theta.score - rollout.ref.score
            else:
                d = theta.score[0::2] - theta.score[1::2]
            s = (torch.sign(d) + 1) / 2
            a = rollout.answered_pairs
            y, pair_loss = labels[a], rollout.pair_loss[a]
            if len(y):
                answered_means["objective/upper_loss"] = answered_value(self.objective, rollout.pair_loss, labels, a)
                answered_means["objective/pair_nll"] = pair_loss.mean()
                answered_means["objective/pref_accuracy"] = (y * s[a] + (1 - y) * (1 - s[a])).mean()
                if self.objective.against_reference:
                    answered_means["objective/win_rate"] = y.mean()
            else:  # none here, some on another process
                answered_means = dict.fromkeys(("objective/upper_loss", "objective/pair_nll", "objective/pref_accuracy")
                                               + (("objective/win_rate",) if self.objective.against_reference else ()),
                                               0.0)
            m.update({key: float(v) * len(y) for key, v in answered_means.items()})
            m["oracle/pairs_answered"] = float(len(y))
            if self.objective.against_reference:
                m["reward/ref_mean"] = rollout.ref.score.mean()
        if self.args.method in PENALIZED_THETA_METHODS:
            m["objective/lambda"] = rollout.penalty_lambda
        if self.args.hypergradient_warmup_ratio > 0:
            m["objective/covariance_weight"] = self.covariance_weight(rollout.iteration)
        if rollout.phi is not None:
            phi = rollout.phi
            m["reward/phi_mean"] = phi.score.mean()
            # phi's own objective J_tau on both samples: r_x less the eos penalty, without theta's oracle term
            penalized = self.args.method in PENALIZED_THETA_METHODS and theta.g is not None
            oracle_term = theta.g / rollout.penalty_lambda if penalized else 0.0
            j_phi = phi.terminal - tau * phi.seq_penalty
            j_theta = theta.terminal + oracle_term - tau * theta.seq_penalty
            m["objective/penalty_gap"] = j_phi.mean() - j_theta.mean()
        if theta.weight is not None:  # exploration: the share of theta's sample its importance weights keep
            w = theta.weight
            m["exploration/effective_sample_fraction"] = w.sum() ** 2 / (len(w) * (w**2).sum())
        for r in rollout.actors:
            c, completion_ids = rollout.completions(r), stats.completion_ids[r]
            m[f"policy_{r}/entropy"] = masked_mean(c.entropy, c.mask.float())
            if c.ref_logprobs is not None:
                m[f"policy_{r}/kl"] = ((c.logprobs - c.ref_logprobs) * c.mask).sum(1).mean()
            m[f"completions/{r}_mean_length"] = c.mask.sum(1).float().mean()
            m[f"completions/{r}_empty_fraction"] = (
                (completion_ids[:, 0] == tok.eos_token_id).float().mean() if tok.eos_token_id is not None else 0.0
            )
        score_fn = getattr(self.preference_oracle, "score", None)
        oracle_scores = score_fn(stats.prompts, stats.texts["theta"]) if callable(score_fn) else None
        if oracle_scores is not None:
            m["oracle/score_theta"] = float(np.mean(oracle_scores))
        if self.completion_logger is not None and self.state.global_step % max(1, int(self.args.logging_steps)) == 0:
            # theta's row i is in pair i (against the reference's row i) or in pair i // 2 (theta's own pairs)
            pair_of = (lambda i: i) if self.objective.against_reference else (lambda i: i // 2)
            shown = None if labels is None else [y if ok else None  # None: no answer for that pair
                                                 for y, ok in zip(labels.tolist(), rollout.answered_pairs.tolist())]
            self.completion_logger.write(self.completion_logger.rows(
                self.state.global_step, stats.prompts, stats.texts["theta"], theta.score.tolist(), oracle_scores,
                shown, pair_of))
        gathered = self._gather_mean(m)
        if answered_means:  # mean over processes of (count * mean) / mean of counts = the mean over all answered
            count = gathered.pop("oracle/pairs_answered")
            gathered.update({key: gathered[key] / count for key in answered_means})
        self._rollout_metrics = gathered
        self._rollout_metrics["completions/truncated_prompts"] *= self.accelerator.num_processes  # a count: sum
        self._rollout_metrics.update(self.oracle_counts.metrics())

    def _react(self, rollout: Rollout) -> None:
        """What the rollout's metrics change for the next iteration: the guards' counts and repairs, the adaptive
        tau. Every process holds the same gathered metrics, so every process decides the same."""
        m = self._rollout_metrics
        m.update(self.guard.check(m, rollout.iteration))
        if self.adaptive_tau is not None:
            self.adaptive_tau.update(m["policy_theta/kl"])

    def _unwrapped_model(self) -> BilevelModel:
        """`accelerator.unwrap_model(self.model)`, kept while `self.model` is the same object: accelerate's unwrap
        re-reads installed packages' metadata on every call (milliseconds), and the rollout asks several times per
        iteration."""
        if getattr(self, "_unwrapped_of", None) is not self.model:
            self._unwrapped_of, self._unwrapped = self.model, self.accelerator.unwrap_model(self.model)
        return self._unwrapped

    @contextlib.contextmanager
    def _full_parameters(self):
        """Under FSDP2, every parameter gathered whole for the work that runs outside the wrapper's forward (sampling,
        the rollout's no-grad passes, evaluation), and sharded again after; elsewhere nothing."""
        model = self.model_wrapped
        if not (self.is_fsdp_enabled and callable(getattr(model, "unshard", None))):
            yield
            return
        model.unshard()
        try:
            yield
        finally:
            model.reshard()

    def _gather_mean(self, metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
        names = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in names], device=self.accelerator.device)
        values = self.accelerator.gather(values[None]).view(-1, len(names)).mean(0)
        return dict(zip(names, values.tolist()))

    # ------------------------------------------------------------------ training step
    def _prepare_inputs(self, inputs: list[dict[str, Any]] | Rollout | LossInputs) -> Rollout | LossInputs:
        """The rollout at the first micro-step of an iteration (`generate_and_score`); afterwards, the micro-batch of
        the buffered rollout. In the fused mode the micro-batch is the whole rollout. A prepared batch is returned as
        it is."""
        if isinstance(inputs, (Rollout, LossInputs)):
            return inputs
        a = self.args
        S = self.micro_steps_per_iteration
        m = self._micro_step % S  # set by training_step
        if m == 0 or self._buffer is None:
            t0 = time.perf_counter()
            # a resync of phi the last rollout asked for, on the parameters the optimizer holds (under FSDP2 the
            # shards: what is written into the gathered ones is dropped when they are sharded again)
            self.guard.before_rollout(self._unwrapped_model(), self.optimizer)
            try:
                with self._full_parameters():
                    self._buffer = self.generate_and_score([row["prompt"] for row in inputs])
            except OracleFailureError as err:  # saved here, outside the rollout's gathered parameters
                err.checkpoint = self._checkpoint_for_oracle_failure()
                raise
            if not self._buffer.fused:
                self._log_rollout(self._buffer)
                self._react(self._buffer)
            self._rollout_seconds = time.perf_counter() - t0
        buf = self._buffer
        if buf.fused:
            return buf
        epoch, j = divmod(m, a.steps_per_generation)
        n = a.num_generations
        B = len(buf.theta) // n  # prompts of this process
        chunk = B // a.steps_per_generation
        # a fixed permutation per (iteration, epoch): no RNG state involved, so resuming replays it exactly
        generator = torch.Generator().manual_seed(a.seed * 1_000_003 + buf.iteration * 101 + epoch)
        prompt_idx = torch.randperm(B, generator=generator)[j * chunk : (j + 1) * chunk]
        rows = (prompt_idx[:, None] * n + torch.arange(n)[None, :]).reshape(-1).to(buf.theta.input_ids.device)
        if self.objective.against_reference:  # one pair per theta completion
            pairs = rows
        else:
            pairs = (prompt_idx[:, None] * (n // 2) + torch.arange(n // 2)[None, :]).reshape(-1).to(rows.device)
        return buf.minibatch(rows, pairs, reward_step=epoch == 0 and buf.reward_step)

    def loss_parts(self, batch: Rollout) -> list[tuple[str, ...]]:
        """The groups of loss parts that get one forward/backward each, in order: x's loss on theta's and on phi's
        completions ("reward/theta", "reward/phi"; first, since in the fused mode their scores enter the actors'
        advantages), then "theta" and "phi" (actor + critic). One part per group, so only one part's activations are
        held at a time, none over more rows than a single-policy step; under DeepSpeed, whose engine steps inside
        each backward, all parts in one group. With `forward_kl_coef`, a last part "forward_kl": theta's pass over the
        reference's completions."""
        parts = ([f"reward/{r}" for r in batch.actors] if batch.reward_step else []) + batch.actors
        if self.args.forward_kl_coef > 0 and batch.ref is not None:
            parts.append("forward_kl")  # theta on the reference's completions, after the scores are known
        return [tuple(parts)] if self.is_deepspeed_enabled else [(p,) for p in parts]

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One micro-step: the rollout when one is due, then `Trainer.training_step` (forward, loss, backward) once
        per group of `loss_parts`: gradient accumulation over the roles. Gradients are synchronized once, with the
        last group. Fused, each group's forward pass runs here first and completes the rollout (`_complete`):
        stages 2 and 3 of `bilevel_rlhf.rollout` come from the pass whose loss is then backpropagated."""
        t0, self._rollout_seconds = time.perf_counter(), 0.0
        if self._micro_step is None:  # first call of this train(): checkpoints sit at iteration boundaries
            self._micro_step = self.state.global_step * self.args.gradient_accumulation_steps
        batch = self._prepare_inputs(inputs)
        groups = self.loss_parts(batch)
        loss = torch.zeros((), device=self.accelerator.device)
        for i, parts in enumerate(groups):
            with contextlib.nullcontext() if i == len(groups) - 1 else self.accelerator.no_sync(model):
                outputs = None
                if batch.fused:
                    model.train()
                    with self.compute_loss_context_manager():
                        outputs = self._forward(model, batch, parts)
                    batch = self._complete(batch, outputs)
                loss = loss + super().training_step(model, LossInputs(batch, parts, outputs), num_items_in_batch)
        if batch.fused:
            self._buffer = batch
            self._log_rollout(batch)
            self._react(batch)
        sm = self._step_metrics
        for name in ("policy/approxkl", "policy/clipfrac", "value/loss"):  # means over the roles
            area, stat = name.split("/")
            sm[name] = torch.stack([sm[f"{area}_{r}/{stat}"] for r in batch.actors]).mean()
        for key, v in self._gather_mean(sm).items():
            self._metrics[key].append(v)
        self._step_metrics.clear()
        self._micro_step += 1
        self._metrics["time/update"].append(time.perf_counter() - t0 - self._rollout_seconds)
        return loss

    def _forward(self, model, batch: Rollout, parts: tuple[str, ...]) -> dict[str, Any]:
        """One forward pass (through the DDP/FSDP wrapper) for `parts`: the actors' outputs (role -> log-probs,
        values, entropies) and r_x's scores (`"scores"`: role -> [N]): on theta's completions and the reference's they
        are compared with for "reward/theta", on phi's for "reward/phi"."""
        actors = [r for r in ACTORS if r in parts]
        scored = [r for r in batch.generators if f"reward/{'theta' if r == 'ref' else r}" in parts]
        reward = None
        if scored:
            reward = {key: torch.cat([getattr(batch.completions(r), f"reward_{key}") for r in scored])
                      for key in ("input_ids", "attention_mask")}
        if "forward_kl" in parts:  # its own group (never under DeepSpeed): theta's log-probs on the reference's rows
            ref = batch.ref
            out = model(theta={"input_ids": ref.input_ids, "attention_mask": ref.attention_mask},
                        prompt_length=batch.prompt_length, temperature=self.args.temperature)
            return {"forward_kl": out["theta"]["logprobs"], "scores": {}}
        out = model(
            **{r: batch.completions(r).policy_inputs() for r in actors},
            reward=reward,
            prompt_length=batch.prompt_length,
            temperature=self.args.temperature,
            with_entropy=batch.fused,
        )
        out["scores"] = dict(zip(scored, out.pop("reward").split(len(batch.theta)))) if scored else {}
        return out

    def _complete(self, batch: Rollout, outputs: dict[str, Any]) -> Rollout:
        """Fused: `batch` with the stages that this forward pass's outputs (without their graph) give: scores, then
        each actor's old log-probs, values and advantages (so the PPO ratio is exactly 1)."""
        if outputs["scores"]:
            batch = self.with_scores(batch, {r: s.detach() for r, s in outputs["scores"].items()})
        for r in ACTORS:
            if r in outputs:
                batch = self.with_advantages(batch, r, {key: v.detach() for key, v in outputs[r].items()})
        return batch

    def _ppo_loss(self, new: dict[str, torch.Tensor], old: Completions) -> tuple[torch.Tensor, dict]:
        """PPO-clip policy loss + vf_coef * clipped value loss, masked token means (each row's tokens weighted by its
        importance weight under exploration)."""
        a = self.args
        mask = old.mask.float()
        w = 1.0 if old.weight is None else old.weight[:, None]
        log_ratio = new["logprobs"] - old.logprobs
        ratio = torch.exp(log_ratio)
        adv = old.advantages
        pg_losses = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - a.cliprange, 1 + a.cliprange))
        pg_loss = masked_mean(w * pg_losses, mask)
        v_clipped = old.values + torch.clamp(new["values"] - old.values, -a.cliprange_value, a.cliprange_value)
        vf_losses = torch.max((new["values"] - old.returns) ** 2, (v_clipped - old.returns) ** 2)
        vf_loss = 0.5 * masked_mean(w * vf_losses, mask)
        stats = {
            "policy_loss": pg_loss.detach(),
            "value_loss": vf_loss.detach(),
            "approxkl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
            "clipfrac": masked_mean((torch.abs(ratio.detach() - 1) > a.cliprange).float(), mask),
        }
        vf_coef = 0.0 if a.advantage_estimator == "rloo" else a.vf_coef  # rloo: the critic is not used
        loss = pg_loss + vf_coef * vf_loss
        if old.kl_coef is not None:  # kl_estimator exact: each visited state's KL, differentiated exactly
            kl_loss = masked_mean(w * old.kl_coef[:, None] * new["kl"], mask)
            stats["kl_loss"] = kl_loss.detach()
            loss = loss + kl_loss
        return loss, stats

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The summed loss of the parts of `inputs` (a `LossInputs`; a bare `Rollout` means all its parts) from one
        forward pass (run here, or given: fused). The parts' parameters are disjoint: each gets only its own
        gradient. Reads its inputs only; the loss statistics go to the step's metrics."""
        if isinstance(inputs, Rollout):
            inputs = LossInputs(inputs, tuple(p for group in self.loss_parts(inputs) for p in group))
        batch, parts, out = inputs.batch, inputs.parts, inputs.outputs
        if out is None:
            out = self._forward(model, batch, parts)
            if batch.fused:  # called directly on a fused rollout: complete a local copy from this pass
                batch = self._complete(batch, out)
        k = batch.iteration
        loss = torch.zeros((), device=self.accelerator.device)
        metrics = self._step_metrics
        scores = out["scores"]
        if scores:
            pair_loss = self._pair_loss(scores, batch.labels) if "theta" in scores else None
            loss_x = reward_model_loss(
                self.objective, self.args.method, pair_loss, batch.labels, scores.get("theta"), scores.get("phi"),
                batch.penalty_lambda, batch.tau, g=batch.theta.g, answered=batch.answered,
                covariance_weight=self.covariance_weight(k), weights=batch.theta.weight,
            )
            _check_finite(f"reward-model loss (objective {self.objective.name!r})", loss_x, k)
            if loss_x.ndim != 0:
                raise ValueError(f"objective {self.objective.name!r}: x_loss must return a scalar, got shape "
                                 f"{tuple(loss_x.shape)}")
            loss = loss + loss_x
            metrics["objective/reward_loss"] = metrics.get("objective/reward_loss", 0.0) + loss_x.detach()
        for r in ACTORS:
            if r not in out:
                continue
            loss_r, stats = self._ppo_loss(out[r], batch.completions(r))
            loss = loss + loss_r
            metrics.update({f"policy_{r}/{key}": v for key, v in stats.items() if key != "value_loss"})
            metrics[f"value_{r}/loss"] = stats["value_loss"]
        if "forward_kl" in out:
            loss_f, ess = forward_kl_loss(out["forward_kl"], batch.ref.mask.float(), batch.ref.score, batch.tau)
            loss = loss + self.args.forward_kl_coef * loss_f
            metrics["policy_theta/forward_kl_loss"], metrics["policy_theta/forward_kl_ess"] = loss_f.detach(), ess
        _check_finite("training loss", loss, k)
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "learning_rate" in logs and self.optimizer is not None:
            # HF logs the first parameter group's rate (the actors'): log each role's under its own name instead
            del logs["learning_rate"]
            logs.update({f"learning_rate/{g['name']}": g["lr"] for g in self.optimizer.param_groups})
        if self.model.training or self._metrics:
            logs.update({key: sum(v) / len(v) for key, v in self._metrics.items()})
            logs.update(self._rollout_metrics)
            self._metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """theta's mean r_x and mean oracle score (if the oracle has `score`) on the eval prompts; no oracle queries.
        Sampling uses its own RNG stream seeded with `args.seed` (every evaluation draws the same noise, and training
        continues with the random state it had: evaluating never changes a run)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        _check_prompt_dataset(dataset, "eval_dataset")
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.args.seed + self.accelerator.process_index)
            with self._full_parameters():
                return self._evaluate_prompts(dataset, metric_key_prefix)

    def _evaluate_prompts(self, dataset: Any, metric_key_prefix: str) -> dict[str, float]:
        unwrapped = self._unwrapped_model()
        shard = dataset.shard(self.accelerator.num_processes, self.accelerator.process_index, contiguous=True)
        r_sum, o_sum, count = 0.0, 0.0, 0
        bs = self.args.per_device_eval_batch_size
        score_fn = getattr(self.preference_oracle, "score", None)
        n = self.args.num_eval_generations
        for start in range(0, len(shard), bs):
            prompts = [p for p in shard[start : start + bs]["prompt"] for _ in range(n)]
            ids, mask, _ = self._tokenize_prompts(prompts)
            completion = self._generate("theta", ids, mask)
            cmask = self._completion_mask(completion)
            texts = self._decode(completion, cmask)
            r_ids, r_mask = self._reward_inputs(torch.cat([ids, completion], 1), torch.cat([mask, cmask], 1))
            r_sum += float(unwrapped.reward_forward(r_ids, r_mask).sum())
            if callable(score_fn):
                scores = score_fn(prompts, texts)
                o_sum += float(np.sum(scores)) if scores is not None else float("nan")
            count += len(prompts)
        totals = self.accelerator.gather(torch.tensor([[r_sum, o_sum, count]], device=self.accelerator.device))
        totals = totals.view(-1, 3).sum(0)
        metrics = {f"{metric_key_prefix}_reward/theta_mean": float(totals[0] / totals[2])}
        if callable(score_fn):
            metrics[f"{metric_key_prefix}_oracle/score_theta"] = float(totals[1] / totals[2])
        Trainer.log(self, dict(metrics))  # not self.log: that would add the training metrics
        # callbacks (early stopping, trackers) see the metrics; this also clears the "evaluate now" flag
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    # ------------------------------------------------------------------ saving / loading
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """theta at the top level (from_pretrained-loadable), phi in phi/, r_x in reward_model/, the critics in
        value_heads.safetensors, the config in bilevel_config.json. With PEFT the adapters are saved instead of
        full weights (theta's adapter at the top level, phi's in phi/); load theta with
        ``AutoModelForCausalLM.from_pretrained(dir)`` (transformers reads adapter_config.json and loads the base
        named in it) or ``PeftModel.from_pretrained(base, dir).merge_and_unload()``."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        # FSDP: the module holds shards, so each role is written from the whole state dict that save_model gathered
        save_roles(self._unwrapped_model(), output_dir,
                   state_dict=state_dict if self.is_fsdp_enabled else None)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        if self.reward_processing_class is not None:
            self.reward_processing_class.save_pretrained(os.path.join(output_dir, "reward_model"))
        with open(os.path.join(output_dir, CONFIG_NAME), "w") as fh:
            fh.write(self.args.to_json_string())

    def _save_checkpoint(self, model, trial) -> None:
        if self.state.global_step % self.args.steps_per_iteration:
            raise RuntimeError(
                f"checkpoint at step {self.state.global_step} is inside an iteration (steps_per_iteration = "
                f"{self.args.steps_per_iteration}); set save_steps to a multiple of it"
            )
        super()._save_checkpoint(model, trial)
        output_dir = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        k = self.state.global_step // self.args.steps_per_iteration
        tau, penalty_lambda = self.schedule(k)
        state_fn = getattr(self.preference_oracle, "state_dict", None)
        state = {
            "iteration": k,
            "tau": tau,
            "lambda": penalty_lambda,
            "oracle_queries": self.oracle_queries,
            "oracle_counts": self.oracle_counts.state_dict(),
            "oracle_state": state_fn() if callable(state_fn) else None,
            "guard": self.guard.record.state_dict(),
            "adaptive_tau": self.adaptive_tau.value if self.adaptive_tau is not None else None,
        }
        os.makedirs(output_dir, exist_ok=True)  # every process writes its own oracle RNG state
        with open(os.path.join(output_dir, STATE_NAME.format(rank=self.accelerator.process_index)), "w") as fh:
            json.dump(state, fh)

    def _checkpoint_for_oracle_failure(self) -> str:
        """A checkpoint at the iteration boundary where the oracle gave up (the model as the last update left it, the
        oracle counts with this iteration's drops), so that the stopped run resumes; returns its folder."""
        self._save_checkpoint(self.model, trial=None)
        return os.path.join(self._get_output_dir(trial=None), f"checkpoint-{self.state.global_step}")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        unwrapped = self._unwrapped_model()
        path = os.path.join(resume_from_checkpoint, STATE_NAME.format(rank=self.accelerator.process_index))
        if not os.path.isfile(path):
            path = os.path.join(resume_from_checkpoint, STATE_NAME.format(rank=0))

        def corrupt(what: str) -> RuntimeError:
            return RuntimeError(
                f"cannot resume from {resume_from_checkpoint}: {what}. The checkpoint is incomplete or corrupt; pass "
                "an earlier checkpoint-* folder as resume_from_checkpoint (--resume_from_checkpoint PATH)."
            )

        try:  # a missing, truncated or corrupt file: load_roles names it
            if self.is_fsdp_enabled:  # sharded parameters: the whole model that accelerate saved beside the roles
                from accelerate.utils import load_fsdp_model

                load_fsdp_model(self.accelerator.state.fsdp_plugin, self.accelerator, self.model_wrapped,
                                resume_from_checkpoint)
            elif not self.is_deepspeed_enabled:  # DeepSpeed has loaded the model from its own checkpoint
                load_roles(unwrapped, resume_from_checkpoint)
        except (OSError, ValueError, KeyError) as err:
            raise corrupt(str(err)) from err
        try:
            with open(path) as fh:
                state = json.load(fh)
        except (OSError, ValueError) as err:
            raise corrupt(f"cannot read {path} ({type(err).__name__}: {err})") from err
        counts = state.get("oracle_counts")  # a checkpoint from before the counts: every query answered
        self.oracle_counts = (OracleCounts.from_state_dict(counts) if counts is not None else
                              OracleCounts(asked=int(state["oracle_queries"]), answered=int(state["oracle_queries"])))
        self.guard.record = GuardRecord.from_state_dict(state.get("guard"))
        if self.adaptive_tau is not None and state.get("adaptive_tau") is not None:
            self.adaptive_tau.value = float(state["adaptive_tau"])
        load_fn = getattr(self.preference_oracle, "load_state_dict", None)
        if state["oracle_state"] is not None and callable(load_fn):
            load_fn(state["oracle_state"])
        self._buffer, self._micro_step = None, None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.is_deepspeed_enabled:  # Trainer skips _load_from_checkpoint there
            self._load_from_checkpoint(checkpoint)
