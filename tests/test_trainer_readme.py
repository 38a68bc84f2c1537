"""Runs tests/readme_example.py exactly as written (the README's pipeline)."""

import os
import runpy


def test_readme_example_runs(capsys):
    namespace = runpy.run_path(os.path.join(os.path.dirname(__file__), "readme_example.py"))
    assert namespace["trainer"].state.global_step == 6
    assert namespace["trainer"].oracle_queries == 6 * 8  # 6 iterations x 8 prompts x 1 pair
    assert "oracle queries: 48" in capsys.readouterr().out
    assert namespace["policy"].config.vocab_size == 17
