"""Jobs across nodes: the teacher on a two-node ray.cluster_utils.Cluster (one worker per node), and a job sent
with `ray job submit` to a cluster from `ray start --head` that ends SUCCEEDED."""

import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ray = pytest.importorskip("ray")

from jobs import make_toy_data, runtime, train_teacher  # noqa: E402
from rtedit.train.config import load_job_config  # noqa: E402

REPO = runtime.REPO_ROOT
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_teacher_runs_on_two_nodes(tmp_path, taef2_weights):
    from ray.cluster_utils import Cluster

    make_toy_data.main(["--out", str(tmp_path / "toy"), "--n", "24", "--seed", "1", "--eval-n", "4"])
    config = load_job_config(REPO / "jobs" / "configs" / "toy_teacher.yaml", [
        f"run.storage_path={tmp_path / 'runs'}", "run.max_steps=2", "run.batch_size=2", "run.checkpoint_every=2",
        "run.log_every=1", "run.timeout_s=500", "optimizer.warmup_steps=0", "scaling.use_gpu=false",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.placement_strategy=STRICT_SPREAD",
        f"task.data_dir={tmp_path / 'toy'}", f"task.taef2_dir={taef2_weights}", "task.encode_device=cpu",
        "task.te_hidden=16", "task.te_layers=2", "task.te_heads=2", "task.te_taps=[1, 2]", "task.num_layers=1",
        "task.num_single_layers=1", "task.num_heads=2", "task.head_dim=16", "task.export_dtype=float32"])
    train_teacher.prepare(config)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                            "object_store_memory": 150 * 2**20})
    cluster.add_node(num_cpus=2, object_store_memory=150 * 2**20)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        result = runtime.run(config, train_teacher.TASK)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert result.metrics["step"] == 2
    assert len({w["node_id"] for w in result.workers}) == 2  # one rank per node
    assert (result.export_dir / "rtedit.json").is_file()


@pytest.mark.slow
def test_ray_job_submit_runs_a_job_to_succeeded(tmp_path):
    port, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rtray-", dir="/tmp")  # AF_UNIX socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    # --block keeps `ray start` in the foreground: ending its process group stops exactly this cluster.
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
         "--object-store-memory=200000000"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            try:
                client = JobSubmissionClient(address)
                break
            except Exception:
                if time.time() > deadline or head.poll() is not None:
                    raise
                time.sleep(2)
        entrypoint = (f"{sys.executable} -m jobs.train_tiny --config {REPO / 'jobs' / 'configs' / 'tiny.yaml'} "
                      f"--set run.storage_path={tmp_path / 'runs'} --set run.max_steps=4 --set run.checkpoint_every=2 "
                      f"--set run.timeout_s=300")
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--runtime-env-json",
             json.dumps({"env_vars": {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}}),
             "--submission-id", "rtedit-tiny", "--", *entrypoint.split()],
            env=env, capture_output=True, text=True, timeout=480, cwd=REPO)
        status = client.get_job_status("rtedit-tiny")
        logs = client.get_job_logs("rtedit-tiny")
        assert str(status) in ("SUCCEEDED", "JobStatus.SUCCEEDED"), submit.stdout[-3000:] + logs[-3000:]
        assert '"steps": 4' in logs
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
