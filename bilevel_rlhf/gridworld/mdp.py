"""Tabular MDPs: the dataclass, its validation, and grid builders (ASCII layouts).

Conventions: P[s, a, s'] = Pr(s' | s, a) (independent of the upper variable x), rho[s] the start
distribution, gamma in [0, 1], and an optional terminal mask: in a terminal state the agent acts once (its reward
and its entropy bonus count) and the episode ends, so nothing accrues after it. Grid cells are indexed
s = row * n_cols + col.
"""

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse

# moves of the grid actions, as (d_row, d_col): up, down, left, right, stay
GRID_MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1], [0, 0]])
GRID_ACTION_NAMES = ("up", "down", "left", "right", "stay")

# The default 10x10 layout. '#' wall, 'S' start, 'T' designer's target, 'H' hazard, '.' free.
# The target is a one-cell-wide bridge between two rows of hazards. Reaching its centre from the
# start means crossing the lower hazard row (the agent does not care); its left end is reached
# around the hazards, and an agent that sits on it is safe only while it does not dither: an
# entropy-regularized (tau > 0) agent steps into the flanking hazards. See problem.py for the costs.
DEFAULT_LAYOUT = (
    "..........",
    "..........",
    "..........",
    "..HHHHHH..",
    "..TTTTTT..",
    "..HHHHHH..",
    "S.........",
    "..........",
    "..........",
    "..........",
)


@dataclass(frozen=True)
class TabularMDP:
    """A finite discounted MDP with a reward-free transition model (the reward comes from x), optionally episodic."""

    P: np.ndarray  # [S, A, S] transition probabilities, or a scipy.sparse matrix [S * A, S] (row s * A + a)
    rho: np.ndarray  # [S] start distribution
    gamma: float  # discount factor in [0, 1]; 1 only with terminal states every state reaches
    terminal: np.ndarray | None = None  # [S] bool: the episode ends after acting here

    def __post_init__(self) -> None:
        sparse = scipy.sparse.issparse(self.P)
        P = scipy.sparse.csr_matrix(self.P, dtype=np.float64) if sparse else np.asarray(self.P, dtype=np.float64)
        rho = np.asarray(self.rho, dtype=np.float64)
        object.__setattr__(self, "P", P)
        object.__setattr__(self, "rho", rho)
        if self.terminal is not None:
            object.__setattr__(self, "terminal", np.asarray(self.terminal))
        validate_mdp(P, rho, self.gamma, self.terminal)
        # the transitions that continue the episode: no successor after a terminal state
        S, A = self.n_states, self.n_actions
        live = np.ones(S) if self.terminal is None else (~self.terminal).astype(np.float64)
        if sparse:
            P_continue = scipy.sparse.diags(np.repeat(live, A)) @ P
        else:
            P_continue = P * live[:, None, None]
        object.__setattr__(self, "P_continue", P_continue)

    @property
    def sparse(self) -> bool:
        """Whether P is a scipy.sparse [S * A, S] matrix (the solvers then use sparse solves, one policy at a time)."""
        return scipy.sparse.issparse(self.P)

    @property
    def n_states(self) -> int:
        return self.P.shape[1] if self.sparse else self.P.shape[0]

    @property
    def n_actions(self) -> int:
        return self.P.shape[0] // self.P.shape[1] if self.sparse else self.P.shape[1]


def validate_mdp(P: np.ndarray, rho: np.ndarray, gamma: float, terminal: np.ndarray | None = None,
                 atol: float = 1e-10) -> None:
    """Raise ValueError naming the field and the allowed range if (P, rho, gamma, terminal) is not an MDP."""
    if scipy.sparse.issparse(P):
        S = P.shape[1]
        if P.ndim != 2 or S < 1 or P.shape[0] < S or P.shape[0] % S:
            raise ValueError(f"a sparse P must have shape [S * A, S] with S, A >= 1, got {P.shape}")
        values, row_sums = P.data, np.asarray(P.sum(axis=1)).ravel()
    else:
        if P.ndim != 3 or P.shape[0] != P.shape[2] or P.shape[0] < 1 or P.shape[1] < 1:
            raise ValueError(f"P must have shape [S, A, S] with S, A >= 1, got {P.shape}")
        S, values, row_sums = P.shape[0], P, P.sum(-1)
    if rho.shape != (S,):
        raise ValueError(f"rho must have shape [S]=[{S}], got {rho.shape}")
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(rho))):
        raise ValueError("P and rho must be finite")
    if np.any(values < 0) or np.max(np.abs(row_sums - 1.0)) > atol:
        raise ValueError(
            "P must be row-stochastic: P[s, a, :] >= 0 and sum_s' P[s, a, s'] = 1 "
            f"(max row-sum error {np.max(np.abs(row_sums - 1.0)):.3g}, min entry {values.min():.3g})"
        )
    if np.any(rho < 0) or abs(rho.sum() - 1.0) > atol:
        raise ValueError(f"rho must be a probability vector (>= 0, sums to 1), sums to {rho.sum():.6g}")
    if terminal is not None and (terminal.shape != (S,) or terminal.dtype != bool):
        raise ValueError(f"terminal must be a bool mask of shape [S]=[{S}], got {terminal.dtype} {terminal.shape}")
    if not (np.isfinite(gamma) and 0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if gamma == 1.0:
        # undiscounted values are finite only if every state reaches a terminal one (then so does every policy
        # that gives each action a positive probability, as the soft best responses do)
        if terminal is None or not terminal.any():
            raise ValueError("gamma = 1 needs terminal states (an undiscounted return never ends otherwise)")
        reach = terminal.copy()
        # some action leads s -> s': [S * A, S] rows grouped by s
        step = scipy.sparse.csr_matrix(P.reshape(S * (P.size // (S * S)), S) if not scipy.sparse.issparse(P) else P)
        step = (scipy.sparse.kron(scipy.sparse.eye(S), np.ones((1, step.shape[0] // S))) @ (step > 0)) > 0
        while True:
            more = reach | np.asarray((step @ reach.astype(np.float64)) > 0).ravel()
            if (more == reach).all():
                break
            reach = more
        if not reach.all():
            raise ValueError(f"gamma = 1 needs every state to reach a terminal state; {int((~reach).sum())} cannot")


@dataclass(frozen=True)
class GridMDP:
    """A grid world: the tabular MDP plus the cell geometry and the layout's masks."""

    mdp: TabularMDP
    layout: tuple[str, ...]
    coords: np.ndarray = field(repr=False)  # [S, 2] (row, col) of every cell, float64
    wall: np.ndarray = field(repr=False)  # [S] bool
    hazard: np.ndarray = field(repr=False)  # [S] bool
    target: np.ndarray = field(repr=False)  # [S] bool

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.layout), len(self.layout[0])


def make_grid(layout: tuple[str, ...] | list[str] = DEFAULT_LAYOUT, slip: float = 0.1, gamma: float = 0.9,
              sparse: bool = False) -> GridMDP:
    """Build a grid world from an ASCII layout.

    Actions: up, down, left, right, stay. With probability ``slip`` the executed action is drawn
    uniformly from all 5 actions instead of the chosen one. Moving into a wall or off the grid
    leaves the agent in place. Walls are states that are never entered (absorbing, rho = 0).
    The start distribution is uniform over the 'S' cells. ``sparse``: P as a scipy.sparse [S * A, S]
    matrix (at most 5 successors per state), for grids too large for a dense [S, A, S] array.
    """
    layout = tuple(layout)
    if len(layout) == 0 or any(len(row) != len(layout[0]) for row in layout):
        raise ValueError("layout must be a non-empty list of equally long strings")
    bad = set("".join(layout)) - set(".#STH")
    if bad:
        raise ValueError(f"layout may only contain the characters '.#STH', got {sorted(bad)}")
    if not 0.0 <= slip <= 1.0:
        raise ValueError(f"slip must be in [0, 1], got {slip}")
    n_rows, n_cols = len(layout), len(layout[0])
    grid = np.array([list(row) for row in layout])
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    coords = np.stack([rows, cols], axis=1).astype(np.float64)
    flat = grid.reshape(-1)
    wall, start = flat == "#", flat == "S"
    if not start.any():
        raise ValueError("layout must contain at least one start cell 'S'")

    S, A = n_rows * n_cols, len(GRID_MOVES)
    # deterministic successor of every (cell, move), vectorized over both
    nr = rows[:, None] + GRID_MOVES[None, :, 0]
    nc = cols[:, None] + GRID_MOVES[None, :, 1]
    inside = (nr >= 0) & (nr < n_rows) & (nc >= 0) & (nc < n_cols)
    dest = np.where(inside, nr.clip(0, n_rows - 1) * n_cols + nc.clip(0, n_cols - 1), np.arange(S)[:, None])
    dest = np.where(wall[dest] | wall[:, None], np.arange(S)[:, None], dest)  # blocked: stay
    if sparse:
        # executed action = chosen w.p. 1 - slip, uniform over all actions w.p. slip; a wall stays in place
        rows = np.repeat(np.arange(S * A), A + 1)
        cols = np.concatenate([dest[:, :, None], np.repeat(dest[:, None, :], A, axis=1)], axis=2).reshape(-1)
        vals = np.tile(np.concatenate([[1.0 - slip], np.full(A, slip / A)]), S * A)
        cols = np.where(np.repeat(wall, A * (A + 1)), np.repeat(np.arange(S), A * (A + 1)), cols)
        P = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(S * A, S))  # duplicates are summed
    else:
        move = np.zeros((S, A, S))
        move[np.arange(S)[:, None], np.arange(A)[None, :], dest] = 1.0
        # executed action = chosen w.p. 1 - slip, uniform over all actions w.p. slip
        P = (1.0 - slip) * move + slip * move.mean(axis=1, keepdims=True)
        P[wall] = np.eye(S)[wall][:, None, :]
    rho = start / start.sum()
    return GridMDP(
        mdp=TabularMDP(P=P, rho=rho, gamma=gamma),
        layout=layout,
        coords=coords,
        wall=wall,
        hazard=flat == "H",
        target=flat == "T",
    )
