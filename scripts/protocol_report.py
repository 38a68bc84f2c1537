"""The field's view of a set of runs trained with the evaluation protocol (`eval_protocol.json` in each run folder).

    python scripts/protocol_report.py outputs/frontier --output_dir outputs/frontier/report
    python scripts/protocol_report.py RUN_DIR [RUN_DIR ...] --kls 2 4 6 --baseline "online_dpo (beta 0.1)"

Folders are searched for runs (any folder holding eval_protocol.json). Writes into OUTPUT_DIR:
  - frontier.png: oracle score against KL to the initial policy, every evaluation of every run a point, the upper
    envelope per method a line;
  - queries.png: oracle score and win rate against training queries, mean and 95% interval over seeds per setting;
  - report.md / report.json: the final-budget table (mean ± std over seeds per setting), the table at matched KL,
    each method's frontier against the baseline method's over the KL range both cover, and the training queries each
    setting's mean curve needs to reach the baseline setting's final mean score.
A setting is a method and its KL weight (`beta` of the TRL baselines, `tau_0` of the bilevel methods).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bilevel_rlhf.eval_callback import RECORDS_NAME  # noqa: E402
from bilevel_rlhf.frontier import (  # noqa: E402
    frontier_comparison, group_by, load_run, matched_kl_rows, mean_curve, plot_frontier, plot_query_curves,
    queries_to_reach,
)

FINAL = ("score", "win_rate", "kl", "distinct_1", "distinct_2", "length")


def completed(run: Path) -> bool:
    """Whether a run is finished: its summary.json says completed or, without one, its records come from
    scripts/evaluate_checkpoints.py (after training) rather than from a callback of a run still training."""
    summary = run / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text()).get("status") == "completed"
    try:
        return "eval_steps" not in json.loads((run / RECORDS_NAME).read_text())
    except ValueError:
        return False


def find_runs(paths: list[str], include_incomplete: bool = False) -> list[Path]:
    """Run folders under `paths`; a run still training (records but no summary.json) or interrupted is left out
    unless `include_incomplete`, and named."""
    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise SystemExit(f"protocol_report: {p} does not exist")
        found = [p] if (p / RECORDS_NAME).is_file() else sorted(f.parent for f in p.rglob(RECORDS_NAME))
        if not found:
            raise SystemExit(f"protocol_report: no {RECORDS_NAME} under {p}")
        runs += found
    if include_incomplete:
        return runs
    left_out = [r for r in runs if not completed(r)]
    if left_out:
        print("protocol_report: left out, not completed: " + ", ".join(str(r) for r in left_out), file=sys.stderr)
    return [r for r in runs if r not in left_out]


def _cell(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "-"
    return f"{values[0]:.3f}" if len(values) == 1 else f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def report(runs, kls: list[float], baseline: str | None) -> tuple[dict, str]:
    settings = group_by(runs, "setting")
    lines = ["## Final budget", "", "| setting | runs | queries | " + " | ".join(FINAL) + " |", "|" + "---|" * (3 + len(FINAL))]
    final = {}
    for setting, members in settings.items():
        last = [r.records[-1] for r in members]
        final[setting] = {m: [getattr(x, m) for x in last] for m in FINAL + ("train_queries",)}
        queries = int(np.mean([x.train_queries or 0 for x in last]))
        lines.append(f"| {setting} | {len(members)} | {queries} | " + " | ".join(_cell(final[setting][m]) for m in FINAL) + " |")

    matched = matched_kl_rows(runs, kls)
    lines += ["", "## Oracle score at matched KL", "",
              "Each run's score where its KL to the initial policy first reaches k; mean ± 95% half-width over the "
              "runs that reach it (reached / runs).", "",
              "| setting | " + " | ".join(f"KL {k:g}" for k in kls) + " |", "|" + "---|" * (1 + len(kls))]
    for setting, rows in matched.items():
        cells = []
        for row in rows:
            if row["runs"] == 0:
                cells.append(f"- (0/{row['of']})")
            else:
                half = "" if math.isnan(row["ci95"]) else f" ± {row['ci95']:.3f}"
                cells.append(f"{row['mean']:.3f}{half} ({row['runs']}/{row['of']})")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")

    out = {"final": final, "matched_kl": matched}
    methods = group_by(runs, "method")
    base_method = None
    if baseline is not None:
        if baseline not in settings:
            raise SystemExit(f"protocol_report: --baseline {baseline!r} is not a setting of these runs: {sorted(settings)}")
        base_method = settings[baseline][0].method
        lines += ["", f"## Frontiers against {base_method}'s", "",
                  "Upper envelopes of every evaluation of every run (score at KL <= k), compared on the KL range both "
                  "cover.", "", "| method | KL range | fraction at or above | min diff | max diff |", "|---|---|---|---|---|"]
        out["frontier_vs_baseline"] = {}
        for method, members in methods.items():
            if method == base_method:
                continue
            c = frontier_comparison(members, methods[base_method])
            out["frontier_vs_baseline"][method] = c
            lines.append(f"| {method} | {c['kl_range'][0]:.2f} - {c['kl_range'][1]:.2f} | {c['fraction_at_or_above']:.2f} "
                         f"| {c['min_diff']:+.3f} | {c['max_diff']:+.3f} |")
        target = float(np.mean(final[baseline]["score"]))
        lines += ["", f"## Training queries to reach {baseline}'s final mean score ({target:.3f})", "",
                  "On each setting's mean curve over seeds (linear between evaluations).", "",
                  "| setting | queries | fraction of the baseline's |", "|---|---|---|"]
        out["queries_to_reach"] = {"target": target}
        base_q = float(np.mean(final[baseline]["train_queries"]))
        for setting, members in settings.items():
            curve = mean_curve(members, "score")
            q = queries_to_reach(curve["queries"], curve["mean"], target)
            out["queries_to_reach"][setting] = q
            lines.append(f"| {setting} | {'not reached' if math.isinf(q) else f'{q:.0f}'} | "
                         f"{'-' if math.isinf(q) else f'{q / base_q:.2f}'} |")
    return out, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders, or folders to search for them")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--kls", type=float, nargs="+", default=[2.0, 4.0, 6.0, 8.0],
                        help="KL values of the matched-KL table (default 2 4 6 8)")
    parser.add_argument("--include_incomplete", action="store_true",
                        help="also read runs still training or interrupted (no completed summary.json)")
    parser.add_argument("--baseline", default=None,
                        help='the setting the others are compared with, e.g. "online_dpo (beta 0.1)"')
    args = parser.parse_args(argv)
    runs = [load_run(p) for p in find_runs(args.paths, args.include_incomplete)]
    if not runs:
        raise SystemExit("protocol_report: no completed run to report")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, text = report(runs, args.kls, args.baseline)
    data["runs"] = [{"name": r.name, "setting": r.setting, "seed": r.seed} for r in runs]
    data["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    (out_dir / "report.json").write_text(json.dumps(data, indent=1, default=float) + "\n")
    (out_dir / "report.md").write_text(text)
    plot_frontier(runs, out_dir / "frontier.png")
    target = None
    if "queries_to_reach" in data:
        target = (f"{args.baseline}: final mean", data["queries_to_reach"]["target"])
    plot_query_curves(runs, out_dir / "queries.png", target=target)
    print(text)
    print("written: " + ", ".join(str(out_dir / n) for n in ("report.md", "report.json", "frontier.png", "queries.png")))


if __name__ == "__main__":
    main()
