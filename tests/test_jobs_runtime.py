"""The shared job runtime on a local 4-CPU Ray cluster: two CPU workers with DeepSpeed ZeRO-2, checkpoints,
resume by rerunning, and recovery from a worker killed mid-run."""

import os
import socket
import threading
import time
import urllib.request

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

ray = pytest.importorskip("ray")

from jobs import runtime  # noqa: E402
from rtedit.train.config import load_job_config  # noqa: E402
from rtedit.train.runtime import MetricsLog  # noqa: E402

TINY = runtime.REPO_ROOT / "jobs" / "configs" / "tiny.yaml"
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


def _config(tmp_path, *overrides):
    return load_job_config(TINY, [f"run.storage_path={tmp_path / 'runs'}", "run.timeout_s=400", *overrides])


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

    def scrape() -> None:  # while the run goes: Ray exports gauges every few seconds
        while not done.is_set() and not found:
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
    assert {"ray_rtedit_train_loss", "ray_rtedit_train_samples_per_s"} <= names, found[:5]
