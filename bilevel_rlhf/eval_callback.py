"""`OracleEvalCallback`: the evaluation protocol (`bilevel_rlhf.evaluation`) run during training, for
`BilevelTrainer` and TRL's trainers alike.

Every `eval_steps` optimizer steps (and at steps 0 and the last) the policy being trained is evaluated on held-out
prompts; the metrics go to the Trainer's loggers (`eval_protocol/score`, `/win_rate`, `/kl`, ...; TensorBoard by
default) and every record to `output_dir/eval_protocol.json`, rewritten whole after each evaluation (never half
written). On resume the records after the checkpoint's step are dropped and measured again. Every process
evaluates the same rows (sharded engines need all ranks in each forward); the main process writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .evaluation import Actor, EvalRecord, PolicyEvaluator

__all__ = ["OracleEvalCallback", "read_eval_records"]

RECORDS_NAME = "eval_protocol.json"


def read_eval_records(path: str | os.PathLike) -> list[EvalRecord]:
    """The records of an `eval_protocol.json` (a file, or the run folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_NAME
    try:
        data = json.loads(path.read_text())
        return [EvalRecord(**r) for r in data["records"]]
    except FileNotFoundError:
        raise FileNotFoundError(f"no evaluation records: {path} does not exist (train with OracleEvalCallback)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt evaluation records {path}: {type(e).__name__}: {e}") from None


def _actors(trainer: Trainer, ref_model: torch.nn.Module | None) -> tuple[Actor, Actor]:
    """(the trained policy, the reference) as the evaluator takes them, for BilevelTrainer and TRL trainers."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "actor"):  # BilevelModel: theta, and the frozen reference (or the bare LoRA base)
        policy: Actor = lambda: model.actor("theta")  # noqa: E731
        if ref_model is None:
            if model.ref_policy is None and not model.use_peft:
                raise ValueError("OracleEvalCallback: this BilevelTrainer keeps no reference policy (regularization "
                                 "'entropy'); pass ref_model= (the initial policy) to measure the KL")
            return policy, lambda: model.actor("ref")
        return policy, ref_model
    if ref_model is not None:
        return model, ref_model
    if hasattr(model, "disable_adapter"):  # a PEFT policy: the base without adapters is the initial policy
        return model, model.disable_adapter
    ref = getattr(trainer, "ref_model", None)
    if ref is None:
        raise ValueError(f"OracleEvalCallback: {type(trainer).__name__} keeps no reference model; pass ref_model= "
                         "(the initial policy) to measure the KL and the win rate")
    return model, trainer.accelerator.unwrap_model(ref)


class OracleEvalCallback(TrainerCallback):
    """Evaluates the trained policy with an oracle on held-out prompts during training (module docstring).

    Args:
        trainer: the trainer (`BilevelTrainer`, TRL's `OnlineDPOTrainer`, `RLOOTrainer`, ...); add the callback to it
            with `trainer.add_callback`.
        prompts: held-out prompts.
        eval_steps: evaluate every this many optimizer steps (>= 1), and at the first and last step.
        oracle: the judge; None: the trainer's `preference_oracle` (BilevelTrainer).
        ref_model: the initial policy; None: the trainer's own reference (BilevelTrainer's, the bare base of a PEFT
            policy, or the TRL trainer's `ref_model`).
        train_queries: returns the training oracle queries so far; None: the trainer's `oracle_queries` when it has
            one (BilevelTrainer).
        output_file: where the records go; None: `args.output_dir/eval_protocol.json`.
        num_samples, max_new_tokens, batch_size, seed: the evaluator's (`PolicyEvaluator`); max_new_tokens None: the
            trainer's `max_completion_length` (or `max_new_tokens`).
    """

    def __init__(self, trainer: Trainer, prompts: list[str], eval_steps: int, oracle: Any = None,
                 ref_model: torch.nn.Module | None = None, train_queries: Callable[[], int] | None = None,
                 output_file: str | os.PathLike | None = None, num_samples: int = 4, max_new_tokens: int | None = None,
                 batch_size: int = 64, seed: int = 0) -> None:
        if not isinstance(eval_steps, int) or eval_steps < 1:
            raise ValueError(f"OracleEvalCallback: eval_steps must be an integer >= 1, got {eval_steps!r}")
        oracle = oracle if oracle is not None else getattr(trainer, "preference_oracle", None)
        if oracle is None:
            raise ValueError(f"OracleEvalCallback: {type(trainer).__name__} has no preference_oracle; pass oracle=")
        args = trainer.args
        if max_new_tokens is None:
            max_new_tokens = getattr(args, "max_completion_length", None) or getattr(args, "max_new_tokens", None)
        if train_queries is None and hasattr(trainer, "oracle_queries"):
            train_queries = lambda: trainer.oracle_queries  # noqa: E731
        self.trainer, self.eval_steps, self.train_queries = trainer, eval_steps, train_queries
        self.policy, self.ref = _actors(trainer, ref_model)
        self.evaluator = PolicyEvaluator(prompts, trainer.processing_class, oracle, num_samples=num_samples,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
        self.output_file = Path(output_file) if output_file is not None else Path(args.output_dir) / RECORDS_NAME
        self.records: list[EvalRecord] = []

    # --- records ---
    def _write(self) -> None:
        if not self.trainer.accelerator.is_main_process:
            return
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.output_file.with_name(self.output_file.name + ".tmp")
        e = self.evaluator
        meta = {"num_prompts": len(e.prompts), "num_samples": e.num_samples, "max_new_tokens": e.max_new_tokens,
                "seed": e.seed, "eval_steps": self.eval_steps}
        tmp.write_text(json.dumps({**meta, "records": [r.to_dict() for r in self.records]}, indent=1) + "\n")
        os.replace(tmp, self.output_file)  # atomic: a kill leaves the previous file whole

    def _evaluate(self, step: int) -> None:
        if self.records and self.records[-1].step >= step:
            return
        queries = self.train_queries() if self.train_queries is not None else None
        record = self.evaluator.evaluate(self.policy, self.ref, step=step, train_queries=queries,
                                         device=self.trainer.accelerator.device)
        self.records.append(record)
        Trainer.log(self.trainer, record.metrics())  # the base log: a trainer's own log would flush its metrics
        self._write()

    # --- Trainer events ---
    def on_train_begin(self, args, state, control, **kwargs):
        if self.output_file.is_file():  # a resumed run: keep what precedes the checkpoint, measure the rest again
            self.records = [r for r in read_eval_records(self.output_file) if r.step <= state.global_step]
            self.evaluator.eval_queries = self.records[-1].eval_queries if self.records else 0
        self._evaluate(state.global_step)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps == 0:
            self._evaluate(state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._evaluate(state.global_step)
        return control
