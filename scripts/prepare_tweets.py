"""Regenerate `bilevel_rlhf/data/tweets.jsonl` from the vaderSentiment 3.3.2 source distribution.

The 4,200 tweet-like texts with mean human sentiment ratings (-4..4) of Hutto & Gilbert (ICWSM 2014)
ship in that sdist as `additional_resources/hutto_ICWSM_2014.tar.gz` -> `tweets_GroundTruth.txt`
(CRLF lines `id<TAB>mean rating<TAB>text`, MIT licence). This script turns it into JSONL, one object
per line `{"id": int, "human_rating": float, "text": str}`, in file order. The only changes to the
text: HTML entities (`&amp;`, `&lt;`, `&gt;`) are unescaped and surrounding whitespace is stripped.
The output is byte-for-byte deterministic (checked against the shipped file with `--check`).

    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d /tmp/vader_src
    python scripts/prepare_tweets.py --source /tmp/vader_src/vaderSentiment-3.3.2.tar.gz
    python scripts/prepare_tweets.py --source /tmp/vader_src/vaderSentiment-3.3.2.tar.gz --check

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


def read_ground_truth(source: Path) -> bytes:
    """Return the raw bytes of `tweets_GroundTruth.txt` from the sdist or from the inner archive."""
    if not source.is_file():
        raise FileNotFoundError(f"source archive not found: {source}")
    with tarfile.open(source, "r:gz") as outer:
        names = outer.getnames()
        if INNER_ARCHIVE in names:  # the vaderSentiment sdist
            inner_bytes = outer.extractfile(INNER_ARCHIVE).read()
            with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
                return inner.extractfile(TWEETS_MEMBER).read()
        if TWEETS_MEMBER in names:  # hutto_ICWSM_2014.tar.gz itself
            return outer.extractfile(TWEETS_MEMBER).read()
    raise ValueError(f"{source} contains neither {INNER_ARCHIVE} nor {TWEETS_MEMBER}")


def parse_ground_truth(raw: bytes) -> list[dict]:
    """Parse `id<TAB>rating<TAB>text` CRLF lines into records, checking every field."""
    records = []
    for lineno, line in enumerate(raw.decode("utf-8").split("\r\n"), start=1):
        if not line:
            continue
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise ValueError(f"tweets_GroundTruth.txt line {lineno}: expected 3 tab-separated fields")
        tweet_id, rating, text = int(fields[0]), float(fields[1]), html.unescape(fields[2]).strip()
        if not -4.0 <= rating <= 4.0 or not text:
            raise ValueError(f"tweets_GroundTruth.txt line {lineno}: rating {rating} or empty text")
        records.append({"id": tweet_id, "human_rating": rating, "text": text})
    ids = [r["id"] for r in records]
    if len(records) != N_TWEETS or sorted(ids) != list(range(1, N_TWEETS + 1)):
        raise ValueError(f"expected ids 1..{N_TWEETS} once each, got {len(records)} records")
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
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSONL file to write")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 unless --output equals the regenerated file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        source = args.source if args.source is not None else fetch_sdist(Path(tmp))
        raw = read_ground_truth(source)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != TWEETS_SHA256:
        raise ValueError(f"{TWEETS_MEMBER} in {source} has sha256 {digest}, expected {TWEETS_SHA256}")
    data = to_jsonl(parse_ground_truth(raw))

    if args.check:
        same = args.output.is_file() and args.output.read_bytes() == data
        print(f"{args.output}: {'up to date' if same else 'DIFFERS from the regenerated file'}")
        return 0 if same else 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    print(f"wrote {N_TWEETS} tweets to {args.output} (sha256 {hashlib.sha256(data).hexdigest()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
