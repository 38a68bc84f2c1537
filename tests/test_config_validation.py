"""Every validated condition of `BilevelConfig`, one parametrized case each (bilevel_rlhf/config.py).

Counted from the source: `_validate_bilevel` makes 65 `need(...)` calls; the 3 inside the `for role in
("actor", "critic", "reward")` loop check 3 conditions each, so there are 71 need-conditions. `__post_init__`
adds 3 raises (save_steps and max_steps multiples of the steps per iteration; optim an AdamW) and 4 warnings
(lr_scheduler_type unused; warmup and lr_scheduler_kwargs unused; learning_rate unused; time-scale ordering).
71 + 3 + 4 = 78 validated conditions.

Each condition has: its smallest bad value (raises ValueError whose message *starts* with the field name, so
another check that happens to mention the field cannot stand in for it), and, where a boundary exists, the valid
boundary value (accepted). `test_every_need_call_has_a_case` parses config.py, so a new validation without a case
here fails.
"""

from __future__ import annotations

import ast
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest

from bilevel_rlhf import config as config_module
from bilevel_rlhf.config import (
    LAMBDA_SCHEDULES,
    LR_SCHEDULES,
    METHODS,
    OBJECTIVES,
    REGULARIZATIONS,
    TAU_SCHEDULES,
    BilevelConfig,
)

CONFIG_PY = Path(config_module.__file__)
ROLES = ("actor", "critic", "reward")
EPS = 1e-9  # "just past the boundary"

# (field, smallest bad overrides, valid overrides at/near the boundary): one entry per need(...) condition.
NEED_CASES: list[tuple[str, dict, list[dict]]] = [
    ("method", dict(method="bilevel"), [dict(method=m) for m in METHODS]),
    ("nested_inner_steps", dict(nested_inner_steps=0), [dict(nested_inner_steps=1)]),
    ("label_every", dict(label_every=0), [dict(label_every=1)]),
    ("num_completions_to_print", dict(num_completions_to_print=0), [dict(num_completions_to_print=1)]),
    ("oracle_retries", dict(oracle_retries=-1), [dict(oracle_retries=0)]),
    ("oracle_timeout", dict(oracle_timeout=0.0), [dict(oracle_timeout=EPS), dict(oracle_timeout=None)]),
    ("oracle_retry_backoff", dict(oracle_retry_backoff=-EPS), [dict(oracle_retry_backoff=0.0)]),
    ("oracle_max_consecutive_failures", dict(oracle_max_consecutive_failures=0),
     [dict(oracle_max_consecutive_failures=1)]),
    ("objective", dict(objective="reward_nll"), [dict(objective=o) for o in OBJECTIVES]),
    ("objective_weight", dict(objective_weight=-EPS), [dict(objective_weight=0.0)]),
    # method="covariance" divides by tau: tau_init = 0 is allowed for the other methods only
    ("tau_init", dict(method="covariance", tau_init=0.0, tau_min=0.0),
     [dict(method="covariance", tau_init=EPS, tau_min=0.0), dict(method="single_loop", tau_init=0.0, tau_min=0.0),
      dict(method="penalized_covariance", tau_init=EPS, tau_min=0.0)]),
    ("tracking_tolerance", dict(tracking_tolerance=-EPS), [dict(tracking_tolerance=0.0)]),
    ("tracking_patience", dict(tracking_patience=0), [dict(tracking_patience=1)]),
    ("reward_head_init", dict(reward_head_init="xavier"), [dict(reward_head_init="zero")]),
    ("value_head_init", dict(value_head_init="xavier"), [dict(value_head_init="zero")]),
    ("advantage_estimator", dict(advantage_estimator="vtrace"), [dict(advantage_estimator="rloo", objective="win_rate")]),
    # rloo with theta's own pairs: a completion's baseline shares its verdict (biased for a penalized theta)
    ("advantage_estimator", dict(advantage_estimator="rloo", objective="preference_nll", method="single_loop"),
     [dict(advantage_estimator="rloo", objective="win_rate", method="single_loop"),
      dict(advantage_estimator="rloo", objective="preference_nll", method="partial_sgd")]),
    ("kl_estimator", dict(kl_estimator="k3"), [dict(kl_estimator="exact")]),
    ("kl_estimator", dict(kl_estimator="exact", regularization="entropy"),
     [dict(kl_estimator="k1", regularization="entropy")]),
    ("kl_estimator", dict(kl_estimator="exact", whiten_rewards=True), [dict(kl_estimator="k1", whiten_rewards=True)]),
    ("missing_eos_penalty", dict(missing_eos_penalty=-EPS),
     [dict(missing_eos_penalty=0.0), dict(missing_eos_penalty=None)]),
    ("reward_trust_region", dict(reward_trust_region=-EPS), [dict(reward_trust_region=0.0)]),
    ("hypergradient_warmup_ratio", dict(hypergradient_warmup_ratio=-EPS, max_steps=8, method="covariance"),
     [dict(hypergradient_warmup_ratio=0.0), dict(hypergradient_warmup_ratio=1.0, max_steps=8, method="covariance")]),
    ("exploration_temperature", dict(exploration_temperature=1.0 - EPS), [dict(exploration_temperature=1.0)]),
    ("exploration_temperature", dict(exploration_temperature=2.0, top_p=0.9),
     [dict(exploration_temperature=2.0, top_k=0, top_p=1.0), dict(exploration_temperature=1.0, top_k=50)]),
    ("hypergradient_warmup_ratio", dict(hypergradient_warmup_ratio=0.5, max_steps=8, method="partial_sgd"),
     [dict(hypergradient_warmup_ratio=0.5, max_steps=8, method="covariance"),
      dict(hypergradient_warmup_ratio=0.0, method="partial_sgd")]),
    ("reward_trust_region", dict(reward_trust_region=1.0, tau_init=0.0, tau_min=0.0),
     [dict(reward_trust_region=1.0, tau_init=EPS, tau_min=0.0), dict(reward_trust_region=0.0, tau_init=0.0, tau_min=0.0)]),
    ("collapse_entropy_fraction", dict(collapse_entropy_fraction=1.0),
     [dict(collapse_entropy_fraction=0.0), dict(collapse_entropy_fraction=1 - EPS)]),
    ("forward_kl_coef", dict(forward_kl_coef=-EPS), [dict(forward_kl_coef=0.0)]),
    ("forward_kl_coef", dict(forward_kl_coef=1.0, regularization="entropy"),
     [dict(forward_kl_coef=1.0, regularization="kl"), dict(forward_kl_coef=0.0, regularization="entropy")]),
    ("regularization", dict(regularization="l2"), [dict(regularization=r) for r in REGULARIZATIONS]),
    ("tau_init", dict(tau_init=-EPS, tau_min=0.0), [dict(tau_init=0.0, tau_min=0.0)]),
    ("tau_min", dict(tau_init=0.1, tau_min=0.1 + EPS), [dict(tau_init=0.1, tau_min=0.1), dict(tau_min=0.0)]),
    ("tau_schedule", dict(tau_schedule="linear"), [dict(tau_schedule=s) for s in TAU_SCHEDULES]),
    ("tau_target_kl", dict(tau_target_kl=0.0), [dict(tau_target_kl=EPS)]),
    ("tau_schedule", dict(tau_schedule="adaptive", regularization="entropy"),
     [dict(tau_schedule="adaptive", regularization="kl"), dict(tau_schedule="polynomial", regularization="entropy")]),
    ("tau_decay_rate", dict(tau_decay_rate=-EPS), [dict(tau_decay_rate=0.0)]),
    ("tau_horizon", dict(tau_horizon=0.0), [dict(tau_horizon=EPS)]),
    ("penalty_lambda", dict(penalty_lambda=0.0), [dict(penalty_lambda=EPS)]),
    # "exponential" is a valid tau schedule but not a lambda schedule
    ("penalty_lambda_schedule", dict(penalty_lambda_schedule="exponential"),
     [dict(penalty_lambda_schedule=s) for s in LAMBDA_SCHEDULES]),
    ("penalty_lambda_growth", dict(penalty_lambda_growth=-EPS), [dict(penalty_lambda_growth=0.0)]),
    ("penalty_lambda_horizon", dict(penalty_lambda_horizon=0.0), [dict(penalty_lambda_horizon=EPS)]),
    ("penalty_lambda_max", dict(penalty_lambda=1.0, penalty_lambda_max=1.0 - EPS),
     [dict(penalty_lambda=1.0, penalty_lambda_max=1.0), dict(penalty_lambda_max=None)]),
    *[case for role in ROLES for case in (
        (f"{role}_learning_rate", {f"{role}_learning_rate": 0.0}, [{f"{role}_learning_rate": EPS}]),
        (f"{role}_lr_schedule", {f"{role}_lr_schedule": "exponential"},
         [{f"{role}_lr_schedule": s} for s in LR_SCHEDULES]),
        (f"{role}_lr_decay", {f"{role}_lr_decay": -EPS}, [{f"{role}_lr_decay": 0.0}]),
    )],
    ("lr_horizon", dict(lr_horizon=0.0), [dict(lr_horizon=EPS)]),
    ("reward_adam_beta2", dict(reward_adam_beta2=1.0), [dict(reward_adam_beta2=1.0 - EPS), dict(reward_adam_beta2=None)]),
    ("max_prompt_length", dict(max_prompt_length=0), [dict(max_prompt_length=1)]),
    ("max_completion_length", dict(max_completion_length=0), [dict(max_completion_length=1)]),
    ("temperature", dict(temperature=0.0), [dict(temperature=EPS)]),
    ("top_k", dict(top_k=-1), [dict(top_k=0)]),
    ("top_p", dict(top_p=0.0), [dict(top_p=1.0), dict(top_p=EPS)]),
    # rloo's baseline is the prompt's other completions: 2 at least (win_rate allows 1 otherwise)
    ("num_generations", dict(num_generations=1, objective="win_rate", advantage_estimator="rloo"),
     [dict(num_generations=2, advantage_estimator="rloo", objective="win_rate"), dict(num_generations=1, objective="win_rate")]),
    ("num_generations", dict(num_generations=3),  # odd pairs nothing with preference_nll; win_rate pairs each one
     [dict(num_generations=2), dict(num_generations=4), dict(num_generations=1, objective="win_rate")]),
    ("num_eval_generations", dict(num_eval_generations=0), [dict(num_eval_generations=1)]),
    ("num_iterations", dict(num_iterations=0), [dict(num_iterations=1)]),
    ("cliprange", dict(cliprange=0.0), [dict(cliprange=EPS)]),
    ("cliprange_value", dict(cliprange_value=0.0), [dict(cliprange_value=EPS)]),
    ("vf_coef", dict(vf_coef=-EPS), [dict(vf_coef=0.0)]),
    ("gamma", dict(gamma=-EPS), [dict(gamma=0.0), dict(gamma=1.0)]),
    ("lam", dict(lam=-EPS), [dict(lam=0.0), dict(lam=1.0)]),
    ("gradient_accumulation_steps", dict(gradient_accumulation_steps=0), [dict(gradient_accumulation_steps=1)]),
    # a positive multiple of gradient_accumulation_steps (= 2 here); 2 itself is the boundary
    ("steps_per_generation", dict(steps_per_generation=3, gradient_accumulation_steps=2),
     [dict(steps_per_generation=2, gradient_accumulation_steps=2), dict(steps_per_generation=4, gradient_accumulation_steps=2),
      dict(gradient_accumulation_steps=2)]),  # None: gradient_accumulation_steps
    # a positive multiple of num_generations (= 2 here): whole prompts per micro-batch; 2 itself is the boundary
    ("per_device_train_batch_size", dict(per_device_train_batch_size=3, num_generations=2),
     [dict(per_device_train_batch_size=2, num_generations=2), dict(per_device_train_batch_size=4, num_generations=2),
      dict(per_device_train_batch_size=3, num_generations=1, objective="win_rate")]),
]
# the other side of two-sided conditions (the same need(...), another way to fail it)
OTHER_SIDE: list[tuple[str, dict]] = [
    ("tau_min", dict(tau_min=-EPS)),
    ("hypergradient_warmup_ratio", dict(hypergradient_warmup_ratio=1.0 + EPS, max_steps=8, method="covariance")),
    ("top_p", dict(top_p=1.0 + EPS)),
    ("reward_adam_beta2", dict(reward_adam_beta2=-EPS)),
    ("num_generations", dict(num_generations=0, objective="win_rate")),  # < 1
    ("steps_per_generation", dict(steps_per_generation=0)),  # < 1 (0 is a multiple of everything)
    ("per_device_train_batch_size", dict(per_device_train_batch_size=0)),  # < 1
    ("gamma", dict(gamma=1.0 + EPS)),
    ("lam", dict(lam=1.0 + EPS)),
]
# the raises of __post_init__ (after TrainingArguments.__post_init__)
POST_INIT_CASES: list[tuple[str, dict, list[dict]]] = [
    ("save_steps", dict(save_strategy="steps", save_steps=3, steps_per_generation=2),
     # a multiple (2 is the boundary), or a ratio of the run (< 1): not checked
     [dict(save_strategy="steps", save_steps=s, steps_per_generation=2) for s in (2, 4, 0.5)]),
    ("optim", dict(optim="adafactor"), [dict(optim="adamw_torch"), dict(optim="adamw_torch_fused")]),
    ("max_steps", dict(max_steps=3, num_iterations=2),  # a run ends at an iteration boundary
     [dict(max_steps=4, num_iterations=2), dict(max_steps=-1, num_iterations=2)]),
]
# the warnings of __post_init__: (message, warning overrides, silent overrides)
WARN_CASES: list[tuple[str, list[dict], list[dict]]] = [
    ("lr_scheduler_type is not used", [dict(lr_scheduler_type="cosine"), dict(lr_scheduler_type="constant")],
     [dict(lr_scheduler_type="linear")]),  # the TrainingArguments default
    ("learning_rate is not used", [dict(learning_rate=1e-3), dict(learning_rate=5e-5 * (1 + 1e-6))],
     [dict(learning_rate=5e-5)]),
    ("is not used by the BilevelTrainer: its learning rates follow",
     [dict(warmup_steps=10), dict(warmup_steps=0.1), dict(lr_scheduler_kwargs={"power": 2.0})],
     [dict(warmup_steps=0)]),
    ("time-scales", [
        dict(critic_learning_rate=1e-4, actor_learning_rate=1e-4 * (1 + 1e-6), reward_learning_rate=1e-6),  # beta < alpha
        dict(critic_learning_rate=1e-4, actor_learning_rate=1e-5, reward_learning_rate=1e-5 * (1 + 1e-6)),  # alpha < zeta
    ], [dict(critic_learning_rate=1e-4, actor_learning_rate=1e-4, reward_learning_rate=1e-4),  # equal: allowed
        dict(critic_learning_rate=1e-3, actor_learning_rate=1e-4, reward_learning_rate=1e-5)]),
]


def make(tmp_path, **overrides) -> BilevelConfig:
    # the cases are written against single_loop without the trust region (tau_init = 0 allowed); the cases of the
    # covariance methods and of the trust region name theirs
    base = {"method": "single_loop", "reward_trust_region": 0.0}
    return BilevelConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **{**base, **overrides})


def _ids(cases):
    seen: Counter = Counter()
    out = []
    for field, *_ in cases:
        seen[field] += 1
        out.append(field if seen[field] == 1 else f"{field}-{seen[field]}")
    return out


def _expect_rejected(tmp_path, field: str, overrides: dict) -> None:
    with pytest.raises(ValueError, match=rf"^{re.escape(field)} must be") as info:
        make(tmp_path, **overrides)
    assert info.type is ValueError  # the exact type, not a subclass


@pytest.mark.parametrize(("field", "bad", "good"), NEED_CASES, ids=_ids(NEED_CASES))
def test_need_condition_rejects_the_smallest_bad_value_and_accepts_the_boundary(tmp_path, field, bad, good):
    _expect_rejected(tmp_path, field, bad)
    for overrides in good:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a tiny learning rate breaks the time-scale order: a warning only
            cfg = make(tmp_path, **overrides)
        assert all(getattr(cfg, k) == v for k, v in overrides.items())


@pytest.mark.parametrize(("field", "bad"), OTHER_SIDE, ids=[f for f, _ in OTHER_SIDE])
def test_two_sided_conditions_reject_the_other_side(tmp_path, field, bad):
    _expect_rejected(tmp_path, field, bad)


@pytest.mark.parametrize(("field", "bad", "good"), POST_INIT_CASES, ids=[f for f, *_ in POST_INIT_CASES])
def test_post_init_raises_name_the_field(tmp_path, field, bad, good):
    with pytest.raises(ValueError, match=rf"^{field} must be") as info:
        make(tmp_path, **bad)
    assert info.type is ValueError
    for overrides in good:
        cfg = make(tmp_path, **overrides)
        assert all(getattr(getattr(cfg, k), "value", getattr(cfg, k)) == v for k, v in overrides.items())


@pytest.mark.parametrize(("message", "warn", "silent"), WARN_CASES, ids=[m.split()[0] for m, *_ in WARN_CASES])
def test_post_init_warnings(tmp_path, message, warn, silent):
    for overrides in warn:
        with pytest.warns(UserWarning, match=message):
            make(tmp_path, **overrides)
    for overrides in silent:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make(tmp_path, **overrides)
        assert not [w for w in caught if message in str(w.message)], overrides


def test_default_config_is_valid_and_silent(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = make(tmp_path)
    ours = ("is not used", "time-scales")
    assert not [w for w in caught if any(s in str(w.message) for s in ours)]
    assert cfg.steps_per_iteration == 1


# ---------------------------------------------------------------------------------------------------- coverage
def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{name} not found in {CONFIG_PY}")


def _need_fields_in_source() -> list[str]:
    """The field named by each need(...) condition of _validate_bilevel, the role loop expanded."""
    fn = _function(ast.parse(CONFIG_PY.read_text()), "_validate_bilevel")
    fields: list[str] = []

    def visit(node, env: dict[str, str]):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
            values = ast.literal_eval(node.iter)
            for value in values:
                for child in node.body:
                    visit(child, {**env, node.target.id: value})
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "need":
            name_arg = node.args[1]
            if isinstance(name_arg, ast.Constant):
                fields.append(name_arg.value)
            else:  # f"{role}_learning_rate"
                assert isinstance(name_arg, ast.JoinedStr), ast.unparse(name_arg)
                fields.append("".join(
                    part.value if isinstance(part, ast.Constant) else env[part.value.id] for part in name_arg.values
                ))
            return
        for child in ast.iter_child_nodes(node):
            visit(child, env)

    for statement in fn.body:
        visit(statement, {})
    return fields


def test_every_need_call_has_a_case():
    """One case per need(...) condition of config.py (50 when written): a new validation without a case fails."""
    source_fields = _need_fields_in_source()
    assert len(source_fields) == CONFIG_PY.read_text().count("need(") + 2 * 3  # the role loop: 3 calls x 3 roles
    assert Counter(source_fields) == Counter(field for field, *_ in NEED_CASES)
    assert {field for field, _ in OTHER_SIDE} <= set(source_fields)


def test_every_post_init_raise_and_warning_has_a_case():
    fn = _function(ast.parse(CONFIG_PY.read_text()), "__post_init__")
    raises = [n for n in ast.walk(fn) if isinstance(n, ast.Raise)]
    warns = [n for n in ast.walk(fn) if isinstance(n, ast.Call)
             and ast.unparse(n.func) in ("warnings.warn", "warn_unless_time_scales")]
    assert len(raises) == len(POST_INIT_CASES) == 3
    assert len(warns) == len(WARN_CASES) == 4
    assert len(NEED_CASES) + len(POST_INIT_CASES) + len(WARN_CASES) == 78  # see the module docstring
