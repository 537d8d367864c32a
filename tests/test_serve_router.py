"""The Router's FastAPI app in this process over fake editor and text-encoder handles (no Ray cluster): limits
derived from the engine config refuse what no replica serves before any editor call; steps follow the model."""

from __future__ import annotations

import base64
import io
import json
import types

import PIL.Image
import pytest
import yaml

pytest.importorskip("ray.serve")

from fastapi.testclient import TestClient  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from conftest import FakeAdmission, FakeResponse, via_serve_handle  # noqa: E402
from test_serve_helpers import REPO, jpeg  # noqa: E402  (puts the repo root on sys.path)

from deployments.config import AppArgs  # noqa: E402
from rtedit.transport import decode_reply, encode_frame  # noqa: E402

GPU_ARGS = yaml.safe_load((REPO / "deployments" / "serve-gpu.yaml").read_text())["applications"][0]["args"]


class FakeEditor(FakeAdmission):
    """An editor handle that records every call; its replies carry the fields EditorDeployment.edit's do, and `info`
    is what a replica of a model with rtedit.json reports."""

    def __init__(self, steps=None):
        super().__init__()
        self.jobs, self.info_calls, self.model_steps = [], 0, steps
        outer = self

        class _Method:
            def __init__(self, fn):
                self.remote = fn

        self.edit = _Method(lambda job, embedding=None, replica=None: FakeResponse(outer._edit(job)))
        self.info = _Method(lambda: FakeResponse(outer._info()))

    def options(self, **_):
        return self

    def _edit(self, job):
        self.jobs.append(job)
        return {"image": jpeg(64, 64), "width": 64, "height": 64, "format": job.format, "seed": job.seed,
                "steps": job.steps, "timings": {}, "replica": "fake", "prompt_key": "k", "prompt_truncated": False}

    def _info(self):
        self.info_calls += 1
        return {"name": "fake model", "random_weights": False, "device": "cpu", "dtype": "float32",
                "steps": self.model_steps}


def client_for(monkeypatch, args: dict, editor: FakeEditor) -> TestClient:
    """The module's FastAPI app served by one Router instance, as Serve's class-based view would find it."""
    from ray import serve

    import deployments.router as router_module

    app_args = AppArgs.model_validate(args)
    router_cls = router_module.Router.func_or_class.__bases__[0]  # the class under @serve.ingress's wrapper
    router = router_cls(FakeEditor(), editor, via_serve_handle(app_args.router), app_args.engine)
    monkeypatch.setattr(serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=router))
    return TestClient(router_module.app)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_gpu_yaml_router_refuses_what_its_engine_cannot_serve_without_an_editor_call(monkeypatch):
    """serve-gpu.yaml serves buckets.references [0] and sizes 512/1024: a request with a reference or another size
    used to cost a round trip to a GPU replica before being refused."""
    editor = FakeEditor()
    args = {**GPU_ARGS, "router": {**GPU_ARGS["router"], "api_key_env": None}}
    with client_for(monkeypatch, args, editor) as client:
        r = client.post("/api/predict", json={"image": b64(jpeg()), "prompt": "x", "references": [b64(jpeg())]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "out_of_range"
        assert "at most 0 references, got 1" in r.json()["error"]["message"]
        r = client.post("/api/predict_binary", content=encode_frame({"id": 1, "prompt": "x", "width": 512,
                                                                     "height": 1024}, jpeg()))
        reply = decode_reply(r.content)
        assert r.status_code == 422 and reply.error["code"] == "not_served" and reply.id == 1
        message = reply.error["message"]
        assert "1024x512 is not served here" in message and "512x512, 1024x1024" in message
        r = client.post("/api/predict", json={"image": b64(jpeg()), "prompt": "x", "width": 256})
        assert r.status_code == 400 and "[512, 1024]" in r.json()["error"]["message"]
        with client.websocket_connect("/ws/predict") as ws:
            ws.send_text(json.dumps({"prompt": "make it blue", "references": [b64(jpeg())]}))
            ack = json.loads(ws.receive_text())
            assert ack["error"]["code"] == "out_of_range" and "at most 0 references" in ack["error"]["message"]
            ws.send_bytes(encode_frame({"id": 1, "prompt": "make it blue"}, jpeg()))
            assert decode_reply(ws.receive_bytes()).error is None  # no reference: served
        info = client.get("/api/info").json()
    assert len(editor.jobs) == 1 and editor.jobs[0].references == ()
    assert info["limits"]["max_references"] == 0 and info["limits"]["reference_counts"] == [0]
    assert info["limits"]["sizes"] == [[512, 512], [1024, 1024]]


def test_router_limits_above_the_engine_are_a_build_time_error():
    with pytest.raises(ValidationError) as exc:
        AppArgs.model_validate({**GPU_ARGS, "router": {"limits": {"max_references": 2}}})
    assert "router.limits.max_references=2" in str(exc.value) and "engine.buckets.references" in str(exc.value)
    with pytest.raises(ValidationError, match="engine.max_steps: 4"):
        AppArgs.model_validate({"engine": {"model": "tiny", "max_steps": 4}, "router": {"limits": {"max_steps": 6}}})
    with pytest.raises(ValidationError, match="router.defaults.steps=9"):
        AppArgs.model_validate({"engine": {"model": "tiny"}, "router": {"defaults": {"steps": 9}}})
    with pytest.raises(ValidationError, match="engine.prompt.cache_entries"):
        AppArgs.model_validate({"engine": {"model": "tiny"}, "editor": {"embedding_cache_entries": 32}})
    unset = AppArgs.model_validate({"engine": {"model": "tiny", "max_steps": 4, "prompt": {"max_chars": 100}}})
    limits = unset.frame_limits()  # unset limits follow the engine
    assert limits.max_steps == 4 and limits.max_prompt_chars == 100 and limits.max_references == 4


@pytest.mark.parametrize("override, expected", [(None, 1), (2, 2)])
def test_session_steps_default_to_the_models_own(monkeypatch, override, expected):
    """A 1-step model (rtedit.json steps [1]) refused every frame while sessions defaulted to 2 steps."""
    editor = FakeEditor(steps=[1, 4])
    defaults = {"prompt": "make it blue"} | ({"steps": override} if override else {})
    args = {"engine": {"model": "tiny"}, "router": {"api_key_env": None, "defaults": defaults}}
    with client_for(monkeypatch, args, editor) as client:
        info = client.get("/api/info").json()
        with client.websocket_connect("/ws/predict") as ws:
            ws.send_bytes(encode_frame({"id": 1}, jpeg()))
            first = decode_reply(ws.receive_bytes())
            ws.send_bytes(encode_frame({"id": 2, "steps": 4}, jpeg()))
            second = decode_reply(ws.receive_bytes())
        r = client.post("/api/predict", json={"image": b64(jpeg()), "steps": 3})
    assert info["defaults"]["steps"] == expected and info["limits"]["steps"] == [1, 4]
    assert second.error is None and editor.jobs[-1].steps == 4
    if override is None:
        assert first.error is None and editor.jobs[0].steps == 1
    else:  # an override the model does not allow is refused here, with the model's step counts
        assert first.error["code"] == "not_served" and "steps [1, 4]" in first.error["message"]
    assert r.status_code == 422 and "got steps=3" in r.json()["error"]["message"]
    assert editor.info_calls == 1 and all(job.steps in (1, 4) for job in editor.jobs)


# ---- the model's own examples and sizes (models/toy-editor's rtedit.json) ------------------------------------

TOY_ARGS = {"engine": {"model": "models/toy-editor"}, "router": {"api_key_env": None}}


def toy_sidecar():
    from rtedit.presets import Sidecar

    return Sidecar.load(REPO / "models" / "toy-editor")


def test_toy_editor_info_offers_its_examples_and_sizes_and_defaults_to_its_first_example(monkeypatch):
    """The page's instruction used to default to a watercolour painting and its size menu to 256-512: neither is
    something the toy editor knows (it was trained at 128x128 on a fixed set of instructions)."""
    editor = FakeEditor(steps=[2])
    sidecar = toy_sidecar()
    with client_for(monkeypatch, TOY_ARGS, editor) as client:
        info = client.get("/api/info").json()
        r = client.post("/api/predict", json={"image": b64(jpeg(128, 128))})  # no prompt: the default applies
    assert info["model"]["examples"] == list(sidecar.examples) and len(sidecar.examples) >= 6
    assert info["model"]["sizes"] == [[128, 128]] and info["limits"]["sizes"] == [[128, 128]]
    assert info["limits"]["off_size"] == "resize"
    assert info["defaults"]["prompt"] == sidecar.examples[0]
    assert r.status_code == 200, r.text
    assert editor.jobs[0].prompt == sidecar.examples[0]


@pytest.mark.parametrize("image, fields, expected_from", [
    ((451, 300), {}, [300, 451]),                        # a photo of its own size: cropped to 1:1, then 128x128
    ((128, 128), {"width": 256, "height": 256}, [128, 128]),  # asked for a size it does not serve
    ((256, 256), {"width": 128, "height": 128}, [256, 256]),  # right output size, input of another
])
def test_an_off_size_request_is_answered_at_the_models_size_and_says_so(monkeypatch, image, fields, expected_from):
    """A 451x300 photo came back as garbage at 448x288: the toy editor only knows 128x128."""
    editor = FakeEditor()
    with client_for(monkeypatch, TOY_ARGS, editor) as client:
        r = client.post("/api/predict", json={"image": b64(jpeg(*image)), "prompt": "invert the colours", **fields})
    assert r.status_code == 200, r.text
    resized = r.json()["resized"]
    assert resized["from"] == expected_from and resized["to"] == [128, 128] and "128x128" in resized["reason"]
    job = editor.jobs[0]
    assert (job.height, job.width) == (128, 128)
    assert PIL.Image.open(io.BytesIO(job.image)).size == (128, 128)


def test_a_frame_of_the_models_size_passes_unchanged(monkeypatch):
    editor = FakeEditor()
    image = jpeg(128, 128, tag=3)
    with client_for(monkeypatch, TOY_ARGS, editor) as client:
        r = client.post("/api/predict", json={"image": b64(image), "prompt": "invert the colours"})
        with client.websocket_connect("/ws/predict") as ws:
            ws.send_bytes(encode_frame({"id": 1}, image))
            on_size = decode_reply(ws.receive_bytes())
            ws.send_bytes(encode_frame({"id": 2}, jpeg(160, 96)))  # a webcam frame of another size
            off_size = decode_reply(ws.receive_bytes())
    assert r.status_code == 200 and "resized" not in r.json()
    assert "resized" not in on_size.meta and on_size.error is None
    assert off_size.meta["resized"]["from"] == [96, 160] and off_size.meta["resized"]["to"] == [128, 128]
    assert editor.jobs[0].image == image and editor.jobs[0].width is None and editor.jobs[1].image == image
    assert (editor.jobs[2].height, editor.jobs[2].width) == (128, 128)


def test_off_size_frames_are_refused_when_configured_without_an_editor_call(monkeypatch):
    editor = FakeEditor()
    args = {**TOY_ARGS, "router": {**TOY_ARGS["router"], "off_size": "refuse"}}
    with client_for(monkeypatch, args, editor) as client:
        info = client.get("/api/info").json()
        r = client.post("/api/predict", json={"image": b64(jpeg(451, 300)), "prompt": "invert the colours"})
        with client.websocket_connect("/ws/predict") as ws:
            ws.send_bytes(encode_frame({"id": 1}, jpeg(160, 96)))
            refused = decode_reply(ws.receive_bytes())
            ws.send_bytes(encode_frame({"id": 2}, jpeg(128, 128)))
            served = decode_reply(ws.receive_bytes())
    assert info["limits"]["off_size"] == "refuse"
    assert r.status_code == 422 and r.json()["error"]["code"] == "off_size"
    assert "288x448" in r.json()["error"]["message"] and "128x128" in r.json()["error"]["message"]
    assert refused.error["code"] == "off_size" and refused.id == 1 and served.error is None
    assert len(editor.jobs) == 1


def test_a_default_prompt_the_model_does_not_list_is_a_build_time_error():
    with pytest.raises(ValidationError, match="not one of the example instructions"):
        AppArgs.model_validate({**TOY_ARGS, "router": {"defaults": {"prompt": "make it look like a watercolor"}}})
    with pytest.raises(ValidationError, match="not a size the model serves"):
        AppArgs.model_validate({**TOY_ARGS, "router": {"defaults": {"width": 256, "height": 256}}})
    with pytest.raises(ValidationError, match="off_size"):
        AppArgs.model_validate({**TOY_ARGS, "router": {"off_size": "stretch"}})
    chosen = AppArgs.model_validate({**TOY_ARGS, "router": {"defaults": {"prompt": "make it darker"}}})
    assert chosen.router.session_defaults().prompt == "make it darker"


def test_openapi_says_prompt_is_optional_where_a_default_applies(monkeypatch):
    with client_for(monkeypatch, TOY_ARGS, FakeEditor()) as client:
        schema = client.get("/openapi.json").json()
    body = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["image"] and "defaults.prompt" in body["properties"]["prompt"]["description"]


def test_a_session_the_client_ended_is_not_closed_again(monkeypatch):
    """Closing after the client's disconnect is an ASGI error: Serve's proxy logged "Request failed due to unexpected
    error" with a GeneratorExit traceback at the end of every websocket session."""
    import asyncio

    import deployments.router as router_module

    client_for(monkeypatch, {"engine": {"model": "tiny"}, "router": {"api_key_env": None}}, FakeEditor())
    incoming = [{"type": "websocket.connect"},
                {"type": "websocket.receive", "bytes": encode_frame({"id": 1, "prompt": "make it blue"}, jpeg())},
                {"type": "websocket.disconnect", "code": 1000}]
    sent = []

    async def receive():
        if incoming:
            await asyncio.sleep(0.05)  # the frame is answered before the client leaves
            return incoming.pop(0)
        raise AssertionError("receive() called after the client disconnected")

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws/predict", "raw_path": b"/ws/predict", "query_string": b"",
             "headers": [], "scheme": "ws", "server": ("test", 80), "client": ("client", 1), "root_path": "",
             "subprotocols": [], "asgi": {"version": "3.0"}}
    asyncio.run(router_module.app(scope, receive, send))
    types_sent = [m["type"] for m in sent]
    assert types_sent == ["websocket.accept", "websocket.send"], types_sent
    assert decode_reply(sent[1]["bytes"]).error is None
