"""The evaluation protocol: `PolicyEvaluator` against recomputation, and `OracleEvalCallback` never changing
training, logging, writing its records and resuming."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import testing_utils
import torch
from testing_utils import make_policy, make_tokenizer

from bilevel_rlhf.eval_callback import OracleEvalCallback, read_eval_records
from bilevel_rlhf.evaluation import PolicyEvaluator, sequence_kl
from bilevel_rlhf.preference import ScoreOracle

PROMPTS = ["the cat is", "a dog was", "we love the", "it is very"]
CONFIG = dict(per_device_train_batch_size=16, max_steps=8, num_iterations=2, max_completion_length=4,
              max_prompt_length=8, num_generations=2, actor_learning_rate=3e-3, critic_learning_rate=3e-3,
              reward_learning_rate=1e-3, penalty_lambda=1.0, tau_init=0.01, logging_steps=1)


class RecordingOracle(ScoreOracle):
    """Scores the number of 'happy' words and records every batch of texts it scores."""

    def __init__(self):
        super().__init__(lambda texts: [t.split().count("happy") + 0.1 * len(t.split()) for t in texts], name="rec")
        self.scored: list[list[str]] = []

    def score(self, prompts, completions):
        self.scored.append(list(completions))
        return super().score(prompts, completions)


def test_evaluator_metrics_are_those_of_its_samples():
    tok = make_tokenizer()
    policy, ref = make_policy(tok, seed=0).eval(), make_policy(tok, seed=1).eval()
    oracle = RecordingOracle()
    ev = PolicyEvaluator(PROMPTS, tok, oracle, num_samples=3, max_new_tokens=4, batch_size=5, seed=7)
    rng_before = torch.random.get_rng_state()
    rec = ev.evaluate(policy, ref, step=3, train_queries=11)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's random stream is untouched
    ref_texts, texts = oracle.scored  # the opponents first (once), then the policy's samples
    assert len(texts) == rec.num_completions == 12 and (rec.step, rec.train_queries) == (3, 11)
    s, s_ref = np.array(oracle.score_fn(texts)), np.array(oracle.score_fn(ref_texts))
    assert rec.score == pytest.approx(s.mean()) and rec.score_se == pytest.approx(s.std(ddof=1) / math.sqrt(12))
    wins = np.where(s > s_ref, 1.0, np.where(s < s_ref, 0.0, 0.5))
    assert rec.win_rate == pytest.approx(wins.mean())
    assert rec.eval_queries == 24  # 12 opponents scored once, 12 samples

    # the KL is sequence_kl's on the same samples (whose expectation is the exact KL: test_happy_tweet_recipe)
    torch.manual_seed(7)
    tok.padding_side = "left"
    rows = [p for p in PROMPTS for _ in range(3)]
    kls = []
    for start in range(0, 12, 5):
        enc = tok(rows[start : start + 5], padding=True, return_tensors="pt")
        from bilevel_rlhf import rl_utils

        comp, mask = rl_utils.sample_completions(policy, enc.input_ids, enc.attention_mask, 4, tok.pad_token_id,
                                                 tok.eos_token_id, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        kls.append(sequence_kl(policy, ref, torch.cat([enc.input_ids, comp], 1),
                               torch.cat([enc.attention_mask, mask], 1), enc.input_ids.shape[1], mask))
    assert rec.kl == pytest.approx(float(torch.cat(kls).mean()), rel=1e-5) and rec.kl > 1e-3

    # the same evaluator again: the same noise, the opponents reused (not scored again)
    again = ev.evaluate(policy, ref, step=4)
    assert (again.score, again.kl, again.win_rate) == (rec.score, rec.kl, rec.win_rate)
    assert len(oracle.scored) == 3 and again.eval_queries == 36
    # the policy against itself: KL exactly 0
    assert PolicyEvaluator(PROMPTS, tok, oracle, num_samples=2).evaluate(ref, ref).kl == 0.0


def test_a_pairwise_oracle_judges_through_a_copy():
    from bilevel_rlhf.preference import PreferenceOracle

    class Pairwise(PreferenceOracle):  # no `score`: the evaluator asks for pairs
        def __init__(self):
            self.inner, self.calls = testing_utils.happy_oracle("bradley_terry"), []

        def __call__(self, prompts, a, b):
            self.calls.append(len(a))
            return self.inner(prompts, a, b)

    tok = make_tokenizer()
    policy, ref = make_policy(tok, seed=0), make_policy(tok, seed=1)
    oracle = Pairwise()
    state = oracle.inner.state_dict()
    ev = PolicyEvaluator(PROMPTS, tok, oracle, num_samples=2)
    rec = ev.evaluate(policy, ref)
    # a deep copy judged: the trainer's oracle was not called and its random state did not move
    assert oracle.calls == [] and oracle.inner.state_dict() == state and ev._judge.calls == [8]
    assert math.isnan(rec.score) and 0.0 <= rec.win_rate <= 1.0 and rec.eval_queries == 8
    assert "eval_protocol/score" not in rec.metrics() and "eval_protocol/win_rate" in rec.metrics()


def test_evaluator_rejects_bad_input():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        PolicyEvaluator([], tok, testing_utils.happy_oracle())
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        PolicyEvaluator(PROMPTS, tok, testing_utils.happy_oracle(), num_samples=0)
    with pytest.raises(TypeError, match="must be callable or have `score`"):
        PolicyEvaluator(PROMPTS, tok, object())


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def train_with_and_without_the_callback(tmp_path, **kw):
    """Two identical trainers (under tmp_path/plain and tmp_path/watched; `kw` may hold a factory `oracle_fn`), the
    second with the callback every 2 steps, both trained; asserts bit-identical parameters; returns both."""
    oracle_fn = kw.pop("oracle_fn", None)
    trainers = []
    for name, watched in (("plain", False), ("watched", True)):
        extra = {"oracle": oracle_fn()} if oracle_fn else {}
        trainer = testing_utils.make_trainer(tmp_path / name, PROMPTS * 4, **kw, **extra)
        if watched:
            trainer.add_callback(OracleEvalCallback(trainer, PROMPTS, eval_steps=2, num_samples=2))
        trainer.train()
        trainers.append(trainer)
    a, b = (_params(t) for t in trainers)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)
    return trainers


def test_callback_never_changes_training_and_resumes(tmp_path):
    """Training with the callback equals training without it (parameters, oracle state, queries); records at steps
    0, 2, ..., 8 reach the file and the log; a run resumed from step 4 drops and re-measures the later records."""
    kw = dict(save_strategy="steps", save_steps=4, **CONFIG)
    plain, watched = train_with_and_without_the_callback(
        tmp_path, oracle_fn=lambda: testing_utils.happy_oracle("bradley_terry"), **kw)
    assert plain.preference_oracle.state_dict() == watched.preference_oracle.state_dict()
    assert plain.oracle_queries == watched.oracle_queries == 32

    path = tmp_path / "watched" / "out" / "eval_protocol.json"
    records = read_eval_records(path)
    assert [r.step for r in records] == [0, 2, 4, 6, 8]
    # an iteration is 2 steps here (2 passes over one micro-batch) and labels 8 pairs (16 completions per actor)
    assert [r.train_queries for r in records] == [0, 8, 16, 24, 32]
    assert records[0].kl == 0.0 and records[-1].kl > 0.0 and records[-1].eval_queries == 5 * 8 + 8
    logged = [h for h in watched.state.log_history if "eval_protocol/kl" in h]
    assert [h["step"] for h in logged] == [0, 2, 4, 6, 8]
    assert [h["eval_protocol/win_rate"] for h in logged] == [r.win_rate for r in records]

    # resume from step 4 with a file that holds the records up to 8: 6 and 8 are measured again, equal
    resumed = testing_utils.make_trainer(tmp_path / "watched", PROMPTS * 4, oracle=testing_utils.happy_oracle("bradley_terry"),
                                         **kw)
    cb = OracleEvalCallback(resumed, PROMPTS, eval_steps=2, num_samples=2)
    resumed.add_callback(cb)
    original = path.read_text()
    resumed.train(resume_from_checkpoint=str(tmp_path / "watched" / "out" / "checkpoint-4"))
    again = read_eval_records(path)
    assert [r.step for r in again] == [0, 2, 4, 6, 8]
    for r, s in zip(records, again):
        measured = {k: v for k, v in r.to_dict().items() if k != "eval_queries"}
        assert measured == pytest.approx({k: v for k, v in s.to_dict().items() if k != "eval_queries"},
                                         rel=1e-5, abs=1e-6), r.step
    # the new process scores the initial policy's completions again: 8 more evaluation queries, counted
    assert [s.eval_queries - r.eval_queries for r, s in zip(records, again)] == [0, 0, 0, 8, 8]
    assert json.loads(original)["num_samples"] == 2 and not path.with_name(path.name + ".tmp").exists()


def test_callback_errors_name_what_is_missing(tmp_path):
    trainer = testing_utils.make_trainer(tmp_path, PROMPTS * 2, **CONFIG)
    with pytest.raises(ValueError, match="eval_steps must be an integer >= 1"):
        OracleEvalCallback(trainer, PROMPTS, eval_steps=0)
    entropy = testing_utils.make_trainer(tmp_path, PROMPTS * 2, regularization="entropy", **CONFIG)
    with pytest.raises(ValueError, match="keeps no reference policy .* pass ref_model="):
        OracleEvalCallback(entropy, PROMPTS, eval_steps=1)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="corrupt evaluation records .*bad.json"):
        read_eval_records(tmp_path / "bad.json")


def test_log_completions_writes_what_was_sampled_labelled_and_scored(tmp_path):
    """log_completions: each logging step's first rows of theta's rollout, with the oracle's score of the text, r_x's
    score and the pair's label, in completions.jsonl and TensorBoard's text tab."""
    trainer = testing_utils.make_trainer(tmp_path, PROMPTS * 4, log_completions=True, num_completions_to_print=3,
                                         report_to="tensorboard", **{**CONFIG, "max_steps": 4, "logging_steps": 2})
    rollouts = testing_utils.record_rollouts(trainer)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 and [r["step"] for r in rows] == [0] * 3 + [2] * 3  # an iteration = 2 steps here
    oracle = testing_utils.happy_oracle()
    for k, rollout in enumerate(rollouts):
        for i, row in enumerate(rows[3 * k : 3 * k + 3]):
            assert row["prompt"] == rollout.stats.prompts[i] and row["completion"] == rollout.stats.texts["theta"][i]
            assert row["oracle_score"] == oracle.score([row["prompt"]], [row["completion"]])[0]
            assert row["reward"] == pytest.approx(float(rollout.theta.score[i]))
            assert row["label"] == float(rollout.labels[i // 2])  # preference_nll: theta's pairs (2i, 2i + 1)
    (logdir,) = (tmp_path / "out" / "runs").iterdir()
    events = b"".join(f.read_bytes() for f in logdir.iterdir())
    assert b"completions" in events and rows[0]["completion"].encode() in events


def test_callback_with_lora_actors_measures_against_the_bare_base(tmp_path):
    """LoRA actors: the reference is the base with the adapters off (KL exactly 0 before training, > 0 after), and
    training with the callback equals training without it."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0)
    tok = make_tokenizer()
    train_with_and_without_the_callback(
        tmp_path, tok=tok, peft_config=lora, **{**CONFIG, "max_steps": 4, "actor_learning_rate": 3e-2})
    records = read_eval_records(tmp_path / "watched" / "out")
    assert [r.step for r in records] == [0, 2, 4] and records[0].kl == 0.0 and records[-1].kl > 1e-4


def test_a_judge_that_abstains_leaves_those_pairs_out_of_the_win_rate():
    """A TRL-style pairwise judge as the evaluator's oracle: wrapped (seeded order shuffling, verdicts mapped back),
    its -1s left out of the win rate, which is the mean over the answered pairs; a judge that always abstains gives
    NaN."""

    def key(text):
        return (len(text), text)

    class Judge:  # TRL's signature: 0 = the first completion preferred; abstains on every `every`-th pair
        def __init__(self, every: int):
            self.every, self.seen = every, []

        def judge(self, prompts, completions, shuffle_order=True):
            self.seen.append([list(pair) for pair in completions])
            return [-1 if i % self.every == 0 else (0 if key(a) >= key(b) else 1) for i, (a, b) in enumerate(completions)]

    tok = make_tokenizer()
    policy, ref = make_policy(tok, seed=0), make_policy(tok, seed=1)
    ev = PolicyEvaluator(PROMPTS, tok, Judge(every=2), num_samples=2)
    rec = ev.evaluate(policy, ref)
    (pairs,) = ev._judge.judge.seen  # the copy the evaluator asked: one call, 8 pairs
    ref_texts = ev._reference[0]
    wins = []
    for i, (a, b) in enumerate(pairs):
        mine = b if a == ref_texts[i] else a  # the policy's completion, whichever side it was shown on
        if i % 2 and mine != ref_texts[i]:
            wins.append(float(key(mine) > key(ref_texts[i])))
    assert len(pairs) == 8 and rec.eval_queries == 8 and len(wins) == 4  # no policy text equals its opponent here
    assert rec.win_rate == pytest.approx(np.mean(wins))
    assert math.isnan(PolicyEvaluator(PROMPTS, tok, Judge(every=1), num_samples=2).evaluate(policy, ref).win_rate)
