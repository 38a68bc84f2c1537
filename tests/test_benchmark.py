"""The benchmark's pieces: timers, the step summary, the grid layouts, argument checks, and one tiny end-to-end run
(3 methods in worker processes, 1 warm-up + 2 interleaved steps). Performance is never asserted here."""

from __future__ import annotations

import json
import statistics
import time

import pytest
from testing_utils import make_policy, make_tokenizer

from benchmarks.harness import (
    PARTS,
    BenchmarkArguments,
    PartTimer,
    gridworld_samples_to_1pct,
    gridworld_speed,
    markdown_tables,
    run_lm_benchmark,
    scaled_layout,
    summarize_steps,
)


def test_part_timer_counts_nested_calls_once_and_resets():
    timer = PartTimer()

    def inner():
        time.sleep(0.02)

    def outer():
        with timer.part("forward"):  # nested: already counted by the outer part
            inner()
        time.sleep(0.01)

    timed = timer.wrap("generation", outer)
    timed()
    totals = timer.take()
    assert totals["forward"] == 0.0
    assert 0.03 <= totals["generation"] < 0.5
    assert timer.take()["generation"] == 0.0


def test_part_timer_counts_generated_token_slots():
    import torch

    timer = PartTimer()

    def generate(input_ids):
        return torch.cat([input_ids, torch.zeros(input_ids.shape[0], 7, dtype=torch.long)], 1)

    timer.wrap("generation", generate)(input_ids=torch.ones(3, 5, dtype=torch.long))
    assert timer.take()["generated_tokens"] == 3 * 7
    # a wrapped generate calling another wrapped generate (PeftModel -> base model) counts its tokens once
    inner = timer.wrap("generation", generate)
    outer = timer.wrap("generation", lambda input_ids: inner(input_ids=input_ids))
    outer(input_ids=torch.ones(2, 4, dtype=torch.long))
    assert timer.take()["generated_tokens"] == 2 * 7


def test_summarize_steps_matches_hand_computation():
    records = []
    for i, seconds in enumerate([1.0, 2.0, 4.0, 3.0]):
        records.append({"seconds": seconds, "generation": 0.5 * seconds, "forward": 0.2 * seconds,
                        "backward": 0.1 * seconds, "optimizer": 0.05 * seconds, "generated_tokens": 100.0 + i})
    s = summarize_steps(records)
    assert s["median_s"] == 2.5
    assert s["min_s"] == 1.0 and s["max_s"] == 4.0
    assert s["split_fraction"]["generation"] == pytest.approx(0.5)
    assert s["split_fraction"]["other"] == pytest.approx(0.15)
    assert sum(s["split_fraction"].values()) == pytest.approx(1.0)
    assert s["split_s"]["other"] == pytest.approx(0.15 * 2.5)
    assert s["generated_tokens_per_s"] == pytest.approx(statistics.median([100 / 1, 101 / 2, 102 / 4, 103 / 3]))


@pytest.mark.parametrize("n", [5, 10, 20, 40])
def test_scaled_layout_is_a_valid_grid(n):
    from bilevel_rlhf.gridworld import make_grid

    layout = scaled_layout(n)
    assert len(layout) == n and all(len(row) == n for row in layout)
    text = "".join(layout)
    assert text.count("S") == 1 and "T" in text and "H" in text
    grid = make_grid(layout)
    assert grid.mdp.n_states == n * n


def test_scaled_layout_10_is_the_default_instance():
    from bilevel_rlhf.gridworld import DEFAULT_LAYOUT

    assert scaled_layout(10) == list(DEFAULT_LAYOUT)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"methods": ["ppo"]}, "methods"), ({"num_generations": 3}, "num_generations"), ({"steps": 0}, "steps"),
     ({"rloo_beta": 0.0}, "rloo_beta"), ({"num_threads": 0}, "num_threads"), ({"rloo_reward": "x"}, "rloo_reward"),
     ({"grid_sizes": [2]}, "grid_sizes"), ({"methods": ["rloo", "rloo"]}, "methods"),
     ({"grid_repeats": 0}, "grid_repeats")],
)
def test_bad_arguments_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BenchmarkArguments(**kwargs)


def test_gridworld_speed_and_samples_to_1pct(tmp_path):
    speed = gridworld_speed([5, 8], iterations=4, repeats=3)
    assert set(speed) == {5, 8}
    assert speed[8]["states"] == 64 and speed[8]["iterations_per_s"] > 0 and speed[8]["first_call_s"] > 0
    assert speed[8]["iterations_per_s"] == sorted(speed[8]["iterations_per_s_repeats"])[1]  # the median of 3
    computed = gridworld_samples_to_1pct(None, overrides={"iterations": 20, "eval_every": 10,
                                                          "methods": ["single_loop", "partial_sgd"]})
    assert set(computed["summary"]) == {"single_loop", "partial_sgd"}
    # read back from a recipe-style results.json
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"global_best": {"phi": -1.0}, "summary": {"single_loop": {
        "samples_to_1pct_median": 512.0, "seeds_reaching_1pct": 3, "n_seeds": 5, "phi_mean": -0.99}}}))
    read = gridworld_samples_to_1pct(str(path))
    assert read["summary"]["single_loop"]["samples_to_1pct_median"] == 512.0 and read["best_phi"] == -1.0


def test_tiny_end_to_end_run(tmp_path):
    """Four trainers in worker processes, interleaved: every method reports every figure."""
    tok = make_tokenizer()
    model_dir = tmp_path / "tiny"
    make_policy(tok, n_positions=64).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    args = BenchmarkArguments(num_prompts=2, num_generations=2, max_completion_length=6, warmup_steps=1, steps=2,
                              gridworld=False, output_dir=str(tmp_path / "out"))
    lm = run_lm_benchmark(args, model_path=str(model_dir))
    assert set(lm["methods"]) == {"rloo", "online_dpo", "partial_sgd", "single_loop"}
    for m, s in lm["methods"].items():
        assert s["steps"] == 2 and s["median_s"] > 0 and s["peak_rss_mb"] > 0
        # full_length: every step generates rows x max_completion_length tokens per actor
        per_actor = 2 * 2 * 6
        assert s["generated_tokens_per_step"] == (2 * per_actor if m == "single_loop" else per_actor)
        for r in s["records"]:
            assert all(r[p] >= 0 for p in PARTS if p != "other")
            assert r["generation"] > 0 and r["forward"] > 0 and r["backward"] > 0 and r["optimizer"] > 0
            assert sum(r[p] for p in PARTS if p != "other") <= r["seconds"]
    assert lm["methods"]["rloo"]["ratio_to_rloo"] == 1.0
    table = markdown_tables({"arguments": vars(args), "machine": {"load_average_start": [0.0]}, "lm": lm})
    for m in ("rloo", "online_dpo", "partial_sgd", "single_loop"):
        assert f"| {m} |" in table


def test_command_line_parses_lists_and_help():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(BenchmarkArguments)
    assert "--use_peft" in parser.format_help()
    (args,) = parser.parse_args_into_dataclasses(["--methods", "rloo", "single_loop", "--grid_sizes", "10", "20",
                                                  "--gridworld", "false", "--use_peft", "true"])
    assert args.methods == ["rloo", "single_loop"] and args.grid_sizes == [10, 20]
    assert args.gridworld is False and args.use_peft is True
