"""The web page's reference slot in headless Chromium against the Router app under uvicorn (the echo editor of
test_web_page_recovery): a chosen reference becomes the session's reference over the websocket (a settings text
message before the next frame, acknowledged), crosses to the editor once, is cleared by the page, and is set again
on the new session after a server restart."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("uvicorn")

from test_serve_helpers import jpeg  # noqa: E402
from test_web_page_recovery import (  # noqa: E402,F401  (browser is a fixture)
    KEY,
    PageServer,
    browser,
    free_port,
    wait_received,
    wait_state,
)


def reference_state(page) -> str:
    return page.eval_on_selector("#reference-state", "el => el.dataset.state")


def wait_reference_state(page, state: str) -> None:
    page.wait_for_function(f"document.getElementById('reference-state').dataset.state === '{state}'",
                           timeout=15_000)


def mean_colour(data: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"), float).reshape(-1, 3).mean(0)


def test_page_sets_clears_and_restores_the_session_reference(browser, monkeypatch, tmp_path):
    upload, palette = tmp_path / "photo.jpg", tmp_path / "palette.png"
    upload.write_bytes(jpeg(128, 128, tag=3))
    PIL.Image.new("RGB", (800, 400), (30, 90, 220)).save(palette)  # larger than the page sends: it is scaled
    server = PageServer(free_port(), monkeypatch)
    editor = server.start()
    page_errors: list[str] = []
    page = browser.new_page()
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    try:
        page.goto(f"http://127.0.0.1:{server.port}/?api_key={KEY}")
        page.wait_for_function("document.getElementById('model').textContent.includes('echo')")
        assert reference_state(page) == "none" and not page.is_visible("#reference-preview")

        # A reference before any source: it waits, then goes with the first frame of the session.
        page.set_input_files("#reference", str(palette))
        wait_reference_state(page, "chosen")
        assert page.is_visible("#reference-preview") and page.is_enabled("#clear-reference")
        page.set_input_files("#file", str(upload))
        wait_received(page, 1)
        wait_reference_state(page, "in-use")
        (sent,) = editor.jobs[0].references
        assert PIL.Image.open(io.BytesIO(sent)).size == (512, 256)  # longest side REFERENCE_MAX_SIDE
        assert np.abs(mean_colour(sent) - (30, 90, 220)).max() < 6

        # The replica acknowledged it: the next frame (a new instruction) carries no copy.
        page.fill("#prompt", "make it darker")
        page.dispatch_event("#prompt", "change")
        wait_received(page, 2)
        assert editor.jobs[1].references is None and editor.jobs[1].prompt == "make it darker"

        # Cleared: the still image is edited again without it.
        page.click("#clear-reference")
        wait_received(page, 3)
        wait_reference_state(page, "none")
        assert editor.jobs[2].references == () and not page.is_visible("#reference-preview")

        # Set again, then the server restarts: the new session is given the reference before its first frame.
        page.set_input_files("#reference", str(palette))
        wait_received(page, 4)
        assert len(editor.jobs[3].references) == 1
        server.stop()
        wait_state(page, "waiting")
        restarted = server.start()
        wait_state(page, "open")
        page.set_input_files("#file", str(upload))
        wait_received(page, 5)
        wait_reference_state(page, "in-use")
        assert len(restarted.jobs) == 1 and restarted.jobs[0].references == editor.jobs[3].references
        assert page.text_content("#error") == ""
    finally:
        page.close()
        server.stop()
    assert page_errors == []
