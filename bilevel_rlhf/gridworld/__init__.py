"""Tabular GridWorld backend: exact solvers, the goal-placement bilevel problem, the bilevel methods
(single_loop, fixed_tau, nested_loop, finite_difference, partial_sgd, exact) and their recipe.
numpy-only (matplotlib loads only with the recipe's plots)."""

from .algorithms import RunResult, build_problem, run_method
from .config import METHODS, GridWorldConfig, load_config
from .mdp import DEFAULT_LAYOUT, GridMDP, TabularMDP, make_grid
from .problem import GoalProblem, global_search
from .solvers import hard_value_iteration, occupancy, policy_evaluation, soft_value_iteration

__all__ = [
    "DEFAULT_LAYOUT", "METHODS", "GoalProblem", "GridMDP", "GridWorldConfig", "RunResult", "TabularMDP",
    "build_problem", "global_search", "hard_value_iteration", "load_config", "make_grid",
    "occupancy", "policy_evaluation", "run_method", "soft_value_iteration",
]
