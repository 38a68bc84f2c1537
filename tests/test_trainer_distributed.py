"""A real 2-process run on CPU (torchrun, gloo): both ranks finish and their parameters agree after every step."""

import json
import os
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out_dir, mode: str, stage: str) -> list[dict]:
    """Both ranks' results of `tests/dist_train.py OUT_DIR MODE STAGE` under torchrun with 2 CPU processes."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           os.path.join(os.path.dirname(__file__), "dist_train.py"), str(out_dir), mode, stage]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out_dir / f"rank{r}-{stage}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("mode", ["plain", "fused"])
def test_two_process_run_keeps_ranks_in_sync(tmp_path, mode):
    ranks = _torchrun(tmp_path, mode, "full")
    assert all(r["world_size"] == 2 and "MULTI_CPU" in r["distributed_type"] for r in ranks)
    assert all(r["fused"] == (mode == "fused") for r in ranks)
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 8
    for step, (a, b) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"])):
        for role in a:
            assert a[role] == pytest.approx(b[role], rel=1e-6, abs=1e-6), (step, role)
    # the parameters did move, and the oracle counter counts both ranks' pairs (2 x 4 pairs per iteration)
    assert ranks[0]["steps"][0]["policy_theta"] != ranks[0]["steps"][-1]["policy_theta"]
    assert ranks[0]["steps"][0]["reward_model"] != ranks[0]["steps"][-1]["reward_model"]
    # each rank rolled out its own half of every global batch of prompts (4 optimizer steps per iteration, or 1)
    iterations = 2 if mode == "plain" else 8
    assert [len(p) for p in ranks[0]["rollout_prompts"]] == [4] * iterations
    assert ranks[0]["rollout_prompts"] != ranks[1]["rollout_prompts"]
    assert ranks[0]["oracle_queries"] == ranks[1]["oracle_queries"] == iterations * 2 * 4


def test_two_process_resume_equals_uninterrupted(tmp_path):
    """Stop after iteration 0 (a checkpoint at step 4), resume with 2 processes: every rank ends with the parameters
    and oracle count of the uninterrupted run (each rank restores its own oracle RNG state)."""
    full = _torchrun(tmp_path / "full", "plain", "full")
    _torchrun(tmp_path / "split", "plain", "first")
    resumed = _torchrun(tmp_path / "split", "plain", "resumed")
    for rank in (0, 1):
        assert len(resumed[rank]["steps"]) == 4  # steps 5..8
        assert resumed[rank]["oracle_queries"] == full[rank]["oracle_queries"]
        for role, checksum in full[rank]["steps"][-1].items():
            assert resumed[rank]["steps"][-1][role] == pytest.approx(checksum, rel=1e-5, abs=1e-6), (rank, role)
        assert resumed[rank]["rollout_prompts"] == full[rank]["rollout_prompts"][1:]  # iteration 1's prompts
