"""Ray-free tests of the frame mailbox and the websocket session loop, driven by fake clients and editors."""

import asyncio
import json

import pytest

from rtedit.streaming import EditJob, FrameMailbox, SessionDefaults, decode_references, serve_stream
from rtedit.transport import FrameError, FrameLimits, decode_reply, encode_frame

IMG = b"\xff\xd8fake"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


# ---- FrameMailbox -------------------------------------------------------------------------------------------


def test_mailbox_newest_overwrites_and_counts_dropped():
    async def main():
        box = FrameMailbox()
        assert box.put(1) is None
        assert box.put(2) == 1
        assert box.put(3) == 2
        assert box.dropped == 2
        assert await box.get() == ("frame", 3)
        assert not box.pending()
    run(main())


def test_mailbox_notices_are_ordered_kept_and_drop_older_frames():
    async def main():
        box = FrameMailbox(max_notices=2)
        box.put("f1")
        assert box.put_notice("n1") == "f1"  # the frame is older than the notice
        box.put_notice("n2")
        box.put("f2")
        assert [await box.get() for _ in range(3)] == [("notice", "n1"), ("notice", "n2"), ("frame", "f2")]
        assert box.dropped == 1
        for i in range(5):
            box.put_notice(i)
        assert box.notices_dropped == 3
        assert [await box.get() for _ in range(2)] == [("notice", 3), ("notice", 4)]
    run(main())


def test_mailbox_close_wakes_waiter_and_drops_queued():
    async def main():
        box = FrameMailbox()
        waiter = asyncio.create_task(box.get())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        box.close()
        assert await waiter is None
        box2 = FrameMailbox()
        box2.put("x")
        box2.close()
        assert box2.dropped == 1 and await box2.get() is None
        assert box2.put("late") == "late" and box2.dropped == 2
    run(main())


# ---- serve_stream ------------------------------------------------------------------------------------------


class FakeClient:
    """A websocket stand-in: messages queued for the server, replies collected."""

    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.replies: list = []
        self.reply_event = asyncio.Event()

    async def receive(self):
        return await self.inbox.get()

    async def send(self, message):
        self.replies.append(message)
        self.reply_event.set()

    def frames(self):
        return [decode_reply(m) for m in self.replies if isinstance(m, bytes)]

    async def wait_for(self, predicate, timeout=10):
        async def loop():
            while not predicate():
                self.reply_event.clear()
                await self.reply_event.wait()
        await asyncio.wait_for(loop(), timeout)


def fake_process(delay=0.0, log=None, fail_on=()):
    async def process(job: EditJob):
        if log is not None:
            log.append(job)
        await asyncio.sleep(delay)
        if job.id in fail_on:
            raise RuntimeError(f"boom on {job.id}")
        return {"prompt": job.prompt, "seed": job.seed}, job.image[::-1]
    return process


def start(client, process, **kwargs):
    kwargs.setdefault("limits", FrameLimits())
    kwargs.setdefault("defaults", SessionDefaults(prompt="p0"))
    return asyncio.create_task(serve_stream(client.receive, client.send, process, session="s", seed=7, **kwargs))


def test_slow_editor_drops_frames_keeps_newest_and_order():
    async def main():
        client, log = FakeClient(), []
        task = start(client, fake_process(delay=0.05, log=log))
        for i in range(30):
            client.inbox.put_nowait(encode_frame({"id": i}, IMG + bytes([i])))
            await asyncio.sleep(0.005)
        await client.wait_for(lambda: any(r.id == 29 for r in client.frames()))
        client.inbox.put_nowait(None)
        stats = await task
        replies = client.frames()
        ids = [r.id for r in replies]
        assert ids == sorted(set(ids)) and ids[-1] == 29
        assert all(r.error is None for r in replies)
        assert replies[-1].image == (IMG + bytes([29]))[::-1]
        assert len(replies) + replies[-1].meta["dropped"] == 30
        assert stats.processed == len(replies) and stats.dropped == 30 - len(replies) and stats.received == 30
        assert len(replies) < 30  # the editor was slower than the client
    run(main())


def test_bad_frames_get_errors_with_ids_and_the_stream_goes_on():
    async def main():
        client = FakeClient()
        task = start(client, fake_process(fail_on={3}))
        client.inbox.put_nowait(encode_frame({"id": 1}, IMG))
        await client.wait_for(lambda: len(client.frames()) == 1)
        client.inbox.put_nowait(encode_frame({"id": 2, "steps": "x"}, IMG))   # bad metadata
        client.inbox.put_nowait(b"\x00")                                       # bad header
        client.inbox.put_nowait(encode_frame({"id": 3}, IMG))                  # editor fails
        await client.wait_for(lambda: len(client.frames()) == 4)
        client.inbox.put_nowait(encode_frame({"id": 2}, IMG))                  # id goes back
        client.inbox.put_nowait(encode_frame({"id": 4}, IMG))
        await client.wait_for(lambda: len(client.frames()) == 6)
        client.inbox.put_nowait(None)
        stats = await task
        r = client.frames()
        assert [x.id for x in r] == [1, 2, None, 3, None, 4]
        assert r[1].error["code"] == "wrong_type" and r[2].error["code"] == "bad_header"
        assert r[3].error["type"] == "RuntimeError" and "boom" in r[3].error["message"]
        assert r[4].error["code"] == "id_not_increasing"
        assert r[5].error is None and r[5].image == IMG[::-1]
        assert stats.errors == 4 and stats.processed == 2
    run(main())


def test_settings_stick_and_prompt_applies_from_next_frame():
    async def main():
        client, log = FakeClient(), []
        task = start(client, fake_process(log=log), defaults=SessionDefaults())
        client.inbox.put_nowait(encode_frame({"id": 0}, IMG))   # no prompt yet
        await client.wait_for(lambda: len(client.frames()) == 1)
        client.inbox.put_nowait(json.dumps({"prompt": "make it blue", "seed": 5, "references": ["aGVsbG8="]}))
        client.inbox.put_nowait(encode_frame({"id": 1}, IMG))
        await client.wait_for(lambda: len(client.frames()) == 2)
        client.inbox.put_nowait(encode_frame({"id": 2, "prompt": "make it red"}, IMG))
        client.inbox.put_nowait(encode_frame({"id": 3}, IMG))  # overwrites 2 but keeps its prompt
        await client.wait_for(lambda: any(f.id == 3 for f in client.frames()))
        client.inbox.put_nowait(json.dumps({"seed": "x"}))
        await client.wait_for(lambda: sum(isinstance(m, str) for m in client.replies) == 2)
        client.inbox.put_nowait(None)
        await task
        frames = client.frames()
        assert frames[0].error["code"] == "missing_prompt" and frames[0].id == 0
        acks = [json.loads(m) for m in client.replies if isinstance(m, str)]
        assert acks[0]["ok"] and acks[0]["prompt"] == "make it blue" and acks[0]["references"] == 1
        assert acks[1]["error"]["code"] == "wrong_type"
        assert log[0].prompt == "make it blue" and log[0].seed == 5 and log[0].references == (b"hello",)
        assert log[-1].prompt == "make it red" and log[-1].seed == 5 and log[-1].id == 3
    run(main())


def test_disconnect_discards_in_flight_result_and_exits():
    async def main():
        client, started = FakeClient(), asyncio.Event()

        async def process(job):
            started.set()
            await asyncio.sleep(0.2)
            return {}, b"late"
        task = start(client, process)
        client.inbox.put_nowait(encode_frame({"id": 1}, IMG))
        await started.wait()
        client.inbox.put_nowait(encode_frame({"id": 2}, IMG))  # queued behind the in-flight one
        client.inbox.put_nowait(None)
        stats = await task
        assert client.frames() == []
        assert stats.dropped == 1
    run(main())


def test_send_failure_ends_the_session():
    async def main():
        client = FakeClient()

        async def broken_send(message):
            raise ConnectionError("gone")
        task = asyncio.create_task(serve_stream(client.receive, broken_send, fake_process(), session="s", seed=0,
                                                limits=FrameLimits(), defaults=SessionDefaults(prompt="p")))
        client.inbox.put_nowait(encode_frame({"id": 1}, IMG))
        stats = await task
        assert stats.processed == 1
    run(main())


def test_references_are_bounded():
    limits = FrameLimits(max_references=1, max_reference_bytes=8)
    with pytest.raises(FrameError, match="at most 1"):
        decode_references(["aGk=", "aGk="], limits)
    with pytest.raises(FrameError) as info:
        decode_references(["aGVsbG8gd29ybGQgaGVsbG8="], limits)
    assert info.value.code == "too_large"
    with pytest.raises(FrameError) as info:
        decode_references(["not base64!"], FrameLimits())
    assert info.value.code == "bad_base64"
    assert decode_references(["data:image/png;base64,aGk="], FrameLimits()) == (b"hi",)
