"""Ray-free streaming session logic: the one-slot frame mailbox and the websocket frame loop.

The Serve router adapts a websocket to `serve_stream(receive, send, process, ...)`; tests drive the same loop
with fakes. Protocol, per connection:
- binary messages are frames (rtedit.transport); text messages are JSON session settings
  (prompt, steps, seed, width, height, format, references as base64 images) answered with a text ack;
- the newest unprocessed frame overwrites an older one, which counts as dropped;
- responses with an id have strictly increasing ids; a frame whose id does not increase, or whose id is
  unreadable, is answered with an error whose id is null;
- an error (bad frame, failed edit) is a response frame with `error`; the stream goes on;
- settings a frame or text message carries stick to the session and apply from the next processed frame;
  the seed stays fixed unless the client sets another, so a still camera gives a still picture.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, TypeVar

from rtedit.errors import ConfigError
from rtedit.transport import (
    OUTPUT_FORMATS,
    SESSION_FIELDS,
    FrameError,
    FrameLimits,
    PayloadTooLarge,
    decode_frame,
    encode_frame,
    error_reply,
    loads_json,
    parse_request_meta,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")


class FrameMailbox(Generic[T]):
    """One slot holding the newest unprocessed frame, plus an ordered queue of notices (error replies, acks).

    A new frame overwrites the queued one, which counts as dropped. A notice is always delivered; it also drops
    a queued frame, since that frame is older and answering it afterwards would send ids back in time.
    `close()` wakes a waiting `get()`, which then returns None.
    """

    def __init__(self, max_notices: int = 64):
        self._frame: T | None = None
        self._notices: collections.deque = collections.deque()
        self._max_notices = max_notices
        self._event = asyncio.Event()
        self.closed = False
        self.dropped = 0
        """Frames overwritten (or discarded by close) before being processed."""
        self.notices_dropped = 0
        """Notices discarded because more than max_notices were waiting (a client flooding bad frames)."""

    def put(self, frame: T) -> T | None:
        """Queue `frame`; returns the frame it overwrote (now dropped), if any."""
        if self.closed:
            self.dropped += 1
            return frame
        old, self._frame = self._frame, frame
        if old is not None:
            self.dropped += 1
        self._event.set()
        return old

    def put_notice(self, notice: Any, ordered: bool = True) -> T | None:
        """Queue a must-deliver message; returns the queued frame it dropped, if any.

        `ordered` notices (replies carrying an id) drop the queued frame, which is older; unordered ones
        (acks, replies without an id) leave it alone.
        """
        if self.closed:
            return None
        old = None
        if ordered:
            old, self._frame = self._frame, None
        if old is not None:
            self.dropped += 1
        self._notices.append(notice)
        while len(self._notices) > self._max_notices:
            self._notices.popleft()
            self.notices_dropped += 1
        self._event.set()
        return old

    async def get(self) -> tuple[str, Any] | None:
        """Wait for the next item: ("notice", x) before ("frame", x); None once closed."""
        while True:
            if self.closed:
                return None
            if self._notices:
                return "notice", self._notices.popleft()
            if self._frame is not None:
                frame, self._frame = self._frame, None
                return "frame", frame
            self._event.clear()
            await self._event.wait()

    def pending(self) -> bool:
        return self._frame is not None or bool(self._notices)

    def close(self) -> None:
        """Drop whatever is queued and wake the waiter."""
        if self._frame is not None:
            self.dropped += 1
            self._frame = None
        self._notices.clear()
        self.closed = True
        self._event.set()


@dataclass
class SessionDefaults:
    """What a session starts with before the client says otherwise."""

    prompt: str | None = None
    """Instruction used until the client sends one (None: frames before a prompt get an error)."""
    steps: int = 2
    """Denoising steps."""
    seed: int | None = 0
    """Session seed; None draws one per session."""
    width: int | None = None
    """Output width; None keeps the input's size."""
    height: int | None = None
    """Output height; None keeps the input's size."""
    format: str = "jpeg"
    """Encoding of returned images."""

    def validate(self) -> "SessionDefaults":
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"SessionDefaults.steps must be an int >= 1, got {self.steps!r}")
        if self.format not in OUTPUT_FORMATS:
            raise ConfigError(f"SessionDefaults.format must be one of {OUTPUT_FORMATS}, got {self.format!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ConfigError(f"SessionDefaults.seed must be None or an int >= 0, got {self.seed!r}")
        return self


@dataclass(frozen=True)
class EditJob:
    """One frame to edit, with the session settings in force when it was taken from the mailbox."""

    session: str
    id: int | None
    image: bytes = field(repr=False)
    prompt: str
    steps: int
    seed: int
    width: int | None
    height: int | None
    format: str
    references: tuple[bytes, ...] | None = field(default=(), repr=False)
    """The references; () means none, None means "unchanged: use the replica session's" (router-side only)."""
    references_version: int = 0
    """Bumped each time the client sets references on this connection; the router resends them until acked."""


@dataclass
class SessionState:
    """Sticky per-connection settings and counters."""

    session: str
    prompt: str | None
    steps: int
    seed: int
    width: int | None
    height: int | None
    format: str
    references: tuple[bytes, ...] = ()
    references_version: int = 0
    last_id: int = -1
    received: int = 0
    processed: int = 0
    errors: int = 0

    @classmethod
    def start(cls, session: str, defaults: SessionDefaults, seed: int) -> "SessionState":
        return cls(session=session, prompt=defaults.prompt, steps=defaults.steps, seed=seed,
                   width=defaults.width, height=defaults.height, format=defaults.format)

    def apply(self, updates: dict[str, Any]) -> None:
        for name, value in updates.items():
            if value is not None:
                if name == "references":
                    self.references_version += 1
                setattr(self, name, value)

    def job(self, frame_id: int | None, image: bytes) -> EditJob:
        if self.prompt is None:
            raise FrameError("missing_prompt", "no instruction set for this session: send a prompt first", frame_id)
        return EditJob(session=self.session, id=frame_id, image=image, prompt=self.prompt, steps=self.steps,
                       seed=self.seed, width=self.width, height=self.height, format=self.format,
                       references=self.references, references_version=self.references_version)


def decode_references(value: Any, limits: FrameLimits) -> tuple[bytes, ...]:
    """A list of base64-encoded images, bounded in count and size."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FrameError("wrong_type", "references must be a list of base64 strings")
    if len(value) > limits.max_references:
        raise FrameError("out_of_range", f"at most {limits.max_references} references, got {len(value)}")
    out = []
    for i, text in enumerate(value):
        # base64 grows data by 4/3: refuse before decoding.
        if len(text) > limits.max_reference_bytes * 4 // 3 + 4:
            raise PayloadTooLarge("too_large", f"reference {i} is over {limits.max_reference_bytes} bytes")
        out.append(decode_base64(text, f"references[{i}]"))
    return tuple(out)


def decode_base64(text: str, what: str) -> bytes:
    """Strict base64 (a data: URL prefix is allowed, as browsers produce one)."""
    if text.startswith("data:") and "," in text[:100]:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FrameError("bad_base64", f"{what} is not valid base64") from None
    if not data:
        raise FrameError("no_image", f"{what} is empty")
    return data


def parse_settings(obj: Any, limits: FrameLimits) -> dict[str, Any]:
    """Session settings from a websocket text message or an HTTP JSON body (no image, no id)."""
    meta = parse_request_meta(obj, limits, require_id=False, allowed=SESSION_FIELDS)
    updates = {k: v for k, v in meta.to_json().items() if k != "id"}
    if "references" in obj:
        updates["references"] = decode_references(obj["references"], limits)
    return updates


Process = Callable[[EditJob], Awaitable[tuple[dict[str, Any], bytes]]]


@dataclass
class StreamStats:
    """What one connection did, for logs and metrics."""

    received: int = 0
    processed: int = 0
    dropped: int = 0
    errors: int = 0
    error_codes: collections.Counter = field(default_factory=collections.Counter)


async def serve_stream(
    receive: Callable[[], Awaitable[bytes | str | None]],
    send: Callable[[bytes | str], Awaitable[None]],
    process: Process,
    *,
    session: str,
    seed: int,
    limits: FrameLimits,
    defaults: SessionDefaults,
    on_frame: Callable[[str], None] | None = None,
) -> StreamStats:
    """Run one websocket session until the client disconnects.

    `receive()` returns the next message (bytes or str) or None on disconnect; `send` sends bytes or text;
    `process(job)` edits one frame and returns (response metadata, image bytes). `on_frame(event)` is told
    "received", "processed", "dropped" or "error:<code>" for metrics.
    """
    state = SessionState.start(session, defaults, seed)
    box: FrameMailbox[tuple[int | None, bytes]] = FrameMailbox()
    stats = StreamStats()
    note = on_frame or (lambda event: None)

    def reject(exc: Exception, frame_id: int | None) -> None:
        meta = {**error_reply(exc, frame_id), "dropped": box.dropped}
        stats.errors += 1
        stats.error_codes[meta["error"]["code"]] += 1
        note("error:" + meta["error"]["code"])
        if box.put_notice(encode_frame(meta), ordered=meta["id"] is not None) is not None:
            note("dropped")

    def on_bytes(data: bytes) -> None:
        stats.received += 1
        note("received")
        try:
            frame = decode_frame(data, limits)
        except FrameError as exc:
            # An unusable id cannot take part in the increasing sequence.
            reject(exc, None if exc.frame_id is None or exc.frame_id <= state.last_id else exc.frame_id)
            if exc.frame_id is not None and exc.frame_id > state.last_id:
                state.last_id = exc.frame_id
            return
        if frame.meta.id <= state.last_id:
            reject(FrameError("id_not_increasing", f"frame id {frame.meta.id} is not greater than the last id "
                                                   f"{state.last_id} of this connection"), None)
            return
        state.last_id = frame.meta.id
        state.apply({k: v for k, v in frame.meta.to_json().items() if k != "id"})
        if box.put((frame.meta.id, frame.image)) is not None:
            note("dropped")

    def on_text(text: str) -> None:
        try:
            if len(text) > limits.max_frame_bytes:
                raise PayloadTooLarge("too_large", f"text message is over {limits.max_frame_bytes} bytes")
            state.apply(parse_settings(loads_json(text, "settings"), limits))
        except FrameError as exc:
            box.put_notice(json.dumps({"type": "settings", **error_reply(exc, None)}), ordered=False)
            stats.errors += 1
            stats.error_codes[exc.code] += 1
            note("error:" + exc.code)
            return
        box.put_notice(json.dumps({"type": "settings", "ok": True, "prompt": state.prompt, "steps": state.steps,
                                   "seed": state.seed, "width": state.width, "height": state.height,
                                   "format": state.format, "references": len(state.references)}), ordered=False)

    async def reader() -> None:
        try:
            while True:
                message = await receive()
                if message is None:
                    return
                if isinstance(message, str):
                    on_text(message)
                else:
                    on_bytes(message)
        finally:
            # Wake the worker so the handler exits on disconnect (else Serve shutdown waits for it).
            queued = box.pending()
            box.close()
            if queued:
                note("dropped")

    async def safe_send(message: bytes | str) -> bool:
        try:
            await send(message)
            return True
        except Exception as exc:  # noqa: BLE001 - a send fails only when the client is gone
            logger.info("session %s: send failed (%s); closing", session, type(exc).__name__)
            return False

    reader_task = asyncio.create_task(reader())
    try:
        while True:
            item = await box.get()
            if item is None:
                break
            kind, payload = item
            if kind == "notice":
                if not await safe_send(payload):
                    break
                continue
            frame_id, image = payload
            try:
                job = state.job(frame_id, image)
                meta, out = await process(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes an error frame; the stream goes on
                meta, out = error_reply(exc, frame_id), b""
                code = meta["error"]["code"] if meta["error"]["code"] != "error" else meta["error"]["type"]
                stats.errors += 1
                stats.error_codes[code] += 1
                note("error:" + code)
            else:
                stats.processed += 1
                note("processed")
            if box.closed:
                # The client left while this frame was in flight: discard the result.
                break
            meta = {**meta, "id": frame_id, "dropped": box.dropped}
            if not await safe_send(encode_frame(meta, out)):
                break
    finally:
        box.close()
        reader_task.cancel()
        try:
            await reader_task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the socket is gone either way
            pass
        stats.dropped = box.dropped
    return stats

