"""The movie-review task: the shipped snippets, the prompts and their hashed split, the gold human's wiring."""

from __future__ import annotations

from pathlib import Path

import pytest
from script_loader import load_script

from bilevel_rlhf import movie_reviews
from bilevel_rlhf.happy_tweet.data import is_eval_id

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reviews() -> dict[str, list]:
    return movie_reviews.load_movie_reviews().to_dict()


def test_shipped_snippets_are_the_prepare_scripts_output(reviews):
    assert sorted(reviews["id"]) == list(range(1, 10606))
    assert all(-4.0 <= r <= 4.0 for r in reviews["human_rating"]) and all(t == t.strip() and t for t in reviews["text"])
    prepare = load_script("prepare_tweets")
    records = [{"id": i, "human_rating": r, "text": t}
               for i, r, t in zip(reviews["id"], reviews["human_rating"], reviews["text"])]
    assert prepare.to_jsonl(records) == movie_reviews.MOVIES_PATH.read_bytes()
    assert (REPO / "bilevel_rlhf" / "data" / "LICENSE_movie_reviews.txt").read_text().count("MIT License") == 1


def test_prompts_are_first_words_split_by_id(reviews, tmp_path):
    splits = movie_reviews.prompt_splits(n_prompt_words=6, eval_fraction=0.1)
    text = dict(zip(reviews["id"], reviews["text"]))
    for name, held in (("train", False), ("test", True)):
        d = splits[name].to_dict()
        assert all(is_eval_id(i, 0.1) == held for i in d["id"])
        assert all(text[i].split()[:6] == p.split() and len(text[i].split()) >= 8 for i, p in zip(d["id"], d["prompt"]))
    n = len(splits["train"]) + len(splits["test"])
    assert n == sum(len(t.split()) >= 8 for t in reviews["text"]) and 0.07 < len(splits["test"]) / n < 0.13
    with pytest.raises(ValueError, match="n_prompt_words must be an integer >= 1"):
        movie_reviews.prompt_splits(n_prompt_words=0)
    # the script writes the folder the recipe reads
    load_script("prepare_movie_reviews").main(["--output_dir", str(tmp_path / "p"), "--n_prompt_words", "3"])
    from bilevel_rlhf.recipe import RecipeArguments, load_prompts

    train, held = load_prompts(RecipeArguments(dataset_name=str(tmp_path / "p")))
    assert len(held) == len(movie_reviews.prompt_splits(3)["test"]) and all(len(p.split()) == 3 for p in held["prompt"])


def test_gold_human_is_the_ridge_head_on_the_movie_snippets(monkeypatch):
    """The gold human scores with the head fitted on the movie snippets (not the tweets), higher rating wins."""
    from bilevel_rlhf.happy_tweet import minilm_oracle

    seen = {}

    def fake(cache_dir=None, lam=1.0, eval_fraction=0.1, path=None, name="tweet"):
        seen.update(path=path, name=name)
        return (lambda texts: [float(len(t)) for t in texts]), {}

    monkeypatch.setattr(minilm_oracle, "get_minilm_oracle", fake)
    human = movie_reviews.gold_human()
    assert seen == {"path": movie_reviews.MOVIES_PATH, "name": "movie-review"}
    assert human(["a", "b"], ["long one", "x"], ["y", "longer one"]) == [1.0, 0.0]
    from bilevel_rlhf import load_human

    assert load_human("bilevel_rlhf.movie_reviews:gold_human").name == "movie_gold"


def test_the_recipe_config_parses():
    from bilevel_rlhf.recipe import make_parser

    config = REPO / "recipes" / "movie_reviews" / "config.yaml"
    script_args, training_args, model_args = make_parser().parse_args_and_config(["--config", str(config)])
    assert script_args.human == "bilevel_rlhf.movie_reviews:gold_human" and model_args.model_name_or_path is None
    assert training_args.method == "penalized_covariance" and training_args.max_steps == 400


def test_the_smollm2_config_parses():
    from bilevel_rlhf.recipe import make_parser

    config = REPO / "recipes" / "movie_reviews" / "smollm2_lora.yaml"
    script_args, training_args, model_args = make_parser().parse_args_and_config(["--config", str(config)])
    assert model_args.use_peft and training_args.reward_adapter and training_args.max_steps == 160
    assert model_args.model_name_or_path == "outputs/smollm2-135m-instruct"


def test_the_gpu_config_parses():
    from bilevel_rlhf.recipe import make_parser

    config = REPO / "recipes" / "movie_reviews" / "smollm2_gpu.yaml"
    script_args, training_args, model_args = make_parser().parse_args_and_config(
        ["--config", str(config), "--bf16", "false"])  # bf16 needs an accelerator to validate here
    assert model_args.use_peft and training_args.per_device_train_batch_size == 32 and training_args.max_steps == 400
