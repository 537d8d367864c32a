"""The frame channel between the router and an editor replica (deployments/frame_channel.py): replies matched to
their calls, the token checked before anything is unpickled, cancellation reaching the replica, a lost connection
and a leaving replica failing calls with what the router needs to tell them apart."""

import asyncio
import pickle
import sys
import threading
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import FakeAdmission  # noqa: E402
from test_serve_helpers import jpeg  # noqa: E402
from deployments.frame_channel import (  # noqa: E402
    HEADER,
    ChannelClient,
    ChannelClosed,
    ChannelRemoteError,
    ChannelServer,
    _read,
)


class Handler:
    """A replica's handler: `delay` seconds, then (job, replica) back; records what it saw, on the server's loop."""

    def __init__(self):
        self.calls, self.cancelled = [], threading.Event()

    async def __call__(self, job, replica, delay=0.0):
        self.calls.append(job)
        if job == "raise":
            raise KeyError("a bug in the replica")
        try:
            if job == "hang":
                await asyncio.sleep(3600)
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return {"job": job, "replica": replica}


@pytest.fixture()
def server():
    handler = Handler()
    srv = ChannelServer(handler, "127.0.0.1", 0)
    yield srv, handler
    srv.close("test over", 0)


def test_calls_share_one_connection_and_get_their_own_replies(server):
    srv, _ = server

    async def main():
        client = ChannelClient("r1", srv.address())
        # Later calls finish first: every reply still reaches its own caller.
        replies = await asyncio.gather(*(client.call(i, "r1", 0.05 * (5 - i)) for i in range(5)))
        client.close("done")
        return replies

    assert asyncio.run(main()) == [{"job": i, "replica": "r1"} for i in range(5)]


def test_a_connection_without_the_token_is_refused_before_anything_is_unpickled(server, monkeypatch):
    srv, handler = server
    unpickled = []
    real_loads = pickle.loads
    monkeypatch.setattr(pickle, "loads", lambda b: unpickled.append(b) or real_loads(b))

    async def main():
        client = ChannelClient("r1", {**srv.address(), "token": "0" * 32})
        with pytest.raises(ChannelClosed) as info:
            await asyncio.wait_for(client.call("x", "r1"), 10)
        return info.value

    closed = asyncio.run(main())
    assert closed.sent and closed.leaving is None
    assert srv.refused == 1 and handler.calls == [] and unpickled == []


def test_a_call_given_up_on_is_cancelled_on_the_replica(server):
    srv, handler = server

    async def main():
        client = ChannelClient("r1", srv.address())
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.call("hang", "r1"), 0.3)
        again = await client.call("after", "r1")  # the connection stays usable
        client.close("done")
        return again

    assert asyncio.run(main()) == {"job": "after", "replica": "r1"}
    assert handler.cancelled.wait(5)


def test_a_raising_handler_fails_only_its_call(server):
    srv, _ = server

    async def main():
        client = ChannelClient("r1", srv.address())
        with pytest.raises(ChannelRemoteError, match="KeyError") as info:
            await client.call("raise", "r1")
        ok = await client.call("fine", "r1")
        client.close("done")
        return info.value, ok

    error, ok = asyncio.run(main())
    assert error.type_name == "KeyError" and ok["job"] == "fine"


def test_a_lost_connection_fails_the_call_in_flight_as_sent_and_later_ones_as_never_sent(server):
    srv, _ = server

    async def main():
        client = ChannelClient("r1", srv.address())
        in_flight = asyncio.ensure_future(client.call("hang", "r1"))
        await asyncio.sleep(0.2)
        # The replica's process dies: its side of every connection goes at once.
        for writer in list(srv.writers):
            srv.loop.call_soon_threadsafe(writer.transport.abort)
        with pytest.raises(ChannelClosed) as first:
            await asyncio.wait_for(in_flight, 10)
        with pytest.raises(ChannelClosed) as later:
            await client.call("next", "r1")
        return first.value, later.value

    first, later = asyncio.run(main())
    assert first.sent and not later.sent and first.leaving is None and later.leaving is None


def test_a_leaving_replica_finishes_frames_in_flight_and_refuses_new_ones_with_its_reason(server):
    srv, _ = server

    async def main():
        client = ChannelClient("r1", srv.address())
        await client.call("warm", "r1")
        in_flight = asyncio.ensure_future(client.call("slow", "r1", 0.5))
        await asyncio.sleep(0.1)
        closing = asyncio.get_running_loop().run_in_executor(None, srv.close, "scale-down", 5)
        await asyncio.sleep(0.2)
        with pytest.raises(ChannelClosed) as refused:
            await client.call("new", "r1")
        done = await asyncio.wait_for(in_flight, 10)
        await closing
        return done, refused.value

    done, refused = asyncio.run(main())
    assert done == {"job": "slow", "replica": "r1"}
    assert refused.leaving == "scale-down" and not refused.sent


def test_a_message_over_the_limit_is_refused_before_it_is_read():
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(HEADER.pack(1 << 30))
        with pytest.raises(ValueError, match="over the channel's limit"):
            await _read(reader, limit=1024)

    asyncio.run(main())


def test_an_unreachable_replica_fails_as_never_sent_with_the_reason():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        client = ChannelClient("r9", {"host": "127.0.0.1", "port": port, "token": "t"})
        with pytest.raises(ChannelClosed, match="cannot reach editor replica r9") as info:
            await client.call("x", "r9")
        return info.value

    assert not asyncio.run(main()).sent


# ---- the router over a channel ----------------------------------------------------------------------------------
def test_router_sends_frames_over_the_channel_and_tells_the_session_to_reconnect_when_its_replica_leaves():
    """A Router (router.frame_channel "direct", the default) whose editor handle has no `edit` at all: every frame
    goes over the replica's channel; when the replica leaves, the frame is refused with code reconnect."""
    import deployments.router as router_module
    from deployments.config import AppArgs
    from deployments.admission import Reconnect
    from rtedit.streaming import SessionDefaults, SessionState

    seen = []

    async def edit(job, replica):
        seen.append((job.id, replica))
        return {"image": b"jpeg", "timings": {"edit": 1.0}, "replica": replica}

    srv = ChannelServer(edit, "127.0.0.1", 0)
    editor = FakeAdmission(replica="r1", slots=1)
    editor._book["channel"] = srv.address()
    args = AppArgs(engine={"model": "tiny"}, router={"api_key_env": None})
    assert args.router.frame_channel == "direct"
    router = router_module.Router.func_or_class.__bases__[0](types.SimpleNamespace(), editor, args.router, args.engine)
    state = SessionState.start("ws-1", SessionDefaults(prompt="make it blue", steps=1), seed=0)

    async def main():
        await router._admit("ws-1")
        replies = [await router.process(state.job(i, jpeg(64, 64))) for i in (1, 2)]
        await asyncio.get_running_loop().run_in_executor(None, srv.close, "scale-down", 1)
        with pytest.raises(Reconnect) as refused:
            await router.process(state.job(3, jpeg(64, 64)))
        return replies, refused.value

    replies, refused = asyncio.run(main())
    assert [r[1] for r in replies] == [b"jpeg", b"jpeg"] and seen == [(1, "r1"), (2, "r1")]
    assert refused.code == "reconnect" and "left the service" in str(refused)
    assert router._ending["ws-1"][0] == 1012  # the websocket is closed with "service restart: reconnect"
    assert router.admission.candidates() == []  # and no new session is admitted there


def test_a_session_whose_replica_died_gets_error_frames_until_one_runs_and_is_sent_away_only_when_all_are_full():
    """The replica's process dies (its channel closes): while no replica runs the socket stays open and each frame
    is an editor_failed error (Serve is replacing it); when replicas run but are full, the socket is told 1013."""
    import deployments.router as router_module
    from deployments.admission import NoCapacity
    from deployments.config import AppArgs
    from deployments.router import EditorFailed
    from rtedit.streaming import SessionDefaults, SessionState

    async def edit(job, replica):
        return {"image": b"jpeg", "timings": {}, "replica": replica}

    srv = ChannelServer(edit, "127.0.0.1", 0)
    editor = FakeAdmission(replica="r1", slots=1)
    editor._book["channel"] = srv.address()
    running = {"states": None}  # None: the fake's own replica answers admission_state
    real_broadcast = editor.broadcast

    def broadcast(method):
        if running["states"] is None:
            return real_broadcast(method)

        async def results(**_):
            return running["states"]

        return types.SimpleNamespace(results_async=results)

    editor.broadcast = broadcast
    args = AppArgs(engine={"model": "tiny"}, router={"api_key_env": None})
    router = router_module.Router.func_or_class.__bases__[0](types.SimpleNamespace(), editor, args.router, args.engine)
    state = SessionState.start("ws-1", SessionDefaults(prompt="make it blue", steps=1), seed=0)

    async def main():
        await router._admit("ws-1")
        await router.process(state.job(1, jpeg(64, 64)))
        for writer in list(srv.writers):  # the replica dies
            srv.loop.call_soon_threadsafe(writer.transport.abort)
        await asyncio.sleep(0.2)
        running["states"] = []  # ... and Serve runs none yet
        router.admission.refreshed = -1e9
        with pytest.raises(EditorFailed, match="no editor replica is running") as failed:
            await router.process(state.job(2, jpeg(64, 64)))
        ending = dict(router._ending)
        running["states"] = [{**editor.book, "replica": "r2", "sessions": 64}]  # one runs, full
        router.admission.refreshed = -1e9
        with pytest.raises(NoCapacity):
            await router.process(state.job(3, jpeg(64, 64)))
        return failed.value, ending

    failed, ending = asyncio.run(main())
    srv.close("test over", 0)
    assert failed.code == "editor_failed" and "ws-1" not in ending
    assert router._ending["ws-1"][0] == 1013 and "every editor replica is full" in router._ending["ws-1"][1]


def test_a_dropped_connection_to_a_live_replica_is_opened_again_and_a_look_that_times_out_closes_nothing():
    """The router's connection breaks but the replica lives: the session's next frame is re-admitted there and goes
    over a new connection; a look at the replicas that gets no answer leaves the open connection alone."""
    import deployments.router as router_module
    from deployments.config import AppArgs
    from rtedit.streaming import SessionDefaults, SessionState

    async def edit(job, replica):
        return {"image": b"jpeg", "timings": {}, "replica": replica}

    srv = ChannelServer(edit, "127.0.0.1", 0)
    editor = FakeAdmission(replica="r1", slots=1)
    editor._book["channel"] = srv.address()
    args = AppArgs(engine={"model": "tiny"}, router={"api_key_env": None})
    router = router_module.Router.func_or_class.__bases__[0](types.SimpleNamespace(), editor, args.router, args.engine)
    state = SessionState.start("ws-1", SessionDefaults(prompt="make it blue", steps=1), seed=0)
    real_broadcast = editor.broadcast

    async def main():
        await router._admit("ws-1")
        await router.process(state.job(1, jpeg(64, 64)))
        first = router.channels["r1"]
        for writer in list(srv.writers):
            srv.loop.call_soon_threadsafe(writer.transport.abort)
        await asyncio.sleep(0.3)
        reply, _ = await router.process(state.job(2, jpeg(64, 64)))
        second = router.channels["r1"]

        def silent(method):
            async def results(**_):
                raise asyncio.TimeoutError

            return types.SimpleNamespace(results_async=results)

        editor.broadcast = silent
        router.admission.refreshed = -1e9  # due for a look
        await router._refresh_replicas()
        assert router.admission.replicas == {}  # nobody answered
        editor.broadcast = real_broadcast
        after_look = router.channels.get("r1")
        third, _ = await router.process(state.job(3, jpeg(64, 64)))
        assert second.closed is None  # (asyncio.run closes it on the way out)
        return first, second, after_look, reply, third

    first, second, after_look, reply, third = asyncio.run(main())
    srv.close("test over", 0)
    assert first.closed is not None and second is not first
    assert reply["replica"] == "r1" and third["replica"] == "r1" and router.counts["readmissions"] == 1
    assert after_look is second


def test_an_editor_replica_at_shutdown_drains_its_book_and_closes_its_channel(monkeypatch):
    """What Serve's call of EditorDeployment.__del__ does: the replica reports itself draining (no router admits a
    session there) and its channel tells the routers it leaves, then stops."""
    from ray import serve

    from deployments.config import AppArgs
    from deployments.editor import EditorDeployment

    context = types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id="replica-a"))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    args = AppArgs(engine={"model": "tiny"}, editor={"warmup": False, "torch_threads": 1})
    deployment = EditorDeployment.func_or_class(args.engine, args.editor)
    state = deployment.admission_state()
    assert state["draining"] is None and state["channel"]["port"] > 0 and len(state["channel"]["token"]) == 32

    async def main():
        client = ChannelClient("replica-a", state["channel"])
        await client._connect()
        for _ in range(100):  # the replica has read the token and holds the connection
            if deployment.channel.writers:
                break
            await asyncio.sleep(0.02)
        await asyncio.get_running_loop().run_in_executor(None, deployment.__del__)
        await asyncio.sleep(0.2)
        return client.leaving

    assert asyncio.run(main()) == "editor replica replica-a is shutting down"
    assert deployment.admission_state()["draining"] == "editor replica replica-a is shutting down"
    assert not deployment.channel.thread.is_alive()
