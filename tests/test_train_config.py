"""Job configs and the Ray-free runtime helpers: strict YAML parsing, NaN rejected, schedule, DeepSpeed config."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from rtedit.errors import ConfigError
from rtedit.train import runtime
from rtedit.config_parsing import from_dict
from rtedit.train.config import JobConfig, OptimizerConfig, load_job_config

REPO = Path(__file__).resolve().parents[1]
BASE = {"run": {"name": "t", "storage_path": "/tmp/x", "max_steps": 10, "batch_size": 4}}


def _write(tmp_path, data) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_committed_job_config_validates():
    configs = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        config = load_job_config(path)
        assert config.run.max_steps >= 1
    from jobs.train_teacher import TeacherTaskConfig
    from jobs.train_tiny import TinyTaskConfig
    from rtedit.train.reward.task import RewardTaskConfig
    from rtedit.train.tasks.distill import DistillTaskConfig
    from rtedit.train.tasks.dmdr import DMDRTaskConfig

    tasks = {"tiny.yaml": TinyTaskConfig, "tiny_pair.yaml": TinyTaskConfig, "toy_teacher.yaml": TeacherTaskConfig,
             "toy_teacher_finetune.yaml": TeacherTaskConfig,
             "distill_toy.yaml": DistillTaskConfig, "reward_toy.yaml": RewardTaskConfig,
             "reward_9b_lora.yaml": RewardTaskConfig, "reward_gpu.yaml": RewardTaskConfig,
             "reward_toy_degraded.yaml": RewardTaskConfig, "reward_toy_relations.yaml": RewardTaskConfig,
             "dmdr_toy.yaml": DMDRTaskConfig}
    assert sorted(tasks) == sorted(p.name for p in configs)  # a new job config needs its task check here
    for name, cls in tasks.items():
        load_job_config(REPO / "jobs" / "configs" / name).task_config(cls)
    with pytest.raises(ConfigError, match=r"task\.head_dim"):
        load_job_config(REPO / "jobs" / "configs" / "toy_teacher.yaml", ["task.head_dim=12"]).task_config(
            TeacherTaskConfig)


def test_defaults_and_overrides(tmp_path):
    config = load_job_config(_write(tmp_path, BASE), ["run.max_steps=25", "deepspeed.zero_stage=3",
                                                      "optimizer.betas=[0.8, 0.9]"])
    assert config.run.max_steps == 25 and config.deepspeed.zero_stage == 3
    assert config.optimizer.betas == (0.8, 0.9)
    assert config.deepspeed.resolve_precision(on_gpu=True) == "bf16"
    assert config.deepspeed.resolve_precision(on_gpu=False) == "fp32"
    assert config.run.output_path() == Path("/tmp/x/t")


@pytest.mark.parametrize("override, field", [
    ("optimizer.lr=.nan", "optimizer.lr"),
    ("optimizer.lr=.inf", "optimizer.lr"),
    ("run.timeout_s=.nan", "run.timeout_s"),
    ("task.scale=.nan", "task.scale"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("deepspeed.zero_stage=2.0", "deepspeed.zero_stage"),
    ("scaling.use_gpu=1", "scaling.use_gpu"),
    ("run.max_steps=0", "run.max_steps"),
    ("run.name=''", "run.name"),
    ("deepspeed.precision=fp16", "deepspeed.precision"),
    ("optimizer.warmup_steps=11", "optimizer.warmup_steps"),
    ("optimizer.betas=[0.9]", "optimizer.betas"),
    ("run.colour=red", "colour"),
    ("models.slow.zero_stage=4", "models.slow.zero_stage"),
    ("models.slow.optimizer.lr=-1", "models.slow.optimizer.lr"),
    ("models.slow.optimizer.lr=.nan", "models.slow.optimizer.lr"),
    ("models.slow.optimizer.warmup_steps=11", "models.slow.optimizer.warmup_steps"),
    ("models.slow.optimizer.colour=1", "models.slow.optimizer.colour"),
    ("models.slow.lr=0.1", "models.slow.lr"),
])
def test_bad_values_name_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_job_config(_write(tmp_path, BASE), [override])


def test_each_model_inherits_the_optimizer_and_zero_stage_it_does_not_change():
    config = load_job_config(REPO / "jobs" / "configs" / "tiny_pair.yaml", ["deepspeed.zero_stage=3"])
    slow = config.optimizer_for("slow")
    assert (slow.lr, slow.warmup_steps) == (0.02, 0)
    assert (slow.name, slow.schedule, slow.betas) == (config.optimizer.name, "cosine", config.optimizer.betas)
    assert config.optimizer_for("student") == config.optimizer
    # The job config wins over the task's own choice, which wins over the job-wide sections.
    assert config.optimizer_for("student", {"lr": 0.5}).lr == 0.5
    assert config.optimizer_for("slow", {"lr": 0.5, "weight_decay": 0.1}) == replace(slow, weight_decay=0.1)
    assert config.zero_stage_for("slow", 2) == 1
    assert config.zero_stage_for("student", 2) == 2 and config.zero_stage_for("student") == 3
    with pytest.raises(ConfigError, match=r"models\.student\.optimizer\.lr"):
        config.optimizer_for("student", {"lr": 0.0})


def test_missing_required_and_unreadable(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.batch_size is required"):
        from_dict(JobConfig, {"run": {"name": "t", "storage_path": "/x", "max_steps": 1}})
    with pytest.raises(ConfigError, match="cannot read"):
        load_job_config(tmp_path / "absent.yaml")


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    opt = OptimizerConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    values = [runtime.lr_multiplier(s, opt, 20) for s in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert math.isclose(values[20], 0.1)
    assert runtime.lr_multiplier(7, OptimizerConfig(schedule="constant"), 20) == 1.0


def test_deepspeed_config_follows_the_job():
    config = load_job_config(REPO / "jobs" / "configs" / "tiny.yaml", ["deepspeed.zero_stage=3"])
    ds = runtime.deepspeed_config(config, on_gpu=False)
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"] == {"enabled": False}
    assert ds["train_micro_batch_size_per_gpu"] == config.run.batch_size
    assert runtime.deepspeed_config(config, on_gpu=True)["bf16"] == {"enabled": True}
    opt = runtime.build_optimizer(torch.nn.Linear(2, 2).parameters(), config.optimizer)
    assert isinstance(opt, torch.optim.AdamW)


def test_metrics_log_round_trips_truncates_and_plots(tmp_path):
    log = runtime.MetricsLog()
    for step in range(1, 7):
        log.append({"step": step, "loss": 1.0 / step, "lr": 0.1, "grad_norm": 2.0, "samples_per_s": 100.0,
                    "step_time_s": 0.5, "elapsed_s": step * 0.5, "attempt_start": 0})
    back = runtime.MetricsLog.read_csv(log.write_csv(tmp_path / "m.csv"))
    assert [r["step"] for r in back.rows] == [1, 2, 3, 4, 5, 6]
    assert math.isclose(back.rows[2]["loss"], 1 / 3, rel_tol=1e-5)
    assert [r["step"] for r in back.upto(4).rows] == [1, 2, 3, 4]
    png = back.plot(tmp_path / "m.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_log_keeps_every_column_a_step_returns(tmp_path):
    log = runtime.MetricsLog()
    for step in range(1, 5):
        values = {"loss": 1.0 / step, "mae": 0.5 / step, **({"loss/slow": 2.0 / step} if step % 2 else {})}
        log.append(runtime.metrics_row(step, values, {"student": 0.1, "slow": 0.2},
                                       {"student": 1.0, "slow": 3.0 if step % 2 else math.nan}, 10.0, 0.1, step, 0))
    expected = [*runtime.METRIC_FIELDS, "lr/student", "lr/slow", "grad_norm/student", "grad_norm/slow", "mae",
                "loss/slow"]
    assert log.columns == expected
    path = log.write_csv(tmp_path / "m.csv")
    assert path.read_text().splitlines()[0] == ",".join(expected)
    back = runtime.MetricsLog.read_csv(path)
    assert back.columns == expected
    assert [r["lr"] for r in back.rows] == [0.1] * 4  # the first declared model's, as with one model
    assert back.rows[0]["loss/slow"] == 2.0 and math.isnan(back.rows[1]["loss/slow"])
    assert math.isnan(back.rows[1]["grad_norm/slow"]) and back.rows[2]["grad_norm/slow"] == 3.0
    assert back.rows[3]["mae"] == 0.125
    panels = {title: keys for title, _, keys in runtime._panels(back.columns)}
    assert panels["learning rate"] == ["lr/student", "lr/slow"] and panels["mae"] == ["mae"]
    assert panels["loss"] == ["loss", "loss/slow"]
    assert back.plot(tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    # One model: no per-model columns; a step value named like a runtime column, or no loss, is refused.
    assert list(runtime.metrics_row(1, {"loss": 1.0}, {"model": 0.1}, {"model": 1.0}, 1, 1, 1, 0)) == list(
        runtime.METRIC_FIELDS)
    with pytest.raises(ValueError, match="samples_per_s"):
        runtime.metrics_row(1, {"loss": 1.0, "samples_per_s": 2.0}, {"model": 0.1}, {"model": 1.0}, 1, 1, 1, 0)
    with pytest.raises(KeyError, match="loss"):
        runtime.metrics_row(1, {"mse": 1.0}, {"model": 0.1}, {"model": 1.0}, 1, 1, 1, 0)
    # A CSV the single-model runtime wrote reads back with its eight columns.
    old = runtime.MetricsLog.read_csv(REPO / "tests" / "data" / "toy_teacher_tiny_metrics.csv")
    assert old.columns == list(runtime.METRIC_FIELDS) and len(old.rows) == 6


class _FakeEngine:
    """What the default train step uses of a DeepSpeed engine: forward, backward, step."""

    def __init__(self):
        self.module = torch.nn.Linear(1, 1)
        self.calls = []

    def __call__(self, x):
        return self.module(x)

    def backward(self, loss):
        self.calls.append("backward")
        loss.backward()

    def step(self):
        self.calls.append("step")


def test_default_train_step_runs_the_micro_batches_and_averages_their_values():
    class OneModel:
        model = torch.nn.Linear(1, 1)

        def batch(self, index):
            return torch.full((2, 1), float(index))

        def loss(self, model, batch):
            return model(batch).pow(2).mean() * 0 + batch.mean(), {"index": batch[0, 0]}

    task = OneModel()
    specs = runtime.model_specs(task)
    assert list(specs) == ["model"] and specs["model"].module is task.model and specs["model"].trainable
    engine = _FakeEngine()
    values = runtime.default_train_step(task, accum=3)({"model": engine}, step=2)  # micro-batches 6, 7, 8
    assert engine.calls == ["backward", "step"] * 3
    assert float(values["loss"]) == 7.0 and values["index"] == 7.0
    assert runtime.mean_over_workers(values, torch.device("cpu")) == {"loss": 7.0, "index": 7.0}


def test_model_specs_are_checked():
    class Many:
        def __init__(self, **specs):
            self.specs = specs

        def models(self):
            return self.specs

    frozen = runtime.ModelSpec(torch.nn.Linear(2, 2), trainable=False)
    with pytest.raises(ValueError, match="trainable"):
        runtime.model_specs(Many(teacher=frozen))
    with pytest.raises(ValueError, match="model name"):
        runtime.model_specs(Many(**{"a/b": runtime.ModelSpec(torch.nn.Linear(2, 2))}))
    with pytest.raises(TypeError, match="ModelSpec"):
        runtime.model_specs(Many(student=torch.nn.Linear(2, 2)))
    module = runtime.freeze(frozen.module, torch.device("cpu"), torch.bfloat16)
    assert not module.training and all(not p.requires_grad and p.dtype == torch.bfloat16 for p in module.parameters())
