"""Sampled completions as a table (TRL's `log_completions` convention): what theta writes, what the human thinks of
it, and what r_x thinks of it.

On each logging step's rollout the first `num_completions_to_print` rows of the main process go to
  - TensorBoard as a Markdown table (text tab, tag `completions`) when the TensorBoard logger is on;
  - Weights & Biases as a `wandb.Table` (key `completions`) when W&B is on;
  - `output_dir/completions.jsonl`, one JSON object per row, always.
Other processes' rows are not gathered: the table is a view of the samples, not a statistic.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

__all__ = ["CompletionRow", "CompletionLogger"]


@dataclass
class CompletionRow:
    """One sampled completion of theta: its prompt, text, the oracle's score (None without `score`), r_x's score, and
    the oracle's label of the pair it belongs to (None on unlabelled iterations, and for a pair without an answer)."""

    step: int
    prompt: str
    completion: str
    oracle_score: float | None
    reward: float
    label: float | None


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


class CompletionLogger:
    """Writes `CompletionRow`s to the trainer's loggers and to `output_dir/completions.jsonl` (module docstring)."""

    def __init__(self, trainer, num_rows: int):
        self.trainer, self.num_rows = trainer, num_rows

    @property
    def path(self) -> str:
        return os.path.join(self.trainer.args.output_dir, "completions.jsonl")

    def rows(self, step: int, prompts, texts, rewards, oracle_scores, labels, pair_of) -> list[CompletionRow]:
        """The first rows of a rollout; `pair_of(i)` is the index of row i's pair in `labels` (None: a pair without
        an answer)."""
        n = min(self.num_rows, len(texts))
        label = lambda i: None if labels is None or labels[pair_of(i)] is None else float(labels[pair_of(i)])
        return [CompletionRow(step, prompts[i], texts[i], None if oracle_scores is None else float(oracle_scores[i]),
                              float(rewards[i]), label(i))
                for i in range(n)]

    def write(self, rows: list[CompletionRow]) -> None:
        if not rows or not self.trainer.accelerator.is_main_process:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as fh:
            for row in rows:
                fh.write(json.dumps(asdict(row)) + "\n")
        step = rows[0].step
        header = "| prompt | completion | oracle score | r_x | pair label |\n|---|---|---|---|---|\n"
        table = header + "".join(f"| {_cell(r.prompt)} | {_cell(r.completion)} | {_cell(r.oracle_score)} | "
                                 f"{_cell(r.reward)} | {_cell(r.label)} |\n" for r in rows)
        for callback in self.trainer.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:  # transformers' TensorBoardCallback, after on_train_begin
                writer.add_text("completions", table, step)
        report_to = self.trainer.args.report_to or []
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                columns = ["step", "prompt", "completion", "oracle_score", "reward", "label"]
                wandb.log({"completions": wandb.Table(columns=columns,
                                                      data=[[getattr(r, c) for c in columns] for r in rows])})
