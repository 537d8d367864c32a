"""Job configs and the Ray-free runtime helpers: strict YAML parsing, NaN rejected, schedule, DeepSpeed config."""

import math
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

    tasks = {"tiny.yaml": TinyTaskConfig, "toy_teacher.yaml": TeacherTaskConfig}
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
])
def test_bad_values_name_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_job_config(_write(tmp_path, BASE), [override])


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
