"""The bilevel methods on the default instance, configuration validation and non-finite handling."""

import numpy as np
import pytest

from bilevel_rlhf.gridworld.algorithms import build_problem, gridworld_tau, initial_x, run_method
from bilevel_rlhf.gridworld.config import METHODS, GridWorldConfig, load_config, parse_args


@pytest.fixture(scope="module")
def default_setup():
    cfg = GridWorldConfig()
    problem = build_problem(cfg)
    return cfg, problem, float(problem.phi(initial_x(problem, cfg)))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_phi_from_the_default_start(default_setup, method):
    """Default instance, start and budget; the mean final Phi over the recipe's 5 seeds is lower
    (single runs of the sampled methods are noisy: a seed can end on a worse piece of Phi)."""
    cfg, problem, phi_start = default_setup
    seeds = (0,) if method.startswith("exact") else range(cfg.seeds)  # exact is deterministic
    results = [run_method(problem, cfg, method, seed=seed) for seed in seeds]
    assert np.mean([r.phi for r in results]) < phi_start - 0.05, (method, [r.phi for r in results], phi_start)
    for result in results:
        assert result.curve_phi[0] == pytest.approx(phi_start)
        assert abs(result.phi - float(problem.phi(result.x))) < 1e-12
        if method.startswith("exact"):
            assert result.samples == 0
        elif method == "finite_difference":  # whole x-updates of (1 + 2 dim) * fd_inner_steps walker steps
            per_update = (1 + 2 * problem.dim) * cfg.fd_inner_steps * cfg.batch_size
            assert result.samples % per_update == 0 and result.samples >= cfg.iterations * cfg.batch_size
        else:  # every transition counted: walkers x steps, inner loops included
            per_step = 2 if method in ("single_loop", "fixed_tau", "nested_loop") else 1
            assert result.samples == per_step * cfg.batch_size * cfg.iterations
        assert result.curve_samples == sorted(result.curve_samples) and result.curve_samples[-1] == result.samples


def test_tau_schedules_decay_to_the_floor_and_fixed_tau_stays():
    cfg = GridWorldConfig()
    taus = [gridworld_tau(cfg, t) for t in range(0, 20000, 100)]
    assert taus[0] == cfg.tau_init and all(a >= b for a, b in zip(taus, taus[1:])) and taus[-1] == cfg.tau_min
    assert gridworld_tau(cfg, 10**6, decay=False) == cfg.tau_init


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("gamma", -0.1, r"gamma must be in \[0, 1\), got -0.1"),
        ("gamma", 1.0, r"gamma must be in \[0, 1\), got 1.0"),
        ("tau_init", -0.5, r"tau_init must be > 0, got -0.5"),
        ("tau_min", -0.01, r"tau_min must be .*, got -0.01"),
        ("tau_decay_rate", -1.0, r"tau_decay_rate must be >= 0, got -1.0"),  # an increasing tau schedule
        ("methods", ["single_loop", "magic"], r"methods must be .*unknown: \['magic'\]"),
        ("reward_lr_decay", -0.1, r"reward_lr_decay must be >= 0, got -0.1"),  # an increasing x step
        ("x0", [1.0], r"x0 must be .*, got \[1.0\]"),
        ("batch_size", 0, r"batch_size must be an integer >= 1, got 0"),
        ("slip", 1.5, r"slip must be .*, got 1.5"),
    ],
)
def test_invalid_config_raises_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        GridWorldConfig(**{field: value})


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"actor_learning_rate": 2.0}, r"critic_learning_rate >= actor_learning_rate >= reward_learning_rate"),
        ({"reward_learning_rate": 0.9}, r"critic_learning_rate >= actor_learning_rate >= reward_learning_rate"),
        ({"actor_lr_decay": 0.9}, r"critic_lr_decay <= actor_lr_decay <= reward_lr_decay"),
    ],
)
def test_misordered_time_scales_warn_naming_the_fields(overrides, message):
    """As in BilevelConfig, the three time-scales' order is the analysis' assumption, not a hard limit: a warning."""
    with pytest.warns(UserWarning, match=message):
        cfg = GridWorldConfig(**overrides)
    assert all(getattr(cfg, k) == v for k, v in overrides.items())


def test_invalid_layout_is_rejected_before_work():
    with pytest.raises(ValueError, match="equally long"):
        build_problem(GridWorldConfig(layout=["S..", "..", "T.."]))
    with pytest.raises(ValueError, match="target cell"):
        build_problem(GridWorldConfig(layout=["S..", "...", "..."]))


def test_command_line_overrides():
    cfg = parse_args(["--seeds", "3", "--methods", "single_loop", "exact", "--gamma", "0.8", "--progress", "false"])
    assert cfg.seeds == 3 and cfg.methods == ["single_loop", "exact"] and cfg.gamma == 0.8 and cfg.progress is False
    with pytest.raises(ValueError, match="methods"):
        parse_args(["--methods", "single_loop", "nope"])
    # the YAML gives the defaults, the command line overrides them
    cfg = parse_args(["--config", "recipes/gridworld/config.yaml", "--x0", "1", "2"])
    assert cfg.x0 == [1.0, 2.0] and cfg.methods == load_config("recipes/gridworld/config.yaml").methods


@pytest.mark.parametrize("method", ["single_loop", "partial_sgd", "finite_difference"])
def test_non_finite_values_stop_the_run_with_quantity_and_iteration(default_setup, method):
    _, problem, _ = default_setup
    cfg = GridWorldConfig(critic_learning_rate=1e308, actor_learning_rate=1e308, reward_learning_rate=1e308,
                          fd_learning_rate=1e308, iterations=200)
    with pytest.raises(FloatingPointError, match=rf"{method}: \w+ became non-finite at iteration \d+"):
        run_method(problem, cfg, method, seed=0)


def test_seeds_change_sampled_runs_but_not_exact(default_setup):
    cfg, problem, _ = default_setup
    cfg = GridWorldConfig(iterations=200, exact_iterations=5)
    a, b = run_method(problem, cfg, "single_loop", 0), run_method(problem, cfg, "single_loop", 1)
    assert not np.allclose(a.x, b.x)
    e0, e1 = run_method(problem, cfg, "exact", 0), run_method(problem, cfg, "exact", 1)
    np.testing.assert_array_equal(e0.x, e1.x)


def test_cells_parameterization_runs_every_method_and_global_search():
    from bilevel_rlhf.gridworld.problem import global_search

    cfg = GridWorldConfig(parameterization="cells", iterations=100, exact_iterations=3, fd_inner_steps=5,
                          fd_directions=2, nested_inner_steps=5)
    problem = build_problem(cfg)
    x0 = initial_x(problem, cfg)
    assert x0.shape == (problem.mdp.n_states,) and x0.max() == cfg.cells_init_peak
    for method in METHODS:
        result = run_method(problem, cfg, method, seed=0)
        assert result.x.shape == x0.shape and np.isfinite(result.phi)
    best = global_search(problem, n_starts=1, descent_steps=3)
    # at least as good as every one-hot placement (it starts from them)
    onehot = 8.0 * np.eye(problem.mdp.n_states)[~problem.grid.wall]
    assert best["phi"] <= problem.phi(onehot).min() + 1e-12
    assert abs(best["phi"] - float(problem.phi(best["x"]))) < 1e-12
