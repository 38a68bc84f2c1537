"""The GridWorld recipe's configuration: one flat dataclass, validated before any work starts,
loadable from YAML and overridable from the command line (``--field value``)."""

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..validation import field_checker, warn_unless_time_scales
from .mdp import DEFAULT_LAYOUT

# exact: oracle descent on Phi_tau at a fixed tau; exact_decay: the same along the decaying tau path
METHODS = ("single_loop", "fixed_tau", "nested_loop", "finite_difference", "partial_sgd", "exact", "exact_decay")


@dataclass
class GridWorldConfig:
    """Instance, algorithm and recipe settings. Schedules are indexed by the walker step t
    (one batch of transitions per actor), so every sampled method is compared at the same budget."""

    # ----- instance -----
    layout: list[str] = field(default_factory=lambda: list(DEFAULT_LAYOUT),
                              metadata={"help": "ASCII grid: '#' wall, 'S' start, 'T' target, 'H' hazard, '.' free."})
    slip: float = field(default=0.05, metadata={"help": "Probability that a uniformly random action is executed, in [0, 1]."})
    gamma: float = field(default=0.9, metadata={"help": "Discount factor, in [0, 1)."})
    parameterization: str = field(default="position", metadata={"help": "Goal parameterization: 'position' (2-D bump) or 'cells' (softmax logits)."})
    reward_scale: float = field(default=1.0, metadata={"help": "R, the agent's goal reward scale (> 0)."})
    bump_width: float = field(default=0.7, metadata={"help": "sigma of the radial reward bump, in cells (> 0)."})
    hazard_cost: float = field(default=2.0, metadata={"help": "Designer cost u on hazard cells (>= 0); the agent ignores it."})
    target_bonus: float = field(default=1.0, metadata={"help": "Designer gain (-u) on target cells (>= 0)."})
    placement_weight: float = field(default=0.01, metadata={"help": "kappa of the placement cost c(x) = kappa * squared distance to the target centre (>= 0)."})
    x0: list[float] = field(default_factory=lambda: [4.0, 0.0], metadata={"help": "Initial goal (row, col). 'cells': logits cells_init_peak on the nearest cell, 0 elsewhere."})
    cells_init_peak: float = field(default=4.0, metadata={"help": "Initial logit of the start cell for the 'cells' parameterization."})
    # ----- algorithms -----
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"Methods to run, from {METHODS}."})
    iterations: int = field(default=2000, metadata={"help": "Walker steps per sampled method (each = batch_size transitions per actor)."})
    batch_size: int = field(default=128, metadata={"help": "B, parallel walkers per actor (>= 1)."})
    tau_init: float = field(default=0.3, metadata={"help": "Initial entropy weight (the paper's tau_0; > 0); fixed_tau keeps it."})
    tau_min: float = field(default=0.02, metadata={"help": "Floor of the decaying tau (0 <= tau_min <= tau_init)."})
    tau_horizon: float = field(default=500.0, metadata={"help": "Time constant (the paper's k_0) in tau_t = max(tau_min, tau_init (1 + t/tau_horizon)^-tau_decay_rate) (> 0)."})
    tau_decay_rate: float = field(default=1.0, metadata={"help": "Decay power of the tau schedule (the paper's c; >= 0, a negative power would increase tau)."})
    critic_learning_rate: float = field(default=0.5, metadata={"help": "Critic step size (the paper's beta_0; fastest)."})
    actor_learning_rate: float = field(default=0.5, metadata={"help": "Actor step size (the paper's alpha_0; <= critic_learning_rate)."})
    reward_learning_rate: float = field(default=0.05, metadata={"help": "Step size of x, the agent's reward parameters (the paper's zeta_0; <= actor_learning_rate, slowest)."})
    critic_lr_decay: float = field(default=0.0, metadata={"help": "Polynomial decay power p of the critic step, critic_learning_rate (1 + t/lr_horizon)^-p (>= 0)."})
    actor_lr_decay: float = field(default=0.0, metadata={"help": "Polynomial decay power of the actor step (>= 0; >= critic_lr_decay)."})
    reward_lr_decay: float = field(default=0.5, metadata={"help": "Polynomial decay power of the x step (>= 0; >= actor_lr_decay)."})
    lr_horizon: float = field(default=1000.0, metadata={"help": "Time constant of the step-size decays and of the penalty_lambda growth (> 0)."})
    penalty_lambda: float = field(default=10.0, metadata={"help": "Penalty coefficient (the paper's lambda_0; > 0)."})
    penalty_lambda_growth: float = field(default=0.0, metadata={"help": "Growth power g in lambda_t = penalty_lambda (1 + t/lr_horizon)^g (>= 0: constant or increasing)."})
    common_random_numbers: bool = field(default=True, metadata={"help": "Drive phi's and theta's walkers with the same random numbers (variance reduction of the lambda-weighted difference)."})
    nested_inner_steps: int = field(default=20, metadata={"help": "nested_loop: actor-critic steps at fixed x before each x step (>= 1)."})
    nested_reward_learning_rate: float = field(default=0.25, metadata={"help": "nested_loop: x step size (decays with reward_lr_decay, on the x-step clock)."})
    fd_inner_steps: int = field(default=20, metadata={"help": "finite_difference: warm-started actor-critic steps per Phi evaluation (>= 1)."})
    fd_eps: float = field(default=0.25, metadata={"help": "finite_difference: perturbation size (> 0)."})
    fd_directions: int = field(default=4, metadata={"help": "finite_difference, 'cells': random Gaussian directions per step (>= 1)."})
    fd_learning_rate: float = field(default=4.0, metadata={"help": "finite_difference: x step size (decays with reward_lr_decay, on the x-step clock)."})
    exact_iterations: int = field(default=300, metadata={"help": "exact, exact_decay: gradient steps on Phi_tau."})
    exact_tau: float = field(default=0.1, metadata={"help": "exact: the fixed tau of Phi_tau (> 0)."})
    exact_learning_rate: float = field(default=0.5, metadata={"help": "exact, exact_decay: step size (constant)."})
    eval_every: int = field(default=50, metadata={"help": "Record exact Phi(x) every this many walker steps (logging, not counted as samples)."})
    # ----- recipe -----
    seeds: int = field(default=5, metadata={"help": "Number of seeds (0, 1, ..., seeds-1)."})
    search_step: float = field(default=0.5, metadata={"help": "Global search grid spacing for 'position' (> 0)."})
    search_refine_step: float = field(default=0.05, metadata={"help": "Refinement spacing around the best grid point (> 0)."})
    output_dir: str = field(default="outputs/gridworld", metadata={"help": "Where results.json, instance.npz, plots go."})
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and its allowed range; warn when the three time-scales are misordered."""

        need = field_checker(self)

        # types first, so that the range checks below compare numbers (a YAML "abc" names its field, not a TypeError)
        for f in dataclasses.fields(self):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = getattr(self, f.name)
            if isinstance(default, bool):
                need(isinstance(value, bool), f.name, "true or false")
            elif isinstance(default, int):
                need(isinstance(value, int) and not isinstance(value, bool), f.name, "an integer")
            elif isinstance(default, float):
                need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                     f.name, "a finite number")
            elif isinstance(default, str):
                need(isinstance(value, str), f.name, "a string")
            elif isinstance(default, (list, tuple)):
                need(isinstance(value, (list, tuple)), f.name, "a list")
        need(0.0 <= self.slip <= 1.0, "slip", "in [0, 1]")
        need(0.0 <= self.gamma < 1.0, "gamma", "in [0, 1)")
        need(self.parameterization in ("position", "cells"), "parameterization", "'position' or 'cells'")
        for name in ("reward_scale", "bump_width", "tau_init", "tau_horizon", "critic_learning_rate",
                     "actor_learning_rate", "reward_learning_rate", "lr_horizon", "penalty_lambda",
                     "nested_reward_learning_rate", "fd_eps", "fd_learning_rate", "exact_tau", "exact_learning_rate",
                     "search_step", "search_refine_step"):
            need(getattr(self, name) > 0, name, "> 0")
        for name in ("hazard_cost", "target_bonus", "placement_weight", "tau_decay_rate", "critic_lr_decay",
                     "actor_lr_decay", "reward_lr_decay", "penalty_lambda_growth"):
            need(getattr(self, name) >= 0, name, ">= 0")
        need(0.0 <= self.tau_min <= self.tau_init, "tau_min", f"in [0, tau_init={self.tau_init}]")
        need(len(self.x0) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in self.x0), "x0",
             "a (row, col) pair of finite numbers")
        for name in ("iterations", "batch_size", "nested_inner_steps", "fd_inner_steps", "fd_directions",
                     "exact_iterations", "eval_every", "seeds"):
            need(getattr(self, name) >= 1, name, "an integer >= 1")  # integer: checked with the types above
        unknown = [m for m in self.methods if m not in METHODS]
        need(not unknown and len(self.methods) > 0, "methods", f"a non-empty list from {METHODS} (unknown: {unknown})")
        # three time-scales, critic >= actor >= reward step size at every t (learning rates in that order, decays in
        # the opposite one): BilevelConfig's rule, a warning only
        warn_unless_time_scales(self, ("critic_learning_rate", "actor_learning_rate", "reward_learning_rate"))
        warn_unless_time_scales(self, ("critic_lr_decay", "actor_lr_decay", "reward_lr_decay"), decays=True)


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> GridWorldConfig:
    """Config from a YAML file (flat mapping of field names) with overrides applied on top."""
    values: dict[str, Any] = {}
    if path is not None:
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
    values.update(overrides or {})
    names = {f.name for f in dataclasses.fields(GridWorldConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; known fields: {sorted(names)}")
    return GridWorldConfig(**values)


def parse_args(argv: list[str] | None = None) -> GridWorldConfig:
    """``--config file.yaml`` plus ``--<field> value`` for any field (lists space-separated), parsed by TRL's
    `TrlParser` (`HfArgumentParser` with a YAML config) as the happy-tweet recipe is: the file gives the defaults, the
    command line overrides them. A value that does not convert stops with argparse's message naming the flag; an
    unknown key of the file, or a value out of range, raises ValueError naming the field."""
    from trl import TrlParser  # here, not at import: the tabular backend imports without torch/transformers

    parser = TrlParser((GridWorldConfig,), description="Bilevel RL on the tabular GridWorld goal-placement problem.")
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, from_file, from_command_line = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True)
    if from_command_line:
        parser.error(f"unrecognized arguments: {' '.join(from_command_line)}")
    unknown = sorted(a[2:] for a in from_file if a.startswith("--"))
    if unknown:
        raise ValueError(f"unknown config fields {unknown} in {argv[argv.index('--config') + 1]}; known fields: "
                         f"{sorted(f.name for f in dataclasses.fields(GridWorldConfig))}")
    return cfg
