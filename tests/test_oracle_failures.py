"""An oracle that fails: retries, timeouts and back-off; dropped and abstained pairs counted and kept out of every
loss; a run stopped by an oracle that keeps failing, with a checkpoint that resumes."""

from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest
import testing_utils
import torch

from bilevel_rlhf import OracleDropWarning, OracleFailureError, OracleOutputError
from bilevel_rlhf.oracle_calls import OracleCaller, OracleCounts
from bilevel_rlhf.rl_utils import bradley_terry_loss

PROMPTS = ["the cat is", "a dog was", "we love the", "it is very", "the day was", "they hate a", "you and we", "the sun is"]
# 4 prompts x 2 completions = 4 pairs per iteration, one micro-step per iteration
CONFIG = dict(per_device_train_batch_size=8, num_generations=2, max_completion_length=4, max_prompt_length=8,
              logging_steps=1, oracle_retry_backoff=0.0)
PAIRS = 4


def happy(text: str) -> int:
    return text.split().count("happy")


def happy_labels(a: list[str], b: list[str]) -> list[float]:
    return [1.0 if happy(x) > happy(y) else 0.0 if happy(x) < happy(y) else 0.5 for x, y in zip(a, b)]


# ---------------------------------------------------------------------------------------------------- the caller
class Scripted:
    """An oracle whose successive calls do what `script` says: "ok", "raise", "bad" (a label of 2), or "sleep"."""

    name = "scripted"

    def __init__(self, script):
        self.script, self.calls = list(script), 0

    def __call__(self, prompts, a, b):
        what = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if what == "raise":
            raise ConnectionError("429 Too Many Requests")
        if what == "sleep":
            time.sleep(0.5)
        if what == "bad":
            return [2.0] * len(a)
        return [1.0] * len(a)


def ask(caller, n=3, iteration=7):
    return caller.ask(["p"] * n, ["a"] * n, ["b"] * n, iteration)


def test_a_failed_call_is_retried_with_exponential_back_off():
    waits = []
    caller = OracleCaller(Scripted(["raise", "raise", "ok"]), retries=2, backoff=0.5, sleep=waits.append)
    answer = ask(caller)
    assert waits == [0.5, 1.0] and answer.failed_calls == 2 and not answer.dropped and answer.answered.all()
    assert answer.counts == OracleCounts(asked=3, answered=3, failed_calls=2)


def test_a_batch_is_dropped_after_the_retries_loudly_and_counted():
    caller = OracleCaller(Scripted(["raise"]), retries=1, backoff=0.0, max_consecutive_failures=2)
    with pytest.warns(OracleDropWarning, match=r"'scripted' failed at iteration 7 \(2 calls; last: ConnectionError: "
                                               r"429 Too Many Requests\): dropping this batch's 3 pairs"):
        answer = ask(caller)
    assert answer.dropped and not answer.answered.any() and np.isfinite(answer.labels).all()
    assert answer.counts == OracleCounts(asked=3, dropped=3, failed_calls=2)
    assert not caller.should_stop
    with pytest.warns(OracleDropWarning):
        ask(caller)
    assert caller.should_stop  # two failed iterations in a row
    caller.oracle.script = ["ok"]
    ask(caller)
    assert caller.consecutive_failures == 0  # an answer resets the count


def test_a_call_past_the_timeout_is_abandoned_and_retried():
    caller = OracleCaller(Scripted(["sleep", "ok"]), retries=1, timeout=0.05, backoff=0.0)
    start = time.perf_counter()
    answer = ask(caller)
    assert time.perf_counter() - start < 0.4  # the sleeping call was not waited for
    assert answer.failed_calls == 1 and isinstance(answer.error, TimeoutError) and answer.answered.all()
    assert "oracle_timeout=0.05" in str(answer.error)


def test_an_output_that_is_not_an_answer_is_not_retried():
    caller = OracleCaller(Scripted(["bad", "ok"]), retries=3, backoff=0.0)
    with pytest.raises(OracleOutputError, match=r"^iteration 7: preference oracle 'scripted' returned a label outside "
                                                r"\[0, 1\] at index 0"):
        ask(caller)
    assert caller.oracle.calls == 1


def test_abstained_pairs_are_kept_out_and_the_rest_answered():
    caller = OracleCaller(lambda p, a, b: [1.0, float("nan"), 0.25])
    answer = ask(caller)
    assert answer.answered.tolist() == [True, False, True] and answer.labels.tolist() == [1.0, 0.5, 0.25]
    assert answer.counts == OracleCounts(asked=3, answered=2, abstained=1)
    with pytest.raises(OracleOutputError, match="non-finite label at index 1"):  # inf is not an abstention
        ask(OracleCaller(lambda p, a, b: [1.0, float("inf"), 0.0]))


# ---------------------------------------------------------------------------------------------------- fault injection
class Faulty:
    """Calls fail in a fixed cycle of ten: two raise (20% of the calls), one gives no answer in time (10%); a call
    that answers abstains on each pair with probability 0.3 (seeded), and labels the others by 'happy' counts. It
    records what it meant, to be compared with what the trainer counted."""

    name = "faulty"
    CYCLE = ["ok", "raise", "timeout", "ok", "ok", "raise", "ok", "ok", "ok", "ok"]

    def __init__(self, timeout_sleep: float):
        self.rng, self.lock, self.sleep = np.random.default_rng(0), threading.Lock(), timeout_sleep
        self.outcomes: list[str] = []
        self.answered = self.abstained = 0

    def __call__(self, prompts, a, b):
        with self.lock:  # decided at once: an abandoned call changes nothing later
            outcome = self.CYCLE[len(self.outcomes) % len(self.CYCLE)]
            self.outcomes.append(outcome)
            abstain = self.rng.random(len(a)) < 0.3
            if outcome == "ok":
                self.abstained += int(abstain.sum())
                self.answered += int((~abstain).sum())
        if outcome == "raise":
            raise ConnectionError("rate limited")
        if outcome == "timeout":
            time.sleep(self.sleep)
        return [math.nan if s else y for s, y in zip(abstain, happy_labels(a, b))]


def test_fault_injection_run_finishes_and_counts_every_query(tmp_path):
    oracle = Faulty(timeout_sleep=1.0)
    # 2 tries per iteration: iterations 1 (raise, timeout) and 9 (raise, timeout) are dropped, 4 (raise, ok) is not
    trainer = testing_utils.make_trainer(tmp_path, PROMPTS, oracle=oracle, max_steps=10, save_strategy="steps",
                                         save_steps=5, oracle_retries=1, oracle_timeout=0.3, **CONFIG)
    with pytest.warns(OracleDropWarning) as caught:
        trainer.train()
    assert trainer.state.global_step == 10  # the run finished
    drops = [str(w.message) for w in caught if issubclass(w.category, OracleDropWarning)]
    assert len(drops) == 2 and "iteration 1 " in drops[0] and "iteration 9 " in drops[1]
    assert "TimeoutError" in drops[0] and "ConnectionError" not in drops[0].split("last:")[1]
    failed = sum(o != "ok" for o in oracle.outcomes)
    assert oracle.outcomes.count("raise") == 3 and oracle.outcomes.count("timeout") == 2 and len(oracle.outcomes) == 13
    expected = OracleCounts(asked=10 * PAIRS, answered=oracle.answered, abstained=oracle.abstained, dropped=2 * PAIRS,
                            failed_calls=failed)
    assert oracle.abstained > 0 and expected.answered + expected.abstained + expected.dropped == expected.asked
    assert trainer.oracle_counts == expected
    last = [e for e in trainer.state.log_history if "oracle/queries" in e][-1]
    assert {k: last[k] for k in expected.metrics()} == expected.metrics()
    state = json.load(open(tmp_path / "out" / "checkpoint-10" / "bilevel_state_rank0.json"))
    assert state["oracle_counts"] == expected.state_dict() and state["oracle_queries"] == 10 * PAIRS
    # resumed from the middle, the counts go on from the checkpoint's
    half = json.load(open(tmp_path / "out" / "checkpoint-5" / "bilevel_state_rank0.json"))["oracle_counts"]
    resumed = testing_utils.make_trainer(tmp_path, PROMPTS, max_steps=6, **CONFIG)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-5"))
    assert resumed.oracle_counts == OracleCounts.from_state_dict(half) + OracleCounts(asked=PAIRS, answered=PAIRS)


# ---------------------------------------------------------------------------------------------------- masked losses
class Abstaining:
    """Soft labels from 'happy' counts and lengths (so that labels differ from the placeholder 1/2), with an
    abstention on the pairs in `abstain`; or a failure on every call."""

    name = "abstaining"

    def __init__(self, abstain=(), fail=False):
        self.abstain, self.fail = set(abstain), fail

    def __call__(self, prompts, a, b):
        if self.fail:
            raise ConnectionError("down")
        labels = [1 / (1 + math.exp(len(y) - len(x) + 2 * (happy(y) - happy(x)))) for x, y in zip(a, b)]
        return [math.nan if i in self.abstain else p for i, p in enumerate(labels)]


def first_iteration(trainer):
    """Iteration 0 through `training_step` (rollout, each loss part's forward and backward; no optimizer step): the
    completed rollout, and the loss statistics of the step."""
    inputs = testing_utils.record_loss_inputs(trainer)
    trainer.state.global_step = 0
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, not run here
    torch.manual_seed(3)
    trainer.training_step(trainer.model, [{"prompt": p} for p in PROMPTS[: trainer.args.prompts_per_iteration]])
    return trainer._buffer, {k: v[-1] for k, v in trainer._metrics.items()}, inputs


@pytest.mark.parametrize("method, objective, fuse", [
    ("single_loop", "preference_nll", True),
    ("covariance", "win_rate", False),
    ("penalized_covariance", "preference_nll", False),
])
def test_losses_with_abstained_pairs_are_those_of_the_answered_pairs_alone(tmp_path, method, objective, fuse):
    against_reference = objective == "win_rate"
    config = {**CONFIG, "num_generations": 1, "per_device_train_batch_size": 4} if against_reference else CONFIG
    trainer = testing_utils.make_trainer(
        tmp_path, PROMPTS, oracle=Abstaining(abstain={1, 2}), method=method, objective=objective, tau_init=0.5,
        fuse_rollout_and_update=fuse, penalty_lambda=2.0, log_completions=True, **config)
    buf, metrics, _ = first_iteration(trainer)
    a = buf.answered
    assert a.tolist() == [True, False, False, True]
    theta = buf.theta.score.double()
    ra, rb = (theta, buf.ref.score.double()) if against_reference else (theta[0::2], theta[1::2])
    y = buf.labels.double()[a]
    nll = bradley_terry_loss(ra[a], rb[a], y)  # the answered pairs alone
    rows = a if against_reference else a.repeat_interleave(2)
    if against_reference:  # win_rate: f = w * BT-NLL - label, g = w * pair NLL - label
        w = trainer.args.objective_weight
        f_x, upper, g = w * nll.mean(), (w * nll - y).mean(), w * nll - y
    else:  # preference_nll: g = 2 * the pair's NLL, for each of its completions
        f_x, upper, g = nll.mean(), nll.mean(), 2 * nll.repeat_interleave(2)
    lam, tau = buf.penalty_lambda, buf.tau
    # theta's oracle term: g on the answered pairs' completions, 0 on the others
    expected_g = torch.zeros_like(theta)
    expected_g[rows] = g
    torch.testing.assert_close(buf.theta.g.double(), expected_g, rtol=1e-5, atol=1e-6)
    if method in ("single_loop", "penalized_covariance"):
        torch.testing.assert_close(buf.theta.terminal.double(), theta - expected_g / lam, rtol=1e-5, atol=1e-6)
    # x's loss
    if method == "single_loop":
        expected = f_x + lam * (buf.phi.score.double().mean() - theta.mean())
    else:  # (1/tau) Cov(r_x, g) over the completions in answered pairs
        r = theta[rows]
        expected = f_x + ((g - g.mean()) * r).sum() / ((len(g) - 1) * tau)
    assert metrics["objective/reward_loss"] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    # the logged estimates
    s = (torch.sign(ra - rb) + 1) / 2
    logged = trainer._rollout_metrics
    assert logged["objective/upper_loss"] == pytest.approx(float(upper), rel=1e-5, abs=1e-6)
    assert logged["objective/pair_nll"] == pytest.approx(float(nll.mean()), rel=1e-5, abs=1e-6)
    assert logged["objective/pref_accuracy"] == pytest.approx(float((y * s[a] + (1 - y) * (1 - s[a])).mean()),
                                                              rel=1e-5, abs=1e-6)
    if against_reference:
        assert logged["objective/win_rate"] == pytest.approx(float(y.mean()), rel=1e-5)
    assert logged["oracle/abstained"] == 2 and logged["oracle/answered"] == 2 and "oracle/pairs_answered" not in logged
    # the completions table shows no label for a pair without an answer
    rows = [json.loads(line) for line in open(tmp_path / "out" / "completions.jsonl")]
    pair_of = (lambda i: i) if against_reference else (lambda i: i // 2)
    assert [r["label"] is None for r in rows] == [not a[pair_of(i)] for i in range(len(rows))]


def test_an_iteration_without_answers_trains_the_actors_on_r_x_alone(tmp_path):
    trainer = testing_utils.make_trainer(tmp_path, PROMPTS, oracle=Abstaining(fail=True), oracle_retries=1,
                                         fuse_rollout_and_update=False, **CONFIG)
    with pytest.warns(OracleDropWarning, match="iteration 0"):
        buf, metrics, inputs = first_iteration(trainer)
    assert buf.labels is None and buf.answered is None and not buf.reward_step
    torch.testing.assert_close(buf.theta.terminal, buf.theta.score)  # no -g / lambda term
    assert all(not part.startswith("reward/") for i in inputs for part in i.parts)  # x does not step
    assert "objective/reward_loss" not in metrics and "objective/upper_loss" not in trainer._rollout_metrics
    assert trainer.oracle_counts == OracleCounts(asked=PAIRS, dropped=PAIRS, failed_calls=2)


# ---------------------------------------------------------------------------------------------------- stop and resume
def test_an_oracle_that_keeps_failing_stops_the_run_with_a_checkpoint_that_resumes(tmp_path):
    broken = Abstaining(fail=True)
    trainer = testing_utils.make_trainer(tmp_path, PROMPTS, oracle=broken, max_steps=4, oracle_retries=1,
                                         oracle_max_consecutive_failures=2, **CONFIG)
    checkpoint = tmp_path / "out" / "checkpoint-1"
    message = (rf"'abstaining' failed on 2 labelled iterations in a row .*the last at iteration 1 \(last error: "
               rf"ConnectionError: down\); the run so far is saved in {checkpoint}")
    with pytest.warns(OracleDropWarning), pytest.raises(OracleFailureError, match=message) as stopped:
        trainer.train()
    assert stopped.value.checkpoint == str(checkpoint) and isinstance(stopped.value.__cause__, ConnectionError)
    state = json.load(open(checkpoint / "bilevel_state_rank0.json"))
    assert state["iteration"] == 1  # iteration 0 trained (on r_x), iteration 1 is redone on resume
    assert state["oracle_counts"] == {"asked": 2 * PAIRS, "answered": 0, "abstained": 0, "dropped": 2 * PAIRS,
                                      "failed_calls": 4}
    resumed = testing_utils.make_trainer(tmp_path, PROMPTS, max_steps=4, oracle_max_consecutive_failures=2, **CONFIG)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert resumed.oracle_counts == OracleCounts(asked=5 * PAIRS, answered=3 * PAIRS, dropped=2 * PAIRS, failed_calls=4)


@pytest.mark.parametrize("field, value", [
    ("oracle_retries", -1), ("oracle_timeout", 0.0), ("oracle_timeout", -1.0), ("oracle_retry_backoff", -0.1),
    ("oracle_max_consecutive_failures", 0),
])
def test_bad_oracle_settings_are_named_config_errors(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*got {value}"):
        testing_utils.make_config(tmp_path, **{field: value})
