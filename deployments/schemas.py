"""The router's replies as pydantic models, for the OpenAPI document only (/docs, /redoc, /openapi.json).

The router builds its replies as plain dicts (no validation on the hot path); tests/test_serve_docs.py validates
real replies against these models, with extra fields forbidden, so the documented schema is the one served.
Ray-free.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Reply(BaseModel):
    # An undocumented field in a real reply fails the schema test instead of going unnoticed.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ErrorDetail(_Reply):
    type: str = Field(description="the error's class, e.g. InvalidImage, NotServed, Unauthorized")
    code: str = Field(description="a stable machine-readable code, e.g. invalid_image, not_served, off_size")
    message: str = Field(description="what was wrong, for a person")


class ErrorReply(_Reply):
    error: ErrorDetail


class ResizedNote(_Reply):
    """Present when the frame was answered at a size the model serves instead of its own."""

    from_: list[int] = Field(alias="from", description="[height, width] the request would have come out at")
    to: list[int] = Field(description="[height, width] it was answered at")
    reason: str


class PredictReply(_Reply):
    image: str = Field(description="the edited image, base64 (POST /api/predict; a binary frame carries raw bytes)")
    width: int
    height: int
    format: Literal["jpeg", "png", "webp"]
    seed: int
    steps: int
    timings: dict[str, float] = Field(description="ms per stage (prepare, denoise, decode, total) and server: the "
                                                  "router's whole time for the frame")
    replica: str = Field(description="the editor replica that edited it")
    prompt_key: str = Field(description="the first 16 hex digits of the prompt's cache key")
    prompt_truncated: bool = Field(description="the prompt was longer than the model's prompt length")
    resized: Optional[ResizedNote] = None


class BinaryReplyMeta(_Reply):
    """The JSON metadata of a binary reply frame: PredictReply without `image` (the frame's payload), plus the frame
    id and the frames dropped before it (always 0 over HTTP)."""

    id: Optional[int] = None
    dropped: int = 0
    width: int
    height: int
    format: Literal["jpeg", "png", "webp"]
    seed: int
    steps: int
    timings: dict[str, float]
    replica: str
    prompt_key: str
    prompt_truncated: bool
    resized: Optional[ResizedNote] = None


class ModelInfo(_Reply):
    name: Optional[str] = None
    random_weights: Optional[bool] = None
    description: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    transformer_params: Optional[int] = None
    steps: Optional[list[int]] = Field(None, description="the step counts a distilled model was trained for")
    native_size: Optional[int] = None
    examples: Optional[list[str]] = Field(None, description="instructions the model edits well (rtedit.json)")
    sizes: Optional[list[list[int]]] = Field(None, description="[height, width] pairs the model serves")


class Limits(_Reply):
    """What a request may ask for; a request beyond any of these is refused (400, 413 or 422) before any edit."""

    max_frame_bytes: int = Field(description="a whole binary frame or JSON body's image")
    max_meta_bytes: int = Field(description="a binary frame's JSON metadata")
    max_side: int = Field(description="a requested width or height")
    min_side: int
    max_pixels: int = Field(description="width x height of an input image or a requested output: a side of "
                                        "max_side is served only while the other keeps the product under this")
    max_steps: int
    max_references: int
    max_reference_bytes: int
    max_prompt_chars: int
    formats: list[str]
    reference_counts: list[int]
    sizes: Optional[list[list[int]]] = Field(None, description="[height, width] pairs served; null: any size")
    steps: Optional[list[int]] = None
    off_size: Optional[Literal["resize", "refuse"]] = Field(
        None, description="what a frame off the model's sizes gets; null when the model lists no sizes")


class SessionDefaultsInfo(_Reply):
    steps: Optional[int] = None
    format: str
    prompt: Optional[str] = Field(None, description="the instruction a request without one gets")


class InfoReply(_Reply):
    model: ModelInfo
    auth: bool = Field(description="an API key is required (x-api-key header, ?api_key= on the websocket)")
    limits: Limits
    defaults: SessionDefaultsInfo


class StatsReply(_Reply):
    model: Optional[ModelInfo] = None
    frames: dict[str, int] = Field(description="received, processed, dropped")
    frames_by_route: dict[str, int]
    drop_rate: float
    sessions: dict[str, int] = Field(description="open and total websocket sessions")
    stages_ms: dict[str, dict[str, float]] = Field(description="per stage: p50, p99 and n over the last window")
    errors: dict[str, int] = Field(description="errors by code")
    prompt_cache: dict[str, Any] | str = Field(description="the text encoder's PromptCache stats, or why not")
    embedding_transfers: int
    editors: dict[str, Any] | str = Field(description="every editor replica's engine stats keyed by replica id")
    attention_backend: dict[str, Any] | str
    replicas_seen: dict[str, int]
    connections: dict[str, Any] = Field(description="this router replica's open connections and client addresses, "
                                                    "and its refusals by reason (origin, too_many_connections, "
                                                    "server_busy, body_timeout, idle)")
    admission: dict[str, Any] = Field(description="sessions per editor replica (capacity, assigned, in flight, "
                                                  "waiting), refusals, re-admissions and the request router's "
                                                  "routing counts (retries: requests Serve routed again)")


class HealthReply(_Reply):
    status: Literal["ok"]


class ReadyReply(_Reply):
    status: Literal["ready", "starting", "unknown"]
    running: dict[str, int] = Field(description="running replicas of each deployment behind the router")
    reason: Optional[str] = None


ERROR_STATUSES = {
    400: "the request is malformed or out of range (limits in GET /api/info)",
    401: "missing or wrong API key",
    413: "the body is over limits.max_frame_bytes",
    422: "valid, but not served by this deployment (a size, a step count or a reference count)",
    500: "an unexpected failure",
    503: "no editor replica could take it; retry",
    504: "the edit took longer than router.edit_timeout_s",
}


def json_responses(reply: type[BaseModel], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for a JSON endpoint: `reply` on 200 and ErrorReply on each of `statuses`."""
    out: dict[int | str, dict[str, Any]] = {200: {"model": reply}}
    for status in statuses:
        out[status] = {"model": ErrorReply, "description": ERROR_STATUSES[status]}
    return out


def binary_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for a binary-frame endpoint: a frame on 200 and an error frame on each of `statuses`."""
    frame = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    out: dict[int | str, dict[str, Any]] = {200: {
        "content": frame, "description": "a binary frame: 4-byte big-endian length N, N bytes of JSON metadata "
                                         "(BinaryReplyMeta), then the edited image"}}
    for status in statuses:
        out[status] = {"content": frame, "description": f"{ERROR_STATUSES[status]}: a frame whose metadata is "
                                                        "{id, error: ErrorDetail} and no image"}
    return out
