"""The docs against the code: docs/trainer.md's metrics tables list exactly what the trainer logs, its custom-objective
example trains, the Python examples of docs/algorithm.md and docs/gridworld.md run (and print what the page says),
and every relative link in README.md and docs/ resolves (file and anchor)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from datasets import Dataset
from test_trainer_math import PROMPTS, char_score, make_trainer
from testing_utils import make_policy, make_reward_model, make_tokenizer, record_loss_inputs
from transformers import TrainerCallback

from bilevel_rlhf.config import PENALIZED_THETA_METHODS, PENALTY_METHODS, BilevelConfig
from bilevel_rlhf.preference import ScoreOracle
from bilevel_rlhf.trainer import BilevelTrainer

ROOT = Path(__file__).resolve().parent.parent
TRAINER_DOC = ROOT / "docs" / "trainer.md"
HF_KEYS = {"loss", "grad_norm", "learning_rate", "epoch", "total_flos"}  # and train_*: HF Trainer's own


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + len(heading) + 2)
    return text[start : end if end >= 0 else len(text)]


def documented_metrics() -> list[tuple[str, list[str]]]:
    """(metric, conditions) of each row of the metrics tables in docs/trainer.md's "## Logged metrics"."""
    rows = re.findall(r"^\| `([^`]+/[^`]+)` \| ([^|]+?) \|", _section(TRAINER_DOC.read_text(), "## Logged metrics"),
                      flags=re.M)
    assert len(rows) > 20, rows
    return [(name, [c.strip() for c in cond.split(",")]) for name, cond in rows]


def expected_keys(trainer: BilevelTrainer, evaluation: bool = False, x_step: bool = True,
                  labelled: bool = True) -> set[str]:
    """The documented metric names whose conditions hold for this trainer's configuration."""
    a = trainer.args
    two_actors = a.method in PENALTY_METHODS
    holds = {
        "always": True,
        "two actors": two_actors,
        "penalized theta": a.method in PENALIZED_THETA_METHODS,
        "win_rate": trainer.objective.against_reference,
        "labelled": labelled,
        "KL": a.regularization == "kl",
        "oracle score": callable(getattr(trainer.preference_oracle, "score", None)),
        "x step": x_step,
        "clipping": a.max_grad_norm > 0,
        "trust region": a.reward_trust_region > 0 and not trainer.is_deepspeed_enabled,
        "warmup": a.hypergradient_warmup_ratio > 0,
        "exploring": a.exploration_temperature > 1,
        "exact KL": a.kl_estimator == "exact",
        "forward KL": a.forward_kl_coef > 0,
    }
    keys = set()
    for name, conditions in documented_metrics():
        unknown = set(conditions) - set(holds)
        assert not unknown, f"docs/trainer.md: {name} has undefined conditions {unknown}"
        if name.startswith("eval_") != evaluation or not all(holds[c] for c in conditions):
            continue
        for role in (["theta", "phi"] if two_actors else ["theta"]) if "{role}" in name else [None]:
            keys.add(name.replace("{role}", role) if role else name)
    return keys


class Capture(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def own_keys(log: dict) -> set[str]:
    return {k for k in log if k not in HF_KEYS and not k.startswith("train_")}


CONFIGS = [
    dict(method="single_loop", objective="win_rate"),
    dict(method="partial_sgd", objective="win_rate", kl_estimator="exact"),
    dict(method="covariance", objective="win_rate", label_every=2, exploration_temperature=2.0),
    dict(method="penalized_covariance", objective="preference_nll", reward_trust_region=0.5,
         hypergradient_warmup_ratio=0.5, forward_kl_coef=0.5),
    dict(method="nested_loop", objective="preference_nll", nested_inner_steps=2, regularization="entropy",
         max_grad_norm=0.0),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['method']}-{c['objective']}")
def test_logged_metrics_are_the_documented_ones(tmp_path, config):
    """Two iterations of 2 PPO epochs x 2 mini-batches: the union of the logged keys is the documented set, and the
    x-step metrics appear exactly on the steps that update x."""
    trainer = make_trainer(tmp_path, max_steps=8, eval_prompts=PROMPTS[:3], **config)
    capture = Capture()
    trainer.add_callback(capture)
    trainer.train()
    steps = [log for log in capture.logs if "loss" in log]
    assert len(steps) == 8
    logged = set().union(*(own_keys(log) for log in capture.logs))
    assert logged == expected_keys(trainer), (
        f"logged, not documented: {sorted(logged - expected_keys(trainer))}; "
        f"documented, not logged: {sorted(expected_keys(trainer) - logged)}"
    )
    spi, per_epoch = trainer.args.steps_per_iteration, trainer.args.steps_per_iteration // trainer.args.num_iterations
    for step, log in enumerate(steps):
        x_step = (step % spi) < per_epoch and trainer.is_reward_iteration(step // spi)
        labelled = trainer.is_labelled_iteration(step // spi)
        assert own_keys(log) == expected_keys(trainer, x_step=x_step, labelled=labelled), step

    metrics = trainer.evaluate()
    assert set(metrics) == expected_keys(trainer, evaluation=True)
    assert own_keys(capture.logs[-1]) == expected_keys(trainer, evaluation=True)


def _python_block(text: str, marker: str) -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if marker in b]
    assert len(blocks) == 1, f"expected one python block with {marker!r}"
    return blocks[0]


def test_custom_objective_example_trains(tmp_path):
    namespace: dict = {}
    exec(_python_block(TRAINER_DOC.read_text(), "class LossAverseWinRate"), namespace)
    objective = namespace["LossAverseWinRate"](weight=0.1, aversion=1.0)
    tok = make_tokenizer()
    args = BilevelConfig(
        output_dir=str(tmp_path / "out"), method="single_loop", per_device_train_batch_size=8, num_generations=2,
        max_completion_length=4, max_prompt_length=8, max_steps=2, use_cpu=True, report_to="none", disable_tqdm=True,
        actor_learning_rate=1e-3, critic_learning_rate=1e-3, reward_learning_rate=1e-3,
    )
    oracle = ScoreOracle(char_score, mode="probability", name="chars")
    trainer = BilevelTrainer(make_policy(tok), make_reward_model(tok), oracle, args,
                             Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok, objective=objective)
    capture = Capture()
    trainer.add_callback(capture)
    loss_inputs = record_loss_inputs(trainer)
    trainer.train()
    assert trainer.oracle_queries == 2 * 4 * 2  # 2 iterations x 4 prompts x 2 theta completions, one query each
    assert "objective/win_rate" in capture.logs[0] and "reward/ref_mean" in capture.logs[0]
    last = loss_inputs[-1].batch  # the last rollout, completed by its update's forward passes (fused)
    expected = objective.completion_values(last.pair_loss, last.labels).mean()
    last_step = [log for log in capture.logs if "loss" in log][-1]
    assert last_step["objective/upper_loss"] == pytest.approx(float(expected), rel=1e-5)


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", heading.strip().lower()))


@pytest.mark.parametrize("page", ["README.md"] + sorted(p.relative_to(ROOT).as_posix()
                                                       for p in (ROOT / "docs").glob("*.md")))
def test_relative_links_resolve(page):
    path = ROOT / page
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{page}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", dest.read_text(), flags=re.S), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page}: no heading for #{anchor} in {dest.name}"


def test_algorithm_bandit_example_prints_the_table_it_documents(capsys):
    """docs/algorithm.md's "Which upper objective?" code block, run as written, prints the means in its table."""
    text = (ROOT / "docs" / "algorithm.md").read_text()
    exec(_python_block(text, "LMBandit.random"), {})
    printed = {}
    for line in capsys.readouterr().out.splitlines():
        tau, values = line.split(" ", 1)
        printed[tau] = [float(v) for v in values.strip("[] ").split()]
    for tau in ("0.5", "0.1"):
        row = re.search(rf"^\| {tau} \| ([\d.]+) / ([\d.]+) .*?\| ([\d.]+) / ([\d.]+) ", text, flags=re.M)
        assert row, f"docs/algorithm.md: no table row for tau {tau}"
        assert printed[tau] == pytest.approx([float(g) for g in row.groups()], abs=1e-3), tau


def test_gridworld_example_runs():
    namespace: dict = {}
    exec(_python_block((ROOT / "docs" / "gridworld.md").read_text(), "run_method(build_problem"), namespace)
    result, cfg = namespace["result"], namespace["cfg"]
    assert result.method == "single_loop" and result.samples == 2 * cfg.iterations * cfg.batch_size  # two actors
    assert result.phi < result.curve_phi[0]  # the designer's objective improved from the start
