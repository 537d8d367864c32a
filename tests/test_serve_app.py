"""The Serve app against a real local Ray cluster and real clients on port 8000 (tiny preset, CPU).

One module-scoped app: 2 editor replicas padded to >= 200 ms a frame (the "slow editor" test config), an API key.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time

import pytest

pytest.importorskip("ray.serve")

import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from rtedit.transport import decode_reply, encode_frame  # noqa: E402
from test_serve_helpers import API_KEY, BASE, WS_URL, image_size, jpeg, recv_frame, running_app, ws_frame  # noqa: E402

pytestmark = pytest.mark.slow
HEADERS = {"x-api-key": API_KEY}
KEYED_WS = f"{WS_URL}?api_key={API_KEY}"
MAX_FRAME = 512 * 1024
SLOW_MS = 200

APP_ARGS = {
    "engine": {"model": "tiny"},
    "editor": {"num_replicas": 2, "num_cpus": 1, "torch_threads": 1, "min_frame_ms": SLOW_MS,
               "health_check_period_s": 2, "admission": {"max_sessions": 4}},  # 8 concurrent clients on 2 replicas
    "text_encoder": {"num_cpus": 0.5},
    "router": {"num_cpus": 0.5, "api_key": API_KEY, "edit_timeout_s": 60,
               "limits": {"max_frame_bytes": MAX_FRAME, "max_meta_bytes": 4096},
               "defaults": {"seed": 0, "steps": 2, "format": "jpeg"}},
}


@pytest.fixture(scope="module")
def app():
    from ray import serve

    import ray

    if os.environ.get("RTEDIT_SERVE_TEST_ADDRESS"):
        # Development loop: reuse a cluster where this app already runs (see bench/serve_load.py --help).
        ray.init(address=os.environ["RTEDIT_SERVE_TEST_ADDRESS"], log_to_driver=False)
        yield serve
        ray.shutdown()
        return
    with running_app(APP_ARGS) as running:
        yield running


def predict_json(client: httpx.Client, image: bytes, **fields) -> httpx.Response:
    body = {"image": base64.b64encode(image).decode(), **fields}
    return client.post(f"{BASE}/api/predict", json=body, headers=HEADERS, timeout=120)


# ---- round trips ---------------------------------------------------------------------------------------------


def test_json_round_trip_returns_requested_size(app):
    with httpx.Client() as client:
        r = predict_json(client, jpeg(64, 64), prompt="make it blue", width=96, height=80, format="png")
    assert r.status_code == 200, r.text
    body = r.json()
    out = base64.b64decode(body["image"])
    assert image_size(out) == (96, 80) and out[:4] == b"\x89PNG"
    assert body["width"] == 96 and body["height"] == 80 and body["replica"]
    assert set(body["timings"]) >= {"prepare", "denoise", "decode", "total", "server"}


def test_binary_round_trip_and_same_frame_twice_is_identical(app):
    frame = encode_frame({"id": 5, "prompt": "make it red", "width": 64, "height": 96, "seed": 3}, jpeg(80, 80, tag=1))
    with httpx.Client() as client:
        replies = [client.post(f"{BASE}/api/predict_binary", content=frame, headers=HEADERS, timeout=120)
                   for _ in range(2)]
    assert [r.status_code for r in replies] == [200, 200]
    first, second = (decode_reply(r.content) for r in replies)
    assert first.id == 5 and first.error is None and image_size(first.image) == (64, 96)
    assert first.image == second.image and first.meta["seed"] == 3


def test_health_page_docs_and_info(app):
    with httpx.Client() as client:
        assert client.get(f"{BASE}/healthz").json() == {"status": "ok"}
        page = client.get(f"{BASE}/")
        assert page.status_code == 200 and "/ws/predict" in client.get(f"{BASE}/static/app.js").text
        assert "<title>rtedit" in page.text
        assert client.get(f"{BASE}/docs").status_code == 200
        assert "/api/predict_binary" in client.get(f"{BASE}/openapi.json").json()["paths"]
        info = client.get(f"{BASE}/api/info", headers=HEADERS).json()
    assert info["model"]["name"] == "tiny" and info["model"]["random_weights"] is True and info["auth"] is True


# ---- websocket semantics -------------------------------------------------------------------------------------


def test_ws_frame_dropping_keeps_newest_and_order(app):
    sent = 30
    with connect(KEYED_WS, max_size=2**24) as ws:
        assert ws_frame(ws, {"id": 0, "prompt": "make it green"}, jpeg(64, 64)).error is None  # warm the session
        for i in range(1, sent + 1):
            ws.send(encode_frame({"id": i}, jpeg(64, 64, tag=i)))
            time.sleep(0.01)
        replies = []
        while not replies or replies[-1].id != sent:
            replies.append(recv_frame(ws, timeout=60))
    ids = [r.id for r in replies]
    assert all(r.error is None for r in replies)
    assert ids == sorted(set(ids)) and ids[-1] == sent, ids
    # Frame 0 was answered before the burst; every response counts the drops of the whole session.
    assert len(replies) + replies[-1].meta["dropped"] == sent
    assert replies[-1].meta["dropped"] > 0 and len(replies) < sent
    assert len({r.meta["replica"] for r in replies}) == 1


def test_same_frame_twice_in_a_session_gives_identical_images(app):
    image = jpeg(64, 64, tag=9)
    with connect(KEYED_WS) as ws:
        a = ws_frame(ws, {"id": 1, "prompt": "make it snowy"}, image)
        b = ws_frame(ws, {"id": 2}, image)
    assert a.error is None and a.image == b.image and a.meta["seed"] == b.meta["seed"]


def test_eight_concurrent_clients_are_isolated(app):
    sizes = [(64, 64), (64, 80), (80, 64), (80, 80), (64, 96), (96, 64), (96, 80), (80, 96)]
    results: dict[int, list] = {}
    errors: list = []

    def client(k: int) -> None:
        try:
            w, h = sizes[k]
            out = []
            with connect(KEYED_WS) as ws:
                ws.send(json.dumps({"prompt": f"client {k}: paint it colour {k}", "width": w, "height": h}))
                for i in range(3):
                    out.append(ws_frame(ws, {"id": i}, jpeg(64, 64, tag=100 + k), timeout=120))
            results[k] = out
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    keys = {}
    for k, replies in results.items():
        assert [r.id for r in replies] == [0, 1, 2]
        assert all(r.error is None for r in replies), [r.error for r in replies]
        assert {image_size(r.image) for r in replies} == {sizes[k]}
        assert len({r.meta["prompt_key"] for r in replies}) == 1
        keys[k] = replies[0].meta["prompt_key"]
        assert len({r.meta["replica"] for r in replies}) == 1
    assert len(set(keys.values())) == 8


def test_sessions_stick_to_one_replica_and_spread(app):
    seen = []
    for _ in range(20):
        with connect(KEYED_WS) as ws:
            replies = [ws_frame(ws, {"id": i, "prompt": "make it blue"}, jpeg(64, 64)) for i in range(3)]
        assert all(r.error is None for r in replies)
        replicas = {r.meta["replica"] for r in replies}
        assert len(replicas) == 1
        seen.append(replicas.pop())
        if len(set(seen)) == 2:
            break
    assert len(set(seen)) == 2, "20 sessions all landed on one of 2 replicas"


# ---- bad input, limits, access ------------------------------------------------------------------------------


def test_bad_frames_get_errors_while_another_client_is_served(app):
    stop = threading.Event()
    good: list = []

    def steady() -> None:
        with connect(KEYED_WS) as ws:
            i = 0
            while not stop.is_set():
                good.append(ws_frame(ws, {"id": i, "prompt": "make it gold"}, jpeg(64, 64, tag=7), timeout=120))
                i += 1

    t = threading.Thread(target=steady)
    t.start()
    try:
        with connect(KEYED_WS, max_size=2**24) as ws:
            cases = [
                (b"\x00\x01", "bad_header"),
                (b"\x00\x00\x00\x06[1, 2]" + jpeg(), "not_object"),
                (encode_frame({"id": 1, "prompt": "x"}, b"not an image at all"), "invalid_image"),
                (encode_frame({"id": 2, "prompt": "x"}, b"\x00" * (MAX_FRAME + 10)), "too_large"),
                (encode_frame({"id": 3, "prompt": "x", "colour": "red"}, jpeg()), "unknown_field"),
            ]
            for data, code in cases:
                ws.send(data)
                reply = recv_frame(ws)
                assert reply.error is not None and reply.error["code"] == code, (code, reply.meta)
                assert reply.error["message"]
            assert ws_frame(ws, {"id": 4, "prompt": "x"}, jpeg()).error is None
        with httpx.Client() as client:
            r = client.post(f"{BASE}/api/predict", content=b"{not json", headers=HEADERS)
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"
            r = client.post(f"{BASE}/api/predict", json={"image": "!!", "prompt": "x"}, headers=HEADERS)
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_base64"
            r = predict_json(client, b"GIF89a-nope", prompt="x")
            assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidImage"
            r = predict_json(client, jpeg(), prompt="x", extra=1)
            assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_field"
    finally:
        stop.set()
        t.join(120)
    assert len(good) >= 2 and all(r.error is None for r in good)


def test_http_body_refused_on_content_length_before_reading(app):
    with socket.create_connection(("127.0.0.1", 8000), timeout=30) as sock:
        sock.sendall(b"POST /api/predict_binary HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nx-api-key: " + API_KEY.encode() +
                     b"\r\nContent-Length: 100000000\r\nContent-Type: application/octet-stream\r\n\r\n")
        # No body is sent: an answer proves the server did not wait to read 100 MB.
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]


def test_api_key_is_required(app):
    with httpx.Client() as client:
        assert client.post(f"{BASE}/api/predict", json={}).status_code == 401
        assert client.post(f"{BASE}/api/predict_binary", content=b"", headers={"x-api-key": "wrong"}).status_code == 401
        assert client.get(f"{BASE}/api/stats").status_code == 401
        r = client.get(f"{BASE}/api/stats", headers={"authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200
    with pytest.raises(InvalidStatus) as info:
        with connect(WS_URL):
            pass
    assert info.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        with connect(f"{WS_URL}?api_key=wrong"):
            pass
    with connect(WS_URL, subprotocols=[f"rtedit.key.{API_KEY}"]) as ws:
        assert ws.subprotocol == f"rtedit.key.{API_KEY}"
        assert ws_frame(ws, {"id": 1, "prompt": "x"}, jpeg()).error is None


def test_client_library_session_through_serve(app):
    """rtedit.client through Serve's proxy: the key in the subprotocol, edits with the engine's stage timings, a
    reference, one replica per session; a wrong key is told apart from a server that is down."""
    from rtedit.client import Client, Unauthorized

    with Client(BASE, api_key=API_KEY) as client:
        with client.session("make it blue", references=[jpeg(64, 64, tag=3)], width=96, height=80) as session:
            edits = []
            for tag in (1, 2):
                session.send(jpeg(64, 64, tag=tag))
                edits.append(session.receive(timeout=120))
            stats = session.stats
    assert [e.id for e in edits] == [1, 2] and (stats.sent, stats.edits, stats.reconnects) == (2, 2, 0)
    assert {e.meta["replica"] for e in edits} == {edits[0].meta["replica"]}
    for edit in edits:
        assert edit.image.size == (96, 80) and {"prepare", "denoise", "decode", "server"} <= set(edit.timings)
    with Client(BASE, api_key="wrong") as client, pytest.raises(Unauthorized):
        client.session("make it blue")


def test_stats_report_frames_stages_and_caches(app):
    with httpx.Client() as client:
        stats = client.get(f"{BASE}/api/stats", headers=HEADERS).json()
    assert stats["frames"]["received"] >= stats["frames"]["processed"] > 0
    assert {"prepare", "denoise", "decode", "server"} <= set(stats["stages_ms"])
    assert stats["stages_ms"]["server"]["p99"] >= stats["stages_ms"]["server"]["p50"] > 0
    assert stats["prompt_cache"]["misses"] >= 1 and "hits" in stats["prompt_cache"]
    assert stats["embedding_transfers"] >= 1


def test_stats_and_info_report_each_editor_replica(app):
    """/api/stats asks every editor replica (a handle call reaches one at random): engine stats and model by id."""
    pids = _editor_pids()
    with httpx.Client() as client:
        stats = client.get(f"{BASE}/api/stats", headers=HEADERS).json()
        info = client.get(f"{BASE}/api/info", headers=HEADERS).json()
    editors = stats["editors"]
    assert set(editors) == set(pids), (editors, pids)
    for replica, replica_stats in editors.items():
        assert replica_stats["replica"] == replica and replica_stats["model"]["name"] == "tiny"
        assert replica_stats["attention_backend"] == "native (not probed)"
        assert replica_stats["warm_up"] is not None  # EditorArgs.warmup (default true) warmed the replica
    assert stats["attention_backend"] == {replica: "native (not probed)" for replica in pids}
    assert info["defaults"]["steps"] == 2 and info["limits"]["max_references"] == 4


# ---- fuzzing -------------------------------------------------------------------------------------------------

json_leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=30)
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3),
                        max_leaves=10)
field_names = st.sampled_from(["id", "prompt", "steps", "seed", "width", "height", "format", "references", "image", "x"])
bad_meta = st.dictionaries(field_names, json_any, max_size=5)


def broken_images() -> st.SearchStrategy[bytes]:
    real = jpeg(96, 96, tag=3)
    return st.one_of(
        st.tuples(st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBP", b""]),
                  st.binary(max_size=200)).map(lambda t: t[0] + t[1]),
        st.integers(1, len(real) * 6 // 10).map(lambda n: real[:n]),              # truncated JPEG
        st.integers(1, 63).map(lambda side: jpeg(side, 64)),                      # below the 64 px minimum
        st.integers(20_000, 60_000).map(_png_header_claiming),                    # decompression bomb header
    )


def _png_header_claiming(side: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_fuzz_running_service_answers_every_malformed_input_with_an_error(app):
    from ray import serve as ray_serve

    counts = {"ws_frames": 0, "json_bodies": 0, "images": 0}
    pids_before = _editor_pids()
    with connect(KEYED_WS, max_size=2**24) as ws:
        ws.send(json.dumps({"prompt": "fuzz"}))
        assert json.loads(ws.recv(timeout=30))["ok"]

        @settings(max_examples=600, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.one_of(
            st.binary(max_size=64),
            st.tuples(bad_meta, st.binary(max_size=16)).map(lambda t: encode_frame(t[0], t[1])),
            st.tuples(json_any, st.integers(-4, 4)).map(lambda t: _raw(json.dumps(t[0]).encode(), t[1])),
        ))
        def frames(data):
            ws.send(data)
            reply = recv_frame(ws, timeout=60)
            assert reply.error is not None, reply.meta
            counts["ws_frames"] += 1

        frames()

    # A fresh connection, so the fuzzed ids above cannot make these ids non-increasing.
    with connect(KEYED_WS, max_size=2**24) as ws:
        ws.send(json.dumps({"prompt": "fuzz"}))
        assert json.loads(ws.recv(timeout=30))["ok"]
        next_id = [0]

        @settings(max_examples=150, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(image=broken_images())
        def images(image):
            next_id[0] += 1
            reply = ws_frame(ws, {"id": next_id[0]}, image)
            assert reply.error is not None and reply.id == next_id[0], reply.meta
            counts["images"] += 1

        images()
        assert ws_frame(ws, {"id": next_id[0] + 1}, jpeg()).error is None

    with httpx.Client(headers=HEADERS, timeout=60) as client:
        @settings(max_examples=300, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(body=st.one_of(st.binary(max_size=64), bad_meta.map(lambda d: json.dumps(d).encode()),
                              json_any.map(lambda v: json.dumps(v).encode())))
        def bodies(body):
            r = client.post(f"{BASE}/api/predict", content=body)
            assert 400 <= r.status_code < 500, (r.status_code, r.text)
            assert r.json()["error"]["message"]
            counts["json_bodies"] += 1

        bodies()
        r = predict_json(client, jpeg(), prompt="after the fuzz")
        assert r.status_code == 200
    assert sum(counts.values()) >= 1000, counts
    assert _editor_pids() == pids_before  # no replica crashed and was replaced
    assert ray_serve.status().applications["rtedit"].status == "RUNNING"


def _raw(meta: bytes, delta: int) -> bytes:
    import struct

    return struct.pack(">I", max(0, len(meta) + delta)) + meta + b"\xff\xd8"


def _editor_pids(n: int = 2, tries: int = 200) -> dict[str, int]:
    """replica id -> pid for the editor replicas, asked of the replicas themselves (no State API needed)."""
    from ray import serve as ray_serve

    handle = ray_serve.get_deployment_handle("Editor", app_name="rtedit")
    found: dict[str, int] = {}
    for _ in range(tries):
        info = handle.pid.remote().result(timeout_s=60)
        found[info["replica"]] = info["pid"]
        if len(found) >= n:
            break
    return found


# ---- the web page in a real browser ----------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


def test_browser_uploads_image_and_shows_edited_result(app, tmp_path):
    from test_serve_helpers import REPO

    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    upload = tmp_path / "upload.jpg"
    upload.write_bytes(jpeg(160, 128, tag=42))
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(f"{BASE}/?api_key={API_KEY}")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')", timeout=60_000)
            assert page.is_visible("#random-notice")
            page.fill("#prompt", "make it look like a pencil sketch")
            page.select_option("#size", "256")
            page.set_input_files("#file", str(upload))
            page.wait_for_function(
                "(() => { const o = document.getElementById('output');"
                " return o.src.startsWith('blob:') && o.complete && o.naturalWidth > 0; })()", timeout=120_000)
            size = page.evaluate("[document.getElementById('output').naturalWidth,"
                                 " document.getElementById('output').naturalHeight]")
            received = int(page.text_content("#received"))
            error = page.text_content("#error")
            page.screenshot(path=str(artifacts / "serve_page.png"), full_page=True)
        finally:
            browser.close()
    # 160x128 scaled so the longest side is 256, both sides multiples of 16.
    assert size == [256, 208], size
    assert received >= 1 and not error


def test_browser_webcam_stream_keeps_at_most_two_frames_in_flight(app):
    """Chromium's fake camera drives the live path: frames stream, FPS shows, never more than 2 in flight."""
    from test_serve_helpers import REPO

    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(f"{BASE}/?api_key={API_KEY}")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')", timeout=60_000)
            page.fill("#prompt", "make it look like a pencil sketch")  # tiny lists no examples: no default prompt
            page.select_option("#size", "256")
            page.click("#camera")
            in_flight = []
            deadline = time.time() + 120
            while time.time() < deadline and int(page.text_content("#received")) < 6:
                in_flight.append(int(page.text_content("#inflight")))
                time.sleep(0.1)
            received, sent = int(page.text_content("#received")), int(page.text_content("#sent"))
            fps = float(page.text_content("#fps"))
            page.screenshot(path=str(REPO / "artifacts" / "serve_page_webcam.png"), full_page=True)
            page.click("#stop")
        finally:
            browser.close()
    assert received >= 6 and sent >= received
    assert max(in_flight) <= 2 and fps > 0


# ---- replica failure (last: it restarts a replica) ------------------------------------------------------------


def test_replica_killed_mid_stream_gives_error_frames_then_recovers(app):
    import os as _os
    import signal

    from ray import serve as ray_serve

    with connect(KEYED_WS) as ws:
        first = ws_frame(ws, {"id": 1, "prompt": "make it stormy"}, jpeg())
        assert first.error is None
        victim = first.meta["replica"]
        pid = _editor_pids()[victim]
        ws.send(encode_frame({"id": 2}, jpeg()))
        time.sleep(0.05)  # frame 2 is now in the replica (every edit takes >= SLOW_MS)
        _os.kill(pid, signal.SIGKILL)
        reply = recv_frame(ws, timeout=60)
        assert reply.id == 2 and reply.error is not None and reply.error["code"] == "editor_failed", reply.meta
        deadline, frame_id, recovered = time.time() + 120, 3, None
        while time.time() < deadline and recovered is None:
            r = ws_frame(ws, {"id": frame_id}, jpeg(), timeout=120)
            frame_id += 1
            if r.error is None:
                recovered = r
            else:
                assert r.error["code"] == "editor_failed", r.meta
                time.sleep(0.5)
        assert recovered is not None, "no frame succeeded within 120 s of the kill"
    # Serve replaces the replica: two live replicas answer again, neither of them the killed one.
    deadline, pids, states = time.time() + 240, {}, {}
    while time.time() < deadline:
        states = ray_serve.status().applications["rtedit"].deployments["Editor"].replica_states
        if states == {"RUNNING": 2}:
            pids = _editor_pids(tries=50)
            if len(pids) == 2 and victim not in pids:
                break
        time.sleep(2)
    assert states == {"RUNNING": 2} and len(pids) == 2, (states, pids)
    assert victim not in pids and pid not in pids.values()
