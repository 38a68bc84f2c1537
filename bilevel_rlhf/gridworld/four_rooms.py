"""HPGD's Four-Rooms incentive design (Thoma, Pásztor, Krause, Ramponi & Hu, NeurIPS 2024; lasgroup/HPGD) as a
`TabularBilevelProblem`, faithful to their code's model:

- a 13x13 map with 104 free cells (states, row-major), start (4, 1); the goal is (1, 9) or (11, 11), uniformly (the
  two contexts); acting in the goal pays the follower 1 and ends the episode; gamma = 0.99 for both levels;
- 4 moves (up, right, down, left); the intended one w.p. 0.56, each other w.p. 0.44 / 3; into a wall: stay;
- the leader's incentive: a per-cell penalty -0.2 softmax(w)_s (w: 104 cell logits and a spare one), paid at every
  step from s except in the goal;
- the leader: +1 per step the follower acts from (8, 4), and -c_UL * ||incentive||_1 once, when it acts in the goal;
- the follower: the entropy-regularized best response with weight reg_lambda (tau here).

Reported number: the leader's value at the start, averaged over the two goals. `HPGD_TABLE` holds their Table 1.
"""

from __future__ import annotations

import numpy as np

from .mdp import TabularMDP
from .solvers import softmax
from .tabular import Context, Parameterization, TabularBilevelProblem, bounded_incentive

__all__ = ["FOUR_ROOMS_LAYOUT", "HPGD_TABLE", "four_rooms", "four_rooms_cells"]

FOUR_ROOMS_LAYOUT = (
    "#############",
    "#.....#.....#",
    "#.....#.....#",
    "#...........#",
    "#.....#.....#",
    "#.....#.....#",
    "##.####.....#",
    "#.....###.###",
    "#.....#.....#",
    "#.....#.....#",
    "#...........#",
    "#.....#.....#",
    "#############",
)
START, GOALS, TARGET = (4, 1), ((1, 9), (11, 11)), (8, 4)
MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))  # up, right, down, left
INTENDED = 0.56  # HPGD's model: 1 - 4/3 * fail_prob with fail_prob = 0.33
INCENTIVE_SCALE = -0.2

# Table 1 of HPGD (their README): (reg_lambda, c_UL) -> {column: (mean, standard error)}, 10 seeds
HPGD_TABLE = {
    (0.001, 1): {"HPGD": (0.91, 0.088), "AMD": (0.58, 0.000), "Zero-Order": (0.59, 0.059)},
    (0.001, 3): {"HPGD": (0.51, 0.006), "AMD": (0.51, 0.000), "Zero-Order": (0.50, 0.005)},
    (0.001, 5): {"HPGD": (0.46, 0.006), "AMD": (0.46, 0.003), "Zero-Order": (0.46, 0.007)},
    (0.003, 1): {"HPGD": (0.95, 0.002), "AMD": (1.00, 0.000), "Zero-Order": (0.91, 0.048)},
    (0.003, 3): {"HPGD": (0.73, 0.001), "AMD": (0.39, 0.000), "Zero-Order": (0.40, 0.028)},
    (0.003, 5): {"HPGD": (0.29, 0.003), "AMD": (0.32, 0.000), "Zero-Order": (0.32, 0.002)},
    (0.005, 1): {"HPGD": (1.17, 0.011), "AMD": (1.28, 0.003), "Zero-Order": (1.15, 0.026)},
    (0.005, 3): {"HPGD": (1.01, 0.002), "AMD": (1.13, 0.004), "Zero-Order": (1.02, 0.027)},
    (0.005, 5): {"HPGD": (0.87, 0.003), "AMD": (0.97, 0.009), "Zero-Order": (0.79, 0.027)},
}


def four_rooms_cells() -> list[tuple[int, int]]:
    """The free cells (row, col), in state order (row-major)."""
    return [(r, c) for r, row in enumerate(FOUR_ROOMS_LAYOUT) for c, ch in enumerate(row) if ch != "#"]


def _transitions(cells: list[tuple[int, int]]) -> np.ndarray:
    index = {cell: i for i, cell in enumerate(cells)}
    S, A = len(cells), len(MOVES)
    move = np.zeros((S, A, S))
    for i, (r, c) in enumerate(cells):
        for a, (dr, dc) in enumerate(MOVES):
            move[i, a, index.get((r + dr, c + dc), i)] = 1.0  # a wall: stay
    other = (1.0 - INTENDED) / (A - 1)
    mix = np.full((A, A), other) + (INTENDED - other) * np.eye(A)  # mix[a, b]: chosen a, executed b
    return np.einsum("ab,sbt->sat", mix, move)


def four_rooms(c_ul: float, gamma: float = 0.99) -> TabularBilevelProblem:
    """The instance with leader cost weight `c_UL` (the follower's tau is chosen when solving)."""
    cells = four_rooms_cells()
    index = {cell: i for i, cell in enumerate(cells)}
    S, A = len(cells), len(MOVES)
    P = _transitions(cells)
    rho = np.zeros(S)
    rho[index[START]] = 1.0
    goal_masks = [np.arange(S) == index[g] for g in GOALS]
    target = np.zeros((S, A))
    target[index[TARGET]] = 1.0
    contexts = [Context(TabularMDP(P, rho, gamma, terminal=goal), np.outer(goal, np.ones(A)), target, 0.5)
                for goal in goal_masks]
    incentive = bounded_incentive(np.ones(S, dtype=bool), A, INCENTIVE_SCALE, zero_in=goal_masks)
    budget = abs(INCENTIVE_SCALE)

    def cost(x: np.ndarray, c: int) -> np.ndarray:  # -c_UL * ||incentive||_1 when acting in the goal
        out = np.zeros((S, A))
        out[goal_masks[c]] = -c_ul * budget * (1.0 - softmax(x)[-1])
        return out

    def cost_vjp(x: np.ndarray, c: int, g: np.ndarray) -> np.ndarray:
        p = softmax(x)
        spare = np.zeros_like(p)
        spare[-1] = 1.0
        # d/dx [-c budget (1 - p_spare)] = c budget p_spare (e_spare - p)
        return float(np.asarray(g)[goal_masks[c]].sum()) * c_ul * budget * p[-1] * (spare - p)

    leader_cost = Parameterization(dim=incentive.dim, value=cost, vjp=cost_vjp)
    return TabularBilevelProblem(contexts, incentive, leader_cost)
