"""With the dashboard on: Serve's REST API lists the app, Prometheus export carries our metrics, and an app
without an API key says so in its start-up log. Its own cluster (the dashboard costs ~1 GiB more)."""

from __future__ import annotations

import glob
import os
import socket
import time

import pytest

pytest.importorskip("ray.serve")

import httpx  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from test_serve_helpers import BASE, WS_URL, jpeg, start_ray, ws_frame  # noqa: E402

pytestmark = pytest.mark.slow

APP_ARGS = {
    "engine": {"model": "tiny"},
    "editor": {"num_replicas": 1, "num_cpus": 1, "torch_threads": 1},
    "text_encoder": {"num_cpus": 0.5},
    "router": {"num_cpus": 0.5, "api_key": None, "api_key_env": None, "defaults": {"prompt": "make it blue"}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppArgs

    dashboard_port, metrics_port = free_port(), free_port()
    context = start_ray(num_cpus=4, include_dashboard=True, dashboard_port=dashboard_port,
                        _metrics_export_port=metrics_port)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        serve.run(build_app(AppArgs.model_validate(APP_ARGS)), name="rtedit", route_prefix="/", blocking=False)
        yield {"dashboard": f"http://127.0.0.1:{dashboard_port}", "metrics": f"http://127.0.0.1:{metrics_port}",
               "session_dir": context.address_info["session_dir"]}
    finally:
        serve.shutdown()
        ray.shutdown()


def test_dashboard_lists_app_and_metrics_export_our_series(cluster):
    with connect(WS_URL) as ws:  # no key configured: the handshake needs none
        for i in range(3):
            assert ws_frame(ws, {"id": i}, jpeg(64, 64, tag=i)).error is None
    apps = httpx.get(f"{cluster['dashboard']}/api/serve/applications/", timeout=30).json()
    assert "rtedit" in apps["applications"]
    deployments = apps["applications"]["rtedit"]["deployments"]
    assert {"Router", "Editor", "TextEncoder"} <= set(deployments)
    wanted = ["ray_rtedit_stage_ms_bucket", "ray_rtedit_editor_stage_ms_bucket", "ray_rtedit_frames_total",
              "ray_rtedit_prompt_cache_lookups_total"]
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        text = httpx.get(f"{cluster['metrics']}/metrics", timeout=30).text
        if all(name in text for name in wanted):
            break
        time.sleep(3)
    missing = [name for name in wanted if name not in text]
    assert not missing, missing
    assert 'stage="denoise"' in text and 'event="processed"' in text


def test_startup_log_says_when_no_api_key_is_configured(cluster):
    assert httpx.get(f"{BASE}/api/stats", timeout=30).status_code == 200
    logs = glob.glob(os.path.join(cluster["session_dir"], "logs", "serve", "replica_rtedit_Router_*.log"))
    assert logs
    text = "".join(open(p, encoding="utf-8", errors="replace").read() for p in logs)
    assert "no API key configured" in text
