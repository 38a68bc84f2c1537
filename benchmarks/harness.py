"""Side-by-side cost of a step of TRL's `RLOOTrainer` and `OnlineDPOTrainer`, a `partial_sgd` step and a `single_loop`
iteration.

The harness behind `python scripts/benchmark.py`; it lives outside the installed package (`bilevel_rlhf`), which
holds the product only.

Every method runs in its own worker process (so each one's peak memory is its own), all on the same model, prompts,
completion length and completions per actor, with the same `torch.set_num_threads`. The parent interleaves them
step by step (A B C A B C ...): a worker pauses at the end of each optimizer step until it is given the next turn,
so machine noise hits every method alike. Each worker runs the real `Trainer.train()` loop; the time of one step is
measured from the moment the worker gets its turn to its `on_step_end` (logging of the previous step, data loading,
rollout, update and optimizer step included).

The split of a step: `generation` (time inside `generate`), `forward` (the functions that turn a batch into
per-token log-probs / values / scores: `BilevelModel.policy_forward` / `reward_forward`, RLOO's
`_get_per_token_logps_and_entropies` and its reward model's forward), `backward` (`accelerator.backward`),
`optimizer` (`optimizer.step()`) and `other` (the rest: tokenization, decoding, the oracle, advantages, losses,
gradient clipping, logging, bookkeeping). Timers add no synchronization on CPU; on GPU each timer edge synchronizes.

Also: the GridWorld backend's sampled single-loop iterations per second at growing grid sizes, and samples to within
1% of the best Phi per method on the default instance.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bilevel_rlhf.validation import field_checker

LM_METHODS = ("rloo", "online_dpo", "partial_sgd", "single_loop")
PARTS = ("generation", "forward", "backward", "optimizer", "other")


@dataclass
class BenchmarkArguments:
    """Arguments of `scripts/benchmark.py`."""

    model: str | None = field(
        default=None, metadata={"help": "Local causal-LM folder; None: the embedded tweet GPT-2 (get_default_model())."}
    )
    methods: list[str] = field(
        default_factory=lambda: list(LM_METHODS), metadata={"help": f"Language-model methods, from {LM_METHODS}."}
    )
    num_prompts: int = field(default=4, metadata={"help": "Prompts per step (>= 1)."})
    num_generations: int = field(
        default=4,
        metadata={"help": "Completions per prompt per actor (even, >= 2): num_prompts * num_generations completions "
                  "per actor per step (RLOO: num_generations)."},
    )
    max_completion_length: int = field(default=32, metadata={"help": "Generated tokens per completion (>= 1)."})
    full_length: bool = field(
        default=True,
        metadata={"help": "Force every completion to max_completion_length tokens (min_new_tokens), so every method "
                  "generates exactly the same number of tokens."},
    )
    warmup_steps: int = field(default=2, metadata={"help": "Untimed steps per method first (>= 0)."})
    steps: int = field(default=10, metadata={"help": "Timed steps per method (>= 1)."})
    num_threads: int = field(
        default=1,
        metadata={"help": "torch.set_num_threads in every worker (>= 1). 1 by default: on 2 cores shared with other "
                  "work, 2 intra-op threads made these small models several times slower (spin-waiting)."},
    )
    use_peft: bool = field(default=False, metadata={"help": "LoRA adapters on one frozen base (every method)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (with --use_peft)."})
    reward_adapter: bool = field(
        default=False,
        metadata={"help": "Our methods, with --use_peft: r_x is a third LoRA adapter on the actors' base with a scalar "
                  "head (one base for every role); the TRL baselines keep their separate reward model."},
    )
    rloo_beta: float = field(default=0.05, metadata={"help": "RLOO's KL coefficient to the reference (> 0)."})
    rloo_reward: str = field(
        default="reward_model",
        metadata={"help": "The TRL baselines' reward (RLOO's score; OnlineDPO's ranking of its two completions): "
                  "'reward_model' (the same scalar-head model r_x our methods use) or 'vader'."},
    )
    fuse: bool = field(
        default=True,
        metadata={"help": "Our methods: let the rollout's forward pass double as the update's (the trainer's default "
                  "with one micro-step per iteration); false measures the plain path (separate passes)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of every worker."})
    lm: bool = field(default=True, metadata={"help": "Run the language-model part (false: the GridWorld part only)."})
    gridworld: bool = field(default=True, metadata={"help": "Also run the GridWorld part."})
    grid_sizes: list[int] = field(default_factory=lambda: [10, 20, 40, 100], metadata={"help": "n of the n x n grids."})
    grid_iterations: int = field(default=2000, metadata={"help": "Timed single-loop iterations per grid size."})
    grid_repeats: int = field(default=5, metadata={"help": "Timed runs per grid size; the median is reported."})
    gridworld_results: str | None = field(
        default="outputs/gridworld/results.json",
        metadata={"help": "The GridWorld recipe's results.json to read samples-to-1-percent from; computed (seed 0) when "
                  "the file is missing."},
    )
    output_dir: str = field(default="outputs/benchmark", metadata={"help": "Where results.json and table.md go."})

    def __post_init__(self) -> None:
        need = field_checker(self)

        if isinstance(self.methods, str):
            self.methods = [m for m in self.methods.split(",") if m]
        if isinstance(self.grid_sizes, str):
            self.grid_sizes = [int(n) for n in self.grid_sizes.split(",") if n]
        need(len(self.methods) > 0 and all(m in LM_METHODS for m in self.methods), "methods",
             f"a non-empty list from {LM_METHODS}")
        need(len(set(self.methods)) == len(self.methods), "methods", "without repeats")
        need(self.num_prompts >= 1, "num_prompts", ">= 1")
        need(self.num_generations >= 2 and self.num_generations % 2 == 0, "num_generations", "even and >= 2")
        need(self.max_completion_length >= 1, "max_completion_length", ">= 1")
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(self.steps >= 1, "steps", ">= 1")
        need(self.num_threads >= 1, "num_threads", ">= 1")
        need(self.lora_r >= 1, "lora_r", ">= 1")
        need(not self.reward_adapter or self.use_peft, "reward_adapter", "False unless use_peft (r_x is an adapter)")
        need(self.rloo_beta > 0, "rloo_beta", "> 0 (the benchmark compares against RLOO with its KL)")
        need(self.rloo_reward in ("reward_model", "vader"), "rloo_reward", "'reward_model' or 'vader'")
        need(all(n >= 4 for n in self.grid_sizes), "grid_sizes", "sizes >= 4")
        need(self.grid_iterations >= 2, "grid_iterations", ">= 2")
        need(self.grid_repeats >= 1, "grid_repeats", ">= 1")
        need(self.lm or self.gridworld, "gridworld", "True when lm is False (nothing to run otherwise)")


# ============================================================================================ timing
class PartTimer:
    """Accumulates wall time per part; nested timed calls count once (in the outermost part)."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.totals = {p: 0.0 for p in PARTS if p != "other"}
        self.generated_tokens = 0
        self._depth = 0

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    @contextlib.contextmanager
    def part(self, name: str):
        if self._depth:  # inside another timed part: already counted
            yield
            return
        self._sync()
        self._depth += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - t0
            self._depth -= 1

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            outermost = self._depth == 0  # e.g. PeftModel.generate calling the base model's generate
            with self.part(name):
                out = fn(*args, **kwargs)
            if outermost and name == "generation" and hasattr(out, "shape") and "input_ids" in kwargs:
                # generated token slots: rows x new positions (the work, eos or not)
                self.generated_tokens += out.shape[0] * (out.shape[1] - kwargs["input_ids"].shape[1])
            return out

        return timed

    def take(self) -> dict[str, float]:
        """Totals since the last call, then reset."""
        out = dict(self.totals, generated_tokens=float(self.generated_tokens))
        self.totals = {k: 0.0 for k in self.totals}
        self.generated_tokens = 0
        return out


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def model_state_bytes(modules: list[Any], optimizer: Any = None) -> int:
    """Bytes of the distinct parameter/buffer storages of `modules` plus the optimizer's state tensors: the memory a
    copy of a model costs (LoRA on a shared base counts the base once)."""
    import torch

    seen, total = set(), 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for module in modules:
        if isinstance(module, torch.nn.Module):
            for t in list(module.parameters()) + list(module.buffers()):
                add(t)
    if optimizer is not None:
        for state in optimizer.state.values():
            for t in state.values():
                add(t)
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ============================================================================================ worker
def _patch_generate(timer: PartTimer) -> None:
    from transformers.generation.utils import GenerationMixin

    GenerationMixin.generate = timer.wrap("generation", GenerationMixin.generate)
    try:
        from peft import PeftModelForCausalLM

        PeftModelForCausalLM.generate = timer.wrap("generation", PeftModelForCausalLM.generate)
    except ImportError:
        pass


def _prompts(n: int, seed: int) -> list[str]:
    """Training prompts of the happy-tweet task (first 4 words of the training tweets), shuffled by `seed`."""
    import random

    from bilevel_rlhf.happy_tweet import load_prompt_dataset

    prompts = list(load_prompt_dataset("train", n_prompt_words=4)["prompt"])
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


def _trl_reward(args: BenchmarkArguments, reward_model, model_path: str):
    """The TRL baselines' reward function and its tokenizer: VADER, or the scalar-head model r_x our methods use."""
    from transformers import AutoTokenizer

    if args.rloo_reward == "vader":
        from bilevel_rlhf.preference import VaderOracle

        oracle = VaderOracle()

        def vader(completions, **kwargs):
            return oracle.compound(completions)

        return vader, None
    reward_tok = AutoTokenizer.from_pretrained(model_path)
    if reward_tok.pad_token is None:
        reward_tok.pad_token = reward_tok.eos_token
    reward_model.forward = PartTimerHolder.timer.wrap("forward", reward_model.forward)
    return reward_model.eval(), reward_tok


def _build_trainer(method: str, args: BenchmarkArguments, model_path: str, output_dir: str, callback):
    """The trainer of `method` on the shared setup (model, prompts, lengths, threads, seed)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback

    cuda = torch.cuda.is_available()
    n_rows = args.num_prompts * args.num_generations  # completions per actor per step
    dataset = Dataset.from_dict({"prompt": _prompts(4096, args.seed)})
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(args.seed)
    policy = AutoModelForCausalLM.from_pretrained(model_path)
    reward_model = None  # r_x, unless it is an adapter on the actors' base (our methods, --reward_adapter)
    if method in ("rloo", "online_dpo") or not args.reward_adapter:
        reward_model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=1, pad_token_id=tok.pad_token_id
        )
    peft_config = None
    if args.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(
        output_dir=output_dir, seed=args.seed, use_cpu=not cuda, bf16=False, max_steps=args.warmup_steps + args.steps,
        logging_steps=1, report_to=[], save_strategy="no", max_completion_length=args.max_completion_length,
        temperature=1.0, top_k=0, top_p=1.0, disable_tqdm=True, dataloader_num_workers=0,
        gradient_checkpointing=False,  # a tiny model gains nothing from it: off for every method
    )
    if method in ("rloo", "online_dpo"):
        reward_funcs, reward_tok = _trl_reward(args, reward_model, model_path)
    if method == "online_dpo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        # two completions per prompt (the pair the reward ranks): n_rows completions from n_rows / 2 prompts
        dpo_common = {k: v for k, v in common.items() if k != "max_completion_length"}  # OnlineDPO: max_new_tokens
        config = OnlineDPOConfig(
            **dpo_common, per_device_train_batch_size=max(1, n_rows // 2), learning_rate=1e-5, beta=[0.1],
            disable_dropout=True, max_new_tokens=args.max_completion_length,
            generation_kwargs={"min_new_tokens": args.max_completion_length} if args.full_length else None,
        )
        trainer = OnlineDPOTrainer(
            model=policy, reward_funcs=reward_funcs, args=config, train_dataset=dataset, processing_class=tok,
            reward_processing_classes=reward_tok, peft_config=peft_config, callbacks=[callback],
        )
    elif method == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        config = RLOOConfig(
            **common, per_device_train_batch_size=n_rows, num_generations=args.num_generations,
            num_iterations=1, steps_per_generation=1, beta=args.rloo_beta, learning_rate=1e-5, log_completions=False,
            disable_dropout=True,  # as our trainer does
            generation_kwargs={"min_new_tokens": args.max_completion_length} if args.full_length else None,
        )
        trainer = RLOOTrainer(
            model=policy, reward_funcs=reward_funcs, args=config, train_dataset=dataset, processing_class=tok,
            reward_processing_classes=reward_tok, peft_config=peft_config, callbacks=[callback],
        )
        trainer._get_per_token_logps_and_entropies = PartTimerHolder.timer.wrap(
            "forward", trainer._get_per_token_logps_and_entropies
        )
    else:
        from bilevel_rlhf.config import BilevelConfig
        from bilevel_rlhf.modeling import BilevelModel
        from bilevel_rlhf.preference import VaderOracle
        from bilevel_rlhf.trainer import BilevelTrainer

        if args.full_length:
            policy.generation_config.min_new_tokens = args.max_completion_length
        config = BilevelConfig(
            **common, method=method, per_device_train_batch_size=n_rows,
            num_generations=args.num_generations, num_iterations=1, steps_per_generation=1,
            actor_learning_rate=1e-5, critic_learning_rate=1e-4, reward_learning_rate=1e-6,
            fuse_rollout_and_update=args.fuse, reward_adapter=args.reward_adapter,
        )
        BilevelModel.policy_forward = PartTimerHolder.timer.wrap("forward", BilevelModel.policy_forward)
        BilevelModel.stacked_policy_forward = PartTimerHolder.timer.wrap("forward", BilevelModel.stacked_policy_forward)
        BilevelModel.reward_forward = PartTimerHolder.timer.wrap("forward", BilevelModel.reward_forward)
        trainer = BilevelTrainer(
            model=policy, reward_model=reward_model, preference_oracle=VaderOracle(seed=args.seed), args=config,
            train_dataset=dataset, processing_class=tok, peft_config=peft_config, callbacks=[callback],
        )
    trainer.accelerator.backward = PartTimerHolder.timer.wrap("backward", trainer.accelerator.backward)
    trainer.remove_callback(PrinterCallback)  # no log lines on stdout (the logs stay in trainer.state.log_history)
    return trainer


class PartTimerHolder:
    """The worker's timer (one per process)."""

    timer: PartTimer


def _worker(conn, method: str, args: BenchmarkArguments, model_path: str, output_dir: str) -> None:
    """Build `method`'s trainer, then run one optimizer step per turn given by the parent through `conn`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch
        from transformers import TrainerCallback
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        torch.set_num_threads(args.num_threads)
        cuda = torch.cuda.is_available()
        timer = PartTimerHolder.timer = PartTimer(cuda=cuda)
        _patch_generate(timer)
        rss_start = rss_bytes()

        class Turns(TrainerCallback):
            """Waits for the parent's turn at train begin and after each step; reports the step's figures."""

            def __init__(self):
                self.t_turn = 0.0

            def _wait(self):
                msg = conn.recv()
                if msg != "step":
                    raise RuntimeError(f"unexpected message {msg!r}")
                timer.take()
                if cuda:
                    torch.cuda.synchronize()
                self.t_turn = time.perf_counter()

            def on_train_begin(self, args_, state, control, **kwargs):
                conn.send(("ready", {"rss_after_setup": rss_bytes(), "rss_start": rss_start}))
                self._wait()

            def on_pre_optimizer_step(self, args_, state, control, **kwargs):
                timer._sync()
                self.t_opt = time.perf_counter()

            def on_optimizer_step(self, args_, state, control, **kwargs):
                timer._sync()
                timer.totals["optimizer"] += time.perf_counter() - self.t_opt

            def on_step_end(self, args_, state, control, **kwargs):
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - self.t_turn
                conn.send(("step", dict(timer.take(), seconds=seconds)))
                self._wait()

        trainer = _build_trainer(method, args, model_path, os.path.join(output_dir, method), Turns())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        modules = [trainer.model, getattr(trainer, "ref_model", None)] + list(getattr(trainer, "reward_funcs", []))
        result = {"peak_rss": peak_rss_bytes(), "rss_start": rss_start,
                  "model_state": model_state_bytes(modules, trainer.optimizer)}
        if cuda:
            result["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
        log = [e for e in trainer.state.log_history if "loss" in e or "step_time" in e or "time/update" in e]
        result["last_log"] = log[-1] if log else {}
        conn.send(("done", result))
    except BaseException as e:  # report to the parent instead of hanging it
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


# ============================================================================================ parent
def _recv(conn, method: str, expect: str, timeout: float = 1800.0):
    if not conn.poll(timeout):
        raise TimeoutError(f"worker {method}: no answer within {timeout} s")
    kind, payload = conn.recv()
    if kind == "error":
        raise RuntimeError(f"worker {method} failed: {payload}")
    if kind != expect:
        raise RuntimeError(f"worker {method}: expected {expect!r}, got {kind!r}")
    return payload


def summarize_steps(records: list[dict[str, float]]) -> dict[str, Any]:
    """Median seconds per step and its spread, generated tokens per second, the median split of a step."""
    seconds = [r["seconds"] for r in records]
    med = statistics.median(seconds)
    q = statistics.quantiles(seconds, n=4) if len(seconds) >= 2 else [med, med, med]
    split = {}
    for p in PARTS:
        if p == "other":
            values = [r["seconds"] - sum(r[k] for k in PARTS if k != "other") for r in records]
        else:
            values = [r[p] for r in records]
        split[p] = statistics.median(values)
    fractions = {p: statistics.median(
        [((r["seconds"] - sum(r[k] for k in PARTS if k != "other")) if p == "other" else r[p]) / r["seconds"]
         for r in records]) for p in PARTS}
    tokens = [r["generated_tokens"] for r in records]
    return {
        "steps": len(records), "median_s": med, "q1_s": q[0], "q3_s": q[2], "min_s": min(seconds), "max_s": max(seconds),
        "generated_tokens_per_step": statistics.median(tokens),
        "generated_tokens_per_s": statistics.median(t / s for t, s in zip(tokens, seconds)),
        "split_s": split, "split_fraction": fractions, "raw_seconds": seconds,
    }


def run_lm_benchmark(args: BenchmarkArguments, model_path: str | None = None) -> dict[str, Any]:
    """Interleaved steps of every method in `args.methods`; per method: summary, memory, raw records."""
    if model_path is None:
        if args.model is None:
            from bilevel_rlhf.happy_tweet import get_default_model

            model_path = str(get_default_model())
        else:
            model_path = args.model
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"model: no local folder {model_path}")
    ctx = mp.get_context("spawn")
    workers = {}
    try:
        for method in args.methods:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, method, args, model_path, args.output_dir), daemon=True)
            proc.start()
            child.close()
            workers[method] = (proc, parent)
        setup = {m: _recv(conn, m, "ready") for m, (_, conn) in workers.items()}
        records: dict[str, list[dict[str, float]]] = {m: [] for m in args.methods}
        for step in range(args.warmup_steps + args.steps):
            order = args.methods if step % 2 == 0 else args.methods[::-1]  # A B C, C B A, ...: no fixed neighbour
            for m in order:
                proc, conn = workers[m]
                conn.send("step")
                rec = _recv(conn, m, "step")
                if step >= args.warmup_steps:
                    records[m].append(rec)
        final = {}
        for m, (proc, conn) in workers.items():
            conn.send("step")  # releases the last on_step_end; train() then returns
            final[m] = _recv(conn, m, "done")
            proc.join(60)
    finally:
        for proc, conn in workers.values():
            if proc.is_alive():
                proc.terminate()
    out = {}
    for m in args.methods:
        s = summarize_steps(records[m])
        s["peak_rss_mb"] = final[m]["peak_rss"] / 2**20
        s["rss_after_setup_mb"] = setup[m]["rss_after_setup"] / 2**20
        s["rss_start_mb"] = setup[m]["rss_start"] / 2**20
        s["peak_rss_above_start_mb"] = (final[m]["peak_rss"] - setup[m]["rss_start"]) / 2**20
        s["model_state_mb"] = final[m]["model_state"] / 2**20
        if "cuda_max_memory_allocated" in final[m]:
            s["cuda_max_memory_allocated_mb"] = final[m]["cuda_max_memory_allocated"] / 2**20
        s["records"] = records[m]
        out[m] = s
    if "rloo" in out:
        base = out["rloo"]["median_s"]
        for m in out:
            out[m]["ratio_to_rloo"] = out[m]["median_s"] / base
    return {"model": model_path, "methods": out}


# ============================================================================================ gridworld
def scaled_layout(n: int) -> list[str]:
    """An n x n version of the default instance: a target row between two hazard rows, the start at the left."""
    rows = [["."] * n for _ in range(n)]
    mid = int(round(0.4 * n))
    lo, hi = max(1, n // 5), n - max(1, n // 5)
    for c in range(lo, hi):
        rows[mid - 1][c], rows[mid][c], rows[mid + 1][c] = "H", "T", "H"
    rows[min(n - 1, mid + 2)][0] = "S"
    return ["".join(r) for r in rows]


def gridworld_speed(sizes: list[int], iterations: int, seed: int = 0, repeats: int = 1) -> dict[int, dict[str, Any]]:
    """Sampled single_loop iterations per second on n x n grids (`scaled_layout(n)`). The exact evaluations of Phi
    that the run logs (`GoalProblem.phi`: value iteration, not part of the method) are timed and subtracted. The
    median of `repeats` timed runs is reported, after an untimed first call (see below)."""
    import numpy as np

    from bilevel_rlhf.gridworld import GoalProblem, GridWorldConfig, build_problem, run_method

    out = {}
    exact_phi = GoalProblem.phi
    phi_seconds = [0.0]

    def timed_phi(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return exact_phi(self, *a, **kw)
        finally:
            phi_seconds[0] += time.perf_counter() - t0

    GoalProblem.phi = timed_phi
    try:
        for n in sizes:
            cfg = GridWorldConfig(layout=scaled_layout(n), x0=[float(int(round(0.4 * n))), 0.0],
                                  methods=["single_loop"], iterations=iterations, eval_every=10 * iterations,
                                  progress=False)
            problem = build_problem(cfg)
            x0 = np.asarray(cfg.x0, dtype=np.float64)
            t0 = time.perf_counter()
            exact_phi(problem, x0, 0.0)
            exact = {"exact_phi_s": time.perf_counter() - t0}
            t0 = time.perf_counter()
            problem.hypergradient(x0, 0.05)
            exact["exact_hypergradient_s"] = time.perf_counter() - t0
            # the first call of the compiled walker step in a process loads it from numba's on-disk cache (or
            # compiles it, once per installation): a fixed cost, reported apart from the per-iteration speed
            phi_seconds[0] = 0.0
            t0 = time.perf_counter()
            run_method(problem, replace(cfg, iterations=2), "single_loop", seed)
            exact["first_call_s"] = time.perf_counter() - t0 - phi_seconds[0]
            runs = []  # seconds per iteration of each repeat (the same seed: the same work)
            for _ in range(repeats):
                phi_seconds[0] = 0.0
                t0 = time.perf_counter()
                run_method(problem, cfg, "single_loop", seed)
                runs.append((time.perf_counter() - t0 - phi_seconds[0]) / iterations)
            per_it = statistics.median(runs)
            out[n] = {"states": int(problem.mdp.n_states), "sparse": problem.mdp.sparse, **exact,
                      "iterations_per_s": 1.0 / per_it, "iterations_per_s_repeats": [1.0 / r for r in runs],
                      "ms_per_iteration": 1e3 * per_it, "samples_per_iteration": 2 * cfg.batch_size,
                      "exact_phi_seconds_excluded": phi_seconds[0]}
    finally:
        GoalProblem.phi = exact_phi
    return out


def gridworld_samples_to_1pct(
    results_path: str | None, seed: int = 0, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Samples to within 1% of the best Phi per method on the default instance: read from the GridWorld recipe's
    results.json when it exists, else computed for one seed with the recipe's default config (plus `overrides`)."""
    keys = ("samples_to_1pct_median", "seeds_reaching_1pct", "n_seeds", "phi_mean")
    if results_path is not None and os.path.isfile(results_path):
        with open(results_path) as fh:
            res = json.load(fh)
        return {"source": results_path, "best_phi": res["global_best"]["phi"],
                "summary": {m: {k: s[k] for k in keys} for m, s in res["summary"].items()}}
    from bilevel_rlhf.gridworld import GridWorldConfig, build_problem, global_search, run_method
    from bilevel_rlhf.gridworld.recipe import summarize

    cfg = GridWorldConfig(**{"progress": False, **(overrides or {})})
    problem = build_problem(cfg)
    best = global_search(problem, step=cfg.search_step, refine_step=cfg.search_refine_step)
    runs = {m: [run_method(problem, cfg, m, seed).to_dict()] for m in cfg.methods}
    summary = summarize(runs, best["phi"])
    return {"source": f"computed (default config, seed {seed}, overrides {overrides or {}})", "best_phi": best["phi"],
            "summary": {m: {k: s[k] for k in keys} for m, s in summary.items()}}


# ============================================================================================ report
def machine_info(num_threads: int) -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "num_threads": num_threads, "load_average_start": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers
        import trl

        info["transformers"], info["trl"] = transformers.__version__, trl.__version__
    except ImportError:
        pass
    return info


def markdown_tables(result: dict[str, Any]) -> str:
    """The headline table (ratios to RLOO), the split of a step, and the GridWorld tables."""
    lines = []
    lm = result.get("lm")
    if lm:
        a = result["arguments"]
        lines += [
            f"Model `{os.path.basename(lm['model'].rstrip('/'))}`{' + LoRA r=' + str(a['lora_r']) if a['use_peft'] else ''}"
            f"{' (our methods: r_x a LoRA adapter on the same base)' if a.get('reward_adapter') else ''}; "
            f"{a['num_prompts']} prompts x {a['num_generations']} completions x {a['max_completion_length']} tokens "
            f"per actor; {a['steps']} timed steps after {a['warmup_steps']} warm-up, interleaved; "
            f"torch threads {a['num_threads']}; load average {result['machine']['load_average_start'][0]:.2f} "
            f"-> {result['machine'].get('load_average_end', [float('nan')])[0]:.2f}.",
            "",
            "| method | s / step (median) | IQR | ratio to RLOO | generated tok/s | peak RSS MB | peak RSS above start MB "
            "| weights + optimizer state MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m, s in lm["methods"].items():
            ratio = f"{s['ratio_to_rloo']:.2f}x" if "ratio_to_rloo" in s else "-"
            mem = f"{s['peak_rss_mb']:.0f}"
            if "cuda_max_memory_allocated_mb" in s:
                mem += f" (cuda {s['cuda_max_memory_allocated_mb']:.0f})"
            lines.append(f"| {m} | {s['median_s']:.3f} | {s['q1_s']:.3f}-{s['q3_s']:.3f} | {ratio} | "
                         f"{s['generated_tokens_per_s']:.0f} | {mem} | {s['peak_rss_above_start_mb']:.0f} | "
                         f"{s['model_state_mb']:.1f} |")
        lines += ["", "| method | " + " | ".join(PARTS) + " |", "|---|" + "---|" * len(PARTS)]
        for m, s in lm["methods"].items():
            cells = [f"{s['split_s'][p]:.3f} s ({100 * s['split_fraction'][p]:.0f}%)" for p in PARTS]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    gw = result.get("gridworld")
    if gw:
        lines += ["", "| grid | states | P | exact Phi (tau = 0) s | exact hypergradient (tau = 0.05) s | single_loop "
                  "iterations / s | ms / iteration | first call s |", "|---|---|---|---|---|---|---|---|"]
        for n, s in gw["speed"].items():
            lines.append(f"| {n}x{n} | {s['states']} | {'sparse' if s.get('sparse') else 'dense'} | "
                         f"{s.get('exact_phi_s', float('nan')):.3f} | {s.get('exact_hypergradient_s', float('nan')):.3f} | "
                         f"{s['iterations_per_s']:.0f} | {s['ms_per_iteration']:.3f} | "
                         f"{s.get('first_call_s', float('nan')):.2f} |")
        s1 = gw["samples_to_1pct"]
        lines += ["", f"Samples to within 1% of the best Phi ({s1['best_phi']:.4f}), default instance; source: "
                  f"{s1['source']}", "", "| method | samples to 1% (median) | seeds reaching | final Phi |",
                  "|---|---|---|---|"]
        for m, s in s1["summary"].items():
            reach = "never" if s["samples_to_1pct_median"] is None else f"{s['samples_to_1pct_median']:.3g}"
            lines.append(f"| {m} | {reach} | {s['seeds_reaching_1pct']}/{s['n_seeds']} | {s['phi_mean']:.4f} |")
    return "\n".join(lines) + "\n"


def run_benchmark(args: BenchmarkArguments) -> dict[str, Any]:
    """The whole benchmark; writes results.json and table.md into args.output_dir."""
    import torch

    torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    result: dict[str, Any] = {"arguments": asdict(args), "machine": machine_info(args.num_threads)}
    if args.lm:
        result["lm"] = run_lm_benchmark(args)
    if args.gridworld:
        result["gridworld"] = {
            "speed": gridworld_speed(args.grid_sizes, args.grid_iterations, args.seed, args.grid_repeats),
            "samples_to_1pct": gridworld_samples_to_1pct(args.gridworld_results, args.seed),
        }
    result["machine"]["load_average_end"] = os.getloadavg()
    table = markdown_tables(result)
    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=float)
    with open(os.path.join(args.output_dir, "table.md"), "w") as fh:
        fh.write(table)
    return result
