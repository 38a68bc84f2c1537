"""A user's own upper objective through the trainer: it trains, and a broken one stops with a clear error."""

from __future__ import annotations

import pytest
import torch
from test_trainer_math import make_trainer
from testing_utils import record_rollouts

from bilevel_rlhf import UpperObjective


class MeanLabel(UpperObjective):
    """f = -(mean label of theta's first completion) + BT-NLL: preference pairs of theta's own completions."""

    name = "mean_label"

    def x_loss(self, pair_loss, labels):
        return pair_loss.mean()

    def completion_values(self, pair_loss, labels):
        return torch.stack([-labels, labels - 1.0], 1).reshape(-1).detach()

    def value(self, pair_loss, labels):
        return pair_loss.mean() - labels.mean()


def test_a_custom_objective_trains_and_is_logged(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=8, objective_instance=MeanLabel())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "objective/upper_loss" in e]
    assert len(logs) >= 8 and all(abs(e["objective/upper_loss"]) < 10 for e in logs)


class Broken(MeanLabel):
    def __init__(self, what: str):
        self.what = what

    def x_loss(self, pair_loss, labels):
        if self.what == "vector":
            return pair_loss
        if self.what == "nan":
            return pair_loss.mean() * float("nan")
        return pair_loss.mean()

    def completion_values(self, pair_loss, labels):
        if self.what == "shape":
            return pair_loss.detach()  # one value per pair, not per completion
        return super().completion_values(pair_loss, labels)


@pytest.mark.parametrize("what, error, match", [
    ("vector", ValueError, "objective 'mean_label': x_loss must return a scalar"),
    ("nan", FloatingPointError, "non-finite reward-model loss \\(objective 'mean_label'\\) at iteration 0"),
    ("shape", ValueError, "objective 'mean_label': completion_values must return one value per completion"),
])
def test_a_broken_objective_stops_naming_itself_and_the_iteration(tmp_path, what, error, match):
    trainer = make_trainer(tmp_path, max_steps=4, objective_instance=Broken(what))
    with pytest.raises(error, match=match):
        trainer.train()


def test_an_object_that_is_not_an_objective_is_rejected_before_training(tmp_path):
    with pytest.raises(TypeError, match="objective must implement UpperObjective.x_loss"):
        make_trainer(tmp_path, objective_instance=object())


def test_win_rate_takes_one_completion_per_prompt(tmp_path):
    """Each theta completion is compared with one of the reference: one completion per prompt is one labelled pair."""
    trainer = make_trainer(tmp_path, max_steps=8, objective="win_rate", num_generations=1, common_random_numbers=True,
                           per_device_train_batch_size=2)
    rollouts = record_rollouts(trainer)
    trainer.train()
    assert trainer.oracle_queries == 2 * 4  # 2 iterations x 4 prompts x 1 pair
    assert len(rollouts) == 2
    assert all(r.theta.input_ids.shape[0] == 4 == r.ref.input_ids.shape[0] for r in rollouts)


def test_a_pairing_objective_needs_an_even_completion_count(tmp_path):
    with pytest.raises(ValueError, match="num_generations must be even for objective 'mean_label'"):
        make_trainer(tmp_path, objective="win_rate", num_generations=3, per_device_train_batch_size=6,
                     objective_instance=MeanLabel())
