"""The generic recipe (`bilevel-rlhf`): the user's prompts from local files, any causal LM, a human given as
module:callable, the evaluation protocol, and clear errors for bad data."""

from __future__ import annotations

import json

import pytest

from bilevel_rlhf.recipe import RecipeArguments, load_prompts, run

TINY = ["--per_device_train_batch_size", "2", "--max_completion_length", "6", "--num_eval_prompts", "2",
        "--num_generations", "1", "--objective", "win_rate", "--steps_per_generation", "2", "--num_iterations", "2",
        "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "4", "--max_steps", "8", "--disable_tqdm", "true",
        "--report_to", "none", "--use_cpu", "true"]
PROMPTS = ["good morning", "i love", "today is", "my dog", "the sun", "we went", "this is", "happy new", "so tired",
           "what a"]




def _args(**kw) -> RecipeArguments:
    return RecipeArguments(**kw)


def test_prompts_from_files_and_folders(tmp_path):
    import datasets

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    train, held = load_prompts(_args(dataset_name=str(tmp_path / "p.jsonl"), prompt_column="text", eval_fraction=0.2))
    assert train.column_names == ["prompt"] and len(held) == 2 and len(train) == 8
    assert sorted(list(train["prompt"]) + list(held["prompt"])) == sorted(PROMPTS)
    again, held_again = load_prompts(_args(dataset_name=str(tmp_path / "p.jsonl"), prompt_column="text", eval_fraction=0.2))
    assert list(held_again["prompt"]) == list(held["prompt"])  # one fixed split
    # a CSV, and a save_to_disk folder with its own test split
    (tmp_path / "p.csv").write_text("prompt\n" + "\n".join(PROMPTS) + "\n")
    assert len(load_prompts(_args(dataset_name=str(tmp_path / "p.csv")))[0]) == 9
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": PROMPTS[:6]}),
                          "test": datasets.Dataset.from_dict({"prompt": PROMPTS[6:]})}).save_to_disk(tmp_path / "dd")
    train, held = load_prompts(_args(dataset_name=str(tmp_path / "dd")))
    assert list(train["prompt"]) == PROMPTS[:6] and list(held["prompt"]) == PROMPTS[6:]


def test_bad_data_is_named(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    with pytest.raises(ValueError, match="prompt_column: .*no column 'prompt' .*columns: \\['text'\\]"):
        load_prompts(_args(dataset_name=str(tmp_path / "p.jsonl")))
    with pytest.raises(FileNotFoundError, match="dataset_name: .*missing.jsonl not found"):
        load_prompts(_args(dataset_name=str(tmp_path / "missing.jsonl")))
    (tmp_path / "p.txt").write_text("a\n")
    with pytest.raises(ValueError, match="is not a .jsonl, .json, .csv or .parquet file"):
        load_prompts(_args(dataset_name=str(tmp_path / "p.txt")))
    (tmp_path / "e.jsonl").write_text('{"prompt": "ok"}\n{"prompt": ""}\n{"prompt": "fine"}\n')
    with pytest.raises(ValueError, match="prompt .* is not a non-empty string"):
        load_prompts(_args(dataset_name=str(tmp_path / "e.jsonl"), eval_fraction=0.34))
    with pytest.raises(ValueError, match="dataset_name"):
        _args(dataset_name=None)
    with pytest.raises(ValueError, match="eval_fraction"):
        _args(dataset_name="x.jsonl", eval_fraction=1.5)


def test_trains_on_a_jsonl_with_a_module_human_and_resumes(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2))
    (tmp_path / "judge.py").write_text("def exclamations(texts):\n    return [float(t.count('!')) for t in texts]\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    argv = ["--dataset_name", str(tmp_path / "p.jsonl"), "--model_name_or_path", tiny_model, "--human",
            "judge:exclamations", "--output_dir", str(out), "--eval_protocol_steps", "4", "--eval_protocol_prompts", "2",
            "--eval_protocol_samples", "1", *TINY]
    summary = run(argv)
    assert summary["status"] == "completed" and summary["human"] == "judge:exclamations"
    assert summary["oracle_queries"] == 2 * 4  # 2 iterations x 4 prompts, one pair each (win_rate)
    assert (out / "model.safetensors").is_file() and (out / "reward_model" / "config.json").is_file()
    records = json.loads((out / "eval_protocol.json").read_text())["records"]
    assert [r["step"] for r in records] == [0, 4, 8] and [r["train_queries"] for r in records] == [0, 4, 8]
    assert set(summary["eval_metrics"]) == {"eval_reward/theta_mean", "eval_oracle/score_theta"}
    # resume: 4 more steps from the last checkpoint
    resumed = run(argv + ["--max_steps", "12", "--resume_from_checkpoint", "last"])  # later flags win
    assert resumed["resumed_from"].endswith("checkpoint-8") and resumed["global_step"] == 12
    assert resumed["oracle_queries"] == 12


def test_the_example_config_parses():
    from pathlib import Path

    from bilevel_rlhf.recipe import make_parser

    config = Path(__file__).resolve().parent.parent / "recipes" / "your_task" / "config.yaml"
    script_args, training_args, model_args = make_parser().parse_args_and_config(["--config", str(config)])
    assert script_args.dataset_name == "prompts.jsonl" and script_args.human == "vader"
    assert training_args.method == "penalized_covariance" and training_args.max_steps == 400
    assert model_args.model_name_or_path == "path/to/causal-lm"


def test_the_comparison_runs_bilevel_and_trl_on_the_generic_task(tiny_model, tmp_path, monkeypatch):
    """scripts/compare.py --recipe generic: the default and OnlineDPO on a JSONL task with a module human,
    the same budget, both evaluated by the protocol; protocol_report reads them."""
    from script_loader import load_script

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2))
    (tmp_path / "judge.py").write_text("def exclamations(texts):\n    return [float(t.count('!')) for t in texts]\n")
    (tmp_path / "task.yaml").write_text(
        f"dataset_name: {tmp_path / 'p.jsonl'}\nhuman: judge:exclamations\nmodel_name_or_path: {tiny_model}\n"
        "per_device_train_batch_size: 4\nnum_generations: 1\nobjective: win_rate\nsteps_per_generation: 1\n"
        "num_iterations: 1\nmax_completion_length: 6\nnum_eval_prompts: 0\nreport_to: none\nuse_cpu: true\n"
        "eval_protocol_prompts: 2\neval_protocol_samples: 1\ndisable_tqdm: true\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cmp"
    load_script("compare").main(
        ["--recipe", "generic", "--config", str(tmp_path / "task.yaml"), "--methods", "penalized_covariance",
         "online_dpo", "--queries", "8", "--eval_every_queries", "4", "--output_dir", str(out)])
    for name in ("penalized_covariance_win_rate-seed0", "online_dpo-seed0"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["oracle_queries"] == 8 and summary["status"] == "completed", name
        records = json.loads((out / name / "eval_protocol.json").read_text())["records"]
        assert [r["train_queries"] for r in records] == [0, 4, 8], name
    load_script("protocol_report").main([str(out), "--output_dir", str(out / "report")])
    assert "online_dpo (beta 0.1)" in (out / "report" / "report.md").read_text()


def test_a_fresh_reward_head_starts_at_zero_and_a_given_one_is_kept(tiny_model, tmp_path):
    """`reward_head_init="zero"`: the head the recipe adds scores every sequence 0 (the lower level's target starts
    at the reference); `"random"` (the default) does not; a saved one-output classifier passed as the reward model
    is kept."""
    import torch
    from trl import ModelConfig

    from bilevel_rlhf import BilevelConfig
    from bilevel_rlhf.recipe import load_models

    def scores(init: str, reward_path=None):
        args = BilevelConfig(output_dir=str(tmp_path / "run"), reward_head_init=init, use_cpu=True, report_to="none")
        models = load_models(tiny_model, reward_path, args, ModelConfig())
        enc = models["tokenizer"](PROMPTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            return models["reward_model"](**enc).logits.squeeze(-1), models["reward_model"]

    zero, _ = scores("zero")
    assert torch.count_nonzero(zero) == 0
    random, model = scores("random")
    assert random.std() > 1e-3
    model.save_pretrained(tmp_path / "rm")
    kept, _ = scores("zero", str(tmp_path / "rm"))
    torch.testing.assert_close(kept, random)
    with pytest.raises(ValueError, match="reward_head_init"):
        BilevelConfig(output_dir=str(tmp_path / "run"), reward_head_init="xavier")
