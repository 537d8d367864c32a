"""Websocket sessions on an editor replica in this process (no Ray cluster): one engine Session per websocket
session id on a "session"-mode model, references sent by the router only when they open or change a session,
and `need_session` when the replica lost it."""

from __future__ import annotations

import asyncio
import io
import types

import pytest

pytest.importorskip("ray.serve")

from conftest import FakeAdmission, FakeResponse, via_serve_handle  # noqa: E402
from test_serve_helpers import jpeg  # noqa: E402  (puts the repo root on sys.path)
from test_sessions import causal_editor  # noqa: E402

from deployments.config import AppArgs  # noqa: E402
from deployments.editor import EditorDeployment  # noqa: E402
from rtedit.config import EditorConfig  # noqa: E402
from rtedit.prompts import PromptService  # noqa: E402
from rtedit.streaming import EditJob, SessionDefaults, SessionState  # noqa: E402

PROMPT = "make it blue"


def png(seed: int, w: int = 64, h: int = 80) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


REF_A, REF_B = (png(10),), (png(11),)


@pytest.fixture()
def replica(monkeypatch):
    """An EditorDeployment outside Serve whose Editor is a session-mode tiny model without text encoder."""
    from ray import serve

    context = types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id="replica-a"))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    args = AppArgs(engine={"model": "tiny"}, editor={"warmup": False, "torch_threads": 1})
    deployment = EditorDeployment.func_or_class(args.engine, args.editor)
    deployment.editor = causal_editor("session", EditorConfig(text_encoder=False), text_encoder=False)
    return deployment, PromptService.from_config(args.engine)


def _job(**kw) -> EditJob:
    fields = dict(session="ws-1", id=1, image=jpeg(64, 64), prompt=PROMPT, steps=1, seed=0, width=None,
                  height=None, format="png")
    return EditJob(**{**fields, **kw})


def test_one_websocket_session_equals_engine_session_frames(replica):
    deployment, service = replica
    emb = service.encode_prompt(PROMPT)
    frames = [jpeg(64, 64), jpeg(64, 64, tag=5)]
    jobs = [_job(id=1, references=REF_A, image=frames[0]), _job(id=2, references=None, image=frames[1]),
            _job(id=3, references=None, image=frames[0], seed=4), _job(id=4, references=REF_B, image=frames[1])]
    replies = [asyncio.run(deployment.edit(jobs[0], emb))] + [asyncio.run(deployment.edit(j)) for j in jobs[1:]]
    assert all("error" not in r and "need_session" not in r for r in replies), replies
    assert [r["session_version"] for r in replies] == [0, 0, 0, 1]
    assert deployment.stats()["sessions"] == 1 and deployment.stats()["kv_store"]["entries"] >= 1

    fresh = causal_editor("session", EditorConfig(text_encoder=False), text_encoder=False)
    s = fresh.open_session(emb, REF_A)
    expected = [s.edit(frames[0], seed=0, steps=1, output_format="png").data,
                s.edit(frames[1], seed=0, steps=1, output_format="png").data,
                s.edit(frames[0], seed=4, steps=1, output_format="png").data]
    s.update(references=REF_B)
    expected.append(s.edit(frames[1], seed=0, steps=1, output_format="png").data)
    assert [r["image"] for r in replies] == expected  # bit-equal (CPU float32, lossless output)

    assert deployment.close_session("ws-1") == {"closed": True, "replica": "replica-a"}
    assert deployment.editor.session("ws-1") is None and deployment.stats()["sessions"] == 0
    # The replica lost the session: a frame without references is answered need_session, with them it reopens.
    assert asyncio.run(deployment.edit(_job(id=5, references=None))) == {"need_session": "ws-1",
                                                                          "replica": "replica-a"}
    again = asyncio.run(deployment.edit(_job(id=5, references=REF_A, image=frames[0])))
    assert again["session_version"] == 0 and again["image"] == expected[0]


def test_http_jobs_without_session_stay_one_shot(replica):
    deployment, service = replica
    reply = asyncio.run(deployment.edit(_job(session="", references=REF_A), service.encode_prompt(PROMPT)))
    assert "session_version" not in reply and "session" in reply["timings"]
    assert deployment.stats()["sessions"] == 0


def test_router_sends_references_only_when_they_open_or_change_the_session(monkeypatch):
    """The Router's per-socket ack state over a fake editor handle that loses its sessions once."""
    import deployments.router as router_module

    args = AppArgs(engine={"model": "tiny"}, router={"api_key_env": None})
    router_cls = router_module.Router.func_or_class.__bases__[0]
    sent, lost = [], {"now": False}
    held: dict[str, tuple] = {}

    def edit(job, embedding=None, replica=None):
        sent.append(job)
        if lost["now"]:
            held.clear()
            lost["now"] = False
        if job.references is None and job.session not in held:
            return FakeResponse({"need_session": job.session, "replica": "fake"})
        if job.references is not None:
            held[job.session] = job.references
        return FakeResponse({"image": b"x", "timings": {}, "replica": "fake", "session_version": 0})

    editor = FakeAdmission(slots=1)
    editor.edit = types.SimpleNamespace(remote=edit)
    router = router_cls(types.SimpleNamespace(), editor, via_serve_handle(args.router), args.engine)
    state = SessionState.start("ws-1", SessionDefaults(prompt=PROMPT, steps=1), seed=0)
    router.acked_references["ws-1"] = -1  # what ws_predict registers for a socket

    def frame(i):
        asyncio.run(router.process(state.job(i, jpeg(64, 64))))

    state.apply({"references": REF_A})
    frame(1), frame(2), frame(3)
    assert [j.references for j in sent] == [REF_A, None, None]
    state.apply({"references": REF_B})
    frame(4), frame(5)
    assert [j.references for j in sent[3:]] == [REF_B, None]
    lost["now"] = True  # a replica restart: the next frame is resent with the full settings
    frame(6)
    assert [j.references for j in sent[5:]] == [None, REF_B] and router.counts["session_resends"] == 1
    frame(7)
    assert sent[-1].references is None
    state.apply({"references": ()})  # "no references" is sent as () once, never as None
    frame(8)
    assert sent[-1].references == ()
