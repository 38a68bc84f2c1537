"""The README's promises: its code block is the tested example, and CI runs its test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_pipeline_is_the_tested_example():
    blocks = re.findall(r"```python\n(.*?)```", _readme(), flags=re.S)
    example = (ROOT / "tests" / "readme_example.py").read_text()
    assert example in blocks, "README's python block differs from tests/readme_example.py"


def test_ci_runs_the_readme_test_command():
    match = re.search(r"^(bash scripts/run_tests\.sh)\s", _readme(), flags=re.M)
    assert match, "README lost its test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert match.group(1) in ci.splitlines(), ".ci/run does not call the README's test command"


def test_readme_has_no_unfilled_placeholders():
    placeholders = re.findall(r"\b[A-Z][A-Z_]+_(?:SECTION|TIME)\b", _readme())
    assert not placeholders, placeholders
