"""Mutation check: do the tests fail when the mathematics breaks?

Applies each deliberate bug of `scripts/mutations.py` to a scratch copy of the repository, one at a time, runs the
tests listed for it, and reports whether they catch it:

    caught    some selected test failed (or could not even be collected: the mutation broke an import)
    survived  every selected test passed: the suite does not notice this bug
    timeout   the tests ran past --timeout (not counted as caught)
    error     pytest itself could not run them (usage error, no tests collected, internal error)

    .venv/bin/python scripts/mutation_check.py                      # every mutation (slow: not part of CI)
    .venv/bin/python scripts/mutation_check.py --only ID [ID ...]   # some of them
    .venv/bin/python scripts/mutation_check.py --list               # the mutations
    .venv/bin/python scripts/mutation_check.py --check              # only validate the list (fast, no tests)
    .venv/bin/python scripts/mutation_check.py --json results.json  # also write machine-readable results

The repository (without .git, .venv, caches and outputs) is copied once into a temporary folder; every pytest run uses
this interpreter, runs in the copy, and has the copy first on PYTHONPATH, so the copy's `bilevel_rlhf` is imported
rather than the editable install (checked before anything else runs). The selected tests first run once on the
unmutated copy: a failing baseline would make every mutation look caught, so the check stops there.

Exit status: 0 whatever the mutations' results; 2 for a bad mutation list (a snippet not found exactly once, an
unknown id); 3 when the scratch copy is not what gets imported or the baseline fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY_IGNORE = (".git", ".venv", "__pycache__", ".pytest_cache", "outputs", "runs", "build", "dist", "*.egg-info",
               "*.pyc")
TAIL_CHARS = 3000


class HarnessError(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def load_mutations() -> list:
    spec = importlib.util.spec_from_file_location("mutations", ROOT / "scripts" / "mutations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.MUTATIONS)


def check_mutations(mutations: list, root: Path = ROOT) -> list[str]:
    """Problems of the list: duplicate ids, `new == old`, `old` not occurring exactly once in its file."""
    problems, seen, texts = [], set(), {}
    for m in mutations:
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id")
        seen.add(m.id)
        if m.new == m.old:
            problems.append(f"{m.id} ({m.path}): `new` equals `old`")
        if not m.tests:
            problems.append(f"{m.id} ({m.path}): no tests selected")
        path = root / m.path
        if m.path not in texts:
            texts[m.path] = path.read_text() if path.is_file() else None
        if texts[m.path] is None:
            problems.append(f"{m.id}: file {m.path} not found")
            continue
        count = texts[m.path].count(m.old)
        if count != 1:
            problems.append(f"{m.id} ({m.path}): `old` occurs {count} times, must occur exactly once: {m.old!r}")
    return problems


def make_scratch(root: Path) -> Path:
    """A copy of the repository (no .git, .venv, caches, outputs) in a new temporary folder."""
    scratch = Path(tempfile.mkdtemp(prefix="mutation_check_")) / "repo"
    shutil.copytree(root, scratch, ignore=shutil.ignore_patterns(*COPY_IGNORE), symlinks=True)
    return scratch


def test_env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(scratch)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no stale .pyc of a mutated file (mtimes have 1 s resolution)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def check_import_location(scratch: Path, env: dict[str, str]) -> str:
    """The file `import bilevel_rlhf` resolves to in the scratch copy; HarnessError unless it is the copy's."""
    code = "import bilevel_rlhf; print(bilevel_rlhf.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=env, capture_output=True, text=True, timeout=300)
    found = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not Path(found).resolve().is_relative_to(scratch.resolve()):
        raise HarnessError(
            f"the scratch copy's bilevel_rlhf is not the one imported (got {found or proc.stderr.strip()[-500:]!r}, "
            f"expected a file under {scratch})", 3)
    return found


def run_pytest(tests: list[str], scratch: Path, env: dict[str, str], timeout: float) -> dict:
    """One pytest process on `tests` in the scratch copy; its whole process group is killed on timeout."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C): do not leave the tests running
                _kill_group(proc)
        log.seek(0)
        output = log.read()
    return {"returncode": None if timed_out else proc.returncode, "timed_out": timed_out,
            "seconds": time.perf_counter() - t0, "tail": output[-TAIL_CHARS:]}


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def classify(run: dict) -> tuple[str, str]:
    """(result, note) of a mutated run, from pytest's exit code."""
    if run["timed_out"]:
        return "timeout", "ran past the timeout"
    rc = run["returncode"]
    if rc == 0:
        return "survived", "all selected tests passed"
    if rc == 1:
        return "caught", "a test failed"
    if rc == 2:
        return "caught", "collection error or interrupted (e.g. the mutation broke an import)"
    names = {3: "pytest internal error", 4: "pytest usage error (a test path not found?)", 5: "no tests collected"}
    return "error", names.get(rc, f"pytest exit status {rc}")


def apply_mutation(scratch: Path, m) -> str:
    """Write the mutated file into the copy; returns the original text (to restore)."""
    path = scratch / m.path
    original = path.read_text()
    if original.count(m.old) != 1:
        raise HarnessError(f"mutation {m.id}: `old` does not occur exactly once in {m.path}", 2)
    path.write_text(original.replace(m.old, m.new, 1))
    return original


def unique(items):
    return list(dict.fromkeys(items))


def print_table(rows: list[dict]) -> None:
    widths = {"id": max([2] + [len(r["id"]) for r in rows]), "path": max([4] + [len(r["path"]) for r in rows])}
    print(f"\n{'id':<{widths['id']}}  {'file':<{widths['path']}}  {'result':<8}  {'seconds':>7}  what")
    for r in rows:
        print(f"{r['id']:<{widths['id']}}  {r['path']:<{widths['path']}}  {r['result']:<8}  {r['seconds']:>7.1f}  "
              f"{r['what']}")


def summarize(rows: list[dict]) -> dict:
    counts = {k: sum(r["result"] == k for r in rows) for k in ("caught", "survived", "timeout", "error")}
    n = len(rows)
    return {**counts, "total": n, "percent": 100.0 * counts["caught"] / n if n else 0.0}


def write_json(path: str | None, report: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Apply the mutations of scripts/mutations.py one at a time and "
                                                 "report which ones the selected tests catch.")
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--check", action="store_true",
                        help="only check the list (each `old` occurs exactly once, `new` differs); no tests run")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation (default 600)")
    parser.add_argument("--baseline-timeout", type=float, default=3600.0,
                        help="seconds for the unmutated baseline run (default 3600)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON (rewritten after each mutation)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = parser.parse_args(argv)

    try:
        mutations = load_mutations()
        duplicates = sorted({m.id for m in mutations if sum(n.id == m.id for n in mutations) > 1})
        if duplicates:
            raise HarnessError(f"duplicate mutation ids: {', '.join(duplicates)}", 2)
        if args.only:  # only the selected mutations' snippets are checked, so a subset runs while others are stale
            by_id = {m.id: m for m in mutations}
            unknown = [i for i in args.only if i not in by_id]
            if unknown:
                raise HarnessError(f"unknown mutation ids: {', '.join(unknown)} (see --list)", 2)
            mutations = [by_id[i] for i in unique(args.only)]
        problems = check_mutations(mutations)
        if problems:
            raise HarnessError("invalid mutation list:\n  " + "\n  ".join(problems), 2)
        if args.list:
            width = max(len(m.id) for m in mutations)
            for m in mutations:
                print(f"{m.id:<{width}}  {m.path}  {m.what}")
            return 0
        if args.check:
            files = len({m.path for m in mutations})
            print(f"OK: {len(mutations)} mutations in {files} files; every `old` occurs exactly once and differs "
                  f"from `new`")
            return 0
        return run_all(mutations, args)
    except HarnessError as e:
        print(f"mutation_check: error: {e}", file=sys.stderr)
        return e.status


def run_all(mutations: list, args) -> int:
    scratch = make_scratch(ROOT)
    print(f"scratch copy: {scratch}", flush=True)
    try:
        env = test_env(scratch)
        where = check_import_location(scratch, env)
        print(f"bilevel_rlhf imported from the copy: {where}", flush=True)
        selected = unique(t for m in mutations for t in m.tests)
        print(f"baseline: {len(selected)} test selections on the unmutated copy ...", flush=True)
        baseline = run_pytest(selected, scratch, env, args.baseline_timeout)
        if baseline["timed_out"] or baseline["returncode"] != 0:
            why = "timed out" if baseline["timed_out"] else f"pytest exit status {baseline['returncode']}"
            raise HarnessError(
                f"the baseline (unmutated) run of the selected tests fails ({why}); fix it first, or every mutation "
                f"would look caught. Its output ends with:\n{baseline['tail']}", 3)
        print(f"baseline passed in {baseline['seconds']:.1f} s", flush=True)
        report = {"baseline": {"tests": selected, "seconds": baseline["seconds"]}, "timeout": args.timeout,
                  "results": [], "summary": {}}
        rows = report["results"]
        for i, m in enumerate(mutations, 1):
            original = apply_mutation(scratch, m)
            try:
                run = run_pytest(list(m.tests), scratch, env, args.timeout)
            finally:
                (scratch / m.path).write_text(original)
            result, note = classify(run)
            rows.append({"id": m.id, "path": m.path, "what": m.what, "tests": list(m.tests), "result": result,
                         "note": note, "returncode": run["returncode"], "seconds": round(run["seconds"], 1),
                         "tail": run["tail"]})
            report["summary"] = summarize(rows)
            write_json(args.json, report)
            print(f"[{i}/{len(mutations)}] {m.id}: {result} ({run['seconds']:.1f} s)", flush=True)
        print_table(rows)
        s = summarize(rows)
        print(f"\ncaught {s['caught']} of {s['total']} ({s['percent']:.0f}%); survived {s['survived']}, "
              f"timeout {s['timeout']}, error {s['error']}")
        for r in rows:
            if r["result"] in ("survived", "timeout", "error"):
                print(f"  {r['result']}: {r['id']} ({r['path']}): {r['what']}" +
                      (f" [{r['note']}]" if r["result"] == "error" else ""))
        return 0
    finally:
        if args.keep:
            print(f"scratch copy kept: {scratch}")
        else:
            shutil.rmtree(scratch.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
