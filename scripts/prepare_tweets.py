"""Regenerate `bilevel_rlhf/data/tweets.jsonl` (or, with `--corpus movie_reviews`, `movie_reviews.jsonl`) from the
vaderSentiment 3.3.2 source distribution.

The 4,200 tweet-like texts with mean human sentiment ratings (-4..4) of Hutto & Gilbert (ICWSM 2014)
ship in that sdist as `additional_resources/hutto_ICWSM_2014.tar.gz` -> `tweets_GroundTruth.txt`
(CRLF lines `id<TAB>mean rating<TAB>text`, MIT licence). This script turns it into JSONL, one object
per line `{"id": int, "human_rating": float, "text": str}`, in file order. The only changes to the
text: HTML entities (`&amp;`, `&lt;`, `&gt;`) are unescaped and surrounding whitespace is stripped.
The output is byte-for-byte deterministic (checked against the shipped file with `--check`).

    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d /tmp/vader_src
    python scripts/prepare_tweets.py --source /tmp/vader_src/vaderSentiment-3.3.2.tar.gz
    python scripts/prepare_tweets.py --source /tmp/vader_src/vaderSentiment-3.3.2.tar.gz --check
    python scripts/prepare_tweets.py --corpus movie_reviews --source /tmp/vader_src/vaderSentiment-3.3.2.tar.gz

`--corpus movie_reviews`: the 10,605 movie-review snippets (`movieReviewSnippets_GroundTruth.txt`, the same format
and licence), the data of the movie-review task.

Without `--source` the sdist is fetched with `pip download` into a temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "bilevel_rlhf" / "data" / "tweets.jsonl"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
TWEETS_MEMBER = "hutto_ICWSM_2014/tweets_GroundTruth.txt"
# sha256 of tweets_GroundTruth.txt inside vaderSentiment 3.3.2: a different file is refused
TWEETS_SHA256 = "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f"
N_TWEETS = 4200
MOVIES_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
MOVIES_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
N_MOVIES = 10605
MOVIES_OUTPUT = REPO_ROOT / "bilevel_rlhf" / "data" / "movie_reviews.jsonl"


def corpus(name: str) -> tuple[str, str, int, Path]:
    """(member in hutto_ICWSM_2014.tar.gz, its sha256, its record count, the shipped JSONL) of a corpus."""
    if name == "tweets":
        return TWEETS_MEMBER, TWEETS_SHA256, N_TWEETS, DEFAULT_OUTPUT
    if name == "movie_reviews":
        return MOVIES_MEMBER, MOVIES_SHA256, N_MOVIES, MOVIES_OUTPUT
    raise ValueError(f"corpus must be 'tweets' or 'movie_reviews', got {name!r}")


def read_ground_truth(source: Path, member: str | None = None) -> bytes:
    """Return the raw bytes of `member` (default `tweets_GroundTruth.txt`) from the sdist or the inner archive."""
    member = TWEETS_MEMBER if member is None else member
    if not source.is_file():
        raise FileNotFoundError(f"source archive not found: {source}")
    with tarfile.open(source, "r:gz") as outer:
        names = outer.getnames()
        if INNER_ARCHIVE in names:  # the vaderSentiment sdist
            inner_bytes = outer.extractfile(INNER_ARCHIVE).read()
            with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
                return inner.extractfile(member).read()
        if member in names:  # hutto_ICWSM_2014.tar.gz itself
            return outer.extractfile(member).read()
    raise ValueError(f"{source} contains neither {INNER_ARCHIVE} nor {member}")


def parse_ground_truth(raw: bytes, count: int = N_TWEETS, name: str = "tweets_GroundTruth.txt") -> list[dict]:
    """Parse `id<TAB>rating<TAB>text` CRLF lines into records, checking every field and that ids are 1..count."""
    records = []
    for lineno, line in enumerate(raw.decode("utf-8").split("\r\n"), start=1):
        if not line:
            continue
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise ValueError(f"{name} line {lineno}: expected 3 tab-separated fields")
        tweet_id, rating, text = int(fields[0]), float(fields[1]), html.unescape(fields[2]).strip()
        if not -4.0 <= rating <= 4.0 or not text:
            raise ValueError(f"{name} line {lineno}: rating {rating} or empty text")
        records.append({"id": tweet_id, "human_rating": rating, "text": text})
    ids = [r["id"] for r in records]
    if len(records) != count or sorted(ids) != list(range(1, count + 1)):
        raise ValueError(f"expected ids 1..{count} once each, got {len(records)} records")
    return records


def to_jsonl(records: list[dict]) -> bytes:
    lines = (json.dumps(r, ensure_ascii=False, separators=(", ", ": ")) for r in records)
    return ("\n".join(lines) + "\n").encode("utf-8")


def fetch_sdist(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "vaderSentiment==3.3.2", "-d", str(dest)]
    subprocess.run(cmd, check=True)
    return dest / SDIST_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None,
                        help=f"{SDIST_NAME} or hutto_ICWSM_2014.tar.gz (default: pip download it)")
    parser.add_argument("--corpus", choices=("tweets", "movie_reviews"), default="tweets")
    parser.add_argument("--output", type=Path, default=None, help="JSONL file to write (default: the shipped one)")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 unless --output equals the regenerated file")
    args = parser.parse_args(argv)

    member, sha256, count, shipped = corpus(args.corpus)
    args.output = shipped if args.output is None else args.output
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source if args.source is not None else fetch_sdist(Path(tmp))
        raw = read_ground_truth(source, member)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise ValueError(f"{member} in {source} has sha256 {digest}, expected {sha256}")
    data = to_jsonl(parse_ground_truth(raw, count, Path(member).name))

    if args.check:
        same = args.output.is_file() and args.output.read_bytes() == data
        print(f"{args.output}: {'up to date' if same else 'DIFFERS from the regenerated file'}")
        return 0 if same else 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    print(f"wrote {count} {args.corpus} records to {args.output} (sha256 {hashlib.sha256(data).hexdigest()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
