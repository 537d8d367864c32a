"""The binary frame codec shared by the HTTP and websocket endpoints, the web page's protocol and the tests.

Frame, both ways: 4-byte big-endian length N, N bytes of UTF-8 JSON metadata (an object), then the encoded
image (JPEG/PNG/WebP; empty on error responses). Decoding is strict: every malformed input raises a
`FrameError` (an `InvalidRequest`) with a short machine-readable `code`, never anything else.
No Ray import: this module is used by clients and benchmarks too.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from rtedit.errors import ConfigError, InvalidRequest

HEADER = struct.Struct(">I")
# Serve's proxy closes websocket messages over 16 MiB (code 1009) before our code sees them.
SERVE_WS_MESSAGE_CAP = 16 * 2**20
OUTPUT_FORMATS = ("jpeg", "png", "webp")
# Largest integer a browser's JSON.parse keeps exactly.
MAX_SAFE_INT = 2**53 - 1


class FrameError(InvalidRequest):
    """A frame or request body is malformed; `code` names what, `frame_id` is the request id when it was readable."""

    def __init__(self, code: str, message: str, frame_id: int | None = None):
        super().__init__(message)
        self.code = code
        self.frame_id = frame_id

    def to_meta(self) -> dict[str, Any]:
        """The error as response metadata."""
        return {"id": self.frame_id, "error": {"type": type(self).__name__, "code": self.code, "message": str(self)}}


class PayloadTooLarge(FrameError):
    """The frame or body is over the configured byte limit."""


@dataclass
class FrameLimits:
    """Bounds on what a client may send; checked before anything is decoded."""

    max_frame_bytes: int = 8 * 2**20
    """Whole frame (header + metadata + image); must stay below Serve's 16 MiB websocket cap."""
    max_meta_bytes: int = 16 * 2**10
    """JSON metadata length N."""
    max_prompt_chars: int = 2000
    """Longest instruction accepted."""
    min_side: int = 64
    """Smallest requested output width/height."""
    max_side: int = 2048
    """Largest requested output width/height."""
    max_steps: int = 8
    """Most denoising steps a request may ask for."""
    max_references: int = 4
    """Most reference images a session may set."""
    max_reference_bytes: int = 4 * 2**20
    """Largest encoded reference image."""

    def validate(self) -> "FrameLimits":
        for name in ("max_frame_bytes", "max_meta_bytes", "max_prompt_chars", "min_side", "max_side", "max_steps",
                     "max_reference_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"FrameLimits.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.max_references, bool) or not isinstance(self.max_references, int) or self.max_references < 0:
            raise ConfigError(f"FrameLimits.max_references must be an int >= 0, got {self.max_references!r}")
        if self.max_frame_bytes >= SERVE_WS_MESSAGE_CAP:
            raise ConfigError(
                f"FrameLimits.max_frame_bytes must be below Serve's websocket cap {SERVE_WS_MESSAGE_CAP}, "
                f"got {self.max_frame_bytes}")
        if self.max_meta_bytes + HEADER.size >= self.max_frame_bytes:
            raise ConfigError(f"FrameLimits.max_meta_bytes must be below max_frame_bytes, got {self.max_meta_bytes}")
        if self.min_side > self.max_side:
            raise ConfigError(f"FrameLimits.min_side must be <= max_side, got {self.min_side} > {self.max_side}")
        return self


@dataclass(frozen=True)
class RequestMeta:
    """What a client may say about one frame; None means "keep the session's value"."""

    id: int | None = None
    prompt: str | None = None
    steps: int | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Frame:
    """A decoded request frame: validated metadata and the still-encoded image."""

    meta: RequestMeta
    image: bytes


@dataclass(frozen=True)
class Reply:
    """A decoded response frame (client side): metadata and the encoded image (b"" on errors)."""

    meta: dict[str, Any]
    image: bytes = field(repr=False)

    @property
    def id(self) -> int | None:
        return self.meta.get("id")

    @property
    def error(self) -> dict[str, Any] | None:
        return self.meta.get("error")


REQUEST_FIELDS = frozenset(RequestMeta.__dataclass_fields__)
# Session settings a websocket text message or an HTTP JSON body may carry besides the frame fields.
SESSION_FIELDS = frozenset({"prompt", "steps", "seed", "width", "height", "format", "references"})


def _int_field(obj: dict, name: str, lo: int, hi: int, frame_id: int | None) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    # bool is an int subclass in Python; JSON true is not a number.
    if isinstance(value, bool) or not isinstance(value, int):
        raise FrameError("wrong_type", f"{name} must be an integer, got {type(value).__name__}", frame_id)
    if not lo <= value <= hi:
        raise FrameError("out_of_range", f"{name} must be in [{lo}, {hi}], got {value}", frame_id)
    return value


def parse_request_meta(obj: Any, limits: FrameLimits, *, require_id: bool, allowed: frozenset[str] = REQUEST_FIELDS
                       ) -> RequestMeta:
    """Validate decoded JSON metadata into a RequestMeta; unknown fields and wrong types are errors."""
    if not isinstance(obj, dict):
        raise FrameError("not_object", f"metadata must be a JSON object, got {type(obj).__name__}")
    raw_id = obj.get("id")
    frame_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) and 0 <= raw_id <= MAX_SAFE_INT else None
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise FrameError("unknown_field", f"unknown metadata field(s): {', '.join(map(repr, unknown))[:200]}", frame_id)
    if "id" in allowed:
        if require_id and raw_id is None:
            raise FrameError("missing_field", "id is required", None)
        _int_field(obj, "id", 0, MAX_SAFE_INT, None)
    prompt = obj.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise FrameError("wrong_type", f"prompt must be a string, got {type(prompt).__name__}", frame_id)
        if not prompt.strip():
            raise FrameError("out_of_range", "prompt must not be empty", frame_id)
        if len(prompt) > limits.max_prompt_chars:
            raise FrameError("out_of_range", f"prompt must be at most {limits.max_prompt_chars} characters, "
                             f"got {len(prompt)}", frame_id)
    fmt = obj.get("format")
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise FrameError("out_of_range" if isinstance(fmt, str) else "wrong_type",
                         f"format must be one of {OUTPUT_FORMATS}, got {str(fmt)[:40]!r}", frame_id)
    return RequestMeta(
        id=frame_id,
        prompt=prompt,
        steps=_int_field(obj, "steps", 1, limits.max_steps, frame_id),
        seed=_int_field(obj, "seed", 0, MAX_SAFE_INT, frame_id),
        width=_int_field(obj, "width", limits.min_side, limits.max_side, frame_id),
        height=_int_field(obj, "height", limits.min_side, limits.max_side, frame_id),
        format=fmt,
    )


def _reject_constant(token: str) -> float:
    # NaN/Infinity are not JSON; Python's json accepts them by default.
    raise ValueError(f"{token} is not valid JSON")


def loads_json(data: bytes | str, what: str = "metadata") -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity; any failure is a FrameError."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError("bad_json", f"{what} is not valid UTF-8 JSON: {str(exc)[:120]}") from None


def split_frame(data: bytes, limits: FrameLimits) -> tuple[Any, bytes]:
    """Split a frame into parsed JSON metadata (not yet validated) and the image bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError("wrong_type", f"a frame must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limits.max_frame_bytes:
        raise PayloadTooLarge("too_large", f"frame is {len(data)} bytes, the limit is {limits.max_frame_bytes}")
    if len(data) < HEADER.size:
        raise FrameError("bad_header", f"frame is {len(data)} bytes, shorter than its 4-byte length header")
    (n,) = HEADER.unpack_from(data)
    if n == 0:
        raise FrameError("bad_header", "metadata length is 0; metadata must be a JSON object")
    if n > limits.max_meta_bytes:
        raise FrameError("bad_header", f"metadata length {n} is over the limit {limits.max_meta_bytes}")
    if HEADER.size + n > len(data):
        raise FrameError("bad_header", f"metadata length {n} runs past the end of the {len(data)}-byte frame")
    meta = loads_json(data[HEADER.size:HEADER.size + n])
    return meta, data[HEADER.size + n:]


def decode_frame(data: bytes, limits: FrameLimits | None = None, *, require_id: bool = True) -> Frame:
    """Decode and validate one request frame; raises FrameError (with the id when readable) on any problem."""
    limits = limits or FrameLimits()
    raw, image = split_frame(data, limits)
    meta = parse_request_meta(raw, limits, require_id=require_id)
    if not image:
        raise FrameError("no_image", "the frame carries no image after its metadata", meta.id)
    return Frame(meta=meta, image=image)


def encode_frame(meta: dict[str, Any] | RequestMeta, image: bytes = b"") -> bytes:
    """Encode metadata and image bytes into one frame (requests and responses alike)."""
    if isinstance(meta, RequestMeta):
        meta = meta.to_json()
    if not isinstance(meta, dict):
        raise InvalidRequest(f"frame metadata must be a dict, got {type(meta).__name__}")
    # allow_nan=False: a NaN timing would produce a frame our own decoder rejects.
    body = json.dumps(_finite(meta), separators=(",", ":"), allow_nan=False).encode("utf-8")
    return HEADER.pack(len(body)) + body + bytes(image)


def _finite(obj: Any) -> Any:
    # Timings can come back NaN from a failed stage; send null rather than invalid JSON.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def decode_reply(data: bytes, limits: FrameLimits | None = None) -> Reply:
    """Client side: decode a response frame (metadata must be an object holding `id`)."""
    limits = limits or FrameLimits(max_frame_bytes=SERVE_WS_MESSAGE_CAP - 1, max_meta_bytes=2**20)
    raw, image = split_frame(data, limits)
    if not isinstance(raw, dict) or "id" not in raw:
        raise FrameError("not_object", "response metadata must be a JSON object with an id")
    return Reply(meta=raw, image=image)


# What a message to a client must not show: an object's repr with its memory address, a bare address, a file path
# (absolute or home-relative; an API route such as /api/info stays).
_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
_PATH = re.compile(r"(?<![\w/.:~-])(?:~|[A-Za-z]:)?[/\\](?!(?:api|ws|static|docs|redoc|healthz|readyz)\b)"
                   r"(?:[\w.@+-]+[/\\])+[\w.@+-]*")


def public_message(text: str) -> str:
    """`text` without memory addresses or file paths: an error message as a client may see it."""
    text = _OBJECT_REPR.sub(lambda m: f"<{m.group(1).rsplit('.', 1)[-1]}>", text)
    text = _ADDRESS.sub("0x…", text)
    return _PATH.sub("<path>", text)


def error_reply(exc: Exception, frame_id: int | None) -> dict[str, Any]:
    """Response metadata for an error: its type, a code and a message (public_message: no addresses, no paths);
    the id when known."""
    if isinstance(exc, FrameError):
        meta = exc.to_meta()
        if meta["id"] is None:
            meta["id"] = frame_id
        meta["error"]["message"] = public_message(str(meta["error"]["message"]))
        return meta
    code = getattr(exc, "code", None)
    return {"id": frame_id, "error": {"type": type(exc).__name__, "code": code if isinstance(code, str) else "error",
                                      "message": public_message(str(exc)[:500])}}
