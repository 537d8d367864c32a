"""The API docs: /docs and /redoc render in headless Chromium with every request to another host refused (their
assets come from the fastapi-offline package, not a CDN), the OpenAPI document has a schema for every reply and
real replies match it, and the README's table of what the server accepts is what GET /api/info says.

Without internet /docs and /redoc used to be blank pages: Swagger UI and ReDoc loaded from a CDN.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import threading
import time
import types
from urllib.parse import urlsplit

import pytest
import yaml

pytest.importorskip("ray.serve")
uvicorn = pytest.importorskip("uvicorn")

from conftest import IN_CI, via_serve_handle  # noqa: E402
from test_serve_helpers import REPO, jpeg  # noqa: E402  (puts the repo root on sys.path)
from test_serve_router import FakeEditor, client_for  # noqa: E402

from deployments.config import AppArgs  # noqa: E402
from deployments.schemas import (  # noqa: E402
    BinaryReplyMeta, ErrorReply, HealthReply, InfoReply, PredictReply, StatsReply)
from rtedit.transport import decode_reply, encode_frame  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"  # built into redoc.standalone.js; hides itself when offline
SERVE_ARGS = yaml.safe_load((REPO / "deployments" / "serve.yaml").read_text())["applications"][0]["args"]
# serve.yaml's app without reading RTEDIT_API_KEY from this process's environment.
DEFAULT_APP = {**SERVE_ARGS, "router": {**SERVE_ARGS["router"], "api_key_env": None}}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- the OpenAPI document against real replies ---------------------------------------------------------------


def test_every_endpoint_documents_its_replies_and_real_replies_match(monkeypatch):
    editor = FakeEditor(steps=[2])
    with client_for(monkeypatch, DEFAULT_APP, editor) as client:
        schema = client.get("/openapi.json").json()
        predicted = client.post("/api/predict", json={"image": b64(jpeg(96, 160))})  # off size: resized
        refused = client.post("/api/predict", json={"image": b64(jpeg()), "steps": 99})
        binary = client.post("/api/predict_binary", content=encode_frame({"id": 7}, jpeg(128, 128)))
        info = client.get("/api/info")
        stats = client.get("/api/stats")
        health = client.get("/healthz")
    components = schema["components"]["schemas"]
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            ok = operation["responses"]["200"]["content"]
            assert all(body["schema"] for body in ok.values()), (method, path)
            if path.startswith("/api/"):
                assert {"400", "401"} & set(operation["responses"]) or path == "/api/info", (method, path)
    assert {"PredictReply", "ErrorReply", "InfoReply", "StatsReply", "Limits", "ResizedNote"} <= set(components)
    predict_ok = schema["paths"]["/api/predict"]["post"]["responses"]
    assert predict_ok["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictReply")
    assert predict_ok["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorReply")
    assert list(schema["paths"]["/api/predict_binary"]["post"]["responses"]["200"]["content"]) == [
        "application/octet-stream"]
    assert "/" not in schema["paths"]  # the web page is no API

    # extra="forbid": a field a reply carries and the schema lacks fails here.
    assert predicted.status_code == 200, predicted.text
    assert PredictReply.model_validate(predicted.json()).resized.to == [128, 128]
    assert refused.status_code == 400 and ErrorReply.model_validate(refused.json()).error.code == "out_of_range"
    reply = decode_reply(binary.content)
    assert binary.status_code == 200 and BinaryReplyMeta.model_validate(reply.meta).id == 7 and reply.image
    limits = InfoReply.model_validate(info.json()).limits
    assert limits.max_pixels == AppArgs.model_validate(DEFAULT_APP).engine.images.max_pixels
    StatsReply.model_validate(stats.json())
    HealthReply.model_validate(health.json())


def test_a_side_of_max_side_is_served_within_max_pixels(monkeypatch):
    """/api/info said max_side 2048, yet 2048x2048 was refused: it is over max_pixels, which /api/info now gives."""
    editor = FakeEditor()
    args = {"engine": {"model": "tiny"}, "router": {"api_key_env": None, "defaults": {"prompt": "make it blue"}}}
    with client_for(monkeypatch, args, editor) as client:
        limits = client.get("/api/info").json()["limits"]
        side, pixels = limits["max_side"], limits["max_pixels"]
        other = pixels // side // 16 * 16
        served = client.post("/api/predict", json={"image": b64(jpeg()), "width": side, "height": other})
        square = client.post("/api/predict", json={"image": b64(jpeg()), "width": side, "height": side})
    assert side * side > pixels >= side * other
    assert served.status_code == 200, served.text
    assert square.status_code == 422 and f"over the limit of {pixels} pixels" in square.json()["error"]["message"]


# ---- the README's numbers ---------------------------------------------------------------------------------------


def readme_limits() -> dict[str, int]:
    """The README's table of what `serve run deployments/serve.yaml` accepts: `limits.<name>` -> number."""
    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `limits\.(\w+)` \| ([\d,]+)", text, flags=re.M)
    assert rows, "README.md has no `limits.*` table"
    return {name: int(value.replace(",", "")) for name, value in rows}


def test_readme_states_the_limits_the_router_enforces(monkeypatch):
    """The README said prompts up to 4,096 characters, the router refused them over 2,000."""
    with client_for(monkeypatch, DEFAULT_APP, FakeEditor(steps=[2])) as client:
        served = client.get("/api/info").json()["limits"]
        documented = readme_limits()
        long_prompt = "x" * (documented["max_prompt_chars"] + 1)
        refused = client.post("/api/predict", json={"image": b64(jpeg(128, 128)), "prompt": long_prompt})
    assert documented == {name: served[name] for name in documented}
    assert {"max_side", "max_pixels", "max_prompt_chars", "max_steps", "max_references", "max_frame_bytes"} <= set(
        documented)
    assert refused.status_code == 400 and str(documented["max_prompt_chars"]) in refused.json()["error"]["message"]


# ---- /docs and /redoc in the browser, offline -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def docs_server(monkeypatch):
    """The router's app on a free port (uvicorn in this process, fake handles, no Ray cluster)."""
    from ray import serve

    import deployments.router as router_module

    app_args = AppArgs.model_validate(DEFAULT_APP)
    router_cls = router_module.Router.func_or_class.__bases__[0]  # the class under @serve.ingress
    router = router_cls(FakeEditor(), FakeEditor(steps=[2]), via_serve_handle(app_args.router), app_args.engine)
    monkeypatch.setattr(serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=router))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(router_module.app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_docs_and_redoc_render_without_internet(docs_server):
    if not os.path.exists(CHROMIUM):
        if IN_CI:
            pytest.fail(f"{CHROMIUM} is missing in CI (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    elsewhere: list[str] = []

    def only_this_server(route):
        # Every request to another host fails as it would offline, and is recorded.
        if urlsplit(route.request.url).netloc == urlsplit(docs_server).netloc:
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort("internetdisconnected")

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.route("**/*", only_this_server)

            page.goto(f"{docs_server}/docs")
            page.wait_for_selector(".opblock-summary-path[data-path='/api/predict_binary']", timeout=30_000)
            paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.dataset.path)")
            assert {"/api/predict", "/api/predict_binary", "/api/info", "/api/stats", "/healthz"} <= set(paths)
            titles = page.eval_on_selector_all(".json-schema-2020-12__title", "els => els.map(e => e.textContent)")
            assert {"PredictReply", "InfoReply", "ErrorReply"} <= set(titles)  # the reply schemas are listed
            page.click(".opblock-summary-path[data-path='/api/info']")
            page.wait_for_selector(".responses-table .response-col_status", timeout=10_000)
            statuses = page.eval_on_selector_all(".responses-table .response-col_status",
                                                 "els => els.map(e => e.textContent.trim())")
            assert [s for s in statuses if s.isdigit()] == ["200", "401", "503"]

            page.goto(f"{docs_server}/redoc")
            page.wait_for_selector("h2 >> text=Predict Binary", timeout=30_000)  # an operation rendered by ReDoc
            assert page.locator("text=max_prompt_chars").count() >= 1  # InfoReply's limits, from our schema
            # ReDoc's footer logo is the one asset it fetches from its CDN; offline it removes itself.
            page.wait_for_function("document.querySelectorAll('img[alt=\"redocly logo\"]').length === 0")
        finally:
            browser.close()
    assert [url for url in elsewhere if url != REDOC_LOGO] == [] and errors == []


def test_the_readmes_curl_walkthrough_edits_an_image(docs_server, tmp_path):
    """The README's section 3, as written, against the router (its port swapped for this server's)."""
    import subprocess
    import sys

    text = (REPO / "README.md").read_text()
    block = text.split("### 3. Edit with curl", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:8000/api/predict" in block
    script = block.replace("http://127.0.0.1:8000", docs_server)
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "'timings'" in proc.stdout and (tmp_path / "edited.jpg").read_bytes()[:2] == b"\xff\xd8"
