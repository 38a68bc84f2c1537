"""Worker of tests/test_trainer_distributed.py: `torchrun --nproc_per_node 2 tests/dist_train.py OUT_DIR ENGINE RUN...`.

Trains tiny single_loop runs on 2 CPU processes (gloo) under ENGINE, configured from the environment as
`accelerate launch` does with the matching file of accelerate_configs/ (bf16 off):
  "ddp"    accelerate's data parallel (cpu_2proc.yaml);
  "fsdp2"  accelerate's FSDP2 plugin (fsdp2.yaml);
  "zero2"  DeepSpeed ZeRO-2 on DeepSpeed's CPU accelerator (zero2.yaml).
Each RUN, in order, in this process, with an accelerator of its own (RUN-bare: without gradient clipping and without
the trust region on x's steps, which DeepSpeed cannot apply per role):
  "plain"   8 steps, 2 PPO epochs x 2 mini-batches per iteration, a checkpoint every 4 steps, then `save_model`;
  "first"   the same run stopped at its step-4 checkpoint;
  "resumed" steps 5..8 from the step-4 checkpoint of the last "plain" or "first" run (of this launch, or of an
            earlier launch into OUT_DIR);
  "fused"   8 steps, one micro-step per iteration (the rollout's forward pass is the update's);
  "lora"    "fused" with LoRA adapters theta and phi on one frozen base, then `save_model`.
After every optimizer step each rank records a checksum of each role's full parameters (FSDP2's shards gathered).
Each run writes OUT_DIR/rank{r}-{RUN}.json: the checksums, the prompts each rank rolled out, the oracle count, what
the engine wrapped and, on rank 0 after `save_model`, the checksums of a fresh model that the saved folder was loaded
into (`bilevel_rlhf.modeling.load_roles`).
"""

import copy
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from testing_utils import make_policy, make_reward_model, make_tokenizer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from bilevel_rlhf import BilevelConfig, BilevelTrainer, ScoreOracle  # noqa: E402
from bilevel_rlhf.modeling import BilevelModel, load_roles  # noqa: E402

ROLES = ("policy_theta", "policy_phi", "value_theta", "value_phi", "reward_model")
PROMPTS = ["the cat is", "a dog was", "we love the", "it is very", "the day was", "they hate a"] * 4


def enable_engine(engine: str) -> None:
    """The environment that `accelerate launch` sets for fsdp2.yaml or zero2.yaml, with bf16 off."""
    if engine == "fsdp2":
        os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                          FSDP_CPU_RAM_EFFICIENT_LOADING="true", FSDP_STATE_DICT_TYPE="FULL_STATE_DICT",
                          FSDP_RESHARD_AFTER_FORWARD="true", FSDP_OFFLOAD_PARAMS="false", ACCELERATE_MIXED_PRECISION="no")
        # accelerate (1.15) turns FSDP on only for a GPU-type process group (MULTI_GPU, MULTI_XPU, ...): on a CPU it
        # runs plain data parallel instead. Make the CPU (gloo) group an FSDP one, as accelerate does a GPU group;
        # everything after that (fully_shard, DTensor parameters, gathers, state dicts) is accelerate's and torch's.
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType

        init = AcceleratorState.__init__

        def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
            init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if fsdp_plugin is not None and self.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP):
                PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # later states read it
                self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

        AcceleratorState.__init__ = fsdp_on_cpu
    elif engine == "zero2":
        os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="2",
                          ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="none",
                          ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="none", ACCELERATE_DEEPSPEED_ZERO3_INIT="false",
                          ACCELERATE_MIXED_PRECISION="no")
        import deepspeed.comm.torch

        # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op (a C++ extension) at its first process
        # group: minutes of g++ on a fresh machine. gloo's collectives do the same work.
        deepspeed.comm.torch.build_shm_op = lambda: None
    elif engine != "ddp":
        raise ValueError(f"unknown engine {engine!r}")


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p  # an FSDP2 shard: gathered (every rank calls this)


def checksum(params) -> list[float]:
    flat = torch.cat([full(p).detach().double().flatten() for p in params])
    weights = torch.cos(torch.arange(len(flat), dtype=torch.float64))
    return [flat.sum().item(), (flat**2).sum().item(), (flat * weights).sum().item()]


def role_checksums(model: torch.nn.Module) -> dict[str, list[float]]:
    """Each role's checksum (LoRA: each actor's adapter)."""
    unwrapped = model.module if hasattr(model, "module") else model
    if unwrapped.use_peft:
        named = list(unwrapped.policy_theta.named_parameters())
        sums = {f"policy_{r}": checksum([p for n, p in named if f".{r}." in n]) for r in ("theta", "phi")}
    else:
        sums = {r: checksum(getattr(unwrapped, r).parameters()) for r in ROLES[:2]}
    sums.update({r: checksum(getattr(unwrapped, r).parameters()) for r in ROLES[2:]})
    return sums


class Checksums(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(role_checksums(model))


def engine_report(trainer) -> dict:
    """What the engine wrapped: the model's classes, the parameters (DTensor shards: local and full sizes), the
    optimizer and, under DeepSpeed, the ZeRO stage and the size of this rank's partition of the fp32 master weights."""
    model = trainer.model_wrapped
    params = list(trainer.accelerator.unwrap_model(model).parameters())
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    report = {
        "wrapped": [c.__name__ for c in type(model).__mro__],
        "params": len(params),
        "dtensor_params": sum(hasattr(p, "to_local") for p in params),
        "local_numel": sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params),
        "full_numel": sum(p.numel() for p in params),
        "trainable_numel": sum(p.numel() for p in params if p.requires_grad),
        "optimizer": type(opt).__name__,
    }
    if hasattr(model, "zero_optimization_stage"):
        report["zero_stage"] = model.zero_optimization_stage()
        report["zero_partition_numel"] = sum(t.numel() for t in getattr(opt, "single_partition_of_fp32_groups", []))
    return report


def fresh_model(tok, peft_config) -> BilevelModel:
    """A BilevelModel with other initial weights, to load a saved folder into."""
    if peft_config is None:
        return BilevelModel(make_policy(tok, seed=5), make_policy(tok, seed=6), None, make_reward_model(tok, seed=7),
                            use_peft=False, has_phi=True)
    from peft import get_peft_model

    theta = get_peft_model(make_policy(tok, seed=5), copy.deepcopy(peft_config), adapter_name="theta")
    theta.add_adapter("phi", copy.deepcopy(peft_config))
    return BilevelModel(theta, None, None, make_reward_model(tok, seed=7), use_peft=True, has_phi=True)


def train(out_dir: str, engine: str, run: str, resume_dir: str | None) -> str:
    tok = make_tokenizer()
    run_dir = os.path.join(out_dir, run)
    mode, bare = run.split("-")[0], run.endswith("-bare")
    fused = mode in ("fused", "lora")
    steps_per_iteration = 1 if fused else 2
    args = BilevelConfig(
        output_dir=run_dir, method="single_loop", per_device_train_batch_size=8 // steps_per_iteration,
        max_steps=4 if mode == "first" else 8, save_strategy="no" if fused else "steps", save_steps=4,
        steps_per_generation=steps_per_iteration, num_iterations=steps_per_iteration,
        max_completion_length=4, max_prompt_length=8, report_to="none", seed=0, disable_tqdm=True,
        actor_learning_rate=3e-3, critic_learning_rate=3e-3, reward_learning_rate=1e-3,
        # LoRA: theta and phi sample with shared Gumbel noise, so that the stacked generation (one batch through both
        # adapters; not under FSDP, which holds shards of the adapters' weights) and the per-role one sample alike
        common_random_numbers=mode == "lora",
        # "-bare": no clipping nor trust region on x's steps, which DeepSpeed cannot apply per role (its engine clips
        # the global norm and steps inside backward; the trainer warns of both)
        **(dict(max_grad_norm=0.0, reward_trust_region=0.0) if bare else {}),
        # DeepSpeed runs only where accelerate is not told `cpu`; gloo is then named, as no GPU backend exists
        use_cpu=engine != "zero2", ddp_backend="gloo",
    )
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0)
    callback = Checksums()
    rollout_prompts = []

    class RecordingTrainer(BilevelTrainer):  # records the prompts each rank rolls out
        def generate_and_score(self, prompts):
            rollout_prompts.append(list(prompts))
            return super().generate_and_score(prompts)

    oracle = ScoreOracle(lambda texts: [t.split().count("happy") for t in texts])
    with warnings.catch_warnings(record=True) as caught:  # what the trainer says at start-up
        warnings.simplefilter("always")
        trainer = RecordingTrainer(make_policy(tok), make_reward_model(tok), oracle, args,
                                   Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok, callbacks=[callback],
                                   peft_config=peft_config)
    trainer.train(resume_from_checkpoint=os.path.join(resume_dir, "checkpoint-4") if mode == "resumed" else None)
    result = {
        "world_size": trainer.accelerator.num_processes,
        "fused": trainer.fuse_rollout_and_update,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "engine": engine_report(trainer),
        "steps": callback.steps,
        "oracle_queries": trainer.oracle_queries,
        "rollout_prompts": rollout_prompts,
        "warnings": [str(w.message) for w in caught],
    }
    if mode in ("plain", "lora"):
        saved = os.path.join(run_dir, "final")
        trainer.save_model(saved)  # every rank: FSDP gathers the state dict
        trainer.accelerator.wait_for_everyone()
        if trainer.accelerator.is_main_process:
            fresh = fresh_model(tok, peft_config)
            load_roles(fresh, saved)
            result["loaded"] = role_checksums(fresh)
    with open(os.path.join(out_dir, f"rank{trainer.accelerator.process_index}-{run}.json"), "w") as fh:
        json.dump(result, fh)
    trainer.accelerator.wait_for_everyone()  # both ranks' results are written
    return run_dir


def main(out_dir: str, engine: str, runs: list[str]) -> None:
    torch.set_num_threads(1)
    enable_engine(engine)
    from accelerate.state import AcceleratorState

    resume_dir = os.path.join(out_dir, "first") if os.path.isdir(os.path.join(out_dir, "first")) else None
    for run in runs:
        AcceleratorState._reset_state()  # a new accelerator for each run, as in a new process (the group stays)
        run_dir = train(out_dir, engine, run, resume_dir)
        if run.split("-")[0] in ("plain", "first"):
            resume_dir = run_dir


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    # Skip the interpreter's teardown: under load, a thread of the gloo process group still alive while the
    # interpreter tears down aborted a rank in some suite runs ("terminate called without an active
    # exception"), after both ranks had written their results. The results are complete here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
