"""Admission, fair share and replica faults (issue 15 items 2-4, 7), on CPU, no timing assertions.

Fast tests drive deployments/admission.py and the Router class over a fake editor handle; one module-scoped Serve
app (tiny preset, 2 editor replicas of 2 sessions each, one edit slot each) checks refusal with its code and reason,
drain, replica death under live sessions and that frames never sat in Serve's routing retry loop.
"""

from __future__ import annotations

import asyncio
import base64
import time
import types

import pytest

pytest.importorskip("ray.serve")

from conftest import FakeAdmission, via_serve_handle  # noqa: E402
from test_serve_helpers import BASE, WS_URL, jpeg, recv_frame, running_app, ws_frame  # noqa: E402

from deployments.admission import Assignments, FairQueue, fps_capacity, replica_capacity  # noqa: E402
from deployments.config import AppArgs  # noqa: E402
from rtedit.streaming import EditJob, SessionDefaults, SessionState  # noqa: E402
from rtedit.transport import encode_frame  # noqa: E402

PROMPT = "make it blue"


# ---- capacity ------------------------------------------------------------------------------------------------
def test_capacity_from_engine_time_target_fps_and_kv_bytes():
    assert fps_capacity(20.0, 10) == 5 and fps_capacity(30.0, 10) == 3 and fps_capacity(500.0, 10) == 1
    fps = replica_capacity(max_sessions=None, target_fps=10, frame_ms=20.0, session_kv_bytes=0, kv_max_bytes=None)
    assert (fps["capacity"], fps["source"]) == (5, "target_fps")
    configured = replica_capacity(max_sessions=8, target_fps=10, frame_ms=20.0, session_kv_bytes=0, kv_max_bytes=10)
    assert (configured["capacity"], configured["source"]) == (8, "configured")
    # A session keeps 300 bytes of K/V and the store holds 1000: three sessions fit, not five or eight.
    for max_sessions in (None, 8):
        kv = replica_capacity(max_sessions=max_sessions, target_fps=10, frame_ms=20.0, session_kv_bytes=300,
                              kv_max_bytes=1000)
        assert (kv["capacity"], kv["source"], kv["kv_sessions"]) == (3, "kv_store", 3)
    assert replica_capacity(max_sessions=None, target_fps=10, frame_ms=1.0, session_kv_bytes=5000,
                            kv_max_bytes=1000)["capacity"] == 1  # one session still served (recomputed per frame)
    with pytest.raises(Exception, match="target_fps"):
        AppArgs(editor={"admission": {"target_fps": 0}})
    with pytest.raises(Exception, match="extra"):
        AppArgs(editor={"admission": {"max_session": 2}})


def test_replica_measures_its_engine_and_derives_capacity(monkeypatch):
    """EditorDeployment measures the engine after warm-up; a frame counts at least min_frame_ms."""
    from ray import serve

    from deployments.config import replicas_options
    from deployments.editor import EditorDeployment

    context = types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id="replica-a"))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    args = AppArgs(engine={"model": "tiny"}, editor={"warmup": False, "torch_threads": 1, "min_frame_ms": 150,
                                                     "admission": {"target_fps": 2}})
    deployment = EditorDeployment.func_or_class(args.engine, args.editor)
    state = deployment.admission_state()
    measured = state["measured"]
    assert measured["engine_ms"] > 0 and measured["frame_ms"] == max(measured["engine_ms"], 150)
    assert state["capacity"] == max(1, int(1000 // (measured["frame_ms"] * 2))) and measured["source"] == "target_fps"
    assert state["slots"] == args.editor.max_ongoing_requests
    assert replicas_options(args.editor)["max_ongoing_requests"] == args.editor.max_ongoing_requests + 4

    # Admission is the replica's: full is refused with the reason, a draining replica takes nobody and tells
    # its sessions to reconnect; a frame for a session not admitted here is never edited.
    deployment.book.capacity = 1
    assert deployment.admit("s1", replica="replica-a")["admitted"] is True
    full = deployment.admit("s2", replica="replica-a")
    assert full["admitted"] is False and "full (1 of 1 sessions)" in full["reason"]
    job = EditJob(session="s2", id=1, image=jpeg(64, 64), prompt=PROMPT, steps=1, seed=0, width=None, height=None,
                  format="jpeg")
    assert asyncio.run(deployment.edit(job, replica="replica-a")) == {"need_admission": "s2", "replica": "replica-a"}
    one_shot = asyncio.run(deployment.edit(EditJob(**{**job.__dict__, "session": ""}), replica="replica-a"))
    assert "full" in one_shot and one_shot["retry_after_s"] == 1
    assert deployment.drain("scale-down")["draining"] == "scale-down"
    assert "draining" in asyncio.run(deployment.edit(dataclass_replace(job, session="s1"), replica="replica-a"))[
        "reconnect"]
    assert deployment.close_session("s1", replica="replica-a")["closed"] is False  # no engine session was opened
    assert deployment.admit("s3")["admitted"] is False
    deployment.drain(None)
    assert deployment.admit("s3")["admitted"] is True


def dataclass_replace(job, **kw):
    import dataclasses

    return dataclasses.replace(job, **kw)


def test_kv_bytes_of_a_session_model_reduce_capacity():
    from deployments.admission import measure_engine
    from rtedit.config import EditorConfig
    from test_sessions import causal_editor

    editor = causal_editor("session", EditorConfig(text_encoder=False), text_encoder=False)
    measured = measure_engine(editor)
    assert measured["session_kv_bytes"] > 0 and editor.kv_store.stats()["entries"] == 0  # probe session closed
    capacity = replica_capacity(max_sessions=10, target_fps=10, frame_ms=1.0,
                                session_kv_bytes=measured["session_kv_bytes"],
                                kv_max_bytes=int(2.5 * measured["session_kv_bytes"]))
    assert (capacity["capacity"], capacity["source"]) == (2, "kv_store")


# ---- fair share -----------------------------------------------------------------------------------------------
def test_fair_queue_is_round_robin_one_frame_per_session():
    async def run():
        queue, order = FairQueue(1), []

        async def session(name: str, frames: int):
            for _ in range(frames):
                await queue.acquire(name)
                order.append(name)
                await asyncio.sleep(0)
                queue.release(name)

        await asyncio.gather(session("flood", 12), session("b", 4), session("c", 4))
        await queue.acquire("x")
        with pytest.raises(RuntimeError, match="already has a frame"):
            await queue.acquire("x")
        return order

    order = asyncio.run(run())
    served = [i for i, name in enumerate(order) if name == "b"]
    # Between two of b's frames every other waiting session is served once at most.
    assert all(later - earlier <= 3 for earlier, later in zip(served, served[1:])), order
    assert order[:9].count("flood") <= 3


def test_new_sessions_go_to_the_freest_replica_and_ties_to_the_longest_unused():
    table = Assignments()
    table.update([{"replica": r, "capacity": 4, "sessions": 0, "slots": 1, "draining": None} for r in ("a", "b")])
    order = []
    for k in range(4):  # one session after another, each closed before the next: they alternate
        replica = table.candidates()[0]
        table.assign(f"s{k}", replica)
        table.unassign(f"s{k}")
        order.append(replica)
    assert order == ["a", "b", "a", "b"]
    table.assign("held", "a")
    table.replicas["a"].sessions += 1
    assert table.candidates() == ["b", "a"]  # most free first, whoever was used last


def test_router_serves_a_quiet_session_every_round_beside_a_flooding_one():
    """Two websocket sessions on one replica with one edit slot: one floods (a new frame whenever it may), the
    other sends one frame at a time; the Router's fair queue serves the quiet one every round."""
    import deployments.router as router_module

    FLOOD, QUIET = jpeg(64, 64, tag=1), jpeg(64, 64, tag=2)
    args = AppArgs(engine={"model": "tiny"}, router={"api_key_env": None})
    router_cls = router_module.Router.func_or_class.__bases__[0]
    editor = FakeAdmission(replica="r1", capacity=2, slots=1)
    served, in_flight = [], []

    def edit(job, embedding=None, replica=None):
        async def run():
            in_flight.append(job.session)
            assert in_flight.count(job.session) == 1 and len(in_flight) <= editor.book["slots"]
            await asyncio.sleep(0.001)
            in_flight.remove(job.session)
            served.append(job.session)
            return {"image": job.image, "timings": {}, "replica": replica}
        return run()

    editor.edit = types.SimpleNamespace(remote=edit)
    router = router_cls(types.SimpleNamespace(), editor, via_serve_handle(args.router), args.engine)

    async def run():
        stop, quiet_rounds = asyncio.Event(), []

        async def flood():
            state = SessionState.start("flood", SessionDefaults(prompt=PROMPT, steps=1), seed=0)
            i = 0
            while not stop.is_set():
                i += 1
                meta, out = await router.process(state.job(i, FLOOD))
                assert out == FLOOD  # never another session's frame

        async def quiet():
            state = SessionState.start("quiet", SessionDefaults(prompt=PROMPT, steps=1), seed=0)
            await asyncio.sleep(0.01)  # the flood is under way
            for i in range(10):
                meta, out = await router.process(state.job(i + 1, QUIET))
                assert out == QUIET
                quiet_rounds.append(len(served))
            stop.set()

        await asyncio.gather(flood(), quiet())
        return quiet_rounds

    rounds = asyncio.run(run())
    # Each quiet frame is answered within two edits of the previous one: the flood got at most one in between.
    assert all(later - earlier <= 2 for earlier, later in zip(rounds, rounds[1:])), (rounds, served)
    assert served.count("flood") >= 5 and router.admission.table == {"flood": "r1", "quiet": "r1"}


# ---- one Serve app ----------------------------------------------------------------------------------------------
APP_ARGS = {
    "engine": {"model": "tiny"},
    "editor": {"num_replicas": 2, "num_cpus": 1, "torch_threads": 1, "min_frame_ms": 100, "max_ongoing_requests": 1,
               "health_check_period_s": 2, "admission": {"max_sessions": 2, "retry_after_s": 3}},
    "text_encoder": {"num_cpus": 0.5},
    "router": {"num_cpus": 0.5, "api_key_env": None, "edit_timeout_s": 60,
               "defaults": {"seed": 0, "steps": 1, "format": "png"}},
}


@pytest.fixture(scope="module")
def app():
    with running_app(APP_ARGS) as serve:
        yield serve


def _stats():
    import httpx

    return httpx.get(f"{BASE}/api/stats", timeout=30).json()


def _closed(ws, timeout: float = 60):
    """The close (code, reason) after any frames still in flight."""
    from websockets.exceptions import ConnectionClosed

    frames = []
    try:
        while True:
            frames.append(recv_frame(ws, timeout))
    except ConnectionClosed as exc:
        return exc.rcvd.code, exc.rcvd.reason, frames


def _open(tag: int):
    from websockets.sync.client import connect

    ws = connect(WS_URL, max_size=2**24)
    # Its own seed too: the tiny preset's random weights may answer different images alike.
    reply = ws_frame(ws, {"id": 1, "prompt": f"session {tag}", "seed": 1000 + tag}, jpeg(64, 64, tag=tag))
    assert reply.error is None, reply.meta
    return ws, reply


def test_sessions_beyond_capacity_are_refused_at_once_and_admitted_ones_go_on(app):
    import httpx

    sessions = [_open(tag) for tag in range(4)]  # 2 replicas x 2 sessions
    try:
        replicas = {reply.meta["replica"] for _, reply in sessions}
        assert len(replicas) == 2  # spread: most free first
        from websockets.sync.client import connect

        with connect(WS_URL) as extra:
            code, reason, frames = _closed(extra)
        assert code == 1013 and "every editor replica is full (4 of 4 sessions on 2 replicas)" in reason, reason
        r = httpx.post(f"{BASE}/api/predict", json={"image": base64.b64encode(jpeg()).decode(), "prompt": PROMPT},
                       timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "3" and r.json()["error"]["code"] == "no_capacity"
        for i, (ws, first) in enumerate(sessions):  # the admitted sessions still get their own frames
            again = ws_frame(ws, {"id": 2}, jpeg(64, 64, tag=i))
            assert again.error is None and again.image == first.image and again.meta["replica"] == first.meta["replica"]
        stats = _stats()["admission"]
        assert stats["refused"] == 1 and stats["one_shots_refused"] == 1 and stats["assigned"] == 4
        # Frames went only into free slots: Serve's request router never had to route one again.
        assert stats["routing"].get("retries", 0) == 0, stats
    finally:
        for ws, _ in sessions:
            ws.close()
    deadline = time.time() + 30
    while _stats()["admission"]["assigned"] and time.time() < deadline:
        time.sleep(0.2)
    ws, _ = _open(9)  # admitted again once the others left
    ws.close()


def test_draining_replica_tells_its_sessions_to_reconnect_and_takes_no_new_ones(app):
    from ray import serve

    ws_a, first = _open(1)
    handle = serve.get_deployment_handle("Editor", app_name="rtedit")
    victim = first.meta["replica"]
    try:
        state = handle.drain.remote("scale-down test", replica=victim).result(timeout_s=30)
        assert state["draining"] == "scale-down test" and state["replica"] == victim
        ws_a.send(encode_frame({"id": 2}, jpeg(64, 64, tag=1)))
        code, reason, frames = _closed(ws_a)
        assert frames and frames[-1].error["code"] == "reconnect" and frames[-1].id == 2
        assert code == 1012 and "draining: scale-down test" in reason, reason
        ws_b, other = _open(2)  # a new session goes to the replica that is not draining
        assert other.meta["replica"] != victim
        ws_b.close()
    finally:
        handle.drain.remote(None, replica=victim).result(timeout_s=30)
        ws_a.close()


def test_replica_death_under_live_sessions_gives_error_frames_then_a_live_replica(app):
    """Kill one editor replica while two sessions stream: the dead replica's session gets an error frame (or, when
    no frame was in flight, its next frame is served elsewhere), then frames from the live replica; every frame a
    client gets is its own session's output (same input, same seed: the same image) or an error, never another's."""
    import ray

    time.sleep(1.2)  # past Assignments.refresh_s: the router sees the drain test's replica taking sessions again
    sessions = [_open(tag) for tag in (3, 4)]
    try:
        by_replica = {reply.meta["replica"]: i for i, (_, reply) in enumerate(sessions)}
        assert len(by_replica) == 2
        victim = sessions[0][1].meta["replica"]
        expected = [reply.image for _, reply in sessions]
        assert expected[0] != expected[1]
        ws0 = sessions[0][0]
        ws0.send(encode_frame({"id": 2}, jpeg(64, 64, tag=3)))  # in flight (>= 100 ms a frame) while it dies
        actor = ray.get_actor(f"SERVE_REPLICA::rtedit#Editor#{victim}", namespace="serve")
        ray.kill(actor, no_restart=True)
        replies, frame_id = [recv_frame(ws0, 60)], 3
        while replies[-1].error is not None and frame_id < 40:
            assert replies[-1].error["code"] == "editor_failed", replies[-1].meta
            replies.append(ws_frame(ws0, {"id": frame_id}, jpeg(64, 64, tag=3)))
            frame_id += 1
        ok = replies[-1]
        assert ok.error is None and ok.image == expected[0] and ok.meta["replica"] != victim, [r.meta for r in replies]
        assert len(replies) <= 2  # at most the in-flight frame was lost
        for i, (ws, _) in enumerate(sessions):
            for j in range(3):
                r = ws_frame(ws, {"id": 100 + j}, jpeg(64, 64, tag=3 + i))
                assert r.error is None and r.image == expected[i] and r.meta["replica"] != victim
        assert _stats()["admission"]["readmissions"] >= 1
    finally:
        for ws, _ in sessions:
            ws.close()
