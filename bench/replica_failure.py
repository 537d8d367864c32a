"""What a replica's death costs its sessions (not a test): two websocket sessions stream on two editor replicas,
one replica is killed (ray.kill, as a crash), and each session's replies are timed from the kill.

    python bench/replica_failure.py --trials 3          # a local cluster on port 8019, the tiny preset on the CPU

Per trial: the dead replica's session's first reply after the kill (an error frame, or already a good frame when
no frame was in flight) and its first good frame from the live replica; the other session's longest wait between
two replies around the kill. The engine issue's targets (issue 15 item 7): error frame <= 1 s, served again by the
other replica <= 1 s (with 2 replicas). Prints a Markdown table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # deployments/ (platform/ itself never goes on sys.path)

PORT = 8019
APP_ARGS = {
    "engine": {"model": "tiny"},
    "editor": {"num_replicas": 2, "num_cpus": 1, "torch_threads": 1, "min_frame_ms": 100,
               "health_check_period_s": 2, "admission": {"max_sessions": 2}},
    "text_encoder": {"num_cpus": 0.5},
    "router": {"num_cpus": 0.5, "api_key_env": None, "edit_timeout_s": 60,
               "defaults": {"seed": 0, "steps": 1, "format": "jpeg"}},
}


def frame(tag: int) -> bytes:
    import io

    import PIL.Image

    rng = np.random.default_rng(tag)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class Stream(threading.Thread):
    """One session sending a frame whenever its previous one came back; every reply as (time, replica, error)."""

    def __init__(self, tag: int):
        super().__init__(daemon=True)
        from websockets.sync.client import connect

        from rtedit.transport import decode_reply, encode_frame

        self.encode, self.decode = encode_frame, decode_reply
        self.ws = connect(f"ws://127.0.0.1:{PORT}/ws/predict", max_size=2**24, open_timeout=60)
        self.image, self.replies, self.stop = frame(tag), [], threading.Event()
        self.ws.send(self.encode({"id": 0, "prompt": f"session {tag}", "seed": tag}, self.image))
        first = self._recv()
        assert first.error is None, first.meta
        self.replica = first.meta["replica"]

    def _recv(self):
        while True:
            message = self.ws.recv(timeout=120)
            if isinstance(message, bytes):
                return self.decode(message)

    def run(self) -> None:
        i = 1
        try:
            while not self.stop.is_set():
                self.ws.send(self.encode({"id": i}, self.image))
                reply = self._recv()
                self.replies.append((time.monotonic(), reply.meta.get("replica"),
                                     reply.error["code"] if reply.error else None))
                i += 1
        except Exception as exc:  # noqa: BLE001 - a closed session is a result
            self.replies.append((time.monotonic(), None, f"closed: {type(exc).__name__}"))


def running_editors(serve) -> int:
    app = serve.status().applications.get("rtedit")
    if app is None or "Editor" not in app.deployments:
        return 0
    return app.deployments["Editor"].replica_states.get("RUNNING", 0)


def trial(serve, ray) -> dict:
    deadline = time.time() + 180
    while running_editors(serve) < 2:
        assert time.time() < deadline, "two editor replicas never ran"
        time.sleep(1)
    time.sleep(1.5)  # past the router's view refresh: it sees both replicas
    streams = [Stream(tag) for tag in (1, 2)]
    assert streams[0].replica != streams[1].replica, "both sessions on one replica"
    for s in streams:
        s.start()
    time.sleep(2)
    victim = streams[0].replica
    killed = time.monotonic()
    ray.kill(ray.get_actor(f"SERVE_REPLICA::rtedit#Editor#{victim}", namespace="serve"), no_restart=True)
    time.sleep(5)
    for s in streams:
        s.stop.set()
    for s in streams:
        s.join(120)
        s.ws.close()
    after = [(t - killed, r, e) for t, r, e in streams[0].replies if t >= killed]
    first = after[0] if after else (float("nan"), None, "none")
    good = next(((t, r) for t, r, e in after if e is None), (float("nan"), None))
    times = [killed] + [t for t, _, _ in streams[1].replies if t >= killed - 1]
    return {"victim": victim, "first_reply_s": first[0], "first_reply": first[2] or "good frame",
            "served_again_s": good[0], "served_by": good[1],
            "errors": sum(1 for _, _, e in after if e), "other_max_gap_s": float(np.max(np.diff(times)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppArgs

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app(AppArgs.model_validate(APP_ARGS)), name="rtedit", route_prefix="/")
        for k in range(args.trials):
            rows.append(trial(serve, ray))
            print(f"trial {k + 1}: {rows[-1]}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("| trial | dead replica's session: first reply after the kill | served again by the live replica | "
          "error frames | other session's longest gap |")
    print("| --- | --- | --- | --- | --- |")
    for k, r in enumerate(rows, 1):
        print(f"| {k} | {r['first_reply']} at {r['first_reply_s']:.2f} s | {r['served_again_s']:.2f} s | "
              f"{r['errors']} | {r['other_max_gap_s']:.2f} s |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
