"""The mutation list of scripts/mutation_check.py stays valid as the code changes (no mutation is run here)."""

import re
from collections import Counter
from pathlib import Path

import pytest
from script_loader import load_script

ROOT = Path(__file__).resolve().parent.parent
MUTATIONS = load_script("mutations").MUTATIONS


def test_ids_are_unique_slugs():
    counts = Counter(m.id for m in MUTATIONS)
    assert not [i for i, n in counts.items() if n > 1], "duplicate mutation ids"
    bad = [m.id for m in MUTATIONS if not re.fullmatch(r"[a-z0-9_]+", m.id)]
    assert not bad, f"ids must be short slugs [a-z0-9_]: {bad}"


@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.id)
def test_snippet_occurs_exactly_once_and_changes_it(m):
    path = ROOT / m.path
    assert path.is_file(), f"{m.id}: product file {m.path} not found"
    assert not m.path.startswith("tests/"), f"{m.id}: mutations go into product code, not {m.path}"
    count = path.read_text().count(m.old)
    assert count == 1, f"{m.id}: `old` occurs {count} times in {m.path}, must occur exactly once: {m.old!r}"
    assert m.new != m.old, f"{m.id}: `new` equals `old`"
    assert m.what.strip() and "\n" not in m.what, f"{m.id}: `what` must be one line"


@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.id)
def test_selected_tests_exist(m):
    assert m.tests, f"{m.id}: no tests selected"
    for node in m.tests:
        file, _, name = node.partition("::")
        path = ROOT / file
        assert file.startswith("tests/") and path.is_file(), f"{m.id}: test file {file} not found"
        if name:  # a node id: its test function must exist (parametrized ids end with [...])
            function = name.split("::")[-1].split("[")[0]
            assert re.search(rf"^\s*def {re.escape(function)}\(", path.read_text(), re.M), (
                f"{m.id}: no test {function} in {file}"
            )
