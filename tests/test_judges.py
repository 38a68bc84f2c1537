"""Pairwise judges (TRL's protocol) as the human: the adapter's order shuffling and verdicts, a judge made from
scores, a TRL-style judge training the trainer end to end, and a judge's bad output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import testing_utils

from bilevel_rlhf import JudgeOracle, OracleOutputError, PairwiseJudge, ScoreJudge, ScoreOracle
from bilevel_rlhf.judges import check_verdicts

PROMPTS = ["the cat is", "a dog was", "we love the", "it is very", "the day was", "they hate a", "you and we", "the sun is"]
# 4 prompts x 2 completions = 4 pairs per iteration, one micro-step per iteration
CONFIG = dict(per_device_train_batch_size=8, num_generations=2, max_completion_length=4, max_prompt_length=8,
              logging_steps=1, oracle_retry_backoff=0.0)


def happy(text: str) -> int:
    return text.split().count("happy")


class HappyJudge:
    """A test double of a TRL pairwise judge (TRL's exact signature): prefers the completion with more 'happy'
    tokens, the first one on a tie; records how it was called."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[list[str]], bool]] = []

    def judge(self, prompts: list[str], completions: list[list[str]], shuffle_order: bool = True) -> list[int]:
        self.calls.append((prompts, completions, shuffle_order))
        return [0 if happy(first) >= happy(second) else 1 for first, second in completions]


class Constant:
    """A judge that returns `verdicts(n)` whatever it is shown."""

    def __init__(self, verdicts, name="constant"):
        self.verdicts, self.name, self.shown = verdicts, name, []

    def judge(self, prompts, completions, shuffle_order=True):
        self.shown.append(completions)
        return self.verdicts(len(prompts))


def pairs(n: int) -> tuple[list[str], list[str], list[str]]:
    return [f"p{i}" for i in range(n)], [f"a{i}" for i in range(n)], [f"b{i}" for i in range(n)]


def test_verdicts_map_back_through_the_shuffle():
    judge = Constant(lambda n: [0] * n)  # always the first shown: pure position bias
    oracle = JudgeOracle(judge, seed=3)
    labels = np.array(oracle(*pairs(4000)))
    # the first shown is a unless the adapter swapped the pair: the label says which one the judge preferred
    first_is_a = np.array([first.startswith("a") for first, _ in judge.shown[0]])
    np.testing.assert_array_equal(labels, first_is_a.astype(float))
    assert abs(labels.mean() - 0.5) < 0.03  # a position-biased judge gives balanced labels
    # a judge that always prefers the second shown: the complement
    second = np.array(JudgeOracle(Constant(lambda n: [1] * n), seed=3)(*pairs(4000)))
    np.testing.assert_array_equal(second, 1.0 - labels)
    # no shuffling: the pair as given, so the biased judge always prefers a
    assert JudgeOracle(Constant(lambda n: [0] * n), shuffle_order=False)(*pairs(5)) == [1.0] * 5


def test_shuffling_is_seeded_and_restored_from_the_state_dict():
    def oracle(seed):
        return JudgeOracle(Constant(lambda n: [0] * n), seed=seed)

    first, again, other = oracle(7), oracle(7), oracle(8)
    assert first(*pairs(64)) == again(*pairs(64)) != other(*pairs(64))
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able: it goes into the checkpoint
    expected = first(*pairs(64))
    restored = oracle(0)
    restored.load_state_dict(state)
    assert restored(*pairs(64)) == expected


def test_abstentions_are_nan_and_the_judge_is_called_without_its_own_shuffle():
    judge = Constant(lambda n: [-1, 0, 1, -1][:n])
    labels = JudgeOracle(judge, shuffle_order=False)(*pairs(4))
    assert np.isnan(labels[0]) and np.isnan(labels[3]) and labels[1:3] == [1.0, 0.0]
    happy_judge = HappyJudge()
    JudgeOracle(happy_judge)(["p"], ["happy"], ["sad"])
    assert happy_judge.calls[0][2] is False  # the adapter shuffles, seeded and checkpointed; the judge must not


def test_score_judge_prefers_the_higher_score_and_shares_the_oracles_state():
    judge = ScoreJudge(lambda texts: [happy(t) for t in texts], name="happy")
    assert isinstance(judge, PairwiseJudge)
    prompts = ["p"] * 3
    assert judge.judge(prompts, [["happy", "sad"], ["sad", "happy happy"], ["a", "a"]])[:2] == [0, 1]
    assert judge.score(["p", "p"], ["happy", "sad"]) == [1.0, 0.0]
    oracle = ScoreOracle(lambda texts: [0.0] * len(texts), seed=5)  # ties only: the seeded coin decides
    tied = ScoreJudge(oracle)
    state = tied.state_dict()
    verdicts = tied.judge(["p"] * 32, [["x", "y"]] * 32)
    assert set(verdicts) == {0, 1}
    tied.load_state_dict(state)
    assert tied.judge(["p"] * 32, [["x", "y"]] * 32) == verdicts
    with pytest.raises(ValueError, match="mode 'probability' gives soft labels"):
        ScoreJudge(lambda texts: [0.0] * len(texts), mode="probability")
    # through JudgeOracle: labels as the scores say, whatever the order shown
    labels = JudgeOracle(judge, seed=1)(["p"] * 6, ["happy", "sad"] * 3, ["sad", "happy"] * 3)
    assert labels == [1.0, 0.0] * 3


@pytest.mark.parametrize("output, match", [
    (lambda n: [0] * (n - 1), r"judge 'bad' must return one verdict per pair: expected 4, got 3 .*index: 3"),
    (lambda n: [0, 1, 1, 2][:n], r"judge 'bad' returned 2 at index 3: a verdict is 0 .*, 1 .* or -1"),
    (lambda n: np.zeros(n, dtype=int), r"judge 'bad' must return a list of 4 verdicts .*got ndarray"),
    (lambda n: [0, True, 0, 0], r"judge 'bad' returned True at index 1"),
    (lambda n: [0, 0, 0.5, 0], r"judge 'bad' returned 0.5 at index 2"),
], ids=["short", "value_2", "ndarray", "bool", "float"])
def test_check_verdicts_names_the_judge_and_the_first_bad_index(output, match):
    with pytest.raises(OracleOutputError, match=match):
        check_verdicts(output(4), 4, "bad")
    np.testing.assert_array_equal(check_verdicts((0, 1, -1, 1.0), 4, "ok"), [0, 1, -1, 1])


def test_a_trl_style_judge_trains_the_trainer_end_to_end(tmp_path):
    judge = HappyJudge()
    trainer = testing_utils.make_trainer(tmp_path, PROMPTS, oracle=judge, max_steps=3, save_strategy="steps",
                                         save_steps=3, **CONFIG)
    assert isinstance(trainer.preference_oracle, JudgeOracle) and trainer.preference_oracle.judge is judge
    rollouts = testing_utils.record_rollouts(trainer)
    trainer.train()
    assert len(judge.calls) == 3 and all(shuffle is False for *_, shuffle in judge.calls)
    for rollout, (_, shown, _) in zip(rollouts, judge.calls):
        # the recorded labels follow the judge's verdicts, mapped back to theta's pairs (2i, 2i+1)
        texts = rollout.stats.texts["theta"]
        for p, (a, b) in enumerate(zip(texts[0::2], texts[1::2])):
            assert sorted(shown[p]) == sorted([a, b])
            expected = 1.0 if happy(a) > happy(b) else 0.0 if happy(a) < happy(b) else None
            if expected is not None:
                assert float(rollout.labels[p]) == expected
    logs = trainer.state.log_history[-2]
    assert logs["oracle/queries"] == logs["oracle/answered"] == 3 * 4 and logs["oracle/abstained"] == 0
    state = json.load(open(tmp_path / "out" / "checkpoint-3" / "bilevel_state_rank0.json"))
    assert state["oracle_state"]["rng"] == trainer.preference_oracle.state_dict()["rng"]
    assert state["oracle_counts"] == {"asked": 12, "answered": 12, "abstained": 0, "dropped": 0, "failed_calls": 0}


@pytest.mark.parametrize("output, match", [
    (lambda n: [0] * (n + 1), r"iteration 0: judge 'bad' must return one verdict per pair: expected 4, got 5"),
    (lambda n: [0, 0, 2, 0], r"iteration 0: judge 'bad' returned 2 at index 2"),
    (lambda n: "0101", r"iteration 0: judge 'bad' must return a list of 4 verdicts .*got str"),
], ids=["long", "value_2", "str"])
def test_a_judges_bad_output_stops_the_run_naming_judge_iteration_and_index(tmp_path, output, match):
    trainer = testing_utils.make_trainer(tmp_path, PROMPTS, oracle=Constant(output, name="bad"), max_steps=2, **CONFIG)
    with pytest.raises(OracleOutputError, match=match):
        trainer.train()
    assert trainer.oracle_counts.failed_calls == 0  # a bug, not a failure: never retried
