"""Clients and fixtures shared by the Serve tests (a local Ray cluster, one Serve app on port 8000); no tests here."""

from __future__ import annotations

import io
import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import PIL.Image

from rtedit.transport import Reply, decode_reply, encode_frame

REPO = Path(__file__).resolve().parents[1]
# deployments/ is imported from the repository root (platform/ itself never goes on sys.path).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
BASE = "http://127.0.0.1:8000"
WS_URL = "ws://127.0.0.1:8000/ws/predict"
API_KEY = "test-key-123"


def jpeg(width: int = 64, height: int = 64, tag: int = 0, quality: int = 90) -> bytes:
    """A deterministic test image; `tag` changes its colours so clients can be told apart."""
    rng = np.random.default_rng(tag)
    base = rng.integers(0, 255, size=3)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([(x * 3 + base[0]) % 256, (y * 3 + base[1]) % 256, ((x + y) + base[2]) % 256], -1)
    buf = io.BytesIO()
    PIL.Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def image_size(data: bytes) -> tuple[int, int]:
    return PIL.Image.open(io.BytesIO(data)).size


def worker_pythonpath() -> str:
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def start_ray(num_cpus: int = 6, **kwargs):
    """A fresh local cluster (never a stale one), auth mode explicit, deployments/ importable on every worker."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    return ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=kwargs.pop("include_dashboard", False),
        object_store_memory=300 * 2**20, log_to_driver=False,
        # The repo root on the workers' path (not a working_dir upload: nothing to package, any cwd works).
        runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}},
        **kwargs,
    )



@contextlib.contextmanager
def running_app(app_args: dict, num_cpus: int = 6):
    """A fresh cluster running the rtedit app from these args on 127.0.0.1:8000; shut down on exit."""
    from ray import serve

    import ray
    from deployments.app import build_app
    from deployments.config import AppArgs

    start_ray(num_cpus=num_cpus)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        serve.run(build_app(AppArgs.model_validate(app_args)), name="rtedit", route_prefix="/", blocking=False)
        yield serve
    finally:
        serve.shutdown()
        ray.shutdown()

def ws_frame(ws, meta: dict, image: bytes, timeout: float = 60) -> Reply:
    ws.send(encode_frame(meta, image))
    return recv_frame(ws, timeout)


def recv_frame(ws, timeout: float = 60) -> Reply:
    while True:
        message = ws.recv(timeout=timeout)
        if isinstance(message, bytes):
            return decode_reply(message)
