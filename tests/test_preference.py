import json
import math

import numpy as np
import pytest

from bilevel_rlhf.preference import PreferenceOracle, ScoreOracle, VaderOracle, check_labels


def length_score(texts):
    return [float(len(t)) for t in texts]


def test_deterministic_labels_and_seeded_ties():
    oracle = ScoreOracle(length_score, mode="deterministic", seed=3)
    labels = oracle(["p", "p", "p"], ["aaa", "a", "bb"], ["a", "aaa", "cc"])
    assert labels[:2] == [1.0, 0.0]
    assert labels[2] in (0.0, 1.0)
    # ties: a fair seeded coin - reproducible with the same seed, roughly half ones over many ties
    n = 4000
    ties = ScoreOracle(length_score, seed=11)(["p"] * n, ["xy"] * n, ["zw"] * n)
    again = ScoreOracle(length_score, seed=11)(["p"] * n, ["xy"] * n, ["zw"] * n)
    assert ties == again
    assert abs(np.mean(ties) - 0.5) < 4 * 0.5 / math.sqrt(n)
    other = ScoreOracle(length_score, seed=12)(["p"] * n, ["xy"] * n, ["zw"] * n)
    assert other != ties


def test_bradley_terry_frequency_matches_sigmoid():
    # score difference 1 at temperature 0.5 -> P(a wins) = sigmoid(2)
    oracle = ScoreOracle(length_score, mode="bradley_terry", temperature=0.5, seed=0)
    n = 20000
    labels = np.array(oracle(["q"] * n, ["ab"] * n, ["a"] * n))
    p = 1 / (1 + math.exp(-2.0))
    assert set(np.unique(labels)) <= {0.0, 1.0}
    assert abs(labels.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
    soft = ScoreOracle(length_score, mode="probability", temperature=0.5)(["q", "q"], ["ab", "a"], ["a", "ab"])
    assert soft == pytest.approx([p, 1 - p], rel=1e-12)
    # huge score gaps: no overflow, labels stay in {0, 1}
    far = ScoreOracle(lambda t: [1e6 if t_ == "a" else -1e6 for t_ in t], mode="probability", temperature=1e-3)
    assert far(["q", "q"], ["a", "b"], ["b", "a"]) == [1.0, 0.0]


def test_state_dict_roundtrip_reproduces_labels():
    oracle = ScoreOracle(length_score, mode="bradley_terry", temperature=2.0, seed=5)
    args = (["q"] * 64, ["abc"] * 64, ["a"] * 64)
    oracle(*args)  # advance the stream
    state = json.loads(json.dumps(oracle.state_dict()))  # must survive JSON
    expected = oracle(*args)
    restored = ScoreOracle(length_score, mode="bradley_terry", temperature=2.0, seed=999)
    restored.load_state_dict(state)
    assert restored(*args) == expected
    # the next draws of the restored oracle differ from a fresh one at the restored oracle's seed
    assert ScoreOracle(length_score, mode="bradley_terry", temperature=2.0, seed=999)(*args) != expected
    with pytest.raises(ValueError, match="no 'rng' entry"):
        restored.load_state_dict({})


def test_include_prompt_and_score():
    oracle = ScoreOracle(length_score, include_prompt=True, name="len")
    assert oracle.score(["ab", ""], ["c", "de"]) == [3.0, 2.0]
    # a non-additive score (distinct characters): the prompt changes which side wins
    def distinct(texts):
        return [float(len(set(t))) for t in texts]

    assert ScoreOracle(distinct)(["abc"], ["cba"], ["xy"]) == [1.0]  # 3 > 2
    assert ScoreOracle(distinct, include_prompt=True)(["abc"], ["cba"], ["xy"]) == [0.0]  # 3 < 5
    assert ScoreOracle(length_score).score(["long prompt"], ["a"]) == [1.0]


def test_bad_inputs_name_the_oracle():
    oracle = ScoreOracle(length_score, name="len")
    with pytest.raises(ValueError, match="'len'.*completions_b has 1 entries, expected 2"):
        oracle(["p", "q"], ["a", "b"], ["c"])
    with pytest.raises(TypeError, match="'len'.*prompts must be a list of str"):
        oracle("p", ["a"], ["b"])
    with pytest.raises(TypeError, match=r"completions_a\[1\] must be a str"):
        oracle(["p", "q"], ["a", 3], ["b", "c"])
    with pytest.raises(ValueError, match="'short'.*expected shape \\(4,\\), got \\(3,\\)"):
        ScoreOracle(lambda t: [0.0] * (len(t) - 1), name="short")(["p", "q"], ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="'nan'.*non-finite score nan for text 1"):
        ScoreOracle(lambda t: [0.0, float("nan")] + [0.0] * (len(t) - 2), name="nan")(["p", "q"], ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="'txt'.*must return 2 numbers"):
        ScoreOracle(lambda t: ["good", "bad"], name="txt").score(["p", "q"], ["a", "b"])
    with pytest.raises(ValueError, match="mode must be one of"):
        ScoreOracle(length_score, mode="sampled")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ScoreOracle(length_score, mode="bradley_terry", temperature=0.0)
    with pytest.raises(TypeError, match="score_fn must be callable"):
        ScoreOracle(3.0, name="x")


def test_check_labels():
    np.testing.assert_array_equal(check_labels([1, 0.0, 0.25], 3, "o"), np.array([1.0, 0.0, 0.25]))
    assert check_labels((1.0,), 1, "o").dtype == np.float64
    with pytest.raises(ValueError, match="'user'.*expected shape \\(3,\\), got \\(2,\\)"):
        check_labels([1.0, 0.0], 3, "user")
    with pytest.raises(ValueError, match="'user'.*non-finite label at index 1"):
        check_labels([1.0, float("inf")], 2, "user")
    with pytest.raises(ValueError, match="'user'.*outside \\[0, 1\\] at index 0: 1.5"):
        check_labels([1.5, 0.0], 2, "user")
    with pytest.raises(ValueError, match="'user'.*outside \\[0, 1\\].*-0.1"):
        check_labels([0.0, -0.1], 2, "user")
    with pytest.raises(ValueError, match="'user' must return 2 numbers"):
        check_labels(["yes", "no"], 2, "user")
    with pytest.raises(ValueError, match="'user'.*expected shape \\(2,\\)"):
        check_labels(None, 2, "user")


def test_base_class_contract():
    class Always(PreferenceOracle):
        name = "always_a"

        def __call__(self, prompts, completions_a, completions_b):
            return [1.0] * len(prompts)

    o = Always()
    assert o(["p"], ["a"], ["b"]) == [1.0]
    assert o.score(["p"], ["a"]) is None
    assert o.state_dict() == {}
    with pytest.raises(NotImplementedError):
        PreferenceOracle()(["p"], ["a"], ["b"])


def test_vader_oracle():
    oracle = VaderOracle()
    happy, sad = "I love this, what a wonderful happy day!", "This is terrible, I hate it."
    assert oracle(["", ""], [happy, sad], [sad, happy]) == [1.0, 0.0]
    s_happy, s_sad = oracle.score(["", ""], [happy, sad])
    assert -1.0 <= s_sad < 0.0 < s_happy <= 1.0
    # the empty completion is scored (compound 0.0), not an error
    assert oracle.score([""], [""]) == [0.0]
    bt = VaderOracle(mode="bradley_terry", temperature=0.1, seed=1)
    n = 4000
    p = 1 / (1 + math.exp(-(s_happy - s_sad) / 0.1))
    freq = np.mean(bt([""] * n, [happy] * n, [sad] * n))
    assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3


# ---------------------------------------------------------------------------------------------------- reward model
def test_reward_model_oracle_scores_prompt_and_completion_with_its_own_tokenizer(tmp_path):
    """A saved one-output classifier as the human: its scores are the model's outputs on prompt + completion (batched
    or not), labels follow them, and load_human takes the folder."""
    import torch
    from testing_utils import make_reward_model, make_tokenizer

    from bilevel_rlhf import RewardModelOracle, load_human

    tok = make_tokenizer()
    rm = make_reward_model(tok, seed=3).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    oracle = RewardModelOracle(tmp_path / "rm", batch_size=2)
    prompts, comps = ["the cat", "a dog", "the sun"], [" is happy", " was sad", " is very good"]
    with torch.no_grad():
        expected = [float(rm(**tok([p + c], return_tensors="pt")).logits[0, 0]) for p, c in zip(prompts, comps)]
    assert oracle.score(prompts, comps) == pytest.approx(expected, abs=1e-5)  # padding in batches changes nothing
    labels = oracle(prompts, comps, [" is sad", " was happy", " is bad"])
    other = oracle.score(prompts, [" is sad", " was happy", " is bad"])
    assert labels == [float(a > b) for a, b in zip(expected, other)]
    assert isinstance(load_human(str(tmp_path / "rm")), RewardModelOracle)


def test_reward_model_oracle_errors(tmp_path):
    from testing_utils import make_reward_model, make_tokenizer

    from bilevel_rlhf import RewardModelOracle

    tok = make_tokenizer()
    make_reward_model(tok, num_labels=2).save_pretrained(tmp_path / "two")
    tok.save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="one output .* this one has 2"):
        RewardModelOracle(tmp_path / "two")
    make_reward_model(tok).save_pretrained(tmp_path / "notok")
    with pytest.raises(ValueError, match="has no loadable tokenizer"):
        RewardModelOracle(tmp_path / "notok")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        RewardModelOracle(tmp_path / "empty")
