"""Real 2-process runs on CPU (torchrun, gloo) under accelerate's DDP, FSDP2 and DeepSpeed ZeRO-2
(`tests/dist_train.py`): the engine is active, every rank holds the same parameters after every optimizer step, the
result equals the DDP run, the saved folder loads back, and a resumed run ends where the uninterrupted one does.

One launch per engine runs all of its runs in turn (each with a new trainer and accelerator); the tests read its
results. Tolerances, relative to max(|checksum|, 1): FSDP2 5e-4 (its reduce-scatter sums the ranks' gradients in
another order than DDP's all-reduce: 3e-6 measured on the plain path, 7e-5 with LoRA, where Adam's first steps
amplify the last bits of r_x's gradient); ZeRO-2 5e-3 (its engine takes all loss parts in one forward/backward, so
r_x scores theta's and phi's completions in one batch: r_x drifts from DDP by about 1.5e-4 per step, 1.3e-3 after 8
steps measured; the actors and critics agree to 2e-5)."""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

# each engine's runs, in one launch (dist_train.py: RUN-bare is without clipping and trust region, as DeepSpeed needs)
RUNS = {
    "ddp": ["plain", "resumed", "fused", "lora", "plain-bare", "fused-bare", "lora-bare"],
    "fsdp2": ["plain", "resumed", "fused", "lora"],
    "zero2": ["plain-bare", "resumed-bare", "fused-bare", "lora-bare"],
}
TOLERANCE = {"fsdp2": 5e-4, "zero2": 5e-3}
ROLES = ("policy_theta", "policy_phi", "value_theta", "value_phi", "reward_model")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install deepspeed)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out_dir, engine: str, runs: list[str]) -> dict[str, list[dict]]:
    """Both ranks' results of `tests/dist_train.py OUT_DIR ENGINE RUN...` under torchrun with 2 CPU processes."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    # in-process runs of other tests leave accelerate's variables behind (ACCELERATE_USE_CPU=true would keep ZeRO-2
    # off): the launch starts from none, as `accelerate launch` would
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           os.path.join(os.path.dirname(__file__), "dist_train.py"), str(out_dir), engine, *runs]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {run: [json.loads((out_dir / f"rank{r}-{run}.json").read_text()) for r in (0, 1)] for run in runs}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """engine -> {run: [rank 0's result, rank 1's]}: each engine's launch, run once for the module."""
    cache = {}

    def get(engine: str) -> dict[str, list[dict]]:
        if engine not in cache:
            cache[engine] = _torchrun(tmp_path_factory.mktemp(engine), engine, RUNS[engine])
        return cache[engine]

    return get


def deviation(a: dict, b: dict, roles=ROLES) -> float:
    """The largest relative difference of two checksum records (relative to max(|b|, 1))."""
    return max(abs(x - y) / max(abs(y), 1.0) for role in roles for x, y in zip(a[role], b[role]))


def assert_ranks_agree(ranks: list[dict]) -> None:
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"])
    for step, (a, b) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"])):
        for role in a:
            assert a[role] == pytest.approx(b[role], rel=1e-6, abs=1e-6), (step, role)


def assert_equal_runs(a: dict, b: dict, tolerance: float, steps=None) -> None:
    assert a["rollout_prompts"] == b["rollout_prompts"] and a["oracle_queries"] == b["oracle_queries"]
    steps = range(len(b["steps"])) if steps is None else steps
    for step in steps:
        assert deviation(a["steps"][step], b["steps"][step]) < tolerance, step


def assert_loads_back(rank0: dict) -> None:
    """The folder save_model wrote, loaded into a fresh model, holds the last step's parameters."""
    assert deviation(rank0["loaded"], rank0["steps"][-1], roles=rank0["loaded"]) < 1e-7


def assert_resume_equals_uninterrupted(full: list[dict], resumed: list[dict]) -> None:
    """Resumed from the uninterrupted run's step-4 checkpoint: steps 5..8 end at its parameters, on every rank (each
    rank restores its own oracle RNG state)."""
    for rank in (0, 1):
        assert len(resumed[rank]["steps"]) == 4
        assert resumed[rank]["oracle_queries"] == full[rank]["oracle_queries"]
        assert deviation(resumed[rank]["steps"][-1], full[rank]["steps"][-1]) < 1e-6, rank
        assert resumed[rank]["rollout_prompts"] == full[rank]["rollout_prompts"][1:]  # iteration 1's prompts


# ---------------------------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("mode", ["plain", "fused", "lora"])
def test_two_process_ddp_run_keeps_ranks_in_sync(launched, mode):
    ranks = launched("ddp")[mode]
    assert all(r["world_size"] == 2 and "MULTI_CPU" in r["distributed_type"] for r in ranks)
    assert ranks[0]["engine"]["wrapped"][0] == "DistributedDataParallel"
    assert all(r["fused"] == (mode != "plain") for r in ranks)
    assert len(ranks[0]["steps"]) == 8
    assert_ranks_agree(ranks)
    # the parameters did move, and the oracle counter counts both ranks' pairs (2 x 4 pairs per iteration)
    assert ranks[0]["steps"][0]["policy_theta"] != ranks[0]["steps"][-1]["policy_theta"]
    assert ranks[0]["steps"][0]["reward_model"] != ranks[0]["steps"][-1]["reward_model"]
    # each rank rolled out its own half of every global batch of prompts (4 optimizer steps per iteration, or 1)
    iterations = 2 if mode == "plain" else 8
    assert [len(p) for p in ranks[0]["rollout_prompts"]] == [4] * iterations
    assert ranks[0]["rollout_prompts"] != ranks[1]["rollout_prompts"]
    assert ranks[0]["oracle_queries"] == ranks[1]["oracle_queries"] == iterations * 2 * 4
    if mode != "fused":
        assert_loads_back(ranks[0])


def test_two_process_ddp_resume_equals_uninterrupted(launched):
    runs = launched("ddp")
    assert_resume_equals_uninterrupted(runs["plain"], runs["resumed"])


# ---------------------------------------------------------------------------------------------------- FSDP2
def test_fsdp2_shards_every_parameter_and_ranks_agree(launched):
    runs = launched("fsdp2")
    for mode in ("plain", "fused", "lora"):
        ranks = runs[mode]
        assert all(r["world_size"] == 2 and r["distributed_type"] == "DistributedType.FSDP" for r in ranks), mode
        engine = ranks[0]["engine"]
        assert "FSDPModule" in engine["wrapped"], mode  # fully_shard'ed by accelerate
        # every parameter is a DTensor of which this rank holds about half
        assert engine["dtensor_params"] == engine["params"], mode
        assert engine["local_numel"] < 0.51 * engine["full_numel"], mode
        assert len(ranks[0]["steps"]) == 8
        assert_ranks_agree(ranks)


def test_fsdp2_equals_ddp(launched):
    """Plain (with per-role clipping and the trust region on x's steps), fused and LoRA."""
    fsdp2, ddp = launched("fsdp2"), launched("ddp")
    for mode in ("plain", "fused", "lora"):
        assert_equal_runs(fsdp2[mode][0], ddp[mode][0], TOLERANCE["fsdp2"])


def test_fsdp2_saved_folder_loads_back_and_resume_equals_uninterrupted(launched):
    runs = launched("fsdp2")
    assert_loads_back(runs["plain"][0])  # theta, phi, r_x, critics
    assert_loads_back(runs["lora"][0])  # the adapters, r_x, critics
    assert_resume_equals_uninterrupted(runs["plain"], runs["resumed"])


# ---------------------------------------------------------------------------------------------------- ZeRO-2
@needs_deepspeed
def test_zero2_partitions_the_optimizer_and_ranks_agree(launched):
    runs = launched("zero2")
    for run in ("plain-bare", "fused-bare", "lora-bare"):
        ranks = runs[run]
        assert all(r["world_size"] == 2 and r["distributed_type"] == "DistributedType.DEEPSPEED" for r in ranks), run
        engine = ranks[0]["engine"]
        assert engine["wrapped"][0] == "DeepSpeedEngine" and engine["optimizer"] == "DeepSpeedZeroOptimizer", run
        assert engine["zero_stage"] == 2
        # each rank holds the fp32 master weights (and Adam's states) of half of the trained parameters
        assert 0.49 * engine["trainable_numel"] < engine["zero_partition_numel"] < 0.51 * engine["trainable_numel"], run
        assert len(ranks[0]["steps"]) == 8
        assert_ranks_agree(ranks)


@needs_deepspeed
def test_zero2_equals_ddp_and_says_what_it_cannot_do(launched):
    zero2, ddp = launched("zero2"), launched("ddp")
    for run in ("fused-bare", "lora-bare"):
        assert_equal_runs(zero2[run][0], ddp[run][0], TOLERANCE["zero2"])
    # plain (2 passes over each rollout, x trained in the first): equal through the first pass; then DeepSpeed's
    # optimizer steps x with a zero gradient, so Adam's momentum moves it, where DDP's leaves it. The trainer says so.
    plain, ddp_plain = zero2["plain-bare"][0], ddp["plain-bare"][0]
    assert_equal_runs(plain, ddp_plain, TOLERANCE["zero2"], steps=[0, 1])
    assert ddp_plain["steps"][2]["reward_model"] == ddp_plain["steps"][1]["reward_model"]
    assert plain["steps"][2]["reward_model"] != plain["steps"][1]["reward_model"]
    said = " ".join(plain["warnings"])
    assert "x (the reward model) keeps moving" in said
    assert "reward_trust_region" not in said and "max_grad_norm" not in said  # both off in the -bare runs
    assert not any("keeps moving" in w for w in zero2["fused-bare"][0]["warnings"])


@needs_deepspeed
def test_zero2_saved_folder_loads_back_and_resume_equals_uninterrupted(launched):
    runs = launched("zero2")
    assert_loads_back(runs["plain-bare"][0])
    assert_loads_back(runs["lora-bare"][0])
    assert_resume_equals_uninterrupted(runs["plain-bare"], runs["resumed-bare"])


# ---------------------------------------------------------------------------------------------------- not started
def test_fsdp_that_accelerate_does_not_start_is_named_at_start_up(tmp_path, monkeypatch):
    """fsdp2.yaml on the CPU (use_cpu): accelerate trains with plain data parallelism; the trainer says so."""
    from accelerate.state import AcceleratorState
    from testing_utils import make_trainer

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    AcceleratorState._reset_state()  # this test's accelerator state is its own, and is not left to the next test
    try:
        with pytest.warns(UserWarning, match="the accelerate config asks for FSDP.*nothing is sharded"):
            make_trainer(tmp_path, ["the cat is", "a dog was"] * 4, max_steps=1, per_device_train_batch_size=4)
    finally:
        AcceleratorState._reset_state()
