"""The shared job runtime on a local 4-CPU Ray cluster: two CPU workers with DeepSpeed ZeRO-2, checkpoints,
resume by rerunning, recovery from a worker killed mid-run (one model, and two at two rates beside a frozen one),
Ray Data shards, metrics on the Prometheus endpoint."""

import math
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

ray = pytest.importorskip("ray")

from jobs import runtime, train_tiny  # noqa: E402
from rtedit.train.config import load_job_config  # noqa: E402
from rtedit.train.runtime import METRIC_FIELDS, MetricsLog  # noqa: E402

TINY = runtime.REPO_ROOT / "jobs" / "configs" / "tiny.yaml"
PAIR = runtime.REPO_ROOT / "jobs" / "configs" / "tiny_pair.yaml"
TASK = "jobs.train_tiny:build_task"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    port = _free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False, _metrics_export_port=port)
    yield port
    ray.shutdown()


def _config(tmp_path, *overrides, path=TINY):
    return load_job_config(path, [f"run.storage_path={tmp_path / 'runs'}", "run.timeout_s=400", *overrides])


@pytest.mark.slow
def test_two_workers_zero2_loss_falls_and_rerun_resumes(ray_cluster, tmp_path):
    config = _config(tmp_path, "run.max_steps=12", "run.checkpoint_every=6", "deepspeed.zero_stage=2",
                     "scaling.num_workers=2", "optimizer.lr=0.03")
    first = runtime.run(config, TASK)
    log = MetricsLog.read_csv(first.metrics_csv)
    assert [int(r["step"]) for r in log.rows] == list(range(1, 13))
    losses = [r["loss"] for r in log.rows]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3
    assert all(r["samples_per_s"] > 0 and r["grad_norm"] > 0 for r in log.rows)
    assert log.columns == [*METRIC_FIELDS, "mae"] and all(r["mae"] > 0 for r in log.rows)  # loss's extras
    assert first.metrics["step"] == 12 and first.metrics_png.read_bytes()[:4] == b"\x89PNG"
    assert (first.export_dir / "model.pt").is_file()

    # Rerunning with the same name and storage path continues from the last checkpoint (step 12).
    more = _config(tmp_path, "run.max_steps=16", "run.checkpoint_every=6", "scaling.num_workers=2",
                   "optimizer.lr=0.03")
    second = runtime.run(more, TASK)
    log = MetricsLog.read_csv(second.metrics_csv)
    assert [int(r["step"]) for r in log.rows] == list(range(1, 17))
    assert {int(r["attempt_start"]) for r in log.rows[12:]} == {12}
    assert {int(r["attempt_start"]) for r in log.rows[:12]} == {0}


@pytest.mark.slow
def test_killed_worker_restarts_from_the_last_checkpoint(ray_cluster, tmp_path):
    marker = tmp_path / "crashed"
    config = _config(tmp_path, "run.name=crash", "run.max_steps=10", "run.checkpoint_every=4", "run.log_every=2",
                     "run.max_failures=1", "deepspeed.zero_stage=2", "scaling.num_workers=2",
                     "task.fail_once_at_step=6", "task.fail_rank=1", f"task.fail_marker={marker}")
    result = runtime.run(config, TASK)
    assert marker.read_text() == "6"  # the worker did die at step 6
    log = MetricsLog.read_csv(result.metrics_csv)
    assert [int(r["step"]) for r in log.rows] == list(range(1, 11))  # steps 5-6 redone, not duplicated
    starts = [int(r["attempt_start"]) for r in log.rows]
    assert starts == [0] * 4 + [4] * 6, starts
    assert result.metrics["step"] == 10


def test_timeout_and_bad_task_fail_before_training(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(runtime.ConfigError, match="cannot be imported"):
        runtime.run(config, "jobs.train_tiny:no_such_builder")
    with pytest.raises(runtime.ConfigError, match="module:function"):
        runtime.resolve_task("jobs.train_tiny")

    class Slow:
        def fit(self):
            import time
            time.sleep(5)

    with pytest.raises(TimeoutError, match="timeout_s=0.2"):
        runtime.fit_with_timeout(Slow(), 0.2)


@pytest.mark.slow
def test_zero3_export_gathers_full_weights(ray_cluster, tmp_path):
    import torch

    config = _config(tmp_path, "run.name=zero3", "run.max_steps=3", "run.checkpoint_every=3",
                     "deepspeed.zero_stage=3", "scaling.num_workers=2")
    result = runtime.run(config, TASK)
    assert result.metrics["step"] == 3
    state = torch.load(result.export_dir / "model.pt", weights_only=True)
    assert state["0.weight"].shape == (32, 16) and state["2.weight"].shape == (1, 32)  # not ZeRO-3 shards
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in state.values())
    assert len(result.workers) == 2 and {w["precision"] for w in result.workers} == {"fp32"}


@pytest.mark.slow
def test_loss_and_throughput_reach_the_prometheus_endpoint(ray_cluster, tmp_path):
    found: list[str] = []
    done = threading.Event()
    # The loss's extra value (mae) and the lr/grad norm columns are gauges too.
    wanted = {f"ray_rtedit_train_{name}" for name in ("loss", "samples_per_s", "mae", "lr", "grad_norm")}

    def scrape() -> None:  # while the run goes: Ray exports gauges every few seconds
        while not done.is_set() and not wanted <= {line.split("{")[0] for line in found}:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{ray_cluster}/metrics", timeout=5).read().decode()
                # Earlier runs on this cluster export the same names: keep only this run's series.
                found.extend(l for l in body.splitlines() if l.startswith("ray_rtedit_train_") and 'run="metrics"' in l)
            except OSError:
                pass
            time.sleep(1)

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    config = _config(tmp_path, "run.name=metrics", "run.max_steps=30", "run.checkpoint_every=30",
                     "scaling.num_workers=1", "task.step_sleep_s=1.0")
    try:
        runtime.run(config, TASK)
    finally:
        done.set()
        thread.join(10)
    names = {line.split("{")[0] for line in found}
    assert wanted <= names, sorted(names)


@pytest.mark.slow
def test_two_models_at_two_rates_resume_exactly_after_a_killed_worker(ray_cluster, tmp_path):
    """tiny_pair: "student" steps every step, "slow" every 2nd, beside a frozen teacher. A worker dies at step 5;
    the resumed run must match one that never failed, so every engine, optimizer and the task's counter resumed."""
    # log_every=6: only the checkpoints report (each ray.train.report costs ~2 s on 2 cores).
    steps = ["run.max_steps=6", "run.checkpoint_every=3", "run.log_every=6", "scaling.num_workers=2"]
    marker = tmp_path / "crashed"
    crashed = runtime.run(_config(tmp_path, "run.name=pair-crash", *steps, "task.fail_once_at_step=4",
                                  f"task.fail_marker={marker}", path=PAIR), TASK)
    assert marker.read_text() == "4"
    reference = runtime.run(_config(tmp_path, "run.name=pair", *steps, path=PAIR), TASK)
    log, ref = MetricsLog.read_csv(crashed.metrics_csv), MetricsLog.read_csv(reference.metrics_csv)
    assert log.columns == [*METRIC_FIELDS, "lr/student", "lr/slow", "grad_norm/student", "grad_norm/slow",
                           "loss/slow", "slow_updates"]
    assert [int(r["step"]) for r in log.rows] == list(range(1, 7))
    assert [int(r["attempt_start"]) for r in log.rows] == [0] * 3 + [3] * 3
    assert [r["slow_updates"] for r in log.rows] == [1, 1, 2, 2, 3, 3]  # the counter came back from the checkpoint
    updated = [math.isfinite(r["grad_norm/slow"]) and math.isfinite(r["loss/slow"]) for r in log.rows]
    assert updated == [True, False] * 3 and all(r["grad_norm/student"] > 0 for r in log.rows)
    assert log.rows[0]["lr/slow"] == 0.02 and log.rows[0]["lr/student"] == 0.005  # models.slow.optimizer; warmup
    assert [r["lr"] for r in log.rows] == [r["lr/student"] for r in log.rows]
    timing = {"samples_per_s", "step_time_s", "elapsed_s", "attempt_start"}  # these differ run to run
    for mine, theirs in zip(log.rows, ref.rows, strict=True):
        for key in set(log.columns) - timing:  # NaN where "slow" did not step, in both runs
            both_nan = math.isnan(mine[key]) and math.isnan(theirs[key])
            assert both_nan or math.isclose(mine[key], theirs[key], rel_tol=1e-6), (key, mine, theirs)
    for name in ("student", "slow"):
        state, expected = (torch.load(r.export_dir / f"{name}.pt", weights_only=True) for r in (crashed, reference))
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    tags = sorted(p.name for p in (Path(crashed.checkpoint_path) / runtime.MODELS_DIR).iterdir() if p.is_dir())
    assert tags == ["slow", "student"]  # one DeepSpeed tag per trainable model, none for the frozen teacher


@pytest.mark.slow
def test_dataset_shards_reach_the_task(ray_cluster, tmp_path):
    """task.kind=rows trains on a Ray Dataset passed to run(): each of two workers streams its own half of the rows."""
    config = _config(tmp_path, "run.name=rows", "run.max_steps=4", "run.checkpoint_every=4", "run.batch_size=4",
                     "scaling.num_workers=2", "task.kind=rows", "task.rows=32")
    result = runtime.run(config, TASK, datasets=train_tiny.prepare(config))
    assert result.metrics["step"] == 4
    state = Path(result.checkpoint_path) / runtime.STATE_DIR
    seen = [torch.load(state / f"rank-{rank}.pt", weights_only=True)["task"]["seen"] for rank in (0, 1)]
    assert [len(s) for s in seen] == [16, 16]  # 4 steps of 4 rows each
    assert sorted(seen[0] + seen[1]) == list(range(32))  # every row once, no row on both workers
