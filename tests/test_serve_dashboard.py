"""The README's local cluster, end to end: Ray started as its first command starts it (the dashboard on, its logical
CPUs, a fixed metrics export port), the served toy student with serve.yaml's resources, and the README's small
training job beside it. The job fits and trains; one that does not fit fails in seconds with the numbers; Serve's
REST API lists the app; the metrics port carries every rtedit metric the code declares, and the Grafana dashboard
queries each of them, and Debian's Prometheus on the shipped scrape config answers every dashboard query; an app
without an API key says so in its start-up log. Its own cluster (the dashboard costs
~1 GiB more).

A job beside `serve run` used to wait 10 minutes for CPUs Serve held; the dashboard's metrics were on a random port.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

pytest.importorskip("ray.serve")

import httpx  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from test_serve_helpers import REPO, jpeg, start_ray, worker_pythonpath, ws_frame  # noqa: E402

pytestmark = pytest.mark.slow

DASHBOARD_JSON = REPO / "deployments" / "observability" / "grafana" / "dashboards" / "rtedit.json"
PROMETHEUS_YML = REPO / "deployments" / "observability" / "prometheus.yml"
# Where the code declares its metrics: Serve's replicas and the job runtime.
METRIC_SOURCES = [*sorted((REPO / "deployments").glob("*.py")), REPO / "jobs" / "runtime.py"]
# The job runtime's gauge per logged column (rtedit_train_<column>); the tiny task logs these.
TRAIN_GAUGES = ("loss", "lr", "grad_norm", "samples_per_s")
REPORT_INTERVAL_ENV = "RAY_metrics_report_interval_ms"
JOB_STEPS = 6


def yaml_app(name: str) -> dict:
    return yaml.safe_load((REPO / "deployments" / name).read_text())["applications"][0]["args"]


def readme_ray_start() -> dict[str, int]:
    """The flags of the `ray start` in the README's first command."""
    first = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("\n", 1)[0]
    start = re.search(r"ray start --head((?: --[\w-]+(?:[ =]\S+)?)*)", first)
    assert start, f"the README's first command starts no Ray head: {first}"
    return {flag: int(value) for flag, value in re.findall(r"--([\w-]+)[ =](\d+)", start.group(1))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def declared_metrics() -> set[str]:
    """Every Prometheus name our code declares (Ray adds ray_, a counter gets _total), the tiny job's gauges too."""
    names = set()
    for path in METRIC_SOURCES:
        for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*f?\"(rtedit_\w+)", path.read_text()):
            if kind == "Counter" and not name.endswith("_total"):
                name += "_total"
            names.add(f"ray_{name}")
    # editor.py builds its gauges from a table: rtedit_editor_{name}
    editor_gauges = re.findall(r"\(\"(\w+)\", \"[^\"]+\"\)", (REPO / "deployments" / "editor.py").read_text())
    names |= {f"ray_rtedit_editor_{name}" for name in editor_gauges}
    names = {n for n in names if "{" not in n and not n.endswith("_")}  # the f-string templates themselves
    names |= {f"ray_rtedit_train_{column}" for column in TRAIN_GAUGES}
    return names


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard's panels."""
    panels = json.loads(DASHBOARD_JSON.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def dashboard_metrics() -> set[str]:
    """The metric names the Grafana dashboard's queries read (a histogram by its _bucket series)."""
    return {name for expr in dashboard_queries() for name in re.findall(r"\bray_rtedit_\w+", expr)}


def exported(name: str) -> str:
    """The series name a declared metric is scraped as (a histogram's _bucket)."""
    return name + "_bucket" if name.endswith("_ms") else name


@pytest.fixture(scope="module")
def cluster(taef2_weights, tmp_path_factory):
    """`ray start --head` as the README's first command runs it, then serve-session.yaml's app (serve.yaml's resources;
    its session-mode model fills the K/V store, so every editor gauge is exported)."""
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppArgs

    flags = readme_ray_start()
    assert "metrics-export-port" in flags and "num-cpus" in flags
    served, session = yaml_app("serve.yaml"), yaml_app("serve-session.yaml")
    assert {k: session[k] for k in ("editor", "text_encoder")} == {k: served[k] for k in ("editor", "text_encoder")}
    assert session["router"]["num_cpus"] == served["router"]["num_cpus"]
    args = {**session, "engine": {**session["engine"], "taef2_dir": str(taef2_weights)},
            "router": {**session["router"], "api_key": None, "api_key_env": None}}
    # Free ports, not the README's, so a cluster or service someone runs on this machine is left alone.
    dashboard_port, metrics_port, http_port = free_port(), free_port(), free_port()
    # Every process exports its metrics each second instead of each 10 s: the scrapes below wait less.
    report_interval = os.environ.get(REPORT_INTERVAL_ENV)
    os.environ[REPORT_INTERVAL_ENV] = "1000"
    context = start_ray(num_cpus=flags["num-cpus"], include_dashboard=True, dashboard_port=dashboard_port,
                        _metrics_export_port=metrics_port)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(AppArgs.model_validate(args)), name="rtedit", route_prefix="/", blocking=False)
        yield {"dashboard": f"http://127.0.0.1:{dashboard_port}", "metrics": f"http://127.0.0.1:{metrics_port}",
               "http": f"http://127.0.0.1:{http_port}", "ws": f"ws://127.0.0.1:{http_port}/ws/predict",
               "session_dir": context.address_info["session_dir"], "gcs": context.address_info["gcs_address"],
               "runs": tmp_path_factory.mktemp("runs")}
    finally:
        serve.shutdown()
        ray.shutdown()
        if report_interval is None:
            os.environ.pop(REPORT_INTERVAL_ENV, None)
        else:
            os.environ[REPORT_INTERVAL_ENV] = report_interval


def scrape(cluster) -> str:
    return httpx.get(f"{cluster['metrics']}/metrics", timeout=30).text


def readme_job_command() -> list[str]:
    """The README's small job beside the service, as its `python -m jobs...` line says."""
    text = (REPO / "README.md").read_text()
    line = re.search(r"^(python -m jobs\.train_tiny [^\n]*--address auto[^\n]*)$", text, flags=re.M)
    assert line, "the README shows no small job beside the service"
    return line.group(1).split()


@pytest.fixture(scope="module")
def job_beside_serving(cluster):
    """The README's job on the cluster Serve runs on, scraped while it trains (a worker's gauges leave with it)."""
    command = readme_job_command()
    assert command[command.index("--address") + 1] == "auto"
    command[command.index("--address") + 1] = cluster["gcs"]  # "auto" would find any cluster on this machine
    command = [sys.executable, *command[1:], "--set", f"run.storage_path={cluster['runs']}",
               "--set", f"run.max_steps={JOB_STEPS}", "--set", f"run.checkpoint_every={JOB_STEPS}",
               "--set", "run.log_every=2", "--set", "task.step_sleep_s=0.5"]
    env = {**os.environ, "PYTHONPATH": worker_pythonpath(), "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                seen.extend(line for line in scrape(cluster).splitlines() if line.startswith("ray_rtedit_train_"))
            except httpx.HTTPError:
                pass
            time.sleep(1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.time()
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        done.set()
        watcher.join(10)
    return {"proc": proc, "seconds": time.time() - started, "train_series": seen}


def test_the_readmes_small_job_trains_beside_serving(cluster, job_beside_serving):
    proc = job_beside_serving["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == JOB_STEPS and summary["loss"] is not None
    apps = httpx.get(f"{cluster['dashboard']}/api/serve/applications/", timeout=30).json()
    assert apps["applications"]["rtedit"]["status"] == "RUNNING"  # serving went on beside it


def test_a_job_that_does_not_fit_fails_in_seconds_with_the_numbers(cluster, tmp_path):
    import ray

    from jobs import runtime
    from rtedit.train.config import load_job_config

    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:  # an earlier job's workers leaving
        time.sleep(1)

    config = load_job_config(REPO / "jobs" / "configs" / "tiny.yaml",
                             ["scaling.num_workers=3", f"run.storage_path={tmp_path}"])
    started = time.time()
    with pytest.raises(runtime.ClusterTooSmall) as refused:
        runtime.run(config, "jobs.train_tiny:build_task")
    assert time.time() - started < 10
    message = str(refused.value)
    # 4 logical CPUs, serve.yaml's replicas hold 2 (1 editor + 0.5 text encoder + 0.5 router).
    assert "3 worker(s) x 1 CPU = 3 CPU" in message and "4 CPU in all and 2 CPU free" in message, message
    assert "holds 2 CPU" in message and "scaling.num_workers" in message


def serving_traffic(cluster, frames: int = 3, pause_s: float = 0.0) -> None:
    """Edited frames, one refused image and one refused origin: every serving metric gets a series."""
    with connect(cluster["ws"]) as ws:  # no key configured: the handshake needs none
        for i in range(frames):
            assert ws_frame(ws, {"id": i}, jpeg(128, 128, tag=i)).error is None
            time.sleep(pause_s)
    # b"nonsense" as the image: the editor refuses it, and so the router counts an error
    bad = httpx.post(f"{cluster['http']}/api/predict", json={"image": "bm9uc2Vuc2U="}, timeout=60)
    assert bad.status_code == 400
    # a foreign origin: the router's guards refuse it, and count the refusal
    foreign = httpx.get(f"{cluster['http']}/api/info", headers={"Origin": "http://evil.example"}, timeout=60)
    assert foreign.status_code == 403


def test_the_metrics_port_carries_every_rtedit_metric_and_the_dashboard_shows_them(cluster, job_beside_serving):
    serving_traffic(cluster)
    apps = httpx.get(f"{cluster['dashboard']}/api/serve/applications/", timeout=30).json()
    assert {"Router", "Editor", "TextEncoder"} <= set(apps["applications"]["rtedit"]["deployments"])

    declared, queried = declared_metrics(), dashboard_metrics()
    assert {exported(name) for name in declared} == queried, "a metric without a panel, or a panel without a metric"
    serving = {name for name in queried if not name.startswith("ray_rtedit_train_")}
    deadline, names = time.time() + 90, set()
    while time.time() < deadline:
        names = {line.split("{")[0] for line in scrape(cluster).splitlines() if line.startswith("ray_rtedit_")}
        if serving <= names:
            break
        time.sleep(1)
    names |= {line.split("{")[0] for line in job_beside_serving["train_series"]}
    assert sorted(queried - names) == []


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no prometheus binary in CI: scripts/test.sh installs Debian's prometheus package")
        pytest.skip("no prometheus binary: Debian's prometheus package (scripts/test.sh installs it)")
    return path


def test_prometheus_on_the_shipped_config_answers_every_dashboard_query(cluster, tmp_path):
    """The README's Prometheus (Debian's, on deployments/observability/prometheus.yml with its target moved to this
    cluster's metrics port) scrapes the cluster; every serving panel's query returns series and the training panels'
    queries parse (their job has left). Grafana itself cannot run here: what it would draw is these answers."""
    shipped = yaml.safe_load(PROMETHEUS_YML.read_text())
    static = shipped["scrape_configs"][0]["static_configs"][0]
    assert static["targets"] == [f"localhost:{readme_ray_start()['metrics-export-port']}"]
    static["targets"] = [cluster["metrics"].removeprefix("http://")]
    shipped["global"] = {**shipped["global"], "scrape_interval": "1s", "evaluation_interval": "1s"}
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(shipped))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)

    def query(expr: str) -> dict:
        answer = httpx.get(f"{api}/query", params={"query": expr}, timeout=30).json()
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]

    try:
        deadline, health = time.time() + 60, None
        while time.time() < deadline and health != "up":
            time.sleep(0.5)
            try:
                targets = httpx.get(f"{api}/targets", timeout=5).json()["data"]["activeTargets"]
                health = targets[0]["health"] if targets else None
            except (httpx.HTTPError, KeyError, ValueError):
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert health == "up", (tmp_path / "prometheus.log").read_text()[-2000:]
        serving_traffic(cluster, frames=4, pause_s=1.0)  # counters that move while Prometheus scrapes them
        exprs = dashboard_queries()
        serving = [e for e in exprs if "ray_rtedit_train_" not in e]
        deadline, empty = time.time() + 60, serving
        while time.time() < deadline and empty:
            empty = [e for e in serving if not query(e)["result"]]
            time.sleep(1)
        assert empty == [], "\n".join(empty)
        # Idle for three report intervals: Ray ages out a gauge nobody sets again (deployments/gauges.py).
        time.sleep(3 * int(os.environ[REPORT_INTERVAL_ENV]) / 1000)
        assert [e for e in serving if not query(e)["result"]] == []
        for expr in exprs:
            assert query(expr)["resultType"] == "vector"
        processed = query('sum(ray_rtedit_frames_total{event="processed"})')["result"]
        assert float(processed[0]["value"][1]) >= 4
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_startup_log_says_when_no_api_key_is_configured(cluster):
    assert httpx.get(f"{cluster['http']}/api/stats", timeout=30).status_code == 200
    logs = glob.glob(os.path.join(cluster["session_dir"], "logs", "serve", "replica_rtedit_Router_*.log"))
    assert logs
    text = "".join(open(p, encoding="utf-8", errors="replace").read() for p in logs)
    assert "no API key configured" in text
