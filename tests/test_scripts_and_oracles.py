"""Value-level tests of paths that had none: the evaluation statistics, the recipe's Bradley-Terry VADER oracle
(`--oracle vader_bt`, `oracle_temperature`, `oracle_seed`), SIGINT / second-signal abort, the comparison script,
`prepare_tweets.py --check`, and a reward tokenizer different from the policy's (`reward_processing_class`)."""

from __future__ import annotations

import html
import io
import json
import math
import os
import signal
import statistics
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from testing_utils import WORDS, happy_oracle, make_policy, make_reward_model, make_tokenizer
from script_loader import load_script

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "recipes" / "happy_tweet" / "config.yaml")
# 2 micro-batches of 2 completions (4 prompts x 1) per iteration; 2 passes = 4 optimizer steps per iteration
TINY = ["--per_device_train_batch_size", "2", "--max_completion_length", "6", "--num_eval_prompts", "0",
        "--save_steps", "4", "--logging_steps", "4", "--max_steps", "8", "--disable_tqdm", "true", "--report_to", "none"]




# ---------------------------------------------------------------------------------------------------- evaluation
# 3 prompts x 2 samples = 6 rows (sample j of prompt i at row 2i + j); everything the statistics read is fixed here
EVAL_PROMPTS = ["shit happens", "the day", "we"]
EVAL_TEXTS = [" great day", " bad", " ok ok", " fine", " yes yes yes no", " "]
EVAL_SCORES = [0.9, -0.7, 0.5, 0.2, 0.6, -0.4]  # VADER compound of each text: 0.5 itself is not "> 0.5"
EVAL_LENGTHS = [3, 1, 2, 1, 5, 1]  # completion tokens (eos included)
EVAL_KL = [0.1, 0.0, 0.3, 0.2, 0.5, 0.1]  # sum over positions of the next-token KL, per row


def test_evaluate_policy_statistics_by_hand(monkeypatch):
    """Generation, VADER and the KL estimator replaced by known numbers: every reported statistic recomputed."""
    import vaderSentiment.vaderSentiment as vader_module

    from bilevel_rlhf.happy_tweet import evaluate

    rows = [p for p in EVAL_PROMPTS for _ in range(2)]
    seen_batches = []

    def fake_sample(model, tokenizer, prompts, max_new_tokens, temperature=1.0):
        start = sum(len(b) for b in seen_batches)
        seen_batches.append(list(prompts))
        assert list(prompts) == rows[start : start + len(prompts)]  # prompt i repeated num_samples times, in order
        idx = list(range(start, start + len(prompts)))
        T = max(EVAL_LENGTHS)
        mask = torch.tensor([[1] * EVAL_LENGTHS[i] + [0] * (T - EVAL_LENGTHS[i]) for i in idx])
        ids = torch.tensor(idx)[:, None].repeat(1, 1 + T)  # the row number, for fake_kl
        return {"input_ids": ids, "attention_mask": torch.cat([torch.ones(len(idx), 1, dtype=torch.long), mask], 1),
                "prompt_length": 1, "completion_mask": mask, "texts": [EVAL_TEXTS[i] for i in idx]}

    def fake_kl(policy, ref, input_ids, attention_mask, prompt_length, completion_mask):
        return torch.tensor([EVAL_KL[i] for i in input_ids[:, 0].tolist()])

    class FakeAnalyzer:
        def polarity_scores(self, text):
            return {"compound": EVAL_SCORES[EVAL_TEXTS.index(text)]}

    monkeypatch.setattr(evaluate, "sample_completions", fake_sample)
    monkeypatch.setattr(evaluate, "sequence_kl", fake_kl)
    monkeypatch.setattr(vader_module, "SentimentIntensityAnalyzer", FakeAnalyzer)
    tok = make_tokenizer()
    policy = make_policy(tok)
    out = evaluate.evaluate_policy(policy, tok, policy, EVAL_PROMPTS, num_samples=2, max_new_tokens=5, batch_size=4,
                                   num_shown=2)
    assert [len(b) for b in seen_batches] == [4, 2]  # batches of batch_size rows
    n = 6
    assert out["num_generations"] == n
    assert out["vader_mean"] == pytest.approx(1.1 / 6, abs=1e-12)  # (0.9 - 0.7 + 0.5 + 0.2 + 0.6 - 0.4) / 6
    assert out["vader_se"] == pytest.approx(statistics.stdev(EVAL_SCORES) / math.sqrt(n), abs=1e-12)
    # > 0.5 strictly: 0.9 and 0.6 (not 0.5; -0.5 would also count 0.5, 0.2, -0.4; >= would count 0.5)
    assert out["vader_frac_gt_0.5"] == pytest.approx(2 / 6, abs=1e-12)
    assert out["kl_to_initial"] == pytest.approx(1.2 / 6, abs=1e-7)
    assert out["kl_to_initial_se"] == pytest.approx(statistics.stdev(EVAL_KL) / math.sqrt(n), rel=1e-5)
    # words: great day bad ok ok fine yes yes yes no -> 7 distinct of 10; bigrams: (great day) (ok ok) (yes yes) x2
    # (yes no) -> 4 distinct of 5
    assert out["distinct_1"] == pytest.approx(7 / 10) and out["distinct_2"] == pytest.approx(4 / 5)
    assert out["mean_length"] == pytest.approx(13 / 6, abs=1e-6)
    assert out["samples"] == ["s*** happens great day", "the day ok ok"]  # first sample of each shown prompt, filtered


def test_markdown_table_aggregates_runs_by_hand():
    """One row per group: mean +- sample std over its runs, the mean of its oracle queries, one value per single run."""
    from bilevel_rlhf.happy_tweet.evaluate import METRICS, markdown_table

    def row(name, group, queries, values):
        return {"name": name, "group": group, "oracle_queries": queries, **dict(zip(METRICS, values))}

    report = {"num_prompts": 3, "num_samples": 2, "max_new_tokens": 5, "base_model": "m", "results": [
        row("initial", "initial", None, [0.1, 0.0, 0.0, 0.9, 0.95, 4.0]),
        row("a", "single_loop", 8, [0.2, 0.25, 0.01, 0.8, 0.9, 3.0]),
        row("b", "single_loop", 12, [0.4, 0.5, 0.03, 0.6, 0.7, 6.0]),
    ]}
    lines = [line for line in markdown_table(report).splitlines() if line.startswith("| ")]
    assert lines[0].split(" | ")[3:5] == ["VADER mean", "frac > 0.5"]
    # the upper objectives: shown where every run of the group has them
    report["results"][0]["win_rate_vs_initial"] = 0.5
    report["results"][1] |= {"win_rate_vs_initial": 0.6, "reward_pair_nll": 0.5, "reward_pair_accuracy": 0.7}
    report["results"][2] |= {"win_rate_vs_initial": 0.8, "reward_pair_nll": 0.7, "reward_pair_accuracy": 0.9}
    lines = [line for line in markdown_table(report).splitlines() if line.startswith("| ")]
    assert lines[1] == "| initial | 1 | 0 | 0.100 | 0.000 | 0.000 | 0.900 | 0.950 | 4.00 | 0.500 | - | - |"
    # means 0.3, 0.375, 0.02, 0.7, 0.8, 4.5; sample std (n-1) 0.1414, 0.1768, 0.01414, 0.1414, 0.1414, 2.121
    assert lines[2] == ("| single_loop | 2 | 10 | 0.300 ± 0.141 | 0.375 ± 0.177 | 0.020 ± 0.014 | 0.700 ± 0.141 | "
                        "0.800 ± 0.141 | 4.50 ± 2.12 | 0.700 ± 0.141 | 0.600 ± 0.141 | 0.800 ± 0.141 |")


def test_evaluation_script_run_names():
    evaluate = load_script("evaluate_happy_tweet")
    assert evaluate.parse_runs(["sl=/x/run", "/y/psgd"]) == {"sl": "/x/run", "psgd": "/y/psgd"}
    with pytest.raises(SystemExit, match="given twice"):
        evaluate.parse_runs(["/a/run", "/b/run"])
    with pytest.raises(SystemExit, match="NAME=FOLDER"):
        evaluate.parse_runs(["=/a"])


# ---------------------------------------------------------------------------------------------------- vader_bt
BT_A = ["I love this, what a wonderful happy day!", "I love this, what a wonderful happy day!", "It is a day."]
BT_B = ["This is terrible, I hate it.", "It is a day.", "This is terrible, I hate it."]


def _recipe_oracle(tmp_path, *extra):
    from bilevel_rlhf.happy_tweet.recipe import make_oracle, make_parser

    script_args, training_args, _ = make_parser().parse_args_and_config(
        ["--config", CONFIG, "--output_dir", str(tmp_path), *extra])
    return make_oracle(script_args, training_args.seed)


def test_vader_bt_oracle_probabilities_seed_and_frequencies(tmp_path):
    """labels ~ Bernoulli(sigmoid((s_a - s_b) / oracle_temperature)) drawn from default_rng(oracle_seed)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    s_a = np.array([analyzer.polarity_scores(t)["compound"] for t in BT_A])
    s_b = np.array([analyzer.polarity_scores(t)["compound"] for t in BT_B])
    assert s_a[0] > 0.5 and s_b[0] < -0.3 and s_a[2] == 0.0  # distinct gaps: probabilities near 1, and in between
    T = 0.25
    p = 1 / (1 + np.exp(-(s_a - s_b) / T))
    assert 0.9 < p[0] < 1 and 0.5 < p[1] < p[0] and 0.5 < p[2] < 1

    oracle = _recipe_oracle(tmp_path, "--oracle", "vader_bt", "--oracle_temperature", str(T), "--oracle_seed", "7")
    assert (oracle.name, oracle.mode, oracle.temperature) == ("vader_bt", "bradley_terry", T)
    assert oracle.score(["", "", ""], BT_A) == pytest.approx(s_a.tolist(), abs=0)
    reps = 1500
    n = 3 * reps
    labels = np.array(oracle([""] * n, BT_A * reps, BT_B * reps))
    expected = (np.random.default_rng(7).random(n) < np.tile(p, reps)).astype(float)
    np.testing.assert_array_equal(labels, expected)  # the documented formula and RNG, draw for draw
    freq = labels.reshape(reps, 3).mean(0)
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / reps) + 1e-3), (freq, p)

    again = _recipe_oracle(tmp_path, "--oracle", "vader_bt", "--oracle_temperature", str(T), "--oracle_seed", "7")
    assert again([""] * n, BT_A * reps, BT_B * reps) == labels.tolist()
    other = _recipe_oracle(tmp_path, "--oracle", "vader_bt", "--oracle_temperature", str(T), "--oracle_seed", "8")
    assert other([""] * n, BT_A * reps, BT_B * reps) != labels.tolist()
    # the default temperature (0.1) gives other probabilities: the same seed draws other labels
    cold = _recipe_oracle(tmp_path, "--oracle", "vader_bt", "--oracle_seed", "7")
    assert cold.temperature == 0.1 and cold([""] * n, BT_A * reps, BT_B * reps) != labels.tolist()
    # no oracle_seed: the training seed
    by_seed = _recipe_oracle(tmp_path, "--oracle", "vader_bt", "--oracle_temperature", str(T), "--seed", "3")
    expected3 = (np.random.default_rng(3).random(n) < np.tile(p, reps)).astype(float)
    np.testing.assert_array_equal(by_seed([""] * n, BT_A * reps, BT_B * reps), expected3)
    # the deterministic VADER oracle: happier wins
    deterministic = _recipe_oracle(tmp_path)
    assert deterministic.mode == "deterministic"
    assert deterministic([""] * 3, [BT_A[0], BT_B[0], BT_A[2]], [BT_B[0], BT_A[0], BT_B[2]]) == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------------- signals
class _FakeAccelerator:
    """`reduce(sum)` adds the flags of `others` further processes."""

    device = torch.device("cpu")

    def __init__(self, others: float = 0.0):
        self.others = others

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + self.others


def _boundary(stopper, step):
    from transformers import TrainerControl, TrainerState

    state, control = TrainerState(), TrainerControl()
    state.global_step = step
    stopper.on_step_end(SimpleNamespace(steps_per_iteration=4), state, control)
    return control.should_save, control.should_training_stop


def _raise_if_reached(signum, frame):
    raise RuntimeError("the recipe's signal handler was not installed")


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_on_signal_handler(first):
    from bilevel_rlhf.happy_tweet.recipe import StopOnSignal

    sigs = (signal.SIGINT, signal.SIGTERM)
    original = {s: signal.signal(s, _raise_if_reached) for s in sigs}  # reached only if the recipe's is missing
    try:
        stopper = StopOnSignal(_FakeAccelerator())
        stopper.install()
        try:
            assert _boundary(stopper, 4) == (False, False)  # no signal: no stop
            os.kill(os.getpid(), first)  # first signal: no exception, a request
            assert stopper.requested and stopper.stopped_at is None
            assert _boundary(stopper, 5) == (False, False)  # inside an iteration: go on
            assert _boundary(stopper, 8) == (True, True) and stopper.stopped_at == 8  # boundary: save, then stop
            with pytest.raises(KeyboardInterrupt):  # second signal (either): abort at once
                os.kill(os.getpid(), signal.SIGINT if first == signal.SIGTERM else signal.SIGTERM)
        finally:
            stopper.uninstall()
        assert all(signal.getsignal(s) is _raise_if_reached for s in sigs)  # the handlers it replaced are back
    finally:
        for s, handler in original.items():
            signal.signal(s, handler)
    # another process got the signal: this one stops at the same boundary
    other = StopOnSignal(_FakeAccelerator(others=1.0))
    assert not other.requested and _boundary(other, 3) == (False, False) and _boundary(other, 4) == (True, True)


def _signal_during_first_step(monkeypatch, count):
    from bilevel_rlhf.trainer import BilevelTrainer

    original = BilevelTrainer.training_step
    calls = []

    def step(self, *a, **kw):
        loss = original(self, *a, **kw)
        calls.append(self.state.global_step)
        if len(calls) == 1:
            for _ in range(count):
                os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(BilevelTrainer, "training_step", step)
    return calls


def test_sigint_checkpoints_at_the_iteration_boundary_and_resumes(tiny_model, tmp_path, monkeypatch):
    """First SIGINT in the middle of iteration 0: the iteration ends (4 steps), checkpoint-4 is saved with the oracle's
    RNG, the run stops with status interrupted (no final model), and `--resume_from_checkpoint last` completes it."""
    from bilevel_rlhf.happy_tweet.recipe import run

    out = tmp_path / "run"
    args = ["--config", CONFIG, "--model_name_or_path", tiny_model, "--output_dir", str(out), *TINY,
            "--oracle", "vader_bt", "--oracle_temperature", "0.25", "--oracle_seed", "7"]
    calls = _signal_during_first_step(monkeypatch, 1)
    previous = signal.signal(signal.SIGINT, _raise_if_reached)
    try:
        first = run(args)
        assert signal.getsignal(signal.SIGINT) is _raise_if_reached  # the recipe restored the handler it replaced
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(calls) == 4  # the signal came in step 1; steps 2-4 of the iteration still ran
    assert first["status"] == "interrupted" and first["global_step"] == 4 and first["iterations"] == 1
    assert first["oracle"] == "vader_bt" and first["oracle_queries"] == 4
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
    assert not (out / "model.safetensors").exists()  # the final model is saved by completed runs only
    ckpt = out / "checkpoint-4"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 4
    state = json.loads((ckpt / "bilevel_state_rank0.json").read_text())
    rng = np.random.default_rng(7)  # oracle_seed; iteration 0 drew one number per pair (4 pairs)
    rng.random(4)
    assert state["oracle_state"]["rng"] == json.loads(json.dumps(rng.bit_generator.state))

    monkeypatch.undo()
    second = run(args + ["--resume_from_checkpoint", "last"])
    assert second["status"] == "completed" and second["global_step"] == 8 and second["oracle_queries"] == 8
    assert second["resumed_from"].endswith("checkpoint-4") and (out / "model.safetensors").is_file()


def test_second_sigint_aborts_at_once(tiny_model, tmp_path, monkeypatch):
    from bilevel_rlhf.happy_tweet.recipe import run

    out = tmp_path / "abort"
    calls = _signal_during_first_step(monkeypatch, 2)
    previous = signal.signal(signal.SIGINT, _raise_if_reached)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(["--config", CONFIG, "--model_name_or_path", tiny_model, "--output_dir", str(out), *TINY])
        assert signal.getsignal(signal.SIGINT) is _raise_if_reached
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls == [0]  # not one more optimizer step after the second signal
    assert not list(out.glob("checkpoint-*")) and not (out / "summary.json").exists()


# ---------------------------------------------------------------------------------------------------- evaluation protocol
def test_checkpoint_evaluation_equals_the_callbacks(tiny_model, tmp_path, monkeypatch):
    """The recipe with the protocol every 4 steps, then scripts/evaluate_checkpoints.py on its checkpoints: the same
    prompts, noise and models give the same records (steps 0, 4, 8; queries from the checkpoints' state)."""
    from bilevel_rlhf.eval_callback import read_eval_records
    from bilevel_rlhf.happy_tweet.recipe import run

    out = tmp_path / "run"
    run(["--config", CONFIG, "--model_name_or_path", tiny_model, "--output_dir", str(out), *TINY,
         "--eval_protocol_steps", "4", "--eval_protocol_prompts", "2", "--eval_protocol_samples", "2"])
    during = read_eval_records(out)
    assert [r.step for r in during] == [0, 4, 8] and during[0].kl == 0.0 and during[-1].kl > 0.0
    script = load_script("evaluate_checkpoints")
    argv = [str(out), "--num_prompts", "2", "--num_samples", "2", "--max_completion_length", "6"]
    with pytest.raises(SystemExit, match="exists .*--overwrite"):
        script.main(argv)
    script.main(argv + ["--overwrite"])
    after = read_eval_records(out)
    assert [r.step for r in after] == [0, 4, 8]  # the initial policy, checkpoint-4, checkpoint-8 (= the final model)
    for a, b in zip(during, after):
        got = {k: v for k, v in b.to_dict().items() if k != "eval_queries"}
        assert got == pytest.approx({k: v for k, v in a.to_dict().items() if k != "eval_queries"}, rel=1e-5, abs=1e-6)

    # a human given as module:callable (a score function), prompts from a JSONL file
    (tmp_path / "my_judge.py").write_text("def length(texts):\n    return [float(len(t)) for t in texts]\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "good morning"}\n{"prompt": "i love"}\n')
    monkeypatch.chdir(tmp_path)
    script.main(argv[:1] + ["--overwrite", "--human", "my_judge:length", "--prompts", str(tmp_path / "p.jsonl"),
                            "--num_samples", "2", "--max_completion_length", "6"])
    assert all(r.score >= 0 and r.num_completions == 4 for r in read_eval_records(out))
    with pytest.raises(ValueError, match="human 'my_judge:nope': cannot import 'nope'"):
        script.main(argv[:1] + ["--overwrite", "--human", "my_judge:nope"])


# ---------------------------------------------------------------------------------------------------- compare script
def _table(path: Path) -> dict[str, list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")][1:]  # skip the header
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def _cell(values, digits):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def test_compare_script_end_to_end(tiny_model, tmp_path, monkeypatch):
    """2 seeds x (single_loop with each objective, rloo, online_dpo) on an 8-query budget: each run uses exactly the
    budget, the table is the aggregate of the per-run results, and completed runs are skipped on a second call."""
    from bilevel_rlhf.happy_tweet import evaluate

    compare = load_script("compare")
    out = tmp_path / "cmp"
    # the recipe's YAML with 4 prompts per iteration: the script scales the micro-batch (completions) per objective
    config = tmp_path / "config.yaml"
    config.write_text(Path(CONFIG).read_text().replace("per_device_train_batch_size: 8 ", "per_device_train_batch_size: 2 "))
    argv = ["--seeds", "0", "1", "--methods", "single_loop", "rloo", "online_dpo", "--objectives", "preference_nll",
            "win_rate", "--queries", "8", "--output_dir", str(out), "--config", str(config),
            "--eval_prompts", "2", "--eval_samples", "2", "--eval_every_queries", "4", "--",
            "--model_name_or_path", tiny_model, "--max_completion_length", "6", "--num_eval_prompts", "0",
            "--eval_protocol_prompts", "2", "--eval_protocol_samples", "1"]
    compare.main(argv)

    kinds = ("single_loop", "single_loop_win_rate", "rloo", "online_dpo")
    groups = {"single_loop": "single_loop", "single_loop_win_rate": "single_loop (win_rate)", "rloo": "rloo",
              "online_dpo": "online_dpo"}
    names = [f"{m}-seed{s}" for s in (0, 1) for m in kinds]
    summaries = {name: json.loads((out / name / "summary.json").read_text()) for name in names}
    for name, s in summaries.items():
        kind, seed = name.split("-seed")
        assert s["status"] == "completed" and s["method"] == kind.replace("_win_rate", "") and s["seed"] == int(seed)
        # 2 iterations x 4 pairs, one per prompt (preference_nll: 2 completions per prompt; win_rate: 1, against the
        # reference's); RLOO: 8 scored completions; OnlineDPO: 2 steps x 4 pairs
        assert s["oracle_queries"] == 8
        assert s["model_name_or_path"] == tiny_model
    for seed in (0, 1):
        assert summaries[f"single_loop-seed{seed}"]["global_step"] == 8  # 2 iterations x 4 steps
        assert summaries[f"single_loop_win_rate-seed{seed}"]["global_step"] == 8
        assert summaries[f"single_loop_win_rate-seed{seed}"]["objective"] == "win_rate"
        assert summaries[f"rloo-seed{seed}"]["oracle_curve"][-1]["oracle/queries"] == 8.0
        assert summaries[f"online_dpo-seed{seed}"]["global_step"] == 2
    assert (out / "single_loop-seed0" / "model.safetensors").is_file() and (out / "rloo-seed1" / "model.safetensors").is_file()
    # the evaluation protocol ran in every run, bilevel and TRL alike, every 4 training queries: at 0, 4 and 8 (RLOO
    # samples its one generation of 8 completions at the first step, so its queries read 8 already at step 4)
    from bilevel_rlhf.eval_callback import read_eval_records

    for name in names:
        records = read_eval_records(out / name)
        assert [r.train_queries for r in records] == ([0, 8, 8] if name.startswith("rloo") else [0, 4, 8]), name
        assert records[0].kl == 0.0 and all(r.num_completions == 2 for r in records), name

    report = json.loads((out / "eval" / "results.json").read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ["initial", *names] and report["queries"] == 8 and report["seeds"] == [0, 1]
    # pi_0 against itself: exactly 0; the bilevel runs moved theta (RLOO's advantages are 0 when every VADER score
    # of a group is equal, as with this model, so it may not move)
    assert rows["initial"]["kl_to_initial"] == 0.0 and all(rows[n]["kl_to_initial"] > 0 for n in names[0::4])
    for name in names:
        assert rows[name]["oracle_queries"] == summaries[name]["oracle_queries"]
        assert rows[name]["group"] == groups[name.split("-seed")[0]] and rows[name]["num_generations"] == 2 * 2
        assert 0.0 <= rows[name]["win_rate_vs_initial"] <= 1.0
    assert all("reward_pair_nll" in rows[n] for n in names if n.startswith("single_loop"))
    assert not any("reward_pair_nll" in rows[n] for n in names if n.startswith(("rloo", "online_dpo")))
    table = _table(out / "eval" / "results.md")
    assert set(table) == {"initial", *groups.values()}
    members_of = {"initial": ["initial"]} | {g: [n for n in names if groups[n.split("-seed")[0]] == g]
                                             for g in groups.values()}
    for group, members in members_of.items():
        cells = table[group]
        assert cells[0] == str(len(members)) and cells[1] == ("0" if group == "initial" else "8")
        for metric, cell in zip(evaluate.METRICS, cells[2:]):
            assert cell == _cell([rows[m][metric] for m in members], 2 if metric == "mean_length" else 3), (group, metric)
    assert (out / "eval" / "oracle_curve.png").stat().st_size > 1000

    # a second call finds every run completed with the same budget: nothing is trained again
    class Done(Exception):
        pass

    def refuse(*a, **kw):
        raise AssertionError("a completed run was trained again")

    def stop(*a, **kw):
        raise Done

    monkeypatch.setattr(compare.subprocess, "run", refuse)
    monkeypatch.setattr(compare, "run_rloo", refuse)
    monkeypatch.setattr(compare, "run_online_dpo", refuse)
    monkeypatch.setattr(evaluate, "evaluate_runs", stop)
    with pytest.raises(Done):
        compare.main(argv)


# ---------------------------------------------------------------------------------------------------- prepare --check
def _source_from_shipped(tmp_path: Path, prepare) -> tuple[Path, str]:
    """The sdist is not available offline: rebuild tweets_GroundTruth.txt from the shipped JSONL (HTML-escape the text,
    repr the rating, CRLF lines) into hutto_ICWSM_2014.tar.gz; returns it and its sha256."""
    import hashlib

    records = [json.loads(line) for line in prepare.DEFAULT_OUTPUT.read_text(encoding="utf-8").splitlines()]
    raw = "\r\n".join(f"{r['id']}\t{r['human_rating']!r}\t{html.escape(r['text'], quote=False)}"
                      for r in records).encode("utf-8")
    path = tmp_path / "hutto_ICWSM_2014.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(prepare.TWEETS_MEMBER)
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    return path, hashlib.sha256(raw).hexdigest()


def test_prepare_tweets_check_passes_on_the_shipped_file_and_fails_on_a_corrupted_copy(tmp_path, capsys):
    prepare = load_script("prepare_tweets")
    source, digest = _source_from_shipped(tmp_path, prepare)
    prepare.TWEETS_SHA256 = digest  # the published file's checksum is checked in test_happy_tweet_data.py
    shipped = prepare.DEFAULT_OUTPUT
    before = shipped.read_bytes()
    assert prepare.main(["--source", str(source), "--check"]) == 0  # --output defaults to the shipped file
    assert capsys.readouterr().out.strip() == f"{shipped}: up to date"
    assert shipped.read_bytes() == before  # --check writes nothing

    corrupt = tmp_path / "tweets.jsonl"
    lines = before.decode("utf-8").splitlines(keepends=True)
    first = json.loads(lines[0])
    lines[0] = lines[0].replace(repr(first["human_rating"]), repr(round(first["human_rating"] + 0.001, 9)))
    corrupt.write_text("".join(lines), encoding="utf-8")
    assert corrupt.read_bytes() != before and len(corrupt.read_bytes()) == len(before)
    assert prepare.main(["--source", str(source), "--output", str(corrupt), "--check"]) == 1
    assert capsys.readouterr().out.strip() == f"{corrupt}: DIFFERS from the regenerated file"
    assert corrupt.read_bytes() != before  # not repaired by --check
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_bytes(before[: before.rindex(b"\n", 0, len(before) - 1) + 1])  # last tweet dropped
    assert prepare.main(["--source", str(source), "--output", str(truncated), "--check"]) == 1
    missing = tmp_path / "missing.jsonl"
    assert prepare.main(["--source", str(source), "--output", str(missing), "--check"]) == 1
    assert "DIFFERS" in capsys.readouterr().out and not missing.exists()


# ---------------------------------------------------------------------------------------------------- reward tokenizer
def _reversed_tokenizer():
    """A word-level tokenizer over the same words in another order, with other special-token ids (<pad>=0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS[::-1])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tok.pad_token = "<pad>"
    return tok, vocab


def test_reward_processing_class_retokenizes_prompt_plus_completion(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from bilevel_rlhf.modeling import BilevelModel
    from bilevel_rlhf.trainer import BilevelTrainer
    from test_trainer_lm import config

    tok = make_tokenizer()
    rtok, rvocab = _reversed_tokenizer()
    assert rtok.pad_token_id == 0 != tok.pad_token_id
    # no trailing space: the prompt's last word and the completion's first must still stay two words
    prompts = ["the cat is", "a dog was", "we love the", "it is very"]
    trainer = BilevelTrainer(
        make_policy(tok), make_reward_model(rtok), happy_oracle(),
        config(tmp_path, per_device_train_batch_size=4, max_steps=4, num_iterations=2, logging_steps=2),
        Dataset.from_dict({"prompt": prompts * 4}), processing_class=tok, reward_processing_class=rtok,
    )
    assert trainer.model.reward_model.config.pad_token_id == 0  # r_x finds the last token with the reward pad id
    made, scored = [], []
    original_inputs = trainer._reward_inputs

    def spy_inputs(policy_ids, policy_mask):
        ids, mask = original_inputs(policy_ids, policy_mask)
        made.append((policy_ids, policy_mask, ids, mask))
        return ids, mask

    original_forward = BilevelModel.reward_forward

    def spy_forward(self, input_ids, attention_mask):
        scored.append((input_ids.clone(), attention_mask.clone()))
        return original_forward(self, input_ids, attention_mask)

    monkeypatch.setattr(trainer, "_reward_inputs", spy_inputs)
    monkeypatch.setattr(BilevelModel, "reward_forward", spy_forward)
    trainer.train()
    assert made and scored and trainer.state.global_step == 4

    expected_rows = set()
    specials = set(tok.all_special_ids)
    for policy_ids, policy_mask, ids, mask in made:
        assert len(policy_ids) == ids.shape[0]
        # the words of each row's real tokens (prompt and completion), special tokens dropped
        words = [[tok.convert_ids_to_tokens(t) for t in row[m.bool()].tolist() if t not in specials]
                 for row, m in zip(policy_ids, policy_mask)]
        width = max(len(w) for w in words)
        # by hand: the reward vocabulary's ids of prompt + completion, right-padded with the reward pad id
        want = [[rvocab.get(w, rvocab["<unk>"]) for w in ws] + [0] * (width - len(ws)) for ws in words]
        assert ids.tolist() == want
        assert mask.tolist() == [[1] * len(ws) + [0] * (width - len(ws)) for ws in words]
        policy_ids = [[tok.convert_tokens_to_ids(w) for w in ws] for ws in words]
        assert [row[: len(p)] for row, p in zip(want, policy_ids)] != policy_ids  # not the policy's own ids
        expected_rows |= {tuple(r[: len(ws)]) for r, ws in zip(want, words)}
    for ids, mask in scored:  # every r_x forward pass reads such rows (whole or as a slice of the batch)
        for row, m in zip(ids.tolist(), mask.tolist()):
            length = sum(m)
            assert m == [1] * length + [0] * (len(m) - length)  # right padding
            assert tuple(row[:length]) in expected_rows

    saved = tmp_path / "saved"
    trainer.save_model(str(saved))
    assert (saved / "reward_model" / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(saved / "reward_model").get_vocab() == rvocab
    assert AutoTokenizer.from_pretrained(saved).get_vocab() == tok.get_vocab() != rvocab


def test_upper_objective_metrics_by_hand(monkeypatch):
    """Win rate against the initial policy and the final r_x's pair NLL / accuracy, with known samples and scores."""
    import vaderSentiment.vaderSentiment as vader_module

    from bilevel_rlhf.happy_tweet import evaluate

    mine = ["a", "b", "c", "d"]  # prompt 0: samples a, b; prompt 1: c, d
    theirs = ["w", "x", "y", "z"]
    vader = {"a": 0.5, "b": 0.1, "c": -0.2, "d": -0.2, "w": 0.1, "x": 0.1, "y": 0.3, "z": -0.5}
    calls = []

    def fake_sample(model, tokenizer, prompts, max_new_tokens, temperature=1.0):
        texts = mine if not calls else theirs
        calls.append(model)
        ids = torch.arange(4)[:, None].repeat(1, 3)  # row number in every position, read by the fake r_x
        return {"input_ids": ids, "attention_mask": torch.ones(4, 3, dtype=torch.long), "prompt_length": 1,
                "completion_mask": torch.ones(4, 2, dtype=torch.long), "texts": texts}

    class FakeAnalyzer:
        def polarity_scores(self, text):
            return {"compound": vader[text]}

    class FakeReward(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None):
            r = torch.tensor([1.0, 0.0, 0.0, 2.0])[input_ids[:, 0]]  # pair 0: r_a > r_b; pair 1: r_a < r_b
            return SimpleNamespace(logits=r[:, None])

    monkeypatch.setattr(evaluate, "sample_completions", fake_sample)
    monkeypatch.setattr(vader_module, "SentimentIntensityAnalyzer", FakeAnalyzer)
    policy, ref = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    out = evaluate.upper_objective_metrics(policy, None, ref, ["p0", "p1"], FakeReward(), num_samples=2, batch_size=4)
    assert calls == [policy, ref]
    # wins: a > w (1), b = x (1/2), c < y (0), d > z (1)
    assert out["win_rate_vs_initial"] == pytest.approx(2.5 / 4)
    # pair 0: a beats b (label 1), r_x difference +1; pair 1: c ties d (label 1/2), difference -2
    nll0 = math.log(1 + math.exp(-1.0))
    nll1 = 0.5 * math.log(1 + math.exp(2.0)) + 0.5 * math.log(1 + math.exp(-2.0))
    assert out["reward_pair_nll"] == pytest.approx((nll0 + nll1) / 2)
    assert out["reward_pair_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError, match="even"):
        evaluate.upper_objective_metrics(policy, None, ref, ["p0"], num_samples=3)


def test_length_bias_reads_the_completion_log(tmp_path, capsys):
    """scripts/length_bias.py: per quarter of the logged steps, the mean length and the correlations of r_x and of
    the oracle's score with it (here r_x grows with length, the oracle's score does not)."""
    run = tmp_path / "runs" / "a-seed0"
    run.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for step in range(0, 400, 4):
        for _ in range(8):
            n = int(rng.integers(1, 60))
            lines.append(json.dumps({"step": step, "prompt": "p", "completion": "x" * n, "label": 1.0,
                                     "reward": n / 60 + 0.01 * rng.normal(), "oracle_score": float(rng.normal())}))
    (run / "completions.jsonl").write_text("\n".join(lines) + "\n")
    import sys

    argv, sys.argv = sys.argv, ["length_bias.py", str(tmp_path / "runs")]
    try:
        load_script("length_bias").main()
    finally:
        sys.argv = argv
    row = [line for line in capsys.readouterr().out.splitlines() if "a-seed0" in line][0]
    cells = [c.split() for c in row.strip("| ").split(" | ")[1:]]
    assert len(cells) == 4
    for length, corr_rx, corr_oracle in cells:
        assert 20 < float(length) < 40 and float(corr_rx) > 0.99 and abs(float(corr_oracle)) < 0.3
