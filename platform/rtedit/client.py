"""A Python client of the rtedit service: live sessions over `WS /ws/predict` and one-shot edits over HTTP, in
asyncio (`AsyncClient`) and blocking (`Client`) form. No Ray, no torch: it needs `websockets` and `httpx` (the
`client` extra), imported on first use, so `import rtedit` stays light.

    from rtedit.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        with client.session("make it black and white", references=[style]) as session:
            session.send(frame)                 # a uint8 HxWx3 numpy array, a PIL image, or JPEG/PNG/WebP bytes
            edit = session.receive(timeout=30)  # Edit: .image (PIL), .array, .data (bytes), .meta, .timings, .id

A session behaves like the web page (deployments/static/app.js), on the protocol of rtedit.streaming:
- **newest frame wins**: at most `max_in_flight` frames are unanswered (2, as on the page; 0: no limit); a frame
  sent while they are waits in one slot, and a newer one replaces it (`stats.client_dropped`). Frames the server's
  mailbox replaced never come back; a reply answers every earlier frame, and those count as `stats.server_dropped`.
- **sticky settings**: prompt, references, steps, seed, size and format are session settings, sent as a text
  message and acknowledged (`update()` changes them; a refused one raises `SettingsRefused`).
- **reconnect with backoff**: a lost connection is redialled (`Backoff`: 0.25 s doubling to 8 s, giving up after
  60 s with `ServiceUnreachable`); the new connection gets the session's settings again and the newest unanswered
  frame is sent again with its id; older unanswered frames count as `stats.lost`. A refused API key raises
  `Unauthorized` and is never retried. A service with no room (close 1013, "retry in N s") is redialled after the
  wait it asks for (`stats.refusals`), and after the backoff's give-up time raises `ServiceBusy` with its reason.
Every frame given to `send()` ends up in exactly one of: an Edit or an error reply (`EditFailed` from `receive()`),
`client_dropped`, `server_dropped`, `lost`, or still `in_flight`/`pending` (`flush()` waits for those).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import io
import itertools
import json
import logging
import math
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from rtedit.errors import InvalidImage, InvalidRequest
from rtedit.transport import OUTPUT_FORMATS, SERVE_WS_MESSAGE_CAP, FrameError, decode_reply, encode_frame

if TYPE_CHECKING:
    import numpy as np
    import PIL.Image

logger = logging.getLogger(__name__)

ImageLike = Union["np.ndarray", "PIL.Image.Image", bytes, bytearray, memoryview]
WS_PATH = "/ws/predict"
WS_KEY_PROTOCOL = "rtedit.key."  # the router's subprotocol that carries the key (deployments/router.py)
# An RFC 7230 token: what a websocket subprotocol may be.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"))
# Close codes after which redialling cannot help: 1008 is the server's policy refusal of this client.
TERMINAL_CLOSE_CODES = frozenset({1008})
BUSY_CLOSE = 1013  # "try again later": no editor replica had room (admission) or the router was full
_RETRY_IN = re.compile(r"retry in (\d+(?:\.\d+)?) s")


# ---- errors -------------------------------------------------------------------------------------------------------


class ClientError(Exception):
    """Base class of every error the client raises on purpose."""


class Unauthorized(ClientError):
    """The server refused the API key (HTTP 401, or a websocket handshake refused while /api/info answers 401)."""


class HandshakeRefused(ClientError):
    """The server refused the websocket handshake for a reason other than the key (e.g. an origin it does not
    allow); redialling would be refused the same way."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ServiceUnreachable(ClientError):
    """No connection to the service within the backoff's give-up time (the message says the last reason)."""


class SessionRefused(ClientError):
    """The server closed the session with a close code that says not to come back (1008); `code`, `reason`."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"the server closed the session with code {code}: {reason or 'no reason given'}")
        self.code, self.reason = code, reason


class ServiceBusy(ClientError):
    """The server had no room for this session (websocket close 1013) for the backoff's whole give-up time;
    `reason` is the server's (it says what is full), `retry_after_s` what it last asked for."""

    def __init__(self, reason: str, retry_after_s: float | None, waited_s: float):
        super().__init__(f"the service had no room for this session for {waited_s:.1f} s: "
                         f"{reason or 'no reason given'}")
        self.reason, self.retry_after_s, self.waited_s = reason, retry_after_s, waited_s


def _retry_after(reason: str) -> float | None:
    """The wait a 1013 close reason asks for ("... retry in 3 s"), if it names one."""
    match = _RETRY_IN.search(reason or "")
    return float(match.group(1)) if match else None


class ProtocolError(ClientError):
    """The server sent something this client cannot read (a malformed reply frame)."""


class SessionClosed(ClientError):
    """The session was closed by this client; nothing more can be sent or received."""


class RequestFailed(ClientError):
    """The server answered a request with an error: HTTP `status` (None on a websocket), the error's remote
    `type` (an rtedit.errors class name or the router's), machine-readable `code` and message."""

    def __init__(self, status: int | None, type: str, code: str, message: str):
        super().__init__(f"{type} ({code}): {message}" + (f" [HTTP {status}]" if status else ""))
        self.status, self.type, self.code, self.message = status, type, code, message

    @classmethod
    def from_payload(cls, status: int | None, error: Any, **extra: Any) -> "RequestFailed":
        error = error if isinstance(error, dict) else {"message": str(error)}
        return cls(status, str(error.get("type", "Error")), str(error.get("code", "error")),
                   str(error.get("message", "")), **extra)


class EditFailed(RequestFailed):
    """An edit came back as an error (an error reply frame or an HTTP error); `frame_id` is its id (None when the
    server could not read one). On a session the stream goes on: `receive()` raises it for that frame only."""

    def __init__(self, status: int | None, type: str, code: str, message: str, frame_id: int | None = None):
        super().__init__(status, type, code, message)
        self.frame_id = frame_id


class SettingsRefused(RequestFailed):
    """The server refused session settings (a prompt too long, a reference too large...): nothing was applied."""


class _Disconnected(Exception):
    """Internal: the connection went away while a settings ack was awaited."""


# ---- settings, frames, replies ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """How a lost or failed connection is redialled: waits of `first_s`, times `factor` each attempt, at most
    `max_s`; after `give_up_after_s` without a connection the session fails with ServiceUnreachable (None: never)."""

    first_s: float = 0.25
    factor: float = 2.0
    max_s: float = 8.0
    give_up_after_s: float | None = 60.0

    def __post_init__(self):
        for name in ("first_s", "factor", "max_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise InvalidRequest(f"Backoff.{name} must be a finite number > 0, got {value!r}")
        if self.give_up_after_s is not None and not self.give_up_after_s >= 0:
            raise InvalidRequest(f"Backoff.give_up_after_s must be None or >= 0, got {self.give_up_after_s!r}")

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (0-based)."""
        return min(self.max_s, self.first_s * self.factor ** min(attempt, 64))


@dataclass(frozen=True)
class SessionSettings:
    """What a session asks of the server; None leaves the server's default (GET /api/info `defaults`)."""

    prompt: str | None = None
    references: tuple[bytes, ...] | None = field(default=None, repr=False)
    """Encoded reference images; () clears them, None leaves the session's."""
    steps: int | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None

    def __post_init__(self):
        if self.format is not None and self.format not in OUTPUT_FORMATS:
            raise InvalidRequest(f"format must be one of {OUTPUT_FORMATS}, got {self.format!r}")

    def merged(self, other: "SessionSettings") -> "SessionSettings":
        """These settings with every field `other` sets replaced."""
        return dataclasses.replace(self, **{k: v for k, v in other.fields().items()})

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def message(self) -> dict[str, Any]:
        """The websocket text message (or HTTP JSON fields) that sets these settings."""
        out = self.fields()
        if "references" in out:
            out["references"] = [base64.b64encode(r).decode("ascii") for r in out["references"]]
        return out


def encode_image(image: ImageLike, quality: int = 90, what: str = "image") -> bytes:
    """A frame or reference as the bytes the server decodes: JPEG/PNG/WebP bytes as they are (checked by their
    magic), a PIL image or a uint8 HxWx3 numpy array as JPEG at `quality`."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise InvalidImage(f"{what} bytes are empty")
        if not (any(data.startswith(m) for m, _ in _IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")):
            raise InvalidImage(f"{what} bytes are not JPEG, PNG or WebP (they start with {data[:8]!r})")
        return data
    import PIL.Image

    if isinstance(image, PIL.Image.Image):
        pil = image if image.mode == "RGB" else image.convert("RGB")
    else:
        import numpy as np

        if not isinstance(image, np.ndarray):
            raise InvalidImage(f"{what} must be a uint8 HxWx3 numpy array, a PIL image or JPEG/PNG/WebP bytes, "
                               f"got {type(image).__name__}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidImage(f"{what} array must be uint8 HxWx3, got {image.dtype} with shape {image.shape}")
        pil = PIL.Image.fromarray(np.ascontiguousarray(image))
    buffer = io.BytesIO()
    pil.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@dataclass
class Edit:
    """One edited frame and the metadata the server sent with it (width, height, format, seed, steps, timings in
    ms with the router's `server`, replica, dropped, resized...)."""

    id: int | None
    data: bytes = field(repr=False)
    """The encoded image as the server sent it (meta["format"])."""
    meta: dict[str, Any]
    sent_at: float | None = None
    """time.perf_counter() when this frame was (last) sent; None for an HTTP edit's reply."""
    received_at: float = field(default_factory=time.perf_counter)

    @property
    def latency_ms(self) -> float | None:
        """Send to reply, measured by this client."""
        return None if self.sent_at is None else (self.received_at - self.sent_at) * 1000

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.meta.get("timings") or {})

    @property
    def image(self) -> "PIL.Image.Image":
        import PIL.Image

        return PIL.Image.open(io.BytesIO(self.data))

    @property
    def array(self) -> "np.ndarray":
        """The image as uint8 HxWx3."""
        import numpy as np

        return np.asarray(self.image.convert("RGB"))


@dataclass
class SessionStats:
    """Where every frame given to send() went (see the module docstring), and the connection's history."""

    frames: int = 0
    """send() calls."""
    sent: int = 0
    """Frames that went out (a frame sent again after a reconnect counts once here and once in `resent`)."""
    resent: int = 0
    edits: int = 0
    errors: int = 0
    """Error replies (EditFailed); an error without an id answers every frame in flight and counts each."""
    client_dropped: int = 0
    """Frames replaced in the waiting slot by a newer one before they went out."""
    server_dropped: int = 0
    """Frames a later reply answered: the server's mailbox replaced them."""
    lost: int = 0
    """Frames in flight on a connection that broke and not sent again (a newer one was)."""
    unread_discarded: int = 0
    """Replies discarded unread: more than `max_unread` waited for receive()."""
    reconnects: int = 0
    refusals: int = 0
    """Connections the server refused for want of room (close 1013) and this client retried."""
    in_flight: int = 0
    pending: int = 0


def _split_url(url: str) -> tuple[str, str]:
    """(http base, websocket URL) of a service at `url` (http(s):// or ws(s)://, with an optional path prefix)."""
    parts = urllib.parse.urlsplit(url)
    schemes = {"http": ("http", "ws"), "https": ("https", "wss"), "ws": ("http", "ws"), "wss": ("https", "wss")}
    if parts.scheme not in schemes or not parts.netloc:
        raise InvalidRequest(f"url must be http(s)://host[:port] or ws(s)://host[:port], got {url!r}")
    http, ws = schemes[parts.scheme]
    prefix = parts.path.rstrip("/")
    if prefix.endswith(WS_PATH):
        prefix = prefix[: -len(WS_PATH)]
    return f"{http}://{parts.netloc}{prefix}", f"{ws}://{parts.netloc}{prefix}{WS_PATH}"


# ---- asyncio ------------------------------------------------------------------------------------------------------


class AsyncClient:
    """The service at `url` (http(s):// or ws(s)://). `api_key` goes in the x-api-key header and the websocket's
    `rtedit.key.<key>` subprotocol (the ?api_key= query when the key is no valid subprotocol token).
    `timeout_s` bounds every HTTP request, handshake and settings ack."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout_s: float = 60.0,
                 backoff: Backoff = Backoff(), jpeg_quality: int = 90):
        self.http_url, self.ws_url = _split_url(url)
        self.api_key = api_key or None
        self.timeout_s = timeout_s
        self.backoff = backoff
        self.jpeg_quality = jpeg_quality
        self._http: Any = None
        self._sessions: set[AsyncSession] = set()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes every session this client opened and its HTTP connections."""
        for session in list(self._sessions):
            await session.close()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _headers(self) -> dict[str, str]:
        return {"x-api-key": self.api_key} if self.api_key else {}

    def _http_client(self) -> Any:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(base_url=self.http_url, timeout=self.timeout_s, headers=self._headers())
        return self._http

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = await self._http_client().request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"{method} {self.http_url}{path} failed: {type(exc).__name__}: {exc}") from None
        if response.status_code == 401:
            raise Unauthorized(self._key_words())
        try:
            body = response.json()
        except ValueError:
            raise RequestFailed(response.status_code, "BadResponse", "not_json",
                                f"{path} answered {response.text[:200]!r}") from None
        if response.status_code >= 400 or (isinstance(body, dict) and "error" in body):
            error = body.get("error") if isinstance(body, dict) else body
            cls = EditFailed if path.startswith("/api/predict") else RequestFailed
            raise cls.from_payload(response.status_code, error)
        return body

    def _key_words(self) -> str:
        return ("the server refused the API key" if self.api_key else
                "the server requires an API key (none given: Client(..., api_key=...))")

    async def info(self) -> dict[str, Any]:
        """GET /api/info: the model, what a request may ask for and the session defaults."""
        return await self._request("GET", "/api/info")

    async def edit(self, image: ImageLike, prompt: str | None = None, *, references: tuple | list = (),
                   steps: int | None = None, seed: int | None = None, width: int | None = None,
                   height: int | None = None, format: str | None = None) -> Edit:
        """One edit over HTTP (POST /api/predict); the server's defaults apply to what is left None."""
        settings = SessionSettings(prompt=prompt, steps=steps, seed=seed, width=width, height=height, format=format,
                                   references=tuple(encode_image(r, self.jpeg_quality, "reference")
                                                    for r in references) or None)
        body = {"image": base64.b64encode(encode_image(image, self.jpeg_quality)).decode("ascii"),
                **settings.message()}
        reply = await self._request("POST", "/api/predict", json=body)
        data = base64.b64decode(reply.pop("image"))
        return Edit(id=reply.get("id"), data=data, meta=reply)

    def session(self, prompt: str | None = None, *, references: tuple | list | None = None, steps: int | None = None,
                seed: int | None = None, width: int | None = None, height: int | None = None,
                format: str | None = None, max_in_flight: int = 2, max_unread: int = 64) -> "AsyncSession":
        """A live session, opened by `async with` or `await`: `async with client.session("...") as s:`."""
        settings = SessionSettings(prompt=prompt, steps=steps, seed=seed, width=width, height=height, format=format,
                                   references=None if references is None else
                                   tuple(encode_image(r, self.jpeg_quality, "reference") for r in references))
        return AsyncSession(self, settings, max_in_flight=max_in_flight, max_unread=max_unread)

    # ---- the websocket dial, shared by every session -------------------------------------------------------------
    async def _connect_once(self) -> Any:
        """One handshake; raises Unauthorized / HandshakeRefused (final) or _Retry (worth another attempt)."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.typing import Subprotocol

        url, subprotocols = self.ws_url, None
        if self.api_key and _TOKEN.match(self.api_key):
            subprotocols = [Subprotocol(WS_KEY_PROTOCOL + self.api_key)]
        elif self.api_key:  # a subprotocol must be a token: a key with other characters rides in the query
            url = f"{url}?{urllib.parse.urlencode({'api_key': self.api_key})}"
        try:
            # compression=None: JPEG does not deflate, and deflating 30 frames a second costs CPU on both sides.
            return await connect(url, subprotocols=subprotocols, compression=None, open_timeout=self.timeout_s,
                                 max_size=SERVE_WS_MESSAGE_CAP, ping_interval=20, ping_timeout=20, close_timeout=2)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                await self._diagnose_refusal(status)
            raise _Retry(f"handshake answered HTTP {status}") from None
        except (OSError, asyncio.TimeoutError, EOFError, WebSocketException) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}"[:200]) from None

    async def _diagnose_refusal(self, status: int) -> None:
        # A refused handshake carries no reason: /api/info with the same key tells a wrong key from the rest.
        try:
            await self.info()
        except Unauthorized:
            raise
        except (ServiceUnreachable, RequestFailed) as exc:
            raise _Retry(f"handshake answered HTTP {status} and /api/info failed ({exc})") from None
        raise HandshakeRefused(status, f"the server refused the websocket handshake (HTTP {status}) though it "
                                       "accepts the key on /api/info: an origin or address it does not allow?")

    async def _dial(self, closed: asyncio.Event) -> Any:
        """A connection, retried with the client's backoff until it gives up (ServiceUnreachable)."""
        started, attempt = time.monotonic(), 0
        while True:
            try:
                return await self._connect_once()
            except _Retry as exc:
                reason = str(exc)
            give_up = self.backoff.give_up_after_s
            elapsed = time.monotonic() - started
            if give_up is not None and elapsed >= give_up:
                raise ServiceUnreachable(f"no websocket to {self.ws_url} within {give_up:g} s ({attempt + 1} "
                                         f"attempts; last: {reason})")
            wait = self.backoff.delay(attempt)
            if give_up is not None:
                wait = min(wait, max(0.0, give_up - elapsed))
            attempt += 1
            logger.info("rtedit client: %s; redialling in %.2f s (attempt %d)", reason, wait, attempt)
            try:
                await asyncio.wait_for(closed.wait(), wait)
                raise SessionClosed("the session was closed while redialling")
            except asyncio.TimeoutError:
                pass


class _Retry(Exception):
    """Internal: a handshake failed in a way another attempt may fix."""


class AsyncSession:
    """One live session: frames in, edits out (see the module docstring). Open it with `async with` or `await`."""

    def __init__(self, client: AsyncClient, settings: SessionSettings, *, max_in_flight: int = 2,
                 max_unread: int = 64):
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 0:
            raise InvalidRequest(f"max_in_flight must be an int >= 0 (0: no limit), got {max_in_flight!r}")
        if isinstance(max_unread, bool) or not isinstance(max_unread, int) or max_unread < 1:
            raise InvalidRequest(f"max_unread must be an int >= 1, got {max_unread!r}")
        self.client = client
        self.settings = settings
        self.max_in_flight = max_in_flight
        self.max_unread = max_unread
        self._stats = SessionStats()
        self._ids = itertools.count(1)  # ids start at 1, as on the page; they only increase, across reconnects too
        self._pending: _Outgoing | None = None
        self._in_flight: dict[int, _Outgoing] = {}
        self._replies: collections.deque[Edit | EditFailed] = collections.deque()
        self._acks: collections.deque[asyncio.Future] = collections.deque()
        self._conn: Any = None
        self._ready = False  # the connection is open and has the session's settings
        self._failure: ClientError | None = None
        self._busy_since: float | None = None  # first 1013 refusal of the current run of them
        self._busy_attempts = 0
        self._opened = False
        self._closed_event: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None  # the pump: a frame waits, a slot freed, a connection is ready
        self._changed: asyncio.Event | None = None  # waiters: a reply, a connection, a failure, the close
        self._reader: asyncio.Task | None = None
        self._supervisor: asyncio.Task | None = None
        self._pump_task: asyncio.Task | None = None

    # ---- life cycle ------------------------------------------------------------------------------------------
    def __await__(self):
        return self.open().__await__()

    async def __aenter__(self) -> "AsyncSession":
        return await self.open()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def open(self) -> "AsyncSession":
        """Connects (retrying with the backoff, and while the service has no room as its refusal asks) and sends the
        settings; raises Unauthorized, SettingsRefused, HandshakeRefused, ServiceBusy or ServiceUnreachable."""
        if self._opened:
            return self
        self._opened = True
        self._closed_event, self._wake, self._changed = asyncio.Event(), asyncio.Event(), asyncio.Event()
        try:
            while True:
                conn = await self.client._dial(self._closed_event)
                try:
                    await self._adopt(conn)
                    break
                except _Disconnected:
                    if conn.close_code != BUSY_CLOSE:
                        raise ServiceUnreachable(f"{self.client.ws_url} closed the connection before acknowledging "
                                                 "the session's settings") from None
                await self._wait_while_busy(conn.close_reason or "")
        except BaseException:
            await self.close()
            raise
        self.client._sessions.add(self)
        self._supervisor = asyncio.create_task(self._supervise(), name="rtedit-session")
        self._pump_task = asyncio.create_task(self._pump(), name="rtedit-pump")
        return self

    async def close(self) -> None:
        """Closes the connection; frames still in flight or waiting stay counted in `stats`."""
        if self._closed_event is None or self._closed_event.is_set():
            return
        self._closed_event.set()
        self._ready = False
        self.client._sessions.discard(self)
        tasks = [t for t in (self._supervisor, self._pump_task, self._reader) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        self._changed.set()

    @property
    def closed(self) -> bool:
        return self._closed_event is not None and self._closed_event.is_set()

    @property
    def stats(self) -> SessionStats:
        return dataclasses.replace(self._stats, in_flight=len(self._in_flight), pending=int(self._pending is not None))

    # ---- frames and settings -------------------------------------------------------------------------------------
    def send(self, frame: ImageLike) -> int:
        """Queues a frame (it replaces a waiting one: newest frame wins) and returns its id; never waits."""
        return self._put(self.next_frame(frame))

    def next_frame(self, frame: ImageLike) -> tuple[int, bytes]:
        """The frame's id and encoded bytes (thread-safe: the blocking Session encodes in the caller's thread)."""
        self._check_usable()
        data = encode_image(frame, self.client.jpeg_quality, "frame")
        if len(data) + 64 >= SERVE_WS_MESSAGE_CAP:
            raise InvalidImage(f"the encoded frame is {len(data)} bytes, over Serve's websocket message cap "
                               f"({SERVE_WS_MESSAGE_CAP}); send a smaller image")
        return next(self._ids), data

    def _put(self, frame: tuple[int, bytes]) -> int:
        self._check_usable()
        self._stats.frames += 1
        frame_id, data = frame
        if self._pending is not None and self._pending.id > frame_id:
            self._stats.client_dropped += 1  # a newer frame got here first (two threads sending at once)
            return frame_id
        if self._pending is not None:
            self._stats.client_dropped += 1
        self._pending = _Outgoing(frame_id, data)
        self._wake.set()
        return frame_id

    def _check_usable(self) -> None:
        if not self._opened:
            raise SessionClosed("the session is not open yet: `async with client.session(...)` or `await` it")
        self._raise_if_done()

    def _raise_if_done(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self.closed:
            raise SessionClosed("the session is closed")

    async def _wait(self, done: Any, timeout: float | None, what: str) -> None:
        """Waits until done() holds; raises the session's failure, SessionClosed or TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            self._raise_if_done()
            self._changed.clear()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                raise TimeoutError(f"{what} within {timeout} s ({self.stats})") from None

    async def receive(self, timeout: float | None = None) -> Edit:
        """The next reply in order: an Edit, or EditFailed raised for an error reply (the session goes on).
        Raises TimeoutError after `timeout` s, the session's failure (once nothing unread is left) or
        SessionClosed."""
        await self._wait(lambda: bool(self._replies), timeout, "no reply")
        item = self._replies.popleft()
        if isinstance(item, EditFailed):
            raise item
        return item

    async def receive_latest(self, timeout: float | None = None) -> Edit:
        """The newest reply, waiting for one if none is unread; older unread ones are discarded (counted in
        `unread_discarded`): what a live display wants."""
        await self._wait(lambda: bool(self._replies), timeout, "no reply")
        while len(self._replies) > 1:
            self._replies.popleft()
            self._stats.unread_discarded += 1
        return await self.receive(0)

    async def flush(self, timeout: float | None = None) -> None:
        """Waits until no frame is in flight or waiting (each answered, dropped or lost)."""
        await self._wait(lambda: not self._in_flight and self._pending is None, timeout, "frames still unanswered")

    async def update(self, prompt: str | None = None, *, references: tuple | list | None = None,
                     steps: int | None = None, seed: int | None = None, width: int | None = None,
                     height: int | None = None, format: str | None = None) -> None:
        """Changes session settings (references=[] clears them); they apply from the next frame the server takes.
        Returns once the server acknowledged them; raises SettingsRefused (then nothing was applied)."""
        self._check_usable()
        change = SessionSettings(prompt=prompt, steps=steps, seed=seed, width=width, height=height, format=format,
                                 references=None if references is None else
                                 tuple(encode_image(r, self.client.jpeg_quality, "reference") for r in references))
        if not change.fields():
            return
        while True:
            await self._wait(lambda: self._ready, None, "no connection")
            try:
                await self._send_settings(self._conn, change.message())
            except _Disconnected:
                continue  # lost before the ack: send the change again on the next connection
            self.settings = self.settings.merged(change)
            return

    # ---- the connection ----------------------------------------------------------------------------------------
    async def _adopt(self, conn: Any) -> None:
        """Makes `conn` the session's connection: its reader runs, the settings are sent and acknowledged."""
        self._conn = conn
        self._reader = asyncio.create_task(self._read(conn), name="rtedit-reader")
        message = self.settings.message()
        if message:
            await self._send_settings(conn, message)
        self._ready = True
        self._wake.set()
        self._changed.set()

    async def _send_settings(self, conn: Any, message: dict[str, Any]) -> None:
        from websockets.exceptions import ConnectionClosed

        ack: asyncio.Future = asyncio.get_running_loop().create_future()  # the ack, or None when the socket went
        self._acks.append(ack)
        try:
            await conn.send(json.dumps(message))
            reply = await asyncio.wait_for(ack, self.client.timeout_s)
        except ConnectionClosed:
            raise _Disconnected() from None
        except asyncio.TimeoutError:
            await conn.close()  # an ack that never came: this connection is no use; the supervisor redials
            raise _Disconnected() from None
        if reply is None:
            raise _Disconnected()
        if reply.get("error"):
            raise SettingsRefused.from_payload(None, reply["error"])

    async def _read(self, conn: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in conn:
                if isinstance(message, str):
                    self._on_text(message)
                else:
                    self._on_reply(message)
        except ConnectionClosed:
            pass
        except FrameError as exc:  # the server broke the protocol: another connection would not fix that
            self._fail(ProtocolError(f"the server sent a frame this client cannot read ({exc.code}: {exc})"))
            await conn.close()
        finally:
            for ack in self._acks:
                if not ack.done():
                    ack.set_result(None)
            self._acks.clear()

    def _on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        if isinstance(message, dict) and message.get("type") == "settings" and self._acks:
            ack = self._acks.popleft()
            if not ack.done():
                ack.set_result(message)
        else:
            logger.warning("rtedit client: unexpected text message %r", text[:200])

    def _on_reply(self, data: bytes) -> None:
        reply = decode_reply(data)
        frame_id = reply.id
        # Frames the server dropped never come back: a reply answers every earlier one (an id-less error, all).
        answered = [i for i in self._in_flight if frame_id is None or i <= frame_id]
        sent_at = self._in_flight[frame_id].sent_at if frame_id in self._in_flight else None
        for i in answered:
            del self._in_flight[i]
        item: Edit | EditFailed
        if reply.error is not None:
            item = EditFailed.from_payload(None, reply.error, frame_id=frame_id)
            self._stats.errors += max(1, len(answered)) if frame_id is None else 1
        else:
            item = Edit(id=frame_id, data=reply.image, meta=reply.meta, sent_at=sent_at)
            self._stats.edits += 1
            self._busy_since = None  # served again: a later refusal starts a new wait
        if frame_id is not None:
            self._stats.server_dropped += sum(1 for i in answered if i != frame_id)
        self._replies.append(item)
        while len(self._replies) > self.max_unread:
            self._replies.popleft()
            self._stats.unread_discarded += 1
        self._wake.set()
        self._changed.set()

    async def _pump(self) -> None:
        """Sends the waiting frame whenever the connection is ready and a slot is free."""
        from websockets.exceptions import ConnectionClosed

        while True:
            await self._wake.wait()
            self._wake.clear()
            while (self._ready and self._pending is not None
                   and (not self.max_in_flight or len(self._in_flight) < self.max_in_flight)):
                frame, self._pending = self._pending, None
                frame.sent_at = time.perf_counter()
                self._in_flight[frame.id] = frame
                try:
                    await self._conn.send(encode_frame({"id": frame.id}, frame.data))
                except ConnectionClosed:
                    break  # the reader sees the close; the supervisor queues this frame again
                if frame.resend:
                    self._stats.resent += 1
                else:
                    self._stats.sent += 1

    async def _supervise(self) -> None:
        """Waits for the connection to end and redials, until the session is closed or fails."""
        while True:
            await asyncio.wait([self._reader])
            if self._failure is not None:
                return
            conn = self._conn
            code, reason = conn.close_code, conn.close_reason or ""
            self._ready, self._conn = False, None
            self._requeue()
            self._changed.set()
            if code in TERMINAL_CLOSE_CODES:
                self._fail(SessionRefused(code, reason))
                return
            if code == BUSY_CLOSE:  # refused for room: wait as the server asks (and the backoff), then redial
                try:
                    await self._wait_while_busy(reason)
                except SessionClosed:
                    return
                except ClientError as exc:
                    self._fail(exc)
                    return
            logger.info("rtedit client: connection lost (close code %s %s); redialling", code, reason)
            try:
                await self._adopt(await self.client._dial(self._closed_event))
            except SessionClosed:
                return
            except _Disconnected:
                continue  # lost again before the settings were acknowledged: the reader has ended
            except ClientError as exc:
                self._fail(exc)
                return
            self._stats.reconnects += 1

    async def _wait_while_busy(self, reason: str) -> None:
        """After a 1013 refusal: waits the server's Retry-After (at least the backoff's next delay) before the next
        dial; ServiceBusy once refusals have gone on for the backoff's give-up time, SessionClosed if closed."""
        now = time.monotonic()
        if self._busy_since is None:
            self._busy_since, self._busy_attempts = now, 0
        waited, give_up = now - self._busy_since, self.client.backoff.give_up_after_s
        asked = _retry_after(reason)
        if give_up is not None and waited >= give_up:
            raise ServiceBusy(reason, asked, waited)
        wait = max(self.client.backoff.delay(self._busy_attempts), asked or 0.0)
        if give_up is not None:
            wait = min(wait, max(0.0, give_up - waited))
        self._busy_attempts += 1
        self._stats.refusals += 1
        logger.info("rtedit client: the service is busy (%s); retrying in %.2f s", reason, wait)
        try:
            await asyncio.wait_for(self._closed_event.wait(), wait)
            raise SessionClosed("the session was closed while the service was busy")
        except asyncio.TimeoutError:
            pass

    def _requeue(self) -> None:
        """After a lost connection the newest unanswered frame goes again with its id (unless a newer one waits);
        the older ones are lost."""
        if not self._in_flight:
            return
        newest = max(self._in_flight)
        for frame_id in self._in_flight:
            if frame_id != newest or self._pending is not None:
                self._stats.lost += 1
        if self._pending is None:
            frame = self._in_flight[newest]
            self._pending = _Outgoing(frame.id, frame.data, resend=True)
        self._in_flight.clear()

    def _fail(self, exc: ClientError) -> None:
        logger.warning("rtedit client: session failed: %s", exc)
        self._failure = exc
        self._ready = False
        self._changed.set()


@dataclass
class _Outgoing:
    """A frame on its way: its id, encoded image, when it last went out, and whether it went out before."""

    id: int
    data: bytes = field(repr=False)
    resend: bool = False
    sent_at: float = 0.0


# ---- blocking -----------------------------------------------------------------------------------------------------


class _LoopThread:
    """An event loop on a daemon thread: the blocking Client runs the asyncio one there."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="rtedit-client", daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def call(self, fn: Any, *args: Any) -> Any:
        """fn(*args) on the loop's thread, waiting for its result."""
        async def call() -> Any:
            return fn(*args)

        return self.run(call())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class Client:
    """The blocking client: the same as AsyncClient (arguments, semantics, errors), run on a private event-loop
    thread. `with Client(url, api_key=...) as client:`; `client.session(...)` returns an open Session."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout_s: float = 60.0,
                 backoff: Backoff = Backoff(), jpeg_quality: int = 90):
        self._thread = _LoopThread()
        self._async = AsyncClient(url, api_key=api_key, timeout_s=timeout_s, backoff=backoff,
                                  jpeg_quality=jpeg_quality)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def http_url(self) -> str:
        return self._async.http_url

    @property
    def ws_url(self) -> str:
        return self._async.ws_url

    def close(self) -> None:
        if self._thread is None:
            return
        try:
            self._thread.run(self._async.close())
        finally:
            self._thread.stop()
            self._thread = None

    def _run(self, coro: Any) -> Any:
        if self._thread is None:
            coro.close()
            raise SessionClosed("the client is closed")
        return self._thread.run(coro)

    def _call(self, fn: Any, *args: Any) -> Any:
        if self._thread is None:
            raise SessionClosed("the client is closed")
        return self._thread.call(fn, *args)

    def info(self) -> dict[str, Any]:
        """GET /api/info (AsyncClient.info)."""
        return self._run(self._async.info())

    def edit(self, image: ImageLike, prompt: str | None = None, **settings: Any) -> Edit:
        """One edit over HTTP (AsyncClient.edit)."""
        return self._run(self._async.edit(image, prompt, **settings))

    def session(self, prompt: str | None = None, **settings: Any) -> "Session":
        """An open live session (AsyncClient.session's arguments); `with client.session(...) as session:`."""
        if self._thread is None:
            raise SessionClosed("the client is closed")

        async def open_session() -> AsyncSession:
            return await self._async.session(prompt, **settings).open()

        return Session(self, self._run(open_session()))


class Session:
    """A blocking AsyncSession: send() never waits, receive() blocks up to its timeout."""

    def __init__(self, client: Client, session: AsyncSession):
        self._client, self._async = client, session
        self._send_lock = threading.Lock()  # ids are taken and queued in one order

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, frame: ImageLike) -> int:
        """Queues a frame (newest frame wins) and returns its id; the image is encoded in this thread."""
        with self._send_lock:
            frame_id, data = self._async.next_frame(frame)
            return self._client._call(self._async._put, (frame_id, data))

    def receive(self, timeout: float | None = None) -> Edit:
        return self._client._run(self._async.receive(timeout))

    def receive_latest(self, timeout: float | None = None) -> Edit:
        return self._client._run(self._async.receive_latest(timeout))

    def flush(self, timeout: float | None = None) -> None:
        return self._client._run(self._async.flush(timeout))

    def update(self, prompt: str | None = None, **settings: Any) -> None:
        return self._client._run(self._async.update(prompt, **settings))

    def close(self) -> None:
        if self._client._thread is not None:
            self._client._run(self._async.close())

    @property
    def settings(self) -> SessionSettings:
        return self._async.settings

    @property
    def stats(self) -> SessionStats:
        return self._client._call(lambda: self._async.stats)

    @property
    def closed(self) -> bool:
        return self._async.closed


__all__ = ["AsyncClient", "AsyncSession", "Backoff", "Client", "ClientError", "Edit", "EditFailed",
           "HandshakeRefused", "ProtocolError", "RequestFailed", "ServiceBusy", "ServiceUnreachable", "Session",
           "SessionClosed", "SessionRefused", "SessionSettings", "SessionStats", "SettingsRefused", "Unauthorized",
           "encode_image"]
