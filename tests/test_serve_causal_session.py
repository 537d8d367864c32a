"""A causal "session"-mode model served by a real Ray Serve app (CPU) and one websocket session against it.

The test writes the model folder itself: the tiny preset saved as a Flux2KleinPipeline folder whose rtedit.json says
causal "session" at condition timestep 0 (what jobs.distill exports), with sharpened modulation weights so the
instruction and the reference visibly move the output. Every frame the socket returns must equal, pixel for pixel
(CPU float32, PNG), `Session.edit` of a fresh Editor built in this process from the same folder with the same prompt,
reference, seed and size; the replica's /api/stats must show the open session and K/V store hits from frame 2 on.
One Serve app for the module, on a free port (other Serve test modules use 8000).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("ray.serve")

import httpx  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from test_serve_helpers import API_KEY, jpeg, start_ray, ws_frame  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "make it look like a watercolor painting"
SEED, STEPS = 3, 2
FRAMES = [jpeg(64, 64, tag=tag) for tag in (1, 2, 3)]
HEADERS = {"x-api-key": API_KEY}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


REFERENCE = png(np.random.default_rng(10).integers(0, 255, (80, 64, 3), dtype=np.uint8))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_session_folder(folder: Path) -> Path:
    """The tiny preset as a served folder in the "session" causal mode (seeded, sharpened weights)."""
    import torch
    from diffusers import Flux2KleinPipeline

    from rtedit.presets import build_preset

    bundle = build_preset("tiny", torch.device("cpu"), torch.float32, seed=0)
    with torch.no_grad():  # default init leaves the gates near zero: T and R would barely move the output
        for name, p in bundle.transformer.named_parameters():
            if "modulation" in name or "time_guidance_embed" in name:
                p.mul_(8.0)
    Flux2KleinPipeline(scheduler=bundle.scheduler, vae=bundle.vae, text_encoder=bundle.text_encoder,
                       tokenizer=bundle.tokenizer, transformer=bundle.transformer,
                       is_distilled=True).save_pretrained(folder)
    (folder / "rtedit.json").write_text(json.dumps({"causal": "session", "condition_timestep": 0.0}))
    return folder


def expected_frames(folder: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """The frames `Session.edit` gives on a fresh Editor from `folder`, and frame 1 edited without the reference; on
    one thread like the replica's processes (the text encoder's and the editor's), so float32 sums run alike."""
    import torch

    from rtedit.config import EditorConfig
    from rtedit.editor import Editor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        editor = Editor.from_config(EditorConfig(model=str(folder), device="cpu", dtype="float32"))
        assert editor.mode == "session"
        session = editor.open_session(PROMPT, [REFERENCE])
        frames = [np.asarray(session.edit(frame, seed=SEED, steps=STEPS).image) for frame in FRAMES]
        return frames, np.asarray(editor.edit(FRAMES[0], PROMPT, seed=SEED, steps=STEPS).image)
    finally:
        torch.set_num_threads(threads)


@dataclass
class Served:
    """The running app and what its frames must be."""

    base: str  # host:port of the app
    expected: list[np.ndarray]  # Session.edit's frames for FRAMES, computed in this process
    without_reference: np.ndarray  # frame 1 edited with the prompt alone


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on a session-mode folder: one editor replica (1 torch thread), its text encoder, the router."""
    from ray import serve

    import ray
    from deployments.app import build_app
    from deployments.config import AppArgs

    folder = tmp_path_factory.mktemp("served") / "tiny-session"
    args = AppArgs.model_validate({
        "engine": {"model": str(folder), "device": "cpu", "dtype": "float32"},
        "editor": {"num_replicas": 1, "num_cpus": 1, "torch_threads": 1, "warmup": False},
        "text_encoder": {"num_cpus": 0.5},
        "router": {"num_cpus": 0.5, "api_key": API_KEY, "edit_timeout_s": 60},
    })
    port = free_port()
    # The folder and the expected frames are made here while Ray and the replicas start in their own processes.
    with ThreadPoolExecutor(1) as pool:
        written = pool.submit(write_session_folder, folder)
        start_ray(num_cpus=3)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            written.result()
            expected = pool.submit(expected_frames, folder)
            serve.run(build_app(args), name="rtedit", route_prefix="/", blocking=False)
            yield Served(f"127.0.0.1:{port}", *expected.result())
        finally:
            serve.shutdown()
            ray.shutdown()


def editor_stats(client: httpx.Client, base: str) -> dict:
    """The one editor replica's engine stats from /api/stats."""
    editors = client.get(f"http://{base}/api/stats", headers=HEADERS, timeout=30).json()["editors"]
    assert isinstance(editors, dict) and len(editors) == 1, editors
    return next(iter(editors.values()))


def test_websocket_session_frames_equal_engine_session_edits(served):
    expected, base = served.expected, served.base
    # The comparison can tell frames apart, and a replica that dropped the reference from its session.
    assert not np.array_equal(expected[0], expected[1])
    assert not np.array_equal(expected[0], served.without_reference)
    received, stats_after = [], {}
    with httpx.Client() as client, connect(f"ws://{base}/ws/predict?api_key={API_KEY}", max_size=2**24) as ws:
        # The replica's start-up capacity probe (deployments/admission.py measure_engine) ran session frames too.
        before = editor_stats(client, base)["kv_store"]
        assert before["entries"] == 0, before
        ws.send(json.dumps({"references": [base64.b64encode(REFERENCE).decode()]}))
        ack = json.loads(ws.recv(timeout=30))
        assert ack["ok"] and ack["references"] == 1, ack
        for i, frame in enumerate(FRAMES, start=1):
            meta = {"id": i, "prompt": PROMPT, "seed": SEED, "steps": STEPS, "format": "png"} if i == 1 else {"id": i}
            reply = ws_frame(ws, meta, frame)
            assert reply.id == i and reply.error is None, reply.meta
            assert "session" in reply.meta["timings"] and reply.meta["session_version"] == 0
            received.append(np.asarray(PIL.Image.open(io.BytesIO(reply.image)).convert("RGB")))
            stats_after[i] = editor_stats(client, base)
        for i, (got, want) in enumerate(zip(received, expected), start=1):
            np.testing.assert_array_equal(got, want, err_msg=f"frame {i}")

        for i, stats in stats_after.items():
            store = stats["kv_store"]
            assert stats["causal"] == "session" and stats["sessions"] == 1, (i, stats)
            # Frame 1 computes the session's T/R keys and values; every later frame reads them back.
            assert (store["entries"], store["misses"] - before["misses"], store["hits"] - before["hits"]) == (
                1, 1, i - 1), (i, store, before)
            assert store["bound_source"] == "cpu_default" and store["share"] == 1.0

        ws.close()
        deadline = time.time() + 20  # the router closes the replica's session after the socket goes
        while time.time() < deadline and (stats := editor_stats(client, base))["sessions"]:
            time.sleep(0.2)
    assert stats["sessions"] == 0 and stats["kv_store"]["entries"] == 0, stats


def test_a_killed_replica_gives_error_frames_or_correct_ones_and_its_successor_recomputes_the_session(served):
    """The causal issue's fault rule on a session-mode model: kill the one editor replica mid-session; until Serve's
    replacement is up the client gets error frames, then the replacement recomputes the session's T/R keys and values
    from the prompt and references the router resends, so every frame is an error or exactly Session.edit's."""
    import ray

    expected, base = served.expected, served.base
    with httpx.Client() as client, connect(f"ws://{base}/ws/predict?api_key={API_KEY}", max_size=2**24) as ws:
        ws.send(json.dumps({"references": [base64.b64encode(REFERENCE).decode()]}))
        assert json.loads(ws.recv(timeout=30))["ok"]
        first = ws_frame(ws, {"id": 1, "prompt": PROMPT, "seed": SEED, "steps": STEPS, "format": "png"}, FRAMES[0])
        assert first.error is None and np.array_equal(np.asarray(PIL.Image.open(io.BytesIO(first.image))), expected[0])
        victim = first.meta["replica"]
        ray.kill(ray.get_actor(f"SERVE_REPLICA::rtedit#Editor#{victim}", namespace="serve"), no_restart=True)
        replies, frame_id, deadline = [], 2, time.time() + 90
        while time.time() < deadline:
            reply = ws_frame(ws, {"id": frame_id}, FRAMES[1], timeout=90)
            replies.append(reply)
            frame_id += 1
            if reply.error is None:
                got = np.asarray(PIL.Image.open(io.BytesIO(reply.image)).convert("RGB"))
                np.testing.assert_array_equal(got, expected[1], err_msg=f"frame {reply.id} after the kill")
                if reply.meta["replica"] != victim:
                    break
            else:
                time.sleep(0.5)  # Serve starts the replacement; the router answers with a reason meanwhile
        assert replies[-1].error is None and replies[-1].meta["replica"] != victim, [r.meta for r in replies]
        assert all(r.error is None or r.error.get("code") for r in replies), [r.meta for r in replies]
        reply = ws_frame(ws, {"id": frame_id}, FRAMES[2])
        got = np.asarray(PIL.Image.open(io.BytesIO(reply.image)).convert("RGB"))
        np.testing.assert_array_equal(got, expected[2], err_msg="the frame after the recomputed one")
        store = editor_stats(client, base)["kv_store"]
        assert store["entries"] == 1 and store["hits"] >= 1, store  # recomputed once, then read back
