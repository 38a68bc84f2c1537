"""Every condition of GridWorldConfig.validate: the smallest bad value is rejected with a ValueError
naming the field, the valid boundary value is accepted; the three time-scales' ordering warns (as BilevelConfig
does), naming the fields; and load_config / parse_args name the field."""

import dataclasses
import warnings

import numpy as np
import pytest

from bilevel_rlhf.gridworld.config import GridWorldConfig, load_config, parse_args


def below(v):
    return float(np.nextafter(v, -np.inf))


def above(v):
    return float(np.nextafter(v, np.inf))


TINY = float(np.nextafter(0.0, 1.0))  # the smallest positive float
POSITIVE = ("reward_scale", "bump_width", "tau_init", "tau_horizon", "critic_learning_rate", "actor_learning_rate",
            "reward_learning_rate", "lr_horizon", "penalty_lambda", "nested_reward_learning_rate", "fd_eps",
            "fd_learning_rate", "exact_tau", "exact_learning_rate", "search_step", "search_refine_step")
NONNEGATIVE = ("hazard_cost", "target_bonus", "placement_weight", "tau_decay_rate", "critic_lr_decay", "actor_lr_decay",
               "reward_lr_decay", "penalty_lambda_growth")
INTEGERS = ("iterations", "batch_size", "nested_inner_steps", "fd_inner_steps", "fd_directions",
            "exact_iterations", "eval_every", "seeds")
# fields that a boundary value of another field drags along (tau_min <= tau_init; the three time-scales' order,
# which would only warn, kept so that the boundary configs are silent)
COMPANIONS = {"tau_init": {"tau_min": 0.0},
              "critic_learning_rate": {"actor_learning_rate": TINY, "reward_learning_rate": TINY},
              "actor_learning_rate": {"reward_learning_rate": TINY}}

# (field, bad overrides, good boundary overrides); defaults: critic = actor = 0.5, reward 0.05 learning rates,
# tau_init = 0.3, decays 0 / 0 / 0.5
CASES = [
    ("slip", {"slip": below(0.0)}, {"slip": 0.0}),
    ("slip", {"slip": above(1.0)}, {"slip": 1.0}),
    ("slip", {"slip": float("nan")}, {"slip": 0.5}),
    ("gamma", {"gamma": below(0.0)}, {"gamma": 0.0}),
    ("gamma", {"gamma": 1.0}, {"gamma": below(1.0)}),
    ("parameterization", {"parameterization": "Position"}, {"parameterization": "cells"}),
    ("parameterization", {"parameterization": ""}, {"parameterization": "position"}),
    *[(name, {name: 0.0, **COMPANIONS.get(name, {})}, {name: TINY, **COMPANIONS.get(name, {})}) for name in POSITIVE],
    ("penalty_lambda", {"penalty_lambda": float("nan")}, {"penalty_lambda": 1.0}),
    *[(name, {name: below(0.0)}, {name: 0.0}) for name in NONNEGATIVE],
    ("tau_min", {"tau_min": below(0.0)}, {"tau_min": 0.0}),
    ("tau_min", {"tau_min": above(0.3)}, {"tau_min": 0.3}),
    ("x0", {"x0": [1.0]}, {"x0": [0.0, 0.0]}),
    ("x0", {"x0": [1.0, 2.0, 3.0]}, {"x0": [9.0, 9.0]}),
    *[(name, {name: 0}, {name: 1}) for name in INTEGERS],
    *[(name, {name: 1.0}, {name: 2}) for name in ("iterations", "batch_size")],  # a float is not an integer
    ("methods", {"methods": []}, {"methods": ["exact"]}),
    ("methods", {"methods": ["single_loop", "magic"]}, {"methods": ["single_loop", "exact_decay"]}),
]


@pytest.mark.parametrize("field,bad,good", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_validate_rejects_the_smallest_bad_value_and_accepts_the_boundary(field, bad, good):
    with pytest.raises(ValueError, match=rf"^{field} must be "):
        GridWorldConfig(**bad)
    cfg = GridWorldConfig(**good)
    for name, value in good.items():
        assert getattr(cfg, name) == value
    # validate() itself, not only construction, checks: break a valid config in place
    for name, value in bad.items():
        setattr(cfg, name, value)
    with pytest.raises(ValueError, match=rf"^{field} must be "):
        cfg.validate()


# the three time-scales (critic >= actor >= reward learning rate, critic <= actor <= reward decay): a warning naming
# the fields, as in BilevelConfig, not an error. (message, warning overrides, silent overrides)
TIME_SCALE_LR = "need critic_learning_rate >= actor_learning_rate >= reward_learning_rate"
TIME_SCALE_DECAY = "need critic_lr_decay <= actor_lr_decay <= reward_lr_decay"
WARN_CASES = [
    (TIME_SCALE_LR, [
        {"actor_learning_rate": above(0.5)},  # actor faster than the critic
        {"reward_learning_rate": above(0.5)},  # x faster than both
        {"actor_learning_rate": 0.2, "reward_learning_rate": above(0.2)},  # bounded by the actor, not the critic
    ], [{"actor_learning_rate": 0.5, "critic_learning_rate": 0.5, "reward_learning_rate": 0.5},  # equal: allowed
        {"actor_learning_rate": 0.2, "reward_learning_rate": 0.2}]),
    (TIME_SCALE_DECAY, [
        {"critic_lr_decay": 0.5, "actor_lr_decay": below(0.5)},  # actor decays slower than the critic
        {"actor_lr_decay": 0.7, "reward_lr_decay": below(0.7)},  # x decays slower than the actor
    ], [{"critic_lr_decay": 0.5, "actor_lr_decay": 0.5, "reward_lr_decay": 0.5},  # equal: allowed
        {"actor_lr_decay": 0.7, "reward_lr_decay": 0.7}]),
]


@pytest.mark.parametrize("message,warn,silent", WARN_CASES, ids=["learning_rates", "lr_decays"])
def test_time_scale_order_warns_naming_the_fields(message, warn, silent):
    for overrides in warn:
        with pytest.warns(UserWarning, match=message):
            cfg = GridWorldConfig(**overrides)
        for name, value in overrides.items():
            assert getattr(cfg, name) == value
        with pytest.warns(UserWarning, match=message):  # validate() itself, not only construction
            cfg.validate()
    for overrides in silent:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            GridWorldConfig(**overrides)
        assert not [w for w in caught if "time-scales" in str(w.message)], overrides

def test_every_validated_field_has_a_case():
    """Fields without a condition in validate (layout is validated by make_grid); any other field must
    appear in CASES, so a new condition needs a new case."""
    unvalidated = {"layout", "cells_init_peak", "common_random_numbers", "output_dir", "progress"}
    covered = {c[0] for c in CASES}
    assert covered | unvalidated == {f.name for f in dataclasses.fields(GridWorldConfig)}
    assert not covered & unvalidated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GridWorldConfig().validate()  # the defaults are valid, and silent


def write_yaml(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_load_config_unknown_field_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config fields \['gama'\]"):
        load_config(write_yaml(tmp_path, "gamma: 0.8\ngama: 0.5\n"))
    with pytest.raises(ValueError, match=r"unknown config fields \['tau'\]"):
        load_config(None, {"tau": 0.1})


def test_load_config_bad_value_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"^gamma must be .*, got 1.5$"):
        load_config(write_yaml(tmp_path, "gamma: 1.5\n"))
    with pytest.raises(ValueError, match=r"^batch_size must be .*, got 2.5$"):
        load_config(write_yaml(tmp_path, "batch_size: 2.5\n"))
    # overrides are applied on top of the file and validated too
    with pytest.raises(ValueError, match=r"^tau_min must be "):
        load_config(write_yaml(tmp_path, "tau_init: 0.1\n"), {"tau_min": 0.2})
    assert load_config(write_yaml(tmp_path, "tau_init: 0.1\n"), {"tau_min": 0.1}).tau_min == 0.1
    # ... and a misordered time-scale from file + override warns, naming the fields
    with pytest.warns(UserWarning, match="reward_learning_rate"):
        cfg = load_config(write_yaml(tmp_path, "actor_learning_rate: 0.1\n"), {"reward_learning_rate": 0.2})
    assert cfg.reward_learning_rate == 0.2


def test_parse_args_bad_value_and_unknown_flag_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^gamma must be .*, got 1.5$"):
        parse_args(["--gamma", "1.5"])
    with pytest.raises(ValueError, match=r"^x0 must be .*, got \[1.0, 2.0, 3.0\]$"):
        parse_args(["--x0", "1", "2", "3"])
    with pytest.raises(ValueError, match=r"^iterations must be .*, got -3$"):
        parse_args(["--iterations", "-3"])
    with pytest.raises(ValueError, match=r"unknown config fields \['gama'\]"):
        parse_args(["--config", write_yaml(tmp_path, "gama: 0.5\n")])
    with pytest.raises(SystemExit):
        parse_args(["--gama", "0.8"])
    assert "unrecognized arguments: --gama 0.8" in capsys.readouterr().err


@pytest.mark.parametrize("how,value,field", [
    ("cli", "1.5", "batch_size"), ("cli", "abc", "gamma"), ("cli", "maybe", "progress"),
    ("yaml", "abc", "gamma"), ("yaml", "[1]", "slip"), ("yaml", "4", "x0"),
])
def test_unconvertible_value_error_names_the_field(tmp_path, capsys, how, value, field):
    try:
        if how == "cli":  # argparse stops with its usage message, naming the flag
            with pytest.raises(SystemExit):
                parse_args([f"--{field}", value])
            assert f"argument --{field}" in capsys.readouterr().err
            return
        load_config(write_yaml(tmp_path, f"{field}: {value}\n"))
    except (ValueError, TypeError) as err:
        assert isinstance(err, ValueError) and field in str(err), repr(err)
    else:
        pytest.fail("no error")
