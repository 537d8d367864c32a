"""Exhaustion and exposure guards (deployments/guards.py) against a real local Serve app on its own loopback port:
foreign origins and foreign Host names (DNS rebinding) refused with 403, a stalled upload cut with 408 and its connection closed, an idle websocket closed
with 1001 and a reason, the per-address and total connection caps with /healthz and /readyz answering while a
thousand idle websockets are held, the bind-without-key refusal, and error messages without addresses or paths.

No timing assertions: every check is a status, a close code, a reason or a count.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import types

import pytest

pytest.importorskip("ray.serve")

import httpx  # noqa: E402
import yaml  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from test_serve_helpers import REPO, jpeg, start_ray  # noqa: E402

from deployments.guards import Readiness, check_exposure, is_loopback  # noqa: E402
from rtedit.errors import ConfigError  # noqa: E402
from rtedit.transport import decode_reply, encode_frame, public_message  # noqa: E402

pytestmark = pytest.mark.slow
PORT = 8017  # not the other Serve tests' 8000
BASE = f"http://127.0.0.1:{PORT}"
WS_URL = f"ws://127.0.0.1:{PORT}/ws/predict"
ALLOWED = "http://allowed.example"
# The idle-connection test: ADDRESSES loopback source addresses x CAP websockets each fill the router exactly.
CAP = 25
ADDRESSES = 16
HELD = CAP * ADDRESSES  # 400 idle websockets, each admitted by an editor call (2 cores: seconds)
RESERVED = 8
SLOW_MS = 1500

APP_ARGS = {
    "engine": {"model": "tiny"},
    "editor": {"num_replicas": 1, "num_cpus": 0, "torch_threads": 1, "min_frame_ms": SLOW_MS,
               "health_check_period_s": 2, "admission": {"max_sessions": 2 * HELD}},  # admission is not tested here
    "text_encoder": {"num_cpus": 0},
    "router": {"num_cpus": 0, "api_key_env": None, "edit_timeout_s": 8, "idle_timeout_s": 10, "body_timeout_s": 1,
               "max_connections_per_client": CAP, "reserved_for_health": RESERVED,
               "max_ongoing_requests": HELD + RESERVED, "allowed_origins": [ALLOWED],
               "defaults": {"seed": 0, "steps": 1, "format": "jpeg"}},
}


@pytest.fixture(scope="module")
def app():
    from ray import serve

    import ray
    from deployments.app import build_app
    from deployments.config import AppArgs

    start_ray(num_cpus=4)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app(AppArgs.model_validate(APP_ARGS)), name="rtedit", route_prefix="/", blocking=False)
        yield serve
    finally:
        serve.shutdown()
        ray.shutdown()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- origins ----------------------------------------------------------------------------------------------------
def test_foreign_origins_are_refused_with_403_and_the_page_own_and_listed_ones_served(app):
    with pytest.raises(InvalidStatus) as refused:
        connect(WS_URL, origin="http://evil.example", open_timeout=30)
    assert refused.value.response.status_code == 403
    with httpx.Client(base_url=BASE, timeout=60) as client:
        r = client.post("/api/predict", json={"image": b64(jpeg()), "prompt": "x"},
                        headers={"origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_refused"
        assert "router.allowed_origins" in r.json()["error"]["message"]
        assert client.get("/api/info", headers={"origin": "null"}).status_code == 403
        # The page's own origin, a listed one and no Origin at all (curl, rtedit.client) are served.
        for headers in ({"origin": BASE}, {"origin": ALLOWED}, {}):
            assert client.get("/api/info", headers=headers).status_code == 200, headers
        # The 3 refusals above are counted in /api/stats (and the rtedit_refusals counter beside it).
        assert client.get("/api/stats").json()["connections"]["refused"]["origin"] >= 3
    for origin in (BASE, ALLOWED):
        with connect(WS_URL, origin=origin, open_timeout=30) as ws:
            ws.send('{"prompt": "make it blue"}')
            assert '"ok": true' in ws.recv(timeout=30)


def test_another_name_of_this_machine_is_refused_with_403_dns_rebinding(app):
    """A foreign page whose name was made to resolve to 127.0.0.1 sends its own name as Host and as Origin: the
    origin check alone would call that same-origin."""
    evil = f"evil.example:{PORT}"
    with httpx.Client(base_url=BASE, timeout=60) as client:
        for path in ("/api/info", "/healthz"):
            r = client.get(path, headers={"host": evil, "origin": f"http://{evil}"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "host_refused", r.text
            assert "router.allowed_hosts" in r.json()["error"]["message"]
        for host in (f"localhost:{PORT}", f"127.0.0.1:{PORT}", f"[::1]:{PORT}"):
            assert client.get("/api/info", headers={"host": host}).status_code == 200, host
        assert client.get("/api/stats").json()["connections"]["refused"]["host"] >= 2
    with socket.create_connection(("127.0.0.1", PORT), timeout=30) as sock:  # the ws client always sends the URL's
        sock.sendall(f"GET /ws/predict HTTP/1.1\r\nHost: {evil}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        assert sock.recv(4096).split(b"\r\n", 1)[0].split()[1] == b"403"


def test_allowed_hosts_default_to_the_loopback_names_on_a_loopback_bind_only():
    from pydantic import ValidationError

    from deployments.config import RouterArgs

    args = RouterArgs()
    assert args.guard_limits("127.0.0.1").allowed_hosts == {"localhost", "127.0.0.1", "::1"}
    assert args.guard_limits("0.0.0.0").allowed_hosts is None  # exposed: the API key guards it
    assert args.guard_limits(None).allowed_hosts is None  # no Serve proxy (a router built in a test)
    named = RouterArgs(allowed_hosts=["Edit.Example.com", "[::1]"])
    assert named.guard_limits("0.0.0.0").allowed_hosts == {"edit.example.com", "::1"}
    assert RouterArgs(allowed_hosts=["*"]).guard_limits("127.0.0.1").allowed_hosts is None
    with pytest.raises(ValidationError, match="without port"):
        RouterArgs(allowed_hosts=["edit.example.com:8000"])


# ---- body deadline ----------------------------------------------------------------------------------------------
def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_stalled_upload_is_cut_with_408_and_its_connection_closed(app):
    with socket.create_connection(("127.0.0.1", PORT), timeout=60) as sock:
        sock.sendall(b"POST /api/predict_binary HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                     b"Content-Type: application/octet-stream\r\n\r\n" + b"\0" * 100)
        reply = read_all(sock)  # returns only once the server closed the connection
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"code": "body_timeout"' in body and b"router.body_timeout_s" in body
    # A body that does arrive is served as before (here: refused as no frame, a 4xx, never a 5xx).
    r = httpx.post(f"{BASE}/api/predict_binary", content=b"\0" * 100, timeout=60)
    assert r.status_code == 400


# ---- /healthz while edits are in flight -------------------------------------------------------------------------
def test_healthz_answers_while_edits_are_in_flight(app):
    results: list[int] = []

    def edit(tag: int) -> None:
        r = httpx.post(f"{BASE}/api/predict", json={"image": b64(jpeg(tag=tag)), "prompt": "make it blue"},
                       timeout=120)
        results.append(r.status_code)

    threads = [threading.Thread(target=edit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    # Four edits of >= SLOW_MS each on one replica taking two at a time: /healthz answers before they are done.
    health = httpx.get(f"{BASE}/healthz", timeout=60)
    in_flight = 4 - len(results)
    for t in threads:
        t.join()
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert in_flight > 0
    assert results == [200] * 4


# ---- caps, with /healthz and /readyz answering while the router is full -----------------------------------------
async def _hold(count_per_address: int, addresses: list[str], stop: asyncio.Event, opened: list, failed: list):
    from websockets.asyncio.client import connect as aconnect

    gate = asyncio.Semaphore(64)

    async def one(address: str) -> None:
        async with gate:
            try:
                ws = await aconnect(WS_URL, local_addr=(address, 0), open_timeout=60, ping_interval=None)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                failed.append(repr(exc))
                return
        opened.append(ws)

    await asyncio.gather(*(one(a) for a in addresses for _ in range(count_per_address)))
    await stop.wait()
    await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)


def closed_with(address: str) -> tuple[int, str]:
    """The close code and reason a new websocket from `address` gets (accepted, then closed by the router)."""
    with pytest.raises(ConnectionClosed) as closed:
        with connect(WS_URL, open_timeout=60, sock=socket.create_connection(("127.0.0.1", PORT),
                                                                             source_address=(address, 0))) as ws:
            ws.recv(timeout=60)
    return closed.value.rcvd.code, closed.value.rcvd.reason


def test_idle_connections_are_capped_per_address_and_in_all_and_health_still_answers(app):
    addresses = [f"127.0.0.{i}" for i in range(2, 2 + ADDRESSES)]
    stop, opened, failed = None, [], []
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        nonlocal stop
        asyncio.set_event_loop(loop)
        stop = asyncio.Event()
        started.set()
        loop.run_until_complete(_hold(CAP, addresses, stop, opened, failed))

    holder = threading.Thread(target=run)
    holder.start()
    started.wait()
    try:
        with httpx.Client(timeout=60) as client:
            while len(opened) + len(failed) < HELD:
                assert client.get(f"{BASE}/healthz").status_code == 200  # answers while they are being opened
            assert not failed, failed[:3]
            # Every address holds its cap: one more is closed with 1008 and the reason, and its HTTP gets 429.
            code, reason = closed_with(addresses[0])
            assert code == 1008 and "max_connections_per_client" in reason
            transport = httpx.HTTPTransport(local_address=addresses[0])
            with httpx.Client(transport=transport, timeout=60) as capped:
                r = capped.post(f"{BASE}/api/predict", json={"image": b64(jpeg()), "prompt": "x"})
                assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_connections"
                assert r.headers["retry-after"] == "1"
            # The router is full (max_ongoing_requests less reserved_for_health): a new address is told to retry.
            code, reason = closed_with("127.0.0.250")
            assert code == 1013 and "retry later" in reason
            # The slots kept for health checks still answer.
            assert client.get(f"{BASE}/healthz").json() == {"status": "ok"}
            ready = client.get(f"{BASE}/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
    finally:
        loop.call_soon_threadsafe(stop.set)
        holder.join()
        loop.close()
    assert len(opened) == HELD


# ---- idle websockets --------------------------------------------------------------------------------------------
def test_an_idle_websocket_is_closed_with_1001_and_a_reason(app):
    with connect(WS_URL, open_timeout=30) as ws:
        ws.send('{"prompt": "make it blue"}')
        assert '"ok": true' in ws.recv(timeout=30)  # a message resets the idle clock; then nothing for 10 s
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=60)
    assert closed.value.rcvd.code == 1001
    assert "idle" in closed.value.rcvd.reason and "router.idle_timeout_s" in closed.value.rcvd.reason


# ---- readiness --------------------------------------------------------------------------------------------------
def _status(**running):
    deployments = {name: types.SimpleNamespace(replica_states={"RUNNING": n} if n else {"STARTING": 1})
                   for name, n in running.items()}
    return types.SimpleNamespace(applications={"rtedit": types.SimpleNamespace(deployments=deployments)})


def test_readiness_waits_for_a_running_replica_of_every_deployment_behind_the_router():
    states = [_status(Router=1, Editor=0, TextEncoder=1), _status(Router=1, Editor=1, TextEncoder=1)]
    readiness = Readiness(lambda: states[0], "rtedit", "Router", ttl_s=0)
    assert asyncio.run(readiness.check()) == (False, {"Editor": 0, "TextEncoder": 1})
    states.pop(0)
    assert asyncio.run(readiness.check()) == (True, {"Editor": 1, "TextEncoder": 1})
    missing = Readiness(lambda: types.SimpleNamespace(applications={}), "rtedit", "Router")
    assert asyncio.run(missing.check()) == (False, {})


# ---- exposure ---------------------------------------------------------------------------------------------------
def test_a_non_loopback_bind_without_an_api_key_refuses_to_start(monkeypatch):
    with pytest.raises(ConfigError) as refused:
        check_exposure("0.0.0.0", None, "RTEDIT_API_KEY")
    message = str(refused.value)
    assert "export RTEDIT_API_KEY=<key>" in message and "router.api_key" in message and "127.0.0.1" in message
    check_exposure("0.0.0.0", "a-key", "RTEDIT_API_KEY")
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, None, "RTEDIT_API_KEY")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("")

    # The router itself refuses, as its replica would at start-up on such a bind.
    import deployments.router as router_module
    from deployments.config import AppArgs

    args = AppArgs.model_validate({"engine": {"model": "tiny"}, "router": {"api_key_env": "RTEDIT_TEST_NO_KEY"}})
    monkeypatch.delenv("RTEDIT_TEST_NO_KEY", raising=False)
    router_cls = router_module.Router.func_or_class.__bases__[0]
    # @serve.ingress rebuilt the class over a copy of the module's globals: patch the ones its __init__ reads.
    monkeypatch.setitem(router_cls.__init__.__globals__, "serve_bind_host", lambda: "0.0.0.0")
    with pytest.raises(ConfigError, match="export RTEDIT_TEST_NO_KEY=<key>"):
        router_cls(None, None, args.router, args.engine)
    monkeypatch.setenv("RTEDIT_TEST_NO_KEY", "a-key")
    router_cls(None, None, args.router, args.engine)


@pytest.mark.parametrize("name", ["serve.yaml", "serve-gpu.yaml", "serve-session.yaml"])
def test_shipped_yamls_bind_loopback_so_they_start_without_a_key(name):
    config = yaml.safe_load((REPO / "deployments" / name).read_text())
    assert is_loopback(config["http_options"]["host"])


# ---- error texts ------------------------------------------------------------------------------------------------
def test_public_messages_show_no_memory_address_or_file_path():
    assert public_message("cannot identify image file <_io.BytesIO object at 0x7f3a2b1c9d50>") == \
        "cannot identify image file <BytesIO>"
    assert "0x7ffe" not in public_message("failed at 0x7ffe12345678")
    for path in ("/work/main/models/toy-editor/model.safetensors", "~/.cache/huggingface/hub/x", "/tmp/a.png",
                 r"C:\Users\me\a.png"):
        assert public_message(f"no such file: '{path}'") == "no such file: '<path>'"
    kept = "see GET /api/info limits; frame 1/2; origin http://evil.example/x"
    assert public_message(kept) == kept


def test_image_decode_errors_over_http_and_websocket_show_no_address(app):
    garbage = b"not an image at all" * 10
    truncated = jpeg(64, 64)[:200]
    with httpx.Client(base_url=BASE, timeout=60) as client:
        for data in (garbage, truncated):
            r = client.post("/api/predict", json={"image": b64(data), "prompt": "x"})
            message = r.json()["error"]["message"]
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image", r.text
            assert "0x" not in message and "object at" not in message and "/" not in message.replace("/api", "")
    with connect(WS_URL, open_timeout=30) as ws:
        ws.send(encode_frame({"id": 1, "prompt": "x"}, garbage))
        reply = decode_reply(ws.recv(timeout=60))
    assert reply.error["code"] == "invalid_image" and "0x" not in reply.error["message"]
