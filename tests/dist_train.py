"""Worker of tests/test_trainer_distributed.py: `torchrun --nproc_per_node 2 tests/dist_train.py OUT_DIR MODE STAGE`.

Trains a tiny single_loop run on CPU (gloo), MODE "plain" (2 PPO epochs x 2 mini-batches per iteration) or "fused"
(one micro-step per iteration: the rollout's forward pass is the update's); STAGE "full" (8 steps), "first" (4 steps,
then a checkpoint) or "resumed" (from the checkpoint of "first" to step 8). It writes, after every optimizer step, a checksum of each role's
parameters to OUT_DIR/rank{r}-{STAGE}.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from testing_utils import make_policy, make_reward_model, make_tokenizer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from bilevel_rlhf import BilevelConfig, BilevelTrainer, ScoreOracle  # noqa: E402


def checksum(module: torch.nn.Module) -> list[float]:
    flat = torch.cat([p.detach().double().flatten() for p in module.parameters()])
    weights = torch.cos(torch.arange(len(flat), dtype=torch.float64))
    return [flat.sum().item(), (flat**2).sum().item(), (flat * weights).sum().item()]


class Checksums(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        unwrapped = model.module if hasattr(model, "module") else model
        roles = ("policy_theta", "policy_phi", "value_theta", "value_phi", "reward_model")
        self.steps.append({r: checksum(getattr(unwrapped, r)) for r in roles})


def main(out_dir: str, mode: str, stage: str) -> None:
    tok = make_tokenizer()
    run_dir = os.path.join(out_dir, "run")
    steps_per_iteration = {"plain": 2, "fused": 1}[mode]
    prompts = ["the cat is", "a dog was", "we love the", "it is very", "the day was", "they hate a"] * 4
    args = BilevelConfig(
        output_dir=run_dir, method="single_loop", per_device_train_batch_size=8 // steps_per_iteration, max_steps=4 if stage == "first" else 8,
        save_strategy="steps" if stage == "first" else "no", save_steps=4,
        steps_per_generation=steps_per_iteration, num_iterations=steps_per_iteration,
        max_completion_length=4, max_prompt_length=8, use_cpu=True, report_to="none", seed=0,
        actor_learning_rate=3e-3, critic_learning_rate=3e-3, reward_learning_rate=1e-3, disable_tqdm=True,
    )
    callback = Checksums()
    rollout_prompts = []

    class RecordingTrainer(BilevelTrainer):  # records the prompts each rank rolls out
        def generate_and_score(self, prompts):
            rollout_prompts.append(list(prompts))
            return super().generate_and_score(prompts)

    oracle = ScoreOracle(lambda texts: [t.split().count("happy") for t in texts])
    trainer = RecordingTrainer(make_policy(tok), make_reward_model(tok), oracle, args, Dataset.from_dict({"prompt": prompts}),
                             processing_class=tok, callbacks=[callback])
    trainer.train(resume_from_checkpoint=os.path.join(run_dir, "checkpoint-4") if stage == "resumed" else None)
    result = {
        "world_size": trainer.accelerator.num_processes,
        "fused": trainer.fuse_rollout_and_update,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "steps": callback.steps,
        "oracle_queries": trainer.oracle_queries,
        "rollout_prompts": rollout_prompts,
    }
    with open(os.path.join(out_dir, f"rank{trainer.accelerator.process_index}-{stage}.json"), "w") as fh:
        json.dump(result, fh)
    trainer.accelerator.wait_for_everyone()  # both ranks' results are written


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
    # Skip the interpreter's teardown: under load, a thread of the gloo process group still alive while the
    # interpreter tears down aborted a rank in some suite runs ("terminate called without an active
    # exception"), after both ranks had written their results. The results are complete here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
