"""End-to-end recipe on a cut-down config; Phi recomputed from instance.npz by independent numpy code."""

import json

import numpy as np

from bilevel_rlhf.gridworld.config import METHODS
from bilevel_rlhf.gridworld.recipe import cli


def independent_phi(P, rho, gamma, u, reward, placement_cost, tie_tol=1e-7):
    """Phi = E_{d^pi*}[u] + c with pi* the hard-optimal policy, uniform over near-ties; plain VI."""
    S, A, _ = P.shape
    V = np.zeros(S)
    for _ in range(3000):  # gamma^3000 ~ 0: exact to machine precision
        Q = reward + gamma * P @ V
        V = Q.max(1)
    Q = reward + gamma * P @ V
    ties = Q >= Q.max(1, keepdims=True) - tie_tol
    pi = ties / ties.sum(1, keepdims=True)
    P_pi = (pi[:, :, None] * P).sum(1)
    d = (1 - gamma) * np.linalg.solve(np.eye(S) - gamma * P_pi.T, rho)
    return float(d @ (pi * u).sum(1) + placement_cost)


def test_recipe_end_to_end(tmp_path):
    out = tmp_path / "gw"
    cli([
        "--output_dir", str(out), "--seeds", "2", "--iterations", "200", "--exact_iterations", "10",
        "--eval_every", "50", "--search_step", "1.0", "--search_refine_step", "0.25", "--progress", "false",
        "--nested_inner_steps", "10", "--fd_inner_steps", "10",
    ])
    for name in ("results.json", "instance.npz", "curves.png", "heatmap.png", "table.md"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == set(METHODS) and set(results["summary"]) == set(METHODS)
    inst = np.load(out / "instance.npz")
    best = results["global_best"]["phi"]
    for method, seeds in results["runs"].items():
        assert [r["seed"] for r in seeds] == [0, 1]
        for r in seeds:
            assert {"x", "phi", "phi_tau", "samples", "seconds", "curve_samples", "curve_phi"} <= set(r)
            assert len(r["curve_samples"]) == len(r["curve_phi"]) >= 2
            assert r["phi"] >= best - 1e-9  # nothing beats the global search by more than round-off
            phi = independent_phi(inst["P"], inst["rho"], float(inst["gamma"]), inst["designer_cost"],
                                  inst[f"reward_final_{method}_seed{r['seed']}"],
                                  float(inst[f"placement_cost_{method}_seed{r['seed']}"]))
            assert abs(phi - r["phi"]) < 1e-8, (method, phi, r["phi"])
        # the unsuffixed per-method keys hold seed 0
        np.testing.assert_array_equal(inst[f"reward_final_{method}"], inst[f"reward_final_{method}_seed0"])
        assert f"placement_cost_{method}" in inst
    assert "| single_loop |" in (out / "table.md").read_text()
