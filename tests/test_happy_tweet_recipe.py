"""The happy-tweet recipe end to end on a cut-down tweet model: training, artifacts, resume after SIGTERM,
a real 2-process accelerate run, the evaluation script, and clear errors for bad model folders."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_loader import load_script

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "recipes" / "happy_tweet" / "config.yaml")
# a handful of steps: 2 micro-batches of 2 completions (4 prompts x 1) per iteration, 2 passes = 4 steps per iteration
TINY = ["--per_device_train_batch_size", "2", "--max_completion_length", "6", "--num_eval_prompts", "4",
        "--save_steps", "4", "--logging_steps", "4", "--max_steps", "8", "--disable_tqdm", "true"]




@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory):
    from bilevel_rlhf.happy_tweet.recipe import run

    out = tmp_path_factory.mktemp("runs") / "single_loop"
    torch.set_num_threads(2)  # the recipe sets its own count (torch_threads, 1 by default)
    summary = run(["--config", CONFIG, "--model_name_or_path", tiny_model, "--output_dir", str(out),
                   "--report_to", "tensorboard", "--method", "single_loop", *TINY])
    return out, summary


def test_recipe_end_to_end_writes_every_artifact(trained_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out, summary = trained_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["status"] == summary["status"] == "completed"
    assert on_disk["method"] == "single_loop" and on_disk["iterations"] == 2 and on_disk["global_step"] == 8
    assert on_disk["torch_threads"] == 1 == torch.get_num_threads()
    assert on_disk["oracle_queries"] == 2 * 4  # 2 iterations x 4 prompts x 1 pair (win_rate, 1 completion each)
    assert [p["oracle/queries"] for p in on_disk["oracle_curve"]] == [4.0, 8.0]
    assert set(on_disk["eval_metrics"]) == {"eval_reward/theta_mean", "eval_oracle/score_theta"}
    assert all(abs(v) < 1e6 for v in on_disk["eval_metrics"].values())
    assert on_disk["final_metrics"]["objective/tau"] < 0.1  # tau decays (polynomial schedule, iteration 1)
    # theta, phi, the reward model, the critics, checkpoints at iteration boundaries, tensorboard logs
    theta = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(on_disk["model_name_or_path"])
    assert not torch.equal(theta.transformer.wte.weight, initial.transformer.wte.weight)  # theta was trained
    AutoModelForCausalLM.from_pretrained(out / "phi")
    assert AutoModelForSequenceClassification.from_pretrained(out / "reward_model").config.num_labels == 1
    assert (out / "value_heads.safetensors").is_file()
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-4", "checkpoint-8"}
    events = b"".join(f.read_bytes() for f in out.glob("runs/*/events.out.tfevents.*"))
    # log_completions (on in the recipe's config): theta's samples as a text table, and in completions.jsonl
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert rows and {r["step"] for r in rows} == {0, 4}
    assert b"completions" in events and all(r["completion"].replace("|", "\\|").encode() in events for r in rows)


def test_resume_after_sigterm_equals_uninterrupted(tiny_model, trained_run, tmp_path, monkeypatch):
    """SIGTERM in the middle of iteration 0: the run finishes that iteration, checkpoints and stops; resuming
    from `last` reproduces the uninterrupted run (same weights, same oracle curve)."""
    from safetensors.torch import load_file

    from bilevel_rlhf.happy_tweet.recipe import run
    from bilevel_rlhf.trainer import BilevelTrainer

    reference_dir, reference = trained_run
    out = tmp_path / "interrupted"
    args = ["--config", CONFIG, "--model_name_or_path", tiny_model, "--output_dir", str(out), "--report_to", "none",
            "--method", "single_loop", *TINY]
    original = BilevelTrainer.training_step
    sent = []

    def step_then_signal(self, *a, **kw):
        loss = original(self, *a, **kw)
        if not sent:  # after the first micro-step of iteration 0
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(BilevelTrainer, "training_step", step_then_signal)
    handler_before = signal.getsignal(signal.SIGTERM)
    first = run(args)
    monkeypatch.setattr(BilevelTrainer, "training_step", original)
    assert first["status"] == "interrupted" and first["global_step"] == 4
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the recipe's handler was removed

    second = run(args + ["--resume_from_checkpoint", "last"])
    assert second["status"] == "completed" and second["resumed_from"].endswith("checkpoint-4")
    assert second["oracle_queries"] == reference["oracle_queries"]
    got = [p["oracle/score_theta"] for p in second["oracle_curve"]]
    assert got == pytest.approx([p["oracle/score_theta"] for p in reference["oracle_curve"]])
    for sub in ("", "phi", "reward_model"):
        a, b = load_file(out / sub / "model.safetensors"), load_file(reference_dir / sub / "model.safetensors")
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"{sub or 'theta'}: {name}")


def test_resume_without_checkpoint_is_a_clear_error(tiny_model, tmp_path):
    from bilevel_rlhf.happy_tweet.recipe import run

    with pytest.raises(FileNotFoundError, match="no complete checkpoint-"):
        run(["--config", CONFIG, "--model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "none"),
             "--resume_from_checkpoint", "last", *TINY])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_accelerate_config(tiny_model, tmp_path):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    out = tmp_path / "dist"
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
           "--main_process_port", str(_free_port()), str(ROOT / "recipes" / "happy_tweet" / "train.py"),
           "--config", CONFIG, "--model_name_or_path", tiny_model, "--output_dir", str(out), "--report_to", "none",
           *TINY, "--max_steps", "4", "--save_strategy", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["iterations"] == 1
    assert summary["oracle_queries"] == 2 * 4  # both processes' pairs: 2 ranks x 4 prompts x 1 pair
    assert (out / "model.safetensors").is_file() and (out / "reward_model" / "model.safetensors").is_file()


def test_evaluation_script(trained_run, tmp_path):
    out, _ = trained_run
    evaluate = load_script("evaluate_happy_tweet")
    report = evaluate.main([f"single_loop={out}", "--num_prompts", "4", "--num_samples", "2",
                            "--max_completion_length", "6", "--output_dir", str(tmp_path)])
    rows = {r["name"]: r for r in report["results"]}
    assert set(rows) == {"initial", "single_loop"}
    assert rows["initial"]["kl_to_initial"] == 0.0  # pi_0 against itself: exactly zero
    assert rows["single_loop"]["kl_to_initial"] > 0.0
    for row in rows.values():
        assert -1 <= row["vader_mean"] <= 1 and 0 <= row["vader_frac_gt_0.5"] <= 1
        assert 0 < row["distinct_1"] <= 1 and 0 < row["distinct_2"] <= 1
        assert row["num_generations"] == 8 and len(row["samples"]) == 4
    assert rows["single_loop"]["oracle_queries"] == 8
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"][1]["name"] == "single_loop"
    table = (tmp_path / "results.md").read_text()
    assert "| initial | 1 |" in table and "| single_loop (win_rate) | 1 | 8 |" in table
    assert (tmp_path / "oracle_curve.png").stat().st_size > 1000


def test_sequence_kl_expectation_is_the_exact_kl():
    """Two-token completions: E_{y1 ~ p}[sequence_kl] (enumerated) equals the brute-force KL of the sequences."""
    sys.path.insert(0, str(Path(__file__).parent))
    from testing_utils import make_policy, make_tokenizer

    from bilevel_rlhf.happy_tweet.evaluate import sequence_kl

    tok = make_tokenizer()
    p_model, q_model = make_policy(tok, seed=0).eval(), make_policy(tok, seed=1).eval()
    V, eos = len(tok), tok.eos_token_id
    prompt = torch.tensor([[tok.convert_tokens_to_ids("the"), tok.convert_tokens_to_ids("cat")]])
    with torch.no_grad():
        def dists(model):
            first = torch.log_softmax(model(prompt).logits[0, -1], -1)  # [V]
            seqs = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], 1)
            second = torch.log_softmax(model(seqs).logits[:, -1], -1)  # [V, V]: row y1
            return first, second

        lp1, lp2 = dists(p_model)
        lq1, lq2 = dists(q_model)
    # brute force: a completion ends at eos, else after 2 tokens
    ended = torch.arange(V) == eos
    log_ratio_pairs = (lp1 - lq1)[:, None] + (lp2 - lq2)  # [y1, y2]
    exact = (lp1.exp() * (lp1 - lq1))[ended].sum() + (lp1.exp()[:, None] * lp2.exp() * log_ratio_pairs)[~ended].sum()
    # the estimator on every first token y1 (second token arbitrary: its KL term does not depend on it)
    ids = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None], torch.zeros(V, 1, dtype=torch.long)], 1)
    mask = torch.stack([torch.ones(V), (~ended).float()], 1).long()
    attention = torch.cat([torch.ones(V, 2, dtype=torch.long), mask], 1)
    estimate = sequence_kl(p_model, q_model, ids, attention, 2, mask)
    torch.testing.assert_close((lp1.exp() * estimate).sum(), exact, rtol=1e-5, atol=1e-6)
    assert float(exact) > 1e-3  # the two models differ: the check is not 0 == 0


def test_distinct_n():
    from bilevel_rlhf.happy_tweet.evaluate import distinct_n

    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == 3 / 7  # a, b, c over 7 words
    assert distinct_n(texts, 2) == 3 / 5  # (a b), (b a), (b c) over 5 bigrams
    assert distinct_n(["one"], 2) == 0.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(texts, 0)


def test_bad_model_folders_and_arguments_name_the_problem(tiny_model, tmp_path):
    import shutil

    from bilevel_rlhf.happy_tweet.evaluate import load_policy
    from bilevel_rlhf.happy_tweet.recipe import HappyTweetArguments, resolve_model_path

    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        resolve_model_path(str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_policy(missing)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"{corrupt}.*corrupt"):
        resolve_model_path(str(corrupt))
    with pytest.raises(ValueError, match=str(corrupt)):
        load_policy(corrupt)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty} has no config.json"):
        resolve_model_path(str(empty))
    with pytest.raises(ValueError, match="oracle must be one of"):
        HappyTweetArguments(oracle="human")
    with pytest.raises(ValueError, match="n_prompt_words must be in"):
        HappyTweetArguments(n_prompt_words=0)
    with pytest.raises(FileNotFoundError, match="tweets_path"):
        HappyTweetArguments(tweets_path=str(missing))
    with pytest.raises(ValueError, match="torch_threads must be an integer >= 0"):
        HappyTweetArguments(torch_threads=-1)


def test_recipe_with_lora_saves_adapters_that_load_and_resume(tiny_model, tmp_path):
    """`--use_peft`: one frozen base with adapters theta and phi; the saved adapters load with transformers, and a
    resumed LoRA run ends where the uninterrupted one does."""
    from transformers import AutoModelForCausalLM

    from bilevel_rlhf.happy_tweet.recipe import run

    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--report_to", "none", "--method", "single_loop"]
    out = tmp_path / "lora"
    summary = run(["--config", CONFIG, "--model_name_or_path", tiny_model, "--output_dir", str(out), *TINY, *lora])
    assert summary["status"] == "completed" and summary["use_peft"] and summary["oracle_queries"] == 8
    assert set(summary["eval_metrics"]) == {"eval_reward/theta_mean", "eval_oracle/score_theta"}
    for sub in ("", "phi"):  # adapters only: the frozen base is not copied
        assert (out / sub / "adapter_model.safetensors").is_file() and not (out / sub / "model.safetensors").exists()
    theta = AutoModelForCausalLM.from_pretrained(out)  # reads adapter_config.json, loads the base it names
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(theta(ids).logits, base(ids).logits)  # the adapter was trained and is applied

    resumed = tmp_path / "lora_resumed"
    first = run(["--config", CONFIG, "--model_name_or_path", tiny_model, "--output_dir", str(resumed), *TINY, *lora,
                 "--max_steps", "4"])
    assert first["global_step"] == 4
    second = run(["--config", CONFIG, "--model_name_or_path", tiny_model, "--output_dir", str(resumed), *TINY, *lora,
                  "--resume_from_checkpoint", "last"])
    assert second["global_step"] == 8 and second["resumed_from"].endswith("checkpoint-4")
    from safetensors.torch import load_file

    for sub in ("", "phi"):
        a, b = load_file(resumed / sub / "adapter_model.safetensors"), load_file(out / sub / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"{sub or 'theta'}: {name}")


def test_recipe_with_the_reward_adapter_holds_one_base(tiny_model, tmp_path):
    """`--use_peft --reward_adapter`: r_x is a third adapter on the policy's base; only adapters and the head are
    saved, and a reward model path is refused."""
    from bilevel_rlhf.happy_tweet.recipe import run

    args = ["--config", CONFIG, "--model_name_or_path", tiny_model, *TINY, "--use_peft", "true", "--lora_r", "4",
            "--lora_alpha", "8", "--report_to", "none", "--reward_adapter", "true", "--num_eval_prompts", "0"]
    out = tmp_path / "shared"
    summary = run([*args, "--output_dir", str(out)])
    assert summary["status"] == "completed" and summary["reward_adapter"] and summary["oracle_queries"] == 8
    assert {p.name for p in (out / "reward_model").iterdir()} >= {"adapter_model.safetensors", "score.safetensors"}
    assert not list(out.rglob("model.safetensors"))  # no full copy of any model
    with pytest.raises(ValueError, match="reward_model_name_or_path must be None with reward_adapter=True"):
        run([*args, "--output_dir", str(tmp_path / "refused"), "--reward_model_name_or_path", tiny_model])


def test_recipe_with_the_minilm_oracle(tiny_model, tmp_path, monkeypatch):
    """`--oracle minilm`: the head is fitted on first use and cached; the run queries it like any oracle. The fit is
    cut to 240 tweets (encoding all 4,200 would take most of a minute; the fit itself: test_happy_tweet_data.py)."""
    from bilevel_rlhf.happy_tweet import minilm_oracle
    from bilevel_rlhf.happy_tweet.recipe import run

    fit = minilm_oracle.fit_minilm_oracle
    monkeypatch.setattr(minilm_oracle, "fit_minilm_oracle", lambda **kw: fit(max_tweets=240, **kw))
    out, cache = tmp_path / "minilm", tmp_path / "cache"
    summary = run(["--config", CONFIG, "--model_name_or_path", tiny_model, "--output_dir", str(out), *TINY,
                   "--report_to", "none", "--oracle", "minilm", "--model_cache_dir", str(cache), "--max_steps", "4",
                   "--save_strategy", "no"])
    assert summary["status"] == "completed" and summary["oracle"] == "minilm" and summary["oracle_queries"] == 4
    heads = list((cache / "models").glob("minilm-tweet-head-*.json"))
    assert len(heads) == 1
    assert json.loads(heads[0].read_text())["metrics"]["eval_pearson_r"] > 0.5
    # the oracle's score (a predicted human rating in [-4, 4], roughly) is what the run logged
    assert -5 < summary["final_metrics"]["oracle/score_theta"] < 5
