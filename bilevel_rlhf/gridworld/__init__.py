"""Tabular backend: exact solvers, the goal-placement bilevel problem, the bilevel methods (single_loop, fixed_tau,
nested_loop, finite_difference, partial_sgd, exact) and their recipe; the general tabular bilevel API (`tabular`) and
HPGD's Four-Rooms benchmark (`four_rooms`).
numpy-only (matplotlib loads only with the recipe's plots)."""

from .algorithms import RunResult, build_problem, run_method
from .config import METHODS, GridWorldConfig, load_config
from .mdp import DEFAULT_LAYOUT, GridMDP, TabularMDP, make_grid
from .problem import GoalProblem, global_search
from .solvers import hard_value_iteration, occupancy, policy_evaluation, soft_value_iteration
from .tabular import Context, Parameterization, TabularBilevelProblem, bounded_incentive, exact_ascent
from .four_rooms import HPGD_TABLE, four_rooms

__all__ = [
    "DEFAULT_LAYOUT", "HPGD_TABLE", "METHODS", "Context", "GoalProblem", "GridMDP", "GridWorldConfig",
    "Parameterization", "RunResult", "TabularBilevelProblem", "TabularMDP", "bounded_incentive", "build_problem",
    "exact_ascent", "four_rooms", "global_search", "hard_value_iteration", "load_config", "make_grid", "occupancy",
    "policy_evaluation", "run_method", "soft_value_iteration",
]
