"""`LocalLLMJudge` (bilevel_rlhf/llm_judge.py) on tiny in-memory models, and scripts/judge_agreement.py on tiny
models: TRL's pairwise-judge contract (0 / 1 / -1 per pair), the order shuffling mapped back, the margin's
abstentions, the answer tokens and their errors, left padding, and the script's report."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from script_loader import load_script
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from bilevel_rlhf.llm_judge import LocalLLMJudge

JUDGE_WORDS = "A B happy sad day the ? Answer: which".split()
# the question in the test vocabulary: the fake models find the two completions between the markers A and B
TEMPLATE = "which {prompt} A {a} B {b} ?"
PROMPTS = ["the day", "the", "day"]
# happy counts (first, second): 2-0, 0-1, 1-1 (a tie)
PAIRS = [["happy happy day", "sad"], ["sad sad", "happy"], ["happy", "happy sad"]]


def judge_tokenizer(words: list[str] = JUDGE_WORDS) -> PreTrainedTokenizerFast:
    """Word-level: <unk>=0, <eos>=1, <pad>=2, then `words`."""
    vocab = {t: i for i, t in enumerate(["<unk>", "<eos>", "<pad>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def gpt2_config(tok, n_positions: int = 64) -> GPT2Config:
    return GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


class FakeLM(torch.nn.Module):
    """A causal LM whose next-token logits at the last position are `rule(tokens of the row)`: logit of "A" and "B"."""

    def __init__(self, tok, rule):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a device to read
        self.tok, self.rule, self.calls = tok, rule, []
        self.a, self.b = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")

    def forward(self, input_ids, attention_mask, position_ids):
        self.calls.append((input_ids.clone(), attention_mask.clone(), position_ids.clone()))
        logits = torch.full((*input_ids.shape, len(self.tok)), -5.0)
        for i, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            logits[i, -1, self.a], logits[i, -1, self.b] = self.rule(ids[mask.bool()].tolist())
        return SimpleNamespace(logits=logits)


def happy_counts(tok):
    """Logits (happy count between the markers A and B, happy count after B): prefers the happier content."""
    happy, a, b = (tok.convert_tokens_to_ids(t) for t in ("happy", "A", "B"))

    def rule(ids):
        i, j = ids.index(a), ids.index(b)
        return float(ids[i:j].count(happy)), float(ids[j:].count(happy))

    return rule


def content_judge(**kwargs) -> LocalLLMJudge:
    tok = judge_tokenizer()
    return LocalLLMJudge(FakeLM(tok, happy_counts(tok)), tok, **{"template": TEMPLATE, **kwargs})


def test_content_preference_maps_back_through_the_shuffle():
    """The fake model prefers the happier completion wherever it is shown: with or without shuffling, the verdict
    names the happier completion of the caller's pair (a tie abstains at margin 0), and the shuffle did swap pairs."""
    prompts, pairs = PROMPTS * 8, PAIRS * 8
    judge = content_judge(batch_size=5)
    assert judge.judge(prompts, pairs, shuffle_order=False) == [0, 1, -1] * 8
    assert not judge.last_flips.any()
    out = judge.judge(prompts, pairs)
    assert out == [0, 1, -1] * 8
    assert 0 < judge.last_flips.sum() < len(pairs)  # both orders were shown
    # the margins as shown: log p(A) - log p(B) = the happy-count difference of the shown order
    shown = np.array([[2.0, -1.0, 0.0][i % 3] for i in range(len(pairs))])
    np.testing.assert_allclose(judge.last_margins, np.where(judge.last_flips, -shown, shown), atol=1e-6)


def test_as_the_trainers_oracle_through_the_judge_adapter():
    """`JudgeOracle(LocalLLMJudge(...))`, as the docs use it: labels 1.0 (a preferred), 0.0 (b) or NaN (abstained)
    name the happier completion whatever order the adapter shows."""
    from bilevel_rlhf.judges import JudgeOracle

    oracle = JudgeOracle(content_judge(), seed=3)
    a, b = [p[0] for p in PAIRS * 4], [p[1] for p in PAIRS * 4]
    labels = np.array(oracle(PROMPTS * 4, a, b))
    np.testing.assert_array_equal(labels, [1.0, 0.0, np.nan] * 4)
    np.testing.assert_array_equal(np.array(oracle(PROMPTS * 4, b, a)), [0.0, 1.0, np.nan] * 4)


def test_always_first_position_is_balanced_by_the_shuffle():
    """A judge that always answers "A": all 0 without shuffling; with it the verdict is 1 exactly on the swapped pairs,
    balanced over many pairs, reproducible from the seed, and a restored state_dict repeats the draws."""
    tok = judge_tokenizer()
    judge = LocalLLMJudge(FakeLM(tok, lambda ids: (3.0, 0.0)), tok, template=TEMPLATE, batch_size=64, seed=7)
    prompts, pairs = ["day"] * 400, [["happy", "sad"]] * 400
    assert judge.judge(prompts, pairs, shuffle_order=False) == [0] * 400
    state = judge.state_dict()
    json.dumps(state)  # plain data
    out = judge.judge(prompts, pairs)
    assert out == judge.last_flips.astype(int).tolist()
    assert 0.4 < np.mean(out) < 0.6
    again = LocalLLMJudge(FakeLM(tok, lambda ids: (3.0, 0.0)), tok, template=TEMPLATE, seed=7)
    again.judge(prompts, pairs, shuffle_order=False)  # no draws without shuffling
    assert again.judge(prompts, pairs) == out  # same seed, same draws
    judge.load_state_dict(state)
    assert judge.judge(prompts, pairs) == out
    with pytest.raises(ValueError, match="no 'rng' entry"):
        judge.load_state_dict({})


def test_margin_abstains_and_non_finite_logits_abstain():
    judge = content_judge(margin=1.0)  # |difference| 2 answers, 1 and 0 abstain
    assert judge.judge(PROMPTS, PAIRS) == [0, -1, -1]
    assert content_judge(margin=1.5).judge(PROMPTS, PAIRS, shuffle_order=False) == [0, -1, -1]
    assert content_judge(margin=0.5).judge(PROMPTS, PAIRS, shuffle_order=False) == [0, 1, -1]
    tok = judge_tokenizer()
    for bad in [(math.nan, 0.0), (math.inf, 0.0), (math.inf, math.inf)]:
        judge = LocalLLMJudge(FakeLM(tok, lambda ids, bad=bad: bad), tok, template=TEMPLATE)
        assert judge.judge(PROMPTS, PAIRS) == [-1, -1, -1]  # a swapped abstention stays -1
        assert np.isnan(judge.last_margins).all()


def test_left_padding_batches_and_positions():
    """Rows of different lengths in one batch: left padding, the attention mask and positions that skip the padding;
    on a real (random) GPT-2 the margins do not depend on the batch size."""
    judge = content_judge(batch_size=3)
    judge.judge(PROMPTS, PAIRS, shuffle_order=False)
    (ids, mask, pos), = judge.model.calls
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1 and mask[:, -1].all()
    for row_ids, row_mask, row_pos, n in zip(ids, mask, pos, lengths.tolist()):
        assert row_mask.tolist() == [0] * (ids.shape[1] - n) + [1] * n
        assert (row_ids[: ids.shape[1] - n] == judge.pad_token_id).all()
        assert row_pos[-n:].tolist() == list(range(n))

    tok = judge_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(tok))
    one = LocalLLMJudge(model, tok, template=TEMPLATE, batch_size=1).answer_margins(PROMPTS, PAIRS)
    batched = LocalLLMJudge(model, tok, template=TEMPLATE, batch_size=3).answer_margins(PROMPTS, PAIRS)
    np.testing.assert_allclose(batched, one, atol=1e-5)
    out = LocalLLMJudge(model, tok, template=TEMPLATE).judge(PROMPTS * 3, PAIRS * 3)
    assert len(out) == 9 and set(out) <= {0, 1, -1}


def test_prompt_uses_the_chat_template_when_there_is_one(tmp_path):
    tok = judge_tokenizer()
    judge = LocalLLMJudge(FakeLM(tok, happy_counts(tok)), tok, template=TEMPLATE)
    assert judge.build_prompt("the", "happy", "sad") == "which the A happy B sad ?\nAnswer:"
    tok.chat_template = "{% for m in messages %}<eos> {{ m['content'] }} <eos>{% endfor %}Answer:"
    judge = LocalLLMJudge(FakeLM(tok, happy_counts(tok)), tok, template=TEMPLATE)
    assert judge.use_chat_template
    assert judge.build_prompt("the", "happy", "sad") == "<eos> which the A happy B sad ? <eos>Answer:"
    assert judge.judge(PROMPTS, PAIRS) == [0, 1, -1]

    # from_pretrained: a saved random GPT-2 and its tokenizer
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config(tok)).save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    loaded = LocalLLMJudge.from_pretrained(tmp_path / "judge", batch_size=2, margin=0.1)
    assert loaded.use_chat_template and loaded.batch_size == 2 and loaded.margin == 0.1
    assert loaded.name.startswith("local_llm_judge:")
    assert set(loaded.judge(PROMPTS, PAIRS)) <= {0, 1, -1}
    with pytest.raises(ValueError, match="cannot load a causal LM"):
        LocalLLMJudge.from_pretrained(tmp_path / "missing")


def test_answer_tokens_with_and_without_leading_space():
    """A byte-level BPE (GPT-2's kind) with both "A" and " A" as tokens: the probability of "A" is the sum of both."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["A B A B happy A B"] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    ids = {s: tok.encode(s, add_special_tokens=False) for s in ("A", " A", "B", " B")}
    assert all(len(v) == 1 for v in ids.values()) and ids["A"] != ids[" A"]

    class SpaceLM(torch.nn.Module):  # p(" A") = p("A") = p(" B"): log p(A) - log p(B) = log 2
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask, position_ids):
            logits = torch.full((*input_ids.shape, len(tok)), -30.0)
            for s in ("A", " A", " B"):
                logits[:, -1, ids[s][0]] = 0.0
            return SimpleNamespace(logits=logits)

    judge = LocalLLMJudge(SpaceLM(), tok, template="{prompt} A {a} B {b}")
    assert judge.answer_ids == {"A": [ids["A"][0], ids[" A"][0]], "B": [ids["B"][0], ids[" B"][0]]}
    np.testing.assert_allclose(judge.answer_margins(["x"], [["y", "z"]]), [math.log(2)], atol=1e-5)
    assert judge.judge(["x"], [["y", "z"]], shuffle_order=False) == [0]


def test_errors_are_clear():
    tok = judge_tokenizer([w for w in JUDGE_WORDS if w not in "AB"])  # no "A" or "B" in its vocabulary
    with pytest.raises(ValueError, match="no single token for the answer 'A'.*needs a tokenizer with both"):
        LocalLLMJudge(FakeLM(tok, lambda ids: (0.0, 0.0)), tok, template=TEMPLATE)
    judge = content_judge()
    for kwargs, match in [(dict(batch_size=0), "batch_size"), (dict(margin=-1.0), "margin"),
                          (dict(margin=math.nan), "margin"), (dict(template="{prompt} {a}"), r"\{b\}"),
                          (dict(template="{prompt} {a} {b} {c}"), "only the fields")]:
        with pytest.raises(ValueError, match=match):
            content_judge(**kwargs)
    with pytest.raises(ValueError, match=r"completions\[1\] must be a pair"):
        judge.judge(["a", "b"], [["x", "y"], ["x"]])
    with pytest.raises(ValueError, match="2 prompts but 1 completion pairs"):
        judge.judge(["a", "b"], [["x", "y"]])
    with pytest.raises(TypeError, match="prompts must be a list"):
        judge.judge("a", [["x", "y"]])
    assert judge.judge([], []) == []
    torch.manual_seed(0)
    short = LocalLLMJudge(GPT2LMHeadModel(gpt2_config(judge_tokenizer(), n_positions=8)), judge_tokenizer(),
                          template=TEMPLATE)
    with pytest.raises(ValueError, match="question for pair 1 has 9 tokens, more than the model's 8 positions"):
        short.judge(["day", "the day"], [["happy", "sad"], ["happy", "sad"]])


def test_agreement_script(tmp_path):
    """scripts/judge_agreement.py end to end: a random GPT-2 with the word-level tokenizer (and a chat template)
    samples the pairs and judges them; the report's counts add up."""
    tok = judge_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %} Answer:"
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config(tok, n_positions=256)).save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    script = load_script("judge_agreement")
    out = tmp_path / "agreement.json"
    report = script.main(["--model", str(tmp_path / "judge"), "--policy", str(tmp_path / "judge"), "--num_pairs", "6",
                          "--max_completion_length", "6", "--batch_size", "4", "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["num_pairs"] == 6 and 0 <= report["vader_ties"] <= 6
    assert report["agreement"]["n"] == 6 - report["vader_ties"]  # margin 0: a random model does not tie
    bias = report["position_bias"]
    assert bias["answers_A_given_order"]["n"] == 6 and bias["answers_A_swapped_order"]["n"] == 6
    assert report["abstain_rate"] == 0.0 and report["seconds_per_pair"] > 0
    assert report["machine"]["device"] == "cpu" and report["machine"]["cpu_count"] >= 1
    tweets = script.main(["--model", str(tmp_path / "judge"), "--completions", "tweets", "--num_pairs", "3",
                          "--output", str(tmp_path / "tweets.json")])
    assert tweets["num_pairs"] == 3 and tweets["policy"] is None
    lo, hi = script.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert all(math.isnan(x) for x in script.wilson_interval(0, 0))
