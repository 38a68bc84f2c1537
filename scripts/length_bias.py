"""Does the learned reward overrate length? Per run, per quarter of training: the mean completion length (characters)
of the logged samples and the Pearson correlation of length with r_x and with the oracle's score.

    python scripts/length_bias.py outputs/frontier_vzero/w0.1 outputs/ht_exactkl

Reads each run's `completions.jsonl` (written with `log_completions: true`: a few of theta's completions per logging
step, with the oracle's score and r_x's). Folders are searched for runs; a run without the file is skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def quarters(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("oracle_score") is not None and r.get("reward") is not None]
    if len(rows) < 40:
        return []
    steps = np.array([r["step"] for r in rows])
    length = np.array([len(r["completion"]) for r in rows], dtype=float)
    r_x = np.array([r["reward"] for r in rows])
    oracle = np.array([r["oracle_score"] for r in rows])
    edges = np.quantile(steps, [0, 0.25, 0.5, 0.75, 1.0])
    cells = []
    for q in range(4):
        m = (steps >= edges[q]) & ((steps < edges[q + 1]) if q < 3 else (steps <= edges[q + 1]))
        cells.append(f"{length[m].mean():5.1f} {np.corrcoef(r_x[m], length[m])[0, 1]:+.2f} "
                     f"{np.corrcoef(oracle[m], length[m])[0, 1]:+.2f}")
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+")
    args = p.parse_args()
    print("| run | " + " | ".join(f"quarter {q}: length, corr(r_x, length), corr(oracle, length)" for q in range(1, 5))
          + " |")
    print("|---|---|---|---|---|")
    for folder in args.folders:
        for log in sorted(Path(folder).rglob("completions.jsonl")):
            cells = quarters(log)
            if cells:
                print(f"| {log.parent} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
