"""The web page in headless Chromium against the Router's FastAPI app served by uvicorn in this process (fake editor
and text-encoder handles, no Ray cluster): a websocket refused for its key, a server restart, and the page's
recovery from both; the model's examples as one-click instructions and only its sizes (models/toy-editor).

The page used to stay stuck after one refused websocket ("Cannot read properties of null (reading 'send')").
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import threading
import time
import types

import PIL.Image
import pytest

pytest.importorskip("ray.serve")
uvicorn = pytest.importorskip("uvicorn")

from conftest import IN_CI, FakeAdmission, FakeResponse, via_serve_handle  # noqa: E402
from test_serve_helpers import REPO, jpeg  # noqa: E402  (puts the repo root on sys.path)

from deployments.config import AppArgs  # noqa: E402
from rtedit.presets import Sidecar  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
KEY = "page-key"
ARGS = {"engine": {"model": "models/toy-editor"}, "router": {"api_key": KEY, "api_key_env": None, "edit_timeout_s": 10}}
EXAMPLES = Sidecar.load(REPO / "models" / "toy-editor").examples


class SlowResponse(FakeResponse):
    """A response that takes `delay_s` to arrive: a frame still in flight when the server goes away."""

    def __init__(self, value, delay_s: float):
        super().__init__(value)
        self.delay_s = delay_s

    def __await__(self):
        yield from asyncio.sleep(self.delay_s).__await__()
        return self.value


class EchoEditor(FakeAdmission):
    """An editor handle that returns its input at the job's size (grey, so a reply is visibly an edit); records jobs.
    With delay_s set, every edit takes that long."""

    def __init__(self):
        super().__init__(replica="echo")
        self.jobs = []
        self.delay_s = 0.0
        self.edit = types.SimpleNamespace(remote=lambda job, embedding=None, replica=None: SlowResponse(
            self._edit(job), self.delay_s))
        self.info = types.SimpleNamespace(remote=lambda: FakeResponse(
            {"name": "echo", "random_weights": False, "device": "cpu", "dtype": "float32", "steps": [2]}))

    def options(self, **_):
        return self

    def _edit(self, job):
        self.jobs.append(job)
        with PIL.Image.open(io.BytesIO(job.image)) as img:
            out = img.convert("L").convert("RGB")
        if job.width and job.height:
            out = out.resize((job.width, job.height))
        buffer = io.BytesIO()
        out.save(buffer, "JPEG")
        return {"image": buffer.getvalue(), "width": out.width, "height": out.height, "format": "jpeg",
                "seed": job.seed, "steps": job.steps, "timings": {"total": 1.0}, "replica": "echo", "prompt_key": "k"}


class PageServer:
    """The router app on one port; stop() and start() again is a server restart (a fresh Router, fresh editor)."""

    def __init__(self, port: int, monkeypatch):
        from ray import serve

        import deployments.router as router_module

        self.port, self.app, self.router_module = port, router_module.app, router_module
        self.current: dict = {}
        monkeypatch.setattr(serve, "get_replica_context", self._replica_context)
        self.server = self.thread = None

    def _replica_context(self):
        """As Serve's: the serving Router; while a Router is being built, "not in a replica" (as for a router built
        directly: it serves no proxy, so it asks for no bind address)."""
        from ray.serve.exceptions import RayServeException

        if "router" not in self.current:
            raise RayServeException("no router is serving yet")
        return types.SimpleNamespace(servable_object=self.current["router"])

    def start(self) -> EchoEditor:
        args = AppArgs.model_validate(ARGS)
        router_cls = self.router_module.Router.func_or_class.__bases__[0]  # the class under @serve.ingress
        editor = EchoEditor()
        self.current.pop("router", None)
        self.current["router"] = router_cls(EchoEditor(), editor, via_serve_handle(args.router), args.engine)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return editor

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def browser():
    # Here, not at import: tests/test_client*.py import PageServer from this module and need no browser.
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        if IN_CI:
            pytest.fail(f"{CHROMIUM} is missing in CI (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield chromium
        finally:
            chromium.close()


def wait_state(page, state: str, timeout_ms: int = 15_000) -> None:
    page.wait_for_function(f"document.getElementById('status').dataset.state === '{state}'", timeout=timeout_ms)


def wait_received(page, n: int, timeout_ms: int = 15_000) -> None:
    page.wait_for_function(f"Number(document.getElementById('received').textContent) >= {n}", timeout=timeout_ms)


def output_size(page) -> list[int]:
    page.wait_for_function("(() => { const o = document.getElementById('output');"
                           " return o.src.startsWith('blob:') && o.complete && o.naturalWidth > 0; })()")
    return page.evaluate("[document.getElementById('output').naturalWidth,"
                         " document.getElementById('output').naturalHeight]")


def test_page_recovers_from_a_refused_key_and_a_server_restart(browser, monkeypatch, tmp_path):
    upload = tmp_path / "photo.jpg"
    upload.write_bytes(jpeg(160, 96, tag=5))  # not the model's 128x128: the page crops and scales it
    server = PageServer(free_port(), monkeypatch)
    editor = server.start()
    page_errors: list[str] = []
    page = browser.new_page()
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    try:
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_function("document.getElementById('model').textContent.includes('API key needed')")
        assert page.is_visible("#api-key")

        # 1. No key: the handshake is refused, and the page says so instead of throwing on a null socket.
        page.set_input_files("#file", str(upload))
        wait_state(page, "refused")
        assert "API key" in page.text_content("#status") and page.text_content("#sent") == "0"

        # 2. The key: the page loads the model, redials and sends the waiting image without a new upload.
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        wait_state(page, "open")
        wait_received(page, 1)
        assert output_size(page) == [128, 128]
        assert page.eval_on_selector_all(".example", "els => els.map(e => e.textContent)") == list(EXAMPLES)
        assert page.eval_on_selector_all("#size option", "els => els.map(e => e.value)") == ["128x128"]
        assert page.input_value("#prompt") == EXAMPLES[0]
        first = editor.jobs[0]
        assert first.prompt == EXAMPLES[0] and (first.width, first.height) == (None, None)
        assert PIL.Image.open(io.BytesIO(first.image)).size == (128, 128)  # cropped by the page: no resize needed
        page.click(f".example >> text='{EXAMPLES[1]}'")
        wait_received(page, 2)
        assert editor.jobs[-1].prompt == EXAMPLES[1] and page.text_content("#resized") == ""

        # 3. The server goes away: the page shows that it waits and redials with backoff.
        server.stop()
        page.wait_for_function("document.getElementById('status').dataset.state === 'waiting'"
                               " && document.getElementById('status').textContent.includes('reconnecting in')")
        time.sleep(1.0)  # a few failed attempts
        attempt = int(page.text_content("#status").rsplit("attempt ", 1)[1].rstrip(")"))
        assert 2 <= attempt <= 5, page.text_content("#status")  # backoff: 0.25 + 0.5 + 1 s, not a tight loop

        # 4. It comes back: the page reconnects by itself, and the new session gets the prompt again.
        restarted = server.start()
        wait_state(page, "open")
        assert restarted.jobs == []
        page.set_input_files("#file", str(upload))  # the same file again: it must still send
        wait_received(page, 3)
        assert len(restarted.jobs) == 1 and restarted.jobs[0].prompt == EXAMPLES[1]
        assert page.text_content("#error") == ""

        # 5. The server goes away with a frame in flight: once back, the page sends it again by itself.
        restarted.delay_s = 60.0
        page.click(f".example >> text='{EXAMPLES[2]}'")
        page.wait_for_function("document.getElementById('inflight').textContent === '1'")
        server.stop()
        wait_state(page, "waiting")
        third = server.start()
        wait_received(page, 4)
        assert [job.prompt for job in third.jobs] == [EXAMPLES[2]] and page.text_content("#error") == ""
    finally:
        page.close()
        server.stop()
    assert page_errors == []
