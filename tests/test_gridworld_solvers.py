"""Exact tabular solvers against closed forms and independent computations."""

import numpy as np
import pytest

from bilevel_rlhf.gridworld.mdp import TabularMDP, make_grid
from bilevel_rlhf.gridworld.solvers import (
    TIE_TOL,
    hard_value_iteration,
    objective,
    occupancy,
    policy_evaluation,
    soft_value_iteration,
)


def _lse(z, tau):
    m = z.max(-1, keepdims=True)
    return (m + tau * np.log(np.exp((z - m) / tau).sum(-1, keepdims=True)))[..., 0]


def two_state_mdp(gamma=0.8):
    # transitions independent of the action: then V*_tau = (I - gamma P)^-1 tau logsumexp(r / tau)
    Ps = np.array([[0.3, 0.7], [0.6, 0.4]])
    P = np.repeat(Ps[:, None, :], 3, axis=1)
    return TabularMDP(P=P, rho=np.array([0.25, 0.75]), gamma=gamma), Ps


@pytest.mark.parametrize("tau", [1.0, 0.2, 0.01])
def test_soft_value_iteration_matches_closed_form_two_states(tau):
    mdp, Ps = two_state_mdp()
    r = np.array([[1.0, 0.0, -0.5], [0.3, 0.9, 0.2]])
    Q, V, pi = soft_value_iteration(mdp, r, tau)
    V_closed = np.linalg.solve(np.eye(2) - mdp.gamma * Ps, _lse(r, tau))
    Q_closed = r + mdp.gamma * (Ps @ V_closed)[:, None]
    np.testing.assert_allclose(V, V_closed, rtol=0, atol=1e-10)
    np.testing.assert_allclose(Q, Q_closed, rtol=0, atol=1e-10)
    pi_closed = np.exp((r - r.max(-1, keepdims=True)) / tau)
    np.testing.assert_allclose(pi, pi_closed / pi_closed.sum(-1, keepdims=True), atol=1e-10)


def test_hard_value_iteration_closed_form_and_uniform_ties():
    mdp, Ps = two_state_mdp()
    r = np.array([[1.0, 1.0, -0.5], [0.3, 0.9, 0.9]])  # two exact ties per state
    Q, V, pi = hard_value_iteration(mdp, r)
    np.testing.assert_allclose(V, np.linalg.solve(np.eye(2) - mdp.gamma * Ps, r.max(-1)), atol=1e-10)
    np.testing.assert_allclose(pi, [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    # a gap just above the tie tolerance is not a tie
    r2 = r.copy()
    r2[0, 1] -= 10 * TIE_TOL
    assert np.allclose(hard_value_iteration(mdp, r2)[2][0], [1.0, 0.0, 0.0])


def test_soft_optimum_is_batched_and_tends_to_hard_optimum():
    grid = make_grid()
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, grid.mdp.n_states, grid.mdp.n_actions))
    Qb = soft_value_iteration(grid.mdp, r, 0.1)[0]
    for i in range(3):
        np.testing.assert_allclose(Qb[i], soft_value_iteration(grid.mdp, r[i], 0.1)[0], atol=1e-9)
    # soft Q* - hard Q* lies in [0, tau log A / (1 - gamma)]
    Qh = hard_value_iteration(grid.mdp, r[0])[0]
    Qs = soft_value_iteration(grid.mdp, r[0], 1e-3)[0]
    bound = 1e-3 * np.log(grid.mdp.n_actions) / (1 - grid.mdp.gamma)
    assert np.all(Qs - Qh >= -1e-9) and np.all(Qs - Qh <= bound + 1e-9)


def test_policy_evaluation_occupancy_and_objective_agree_with_power_series():
    grid = make_grid(slip=0.2)
    mdp = grid.mdp
    rng = np.random.default_rng(1)
    pi = rng.dirichlet(np.ones(mdp.n_actions), size=mdp.n_states)
    r = rng.normal(size=(mdp.n_states, mdp.n_actions))
    tau = 0.3
    # truncated series: d = (1 - gamma) sum_t gamma^t rho P_pi^t
    P_pi = np.einsum("sa,sat->st", pi, mdp.P)
    d_series, row = np.zeros(mdp.n_states), mdp.rho.copy()
    for t in range(600):
        d_series += (1 - mdp.gamma) * mdp.gamma**t * row
        row = row @ P_pi
    d = occupancy(mdp, pi)
    np.testing.assert_allclose(d, d_series, atol=1e-12)
    assert abs(d.sum() - 1) < 1e-12
    Q, V = policy_evaluation(mdp, pi, r, tau)
    r_pi = (pi * (r - tau * np.log(pi))).sum(-1)
    np.testing.assert_allclose(V, (pi * (Q - tau * np.log(pi))).sum(-1), atol=1e-10)  # Bellman consistency
    J = float(objective(mdp, pi, r, tau))
    assert abs(J - (1 - mdp.gamma) * mdp.rho @ V) < 1e-10
    assert abs(J - d @ r_pi) < 1e-12


def test_mdp_validation_errors_name_the_field():
    P = np.full((2, 1, 2), 0.5)
    with pytest.raises(ValueError, match="row-stochastic"):
        TabularMDP(P=P * 1.1, rho=np.array([0.5, 0.5]), gamma=0.9)
    with pytest.raises(ValueError, match="gamma = 1 needs terminal states"):
        TabularMDP(P=P, rho=np.array([0.5, 0.5]), gamma=1.0)
    with pytest.raises(ValueError, match="gamma must be in"):
        TabularMDP(P=P, rho=np.array([0.5, 0.5]), gamma=-0.1)
    with pytest.raises(ValueError, match="gamma must be in"):
        TabularMDP(P=P, rho=np.array([0.5, 0.5]), gamma=1.5)
    # gamma = 1 with a terminal state that every state reaches: fine; one that a state cannot reach: refused
    TabularMDP(P=P, rho=np.array([0.5, 0.5]), gamma=1.0, terminal=np.array([False, True]))
    stuck = np.stack([np.eye(2)[:, None, :][0], np.eye(2)[:, None, :][1]])  # each state stays where it is
    with pytest.raises(ValueError, match="every state to reach a terminal state; 1 cannot"):
        TabularMDP(P=stuck, rho=np.array([0.5, 0.5]), gamma=1.0, terminal=np.array([False, True]))
    with pytest.raises(ValueError, match="terminal must be a bool mask"):
        TabularMDP(P=P, rho=np.array([0.5, 0.5]), gamma=0.9, terminal=np.array([0, 1]))
    with pytest.raises(ValueError, match="rho must have shape"):
        TabularMDP(P=P, rho=np.array([1.0]), gamma=0.9)
    with pytest.raises(ValueError, match="P must have shape"):
        TabularMDP(P=np.ones((2, 2)), rho=np.array([0.5, 0.5]), gamma=0.9)
    with pytest.raises(ValueError, match="slip must be in"):
        make_grid(slip=1.5)
    with pytest.raises(ValueError, match="tau must be > 0"):
        soft_value_iteration(make_grid().mdp, np.zeros((100, 5)), 0.0)


def test_grid_builder_walls_slip_and_start():
    grid = make_grid(["S#", ".."], slip=0.5)
    P = grid.mdp.P
    assert P.shape == (4, 5, 4)
    # from (0,0) "right" hits the wall: stays w.p. 1 - slip + slip * (stays under random actions)
    # random actions from (0,0): up/left/right/stay stay put, down -> (1,0)
    assert np.isclose(P[0, 3, 0], 0.5 + 0.5 * 4 / 5) and np.isclose(P[0, 3, 2], 0.5 / 5)
    assert np.allclose(P[1, :, 1], 1.0)  # the wall is absorbing and never entered
    assert np.allclose(P[:, :, 1][[0, 2, 3]], 0.0)
    assert np.allclose(grid.mdp.rho, [1, 0, 0, 0])
