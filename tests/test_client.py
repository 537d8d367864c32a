"""rtedit.client against the real Router app under uvicorn in this process (the echo editor of
test_web_page_recovery, no Ray cluster): a session's edits come back with their metadata, newest-frame semantics
drop stale frames on the client and on the server (counted), a refused key raises Unauthorized, a server restart is
survived (settings and the frame in flight sent again), a service with no room is waited for as its refusal asks
and then raises ServiceBusy with its reason, and a service that stays away raises ServiceUnreachable.
"""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("uvicorn")

from test_serve_helpers import jpeg  # noqa: E402
from test_web_page_recovery import KEY, PageServer, free_port  # noqa: E402

from rtedit.client import (  # noqa: E402
    AsyncClient,
    Backoff,
    Client,
    EditFailed,
    ServiceBusy,
    ServiceUnreachable,
    SettingsRefused,
    Unauthorized,
)
from rtedit.errors import InvalidImage  # noqa: E402

QUICK = Backoff(first_s=0.05, max_s=0.4, give_up_after_s=30)


@pytest.fixture()
def server(monkeypatch):
    page_server = PageServer(free_port(), monkeypatch)
    page_server.editor = page_server.start()
    yield page_server
    page_server.stop()


def url(server: PageServer) -> str:
    return f"http://127.0.0.1:{server.port}"


def decoded(data: bytes) -> PIL.Image.Image:
    return PIL.Image.open(io.BytesIO(data))


def test_session_edits_come_back_with_their_metadata(server):
    editor = server.editor
    reference = np.full((48, 32, 3), (200, 40, 40), np.uint8)
    with Client(url(server), api_key=KEY, backoff=QUICK) as client:
        assert client.info()["model"]["name"] == "echo"
        with client.session("make it black and white", references=[reference], steps=2, seed=7) as session:
            array = np.asarray(decoded(jpeg(128, 128, tag=1)).convert("RGB"))
            edits = []
            for frame in (array, decoded(jpeg(128, 128, tag=2)), jpeg(160, 96, tag=3)):  # numpy, PIL, JPEG bytes
                frame_id = session.send(frame)
                edits.append(session.receive(timeout=20))
                assert edits[-1].id == frame_id
            with pytest.raises(InvalidImage):
                session.send("not an image")
            with pytest.raises(SettingsRefused) as refused:
                session.update(prompt="x" * 5000)
            assert refused.value.code == "out_of_range"
            session.update(prompt="invert the colours", references=[])
            session.send(array)
            after_update = session.receive(timeout=20)
            stats = session.stats
        one_shot = client.edit(jpeg(128, 128, tag=4), "flip it horizontally", seed=3)

    assert [e.id for e in edits] == [1, 2, 3] and after_update.id == 4
    for edit in edits:
        assert edit.meta["format"] == "jpeg" and edit.meta["replica"] == "echo" and edit.meta["dropped"] == 0
        assert (edit.meta["seed"], edit.meta["steps"]) == (7, 2)
        assert {"total", "server"} <= set(edit.timings) and edit.latency_ms > 0
        assert edit.array.shape == (128, 128, 3) and edit.image.size == (128, 128)
        assert np.abs(edit.array.astype(int) - edit.array.mean(-1, keepdims=True)).max() <= 8  # the echo's grey
    assert "resized" not in edits[0].meta and edits[2].meta["resized"]["from"] == [96, 160]  # off the model's size
    # The references cross once: the replica acknowledged them, so later frames carry none (None: unchanged).
    first, second = editor.jobs[0], editor.jobs[1]
    assert first.prompt == "make it black and white" and len(first.references) == 1
    assert decoded(first.references[0]).size == (32, 48) and second.references is None
    assert editor.jobs[3].prompt == "invert the colours" and editor.jobs[3].references == ()
    assert (stats.frames, stats.sent, stats.edits, stats.client_dropped, stats.server_dropped) == (4, 4, 4, 0, 0)
    assert one_shot.meta["seed"] == 3 and one_shot.image.size == (128, 128)
    assert editor.jobs[-1].prompt == "flip it horizontally"


def test_newest_frame_wins_on_the_client_and_on_the_server(server):
    server.editor.delay_s = 1.0  # every edit takes 1 s: the other nine frames arrive while the first is edited
    frame = jpeg(128, 128, tag=5)

    async def burst(client: AsyncClient, max_in_flight: int) -> tuple[list, object]:
        async with client.session("make it darker", max_in_flight=max_in_flight) as session:
            session.send(frame)
            await asyncio.sleep(0.05)  # frame 1 goes out
            for _ in range(9):
                session.send(frame)
                await asyncio.sleep(0.01)
            await session.flush(timeout=30)
            edits = []
            while session.stats.edits > len(edits):
                edits.append(await session.receive(timeout=1))
            return edits, session.stats

    async def main():
        async with AsyncClient(url(server), api_key=KEY, backoff=QUICK) as client:
            return await burst(client, 1), await burst(client, 0)

    (client_side, client_stats), (server_side, server_stats) = asyncio.run(main())
    # One slot on the client: frames 2..9 were replaced there before they went out; 10 went when 1 came back.
    assert [e.id for e in client_side] == [1, 10]
    assert (client_stats.client_dropped, client_stats.sent, client_stats.server_dropped) == (8, 2, 0)
    # No limit: every frame went out and the server's mailbox kept the newest; the reply answers the dropped ones.
    assert [e.id for e in server_side] == [1, 10]
    assert (server_stats.client_dropped, server_stats.sent, server_stats.server_dropped) == (0, 10, 8)
    assert server_side[-1].meta["dropped"] == 8  # the server counted the same frames
    assert len(server.editor.jobs) == 4


def test_a_refused_key_raises_unauthorized_at_once(server):
    started = time.monotonic()
    for key in ("wrong", None):
        with Client(url(server), api_key=key, backoff=QUICK) as client:
            with pytest.raises(Unauthorized):
                client.session("make it brighter")
            with pytest.raises(Unauthorized):
                client.info()
            with pytest.raises(Unauthorized):
                client.edit(jpeg(128, 128), "make it brighter")
    assert time.monotonic() - started < 10  # never retried with backoff
    assert server.editor.jobs == []
    with Client(url(server), api_key=KEY) as client, pytest.raises(EditFailed) as failed:
        client.edit(jpeg(128, 128), "make it brighter", steps=99)
    assert failed.value.status == 400 and failed.value.code == "out_of_range"


def test_session_survives_a_server_restart(server):
    prompt, reference = "make the circle blue", jpeg(32, 32, tag=8)
    with Client(url(server), api_key=KEY, backoff=QUICK) as client:
        with client.session(prompt, references=[reference]) as session:
            session.send(jpeg(128, 128, tag=1))
            assert session.receive(timeout=20).id == 1

            # Down, then back: a frame sent meanwhile waits, and the new session gets prompt and reference again.
            server.stop()
            session.send(jpeg(128, 128, tag=2))
            time.sleep(0.5)  # a few failed redials
            restarted = server.start()
            assert session.receive(timeout=30).id == 2
            assert [(j.prompt, j.references) for j in restarted.jobs] == [(prompt, (reference,))]

            # Down with a frame in flight: it is sent again, with its id, once the server is back.
            restarted.delay_s = 60.0
            session.send(jpeg(128, 128, tag=3))
            deadline = time.monotonic() + 10
            while not restarted.jobs[1:] and time.monotonic() < deadline:
                time.sleep(0.02)
            server.stop()
            third = server.start()
            assert session.receive(timeout=30).id == 3
            stats = session.stats
    assert [j.prompt for j in third.jobs] == [prompt] and third.jobs[0].references == (reference,)
    assert (stats.reconnects, stats.resent, stats.sent, stats.edits, stats.lost) == (2, 1, 3, 3, 0)

    server.stop()
    started = time.monotonic()
    with Client(url(server), api_key=KEY, backoff=Backoff(first_s=0.05, max_s=0.2, give_up_after_s=1)) as client:
        with pytest.raises(ServiceUnreachable, match="within 1 s"):
            client.session(prompt)
    assert time.monotonic() - started < 5


def test_a_full_service_is_retried_as_it_asks_then_served_or_refused_with_its_reason(server):
    import threading

    server.editor.full = True  # every replica full: the router closes each new session with 1013 and a reason
    with Client(url(server), api_key=KEY, backoff=Backoff(first_s=0.05, max_s=0.4, give_up_after_s=2)) as client:
        started = time.monotonic()
        with pytest.raises(ServiceBusy) as busy:
            client.session("make it black and white").__enter__()
        assert "every editor replica is full" in busy.value.reason and busy.value.retry_after_s == 1
        assert 2 <= time.monotonic() - started < 10 and "no room" in str(busy.value)

    room = threading.Timer(1.5, lambda: setattr(server.editor, "full", False))  # a session ends elsewhere
    room.start()
    with Client(url(server), api_key=KEY, backoff=QUICK) as client:
        with client.session("make it black and white") as session:
            session.send(jpeg(128, 128, tag=5))
            edit = session.receive(timeout=20)
            stats = session.stats
    room.join()
    assert edit.meta["replica"] == "echo" and stats.refusals >= 1 and stats.edits == 1
