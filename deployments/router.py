"""The FastAPI ingress: HTTP and websocket transport, sessions, frame dropping, auth, limits, stats.

The router owns transport; editor replicas own compute. Every failure is mapped to a response in `classify`.
"""

import asyncio
import base64
import collections
import dataclasses
import hmac
import logging
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.websockets import WebSocketState
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

import rtedit.errors
from deployments.admission import Assignments, NoCapacity, Reconnect
from deployments.affinity import ROUTING, ReplicaGone
from deployments.config import RouterArgs
from deployments.frame_channel import ChannelClient, ChannelClosed, ChannelRemoteError
from deployments.guards import ConnectionGuards, Guards, Readiness, check_exposure, serve_bind_host
from deployments.limits import (
    EngineChecks,
    ServedSizes,
    check_session_defaults,
    default_steps,
    derive_frame_limits,
    model_session_defaults,
)
from deployments.schemas import (
    HealthReply,
    ReadyReply,
    InfoReply,
    PredictReply,
    StatsReply,
    binary_responses,
    json_responses,
)
from rtedit.config import EditorConfig
from rtedit.errors import EditError, EngineDead, InvalidRequest, UnsupportedRequest
from rtedit.presets import model_sidecar
from rtedit.streaming import EditJob, SessionDefaults, decode_base64, parse_settings, serve_stream
from rtedit.transport import (
    OUTPUT_FORMATS,
    FrameError,
    PayloadTooLarge,
    decode_frame,
    encode_frame,
    error_reply,
    loads_json,
)

logger = logging.getLogger("ray.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
STAGE_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
WS_KEY_PROTOCOL = "rtedit.key."


class EditorFailed(EditError):
    """The editor replica died or could not be reached mid-request; retry (Serve replaces the replica)."""

    code = "editor_failed"


class EditTimeout(EditError):
    """The edit took longer than edit_timeout_s."""

    code = "timeout"


def replica_gone(exc: BaseException) -> ReplicaGone | None:
    """The ReplicaGone SessionAffinityRouter raised, however Serve wrapped it."""
    while exc is not None:
        if isinstance(exc, ReplicaGone):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def close_reason(text: str) -> str:
    """A websocket close reason: at most 123 bytes of UTF-8."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


def retry_after(exc: BaseException) -> dict[str, str]:
    """The Retry-After header of a refusal (NoCapacity), else none."""
    return {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, NoCapacity) else {}


def classify(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """One place mapping every failure to an HTTP status and an error payload."""
    if isinstance(exc, RemoteError):
        status = remote_status(exc.type_name)
    elif isinstance(exc, PayloadTooLarge):
        status = 413
    elif isinstance(exc, UnsupportedRequest):
        status = 422
    elif isinstance(exc, InvalidRequest):
        status = 400
    elif isinstance(exc, EditTimeout):
        status = 504
    elif isinstance(exc, (EditorFailed, NoCapacity, Reconnect)):
        status = 503
    else:
        status = 500
    return status, error_reply(exc, None)["error"]


def remote_status(type_name: str) -> int:
    """The status of an error a replica reported as data, by its engine type (a dead device is no client error)."""
    cls = getattr(rtedit.errors, type_name, None)
    if not isinstance(cls, type):
        return 400 if type_name in ("FrameError", "PayloadTooLarge") else 500
    if issubclass(cls, UnsupportedRequest):
        return 422
    if issubclass(cls, InvalidRequest):
        return 400
    return 503 if issubclass(cls, EngineDead) else 500


class RemoteError(FrameError):
    """An error the editor or text encoder reported as data; keeps its remote type name and code."""

    def __init__(self, payload: dict[str, Any]):
        super().__init__(payload.get("code", "invalid"), payload.get("message", "error"))
        self.type_name = payload.get("type", "EditError")

    def to_meta(self) -> dict[str, Any]:
        return {"id": self.frame_id, "error": {"type": self.type_name, "code": self.code, "message": str(self)}}


def auth_notice(key: str | None) -> str:
    """The start-up log line about access control."""
    if key:
        return "API key required: HTTP header x-api-key (or Authorization: Bearer), websocket ?api_key= or subprotocol"
    return ("no API key configured: every client can use this service (set RTEDIT_API_KEY or router.api_key "
            "to require one)")


# /docs and /redoc load Swagger UI's and ReDoc's assets from the fastapi-offline package, never from a CDN: the docs
# work on a machine without internet. validatorUrl null: Swagger UI would otherwise ask swagger.io about the schema.
DOCS_ASSETS = "/docs-assets"
app = FastAPIOffline(
    title="rtedit",
    description="Realtime instruction-based image editing on FLUX.2 [klein]. Binary frame: 4-byte big-endian "
                "length N, N bytes of UTF-8 JSON metadata, then the encoded image. The websocket `WS /ws/predict` "
                "streams such frames (newest frame first; dropped frames are counted); OpenAPI cannot describe it. "
                "What a request may ask for: `GET /api/info` limits.",
    version="0.1.0",
    static_url=DOCS_ASSETS,
    swagger_ui_parameters={"validatorUrl": None},
)
if STATIC_DIR.is_dir():
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
# Origins, per-address caps, body deadlines, idle websockets (deployments/guards.py); each connection finds the
# replica's Router, whose __init__ built its Guards, as the class-based routes do.
app.add_middleware(ConnectionGuards, guards=lambda: serve.get_replica_context().servable_object.guards)


class _StageStats:
    """Rolling windows of stage timings for p50/p99 in /api/stats (Prometheus gets the histograms)."""

    def __init__(self, window: int):
        self.samples: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=window))

    def add(self, timings: dict[str, float]) -> None:
        for stage, ms in timings.items():
            if isinstance(ms, (int, float)):
                self.samples[stage].append(float(ms))

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for stage, values in self.samples.items():
            if values:
                arr = np.fromiter(values, float)
                out[stage] = {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)),
                              "n": len(values)}
        return out


@serve.deployment(name="Router", max_ongoing_requests=1024, graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class Router:
    def __init__(self, encoder: DeploymentHandle, editor: DeploymentHandle, args: RouterArgs, engine: EditorConfig):
        self.encoder, self.editor, self.args = encoder, editor, args
        # Limits within the engine's bounds, so what no replica serves is refused here (AppArgs checked them).
        self.limits = derive_frame_limits(args.limits, engine)
        self.checks = EngineChecks.from_config(engine)
        # The model's rtedit.json, read here as the replicas read it: its examples and sizes shape every session.
        self.sidecar = model_sidecar(engine.model)
        self.sizes = ServedSizes.of_model(self.sidecar, engine, args.off_size, engine.model)
        self.defaults = model_session_defaults(args.session_defaults(), self.sidecar, engine.model)
        check_session_defaults(self.defaults, self.limits, args.steps_override, self.sizes)
        self._model_defaults: SessionDefaults | None = None  # with the model's steps, once an editor reported them
        self._info_lock = asyncio.Lock()
        self.api_key = args.api_key or (os.environ.get(args.api_key_env) if args.api_key_env else None) or None
        bind_host = serve_bind_host()
        check_exposure(bind_host, self.api_key, args.api_key_env)  # no keyless service off loopback
        self.guards = Guards(args.guard_limits(bind_host), on_refuse=self._count_refusal)
        self.readiness: Readiness | None = None  # built at the first /readyz, inside the replica
        # Admission (deployments/admission.py): the table session -> editor replica, each replica's fair queue.
        self.admission = Assignments()
        self._admission_lock = asyncio.Lock()  # one admission_state broadcast for a burst of new sessions
        self._ending: dict[str, tuple[int, str]] = {}  # websockets to close (code, reason) after their next frame
        # Per websocket: the references version its replica acknowledged (a reply without error); frames whose
        # references are acked travel with references=None, so the images cross once per change, not per frame.
        self.acked_references: dict[str, int] = {}
        self._closing: set[asyncio.Task] = set()  # close_session calls in flight (a task needs a reference)
        # Per editor replica, the connection its frames take (router.frame_channel "direct"); None: Serve's handle.
        self.channels: dict[str, ChannelClient] | None = {} if args.frame_channel == "direct" else None
        self.counts: collections.Counter = collections.Counter()
        self.errors_by_type: collections.Counter = collections.Counter()
        self.replicas_seen: collections.Counter = collections.Counter()
        self.stages = _StageStats(args.stats_window)
        self.model_info: dict[str, Any] | None = None
        self.m_frames = Counter("rtedit_frames", description="Frames by event (received, processed, dropped)",
                                tag_keys=("event", "route"))
        self.m_errors = Counter("rtedit_errors", description="Errors by type", tag_keys=("type", "route"))
        self.m_stage = Histogram("rtedit_stage_ms", description="Per-frame stage latency seen by the router (ms)",
                                 boundaries=STAGE_BOUNDARIES_MS, tag_keys=("stage",))
        self.m_prompt = Counter("rtedit_embedding_transfers", description="Prompt embeddings sent to editors",
                                tag_keys=())
        self.m_refusals = Counter("rtedit_refusals", description="Connections, sessions and frames refused, by reason",
                                  tag_keys=("reason",))
        logger.info("rtedit router: %s", auth_notice(self.api_key))
        if not self.api_key:
            logger.warning("rtedit router: %s", auth_notice(None))

    def _count_refusal(self, reason: str) -> None:
        self.m_refusals.inc(tags={"reason": reason})

    # ---- access -------------------------------------------------------------------------------------------------
    def _key_ok(self, given: str | None) -> bool:
        return not self.api_key or (given is not None and hmac.compare_digest(given.encode(), self.api_key.encode()))

    def _http_key(self, request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return request.headers.get("x-api-key")

    def _refuse(self, request: Request) -> JSONResponse | None:
        if self._key_ok(self._http_key(request)):
            return None
        self._count_error("unauthorized", "http")
        return JSONResponse({"error": {"type": "Unauthorized", "code": "unauthorized",
                                       "message": "missing or wrong API key (x-api-key header)"}}, status_code=401)

    # ---- bookkeeping --------------------------------------------------------------------------------------------
    def _count(self, event: str, route: str, n: int = 1) -> None:
        self.counts[f"{route}:{event}"] += n
        self.counts[event] += n
        self.m_frames.inc(n, tags={"event": event, "route": route})

    def _count_error(self, type_name: str, route: str) -> None:
        self.errors_by_type[type_name] += 1
        self.m_errors.inc(tags={"type": type_name, "route": route})

    def _observe(self, timings: dict[str, float]) -> None:
        self.stages.add(timings)
        for stage, ms in timings.items():
            if isinstance(ms, (int, float)):
                self.m_stage.observe(float(ms), tags={"stage": stage})

    # ---- the edit call ------------------------------------------------------------------------------------------
    async def _call_editor(self, replica: str, job: EditJob, embedding: Any = None) -> dict[str, Any]:
        """One edit on `replica`: over its frame channel, or through Serve's handle (SessionAffinityRouter sends it
        there or fails it with ReplicaGone)."""
        if self.channels is not None:
            return await self._call_channel(replica, job)
        response = self.editor.edit.remote(job, embedding, replica=replica)
        try:
            return await asyncio.wait_for(response, self.args.edit_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise EditTimeout(f"the edit took longer than {self.args.edit_timeout_s} s") from None
        except (EditError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - actor died, unavailable, back-pressure: the replica failed
            gone = replica_gone(exc)
            if gone is not None and not gone.died:
                raise Reconnect(f"editor replica {replica} left the service (scale-down or replacement): "
                                "reconnect") from None
            raise self._replica_failed(replica, type(exc).__name__, never_sent=gone is not None) from None

    def _replica_failed(self, replica: str, why: str, never_sent: bool) -> "EditorFailed":
        failed = EditorFailed(f"the editor replica failed ({why}); retry: Serve restarts failed replicas")
        failed.replica, failed.never_sent = replica, never_sent  # never_sent: the frame reached no replica
        return failed

    async def _call_channel(self, replica: str, job: EditJob) -> dict[str, Any]:
        """The frame over the replica's channel (deployments/frame_channel.py), failures mapped as Serve's are."""
        client = self._channel(replica)
        try:
            return await asyncio.wait_for(client.call(job, replica), self.args.edit_timeout_s)
        except asyncio.TimeoutError:  # wait_for cancelled the call, which cancels it on the replica
            raise EditTimeout(f"the edit took longer than {self.args.edit_timeout_s} s") from None
        except ChannelClosed as exc:
            logger.info("rtedit router: frame channel of %s: %s", replica, exc)
            if exc.leaving is not None:
                view = self.admission.replicas.get(replica)
                if view is not None:  # no new session goes there before the next look shows it draining
                    view.draining = exc.leaving
                raise Reconnect(f"editor replica {replica} left the service (shutting down): reconnect") from None
            raise self._replica_failed(replica, "its frame channel closed", never_sent=not exc.sent) from None
        except ChannelRemoteError as exc:
            logger.warning("rtedit router: editor replica %s raised on a frame: %s", replica, exc)
            raise self._replica_failed(replica, exc.type_name, never_sent=False) from None

    def _channel(self, replica: str) -> ChannelClient:
        """The replica's channel client, made from the address its admission_state gave."""
        client = self.channels.get(replica)
        if client is not None:
            return client
        view = self.admission.replicas.get(replica)
        if view is None:  # not among the replicas that answered the last look: gone before this frame
            raise self._replica_failed(replica, "not running", never_sent=True)
        if view.channel is None:
            logger.error("rtedit router: editor replica %s offers no frame channel; redeploy it, or set "
                         "router.frame_channel: serve", replica)
            raise self._replica_failed(replica, "it offers no frame channel", never_sent=False)
        client = self.channels[replica] = ChannelClient(replica, view.channel)
        return client

    def _forget_channels(self) -> None:
        """After a fresh look at the replicas: closed channels go (a replica that answers again gets a new
        connection at its next frame), as do those a replica replaced. One missing from a look stays open: a look
        can time out while frames flow; a replica that is gone closes its connections itself."""
        for replica, client in list(self.channels.items()):
            view = self.admission.replicas.get(replica)
            if client.closed is not None or (view is not None and view.channel != client.address):
                client.close("the router stopped using this channel")
                del self.channels[replica]

    def _outgoing(self, job: EditJob) -> EditJob:
        """The job as sent to the replica: references left out when the socket's replica holds them already."""
        if job.session and self.acked_references.get(job.session) == job.references_version:
            return dataclasses.replace(job, references=None)
        return job

    # ---- admission: which replica, and a slot on it (deployments/admission.py) -----------------------------------
    async def _refresh_replicas(self, force: bool = False) -> None:
        """Every running editor replica's admission_state (broadcast: no queueing behind frames)."""
        async with self._admission_lock:
            if not force and not self.admission.stale():
                return
            if force and time.monotonic() - self.admission.refreshed < 0.2:  # a burst of refusals shares one look
                return
            try:
                replies = await self.editor.broadcast("admission_state").results_async(
                    timeout_s=5, return_exceptions=True)
            except Exception as exc:  # noqa: BLE001 - no replica running: nothing can be admitted
                logger.info("rtedit router: no editor replica answered admission_state (%s)", type(exc).__name__)
                replies = []
            self.admission.update([r for r in replies if isinstance(r, dict)])
            if self.channels is not None:
                self._forget_channels()

    def _no_capacity(self) -> NoCapacity:
        views = [v for v in self.admission.replicas.values() if not v.failed]
        retry = self.admission.retry_after_s()
        if not views:
            return NoCapacity(f"no editor replica is running; retry in {retry} s", retry)
        used, capacity = sum(v.sessions for v in views), sum(v.capacity for v in views)
        draining = sum(1 for v in views if v.draining is not None)
        return NoCapacity(f"every editor replica is full ({used} of {capacity} sessions on {len(views)} replicas"
                          f"{f', {draining} draining' if draining else ''}); retry in {retry} s", retry)

    async def _candidates(self, tried: set[str]):
        """Replicas with room, most free first; the view is looked at again once before giving up."""
        await self._refresh_replicas()
        for fresh in (False, True):
            if fresh:
                await self._refresh_replicas(force=True)
            for replica in self.admission.candidates():
                if replica not in tried:
                    tried.add(replica)
                    yield replica

    async def _admit(self, session: str) -> str:
        """Admits a websocket session on a replica with room (the replica decides) or raises NoCapacity."""
        async for replica in self._candidates(set()):
            try:
                reply = await asyncio.wait_for(self.editor.admit.remote(session, replica=replica),
                                               self.args.edit_timeout_s)
            except Exception as exc:  # noqa: BLE001 - that replica is gone or stuck: try another
                logger.info("rtedit router: admit on %s failed (%s)", replica, type(exc).__name__)
                self.admission.failed(replica, EditorFailed("the editor replica failed; retry"))
                continue
            self.admission.note(reply)
            if reply["admitted"]:
                self.admission.assign(session, replica)
                return replica
        self.counts["sessions_refused"] += 1
        self._count_refusal("session_no_capacity")
        raise self._no_capacity()

    async def _on_replica(self, replica: str, key: str, job: EditJob) -> dict[str, Any]:
        """The frame on `replica` once the replica's fair queue gives this session a slot (one frame per session,
        sessions round-robin): a frame is sent only into a free slot, never into Serve's retry loop."""
        queue = self.admission.queue(replica)
        await queue.acquire(key)
        try:
            return await self._edit_on(replica, job)
        except EditorFailed as exc:
            if getattr(exc, "replica", None) == replica:  # the replica itself failed, not one reply
                for session in self.admission.failed(replica, exc):  # its sessions move at their next frame
                    self.admission.unassign(session)
            raise
        finally:
            queue.release(key)

    async def _edit_on(self, replica: str, job: EditJob) -> dict[str, Any]:
        outgoing, embedding = self._outgoing(job), None
        for _ in range(4):
            reply = await self._call_editor(replica, outgoing, embedding)
            embedding = None
            if "need_embedding" in reply and self.channels is not None:
                raise self._replica_failed(replica, "it has no text encoder handle", never_sent=False)
            # An embedding crossed to the replica: fetched by it (frame channel), or sent with the next call (Serve).
            if reply.pop("embedding_fetched", False) or "need_embedding" in reply:
                self.m_prompt.inc()
                self.counts["embedding_transfers"] += 1
            if "need_embedding" in reply:
                # The encoder's response goes to the editor as a reference: the tensors never pass through here.
                embedding = self.encoder.encode.remote(job.prompt)
            elif "need_session" in reply and outgoing.references is None:
                self.counts["session_resends"] += 1
                outgoing = job  # the full settings: the replica opens the session again
            else:
                return reply
        raise EditorFailed("the editor replica kept asking for the prompt or the session; retry")

    async def _session_frame(self, job: EditJob) -> dict[str, Any]:
        session = job.session
        for _ in range(3):
            replica = self.admission.table.get(session)
            if replica is None:  # its replica failed: admitted again on a live one, with the full settings
                try:
                    replica = await self._admit(session)
                except NoCapacity as exc:
                    if not any(not v.failed for v in self.admission.replicas.values()):
                        # Its replica died and none runs yet: Serve is starting one, so the socket stays open and
                        # this frame is an error; a later frame is admitted on the replacement.
                        raise EditorFailed(f"{exc} (Serve is replacing the failed one)") from None
                    self._ending[session] = (1013, str(exc))  # replicas run, all full: told to come back
                    raise
                if session in self.acked_references:
                    self.acked_references[session] = -1
                self.counts["readmissions"] += 1
            try:
                reply = await self._on_replica(replica, session, job)
            except Reconnect as exc:
                self._ending[session] = (1012, str(exc))
                raise
            except EditorFailed as exc:
                if getattr(exc, "never_sent", False):  # its replica died before this frame: admit it elsewhere
                    continue
                raise
            if "need_admission" in reply:  # that replica does not hold the session (never crosses: ask again)
                self.admission.unassign(session)
                continue
            if "reconnect" in reply:
                self._ending[session] = (1012, reply["reconnect"])
                raise Reconnect(reply["reconnect"])
            return reply
        raise EditorFailed("no editor replica kept the session's admission; retry")

    async def _one_shot_frame(self, job: EditJob) -> dict[str, Any]:
        """A sessionless frame takes a slot on a replica with room, or NoCapacity (HTTP 503 with Retry-After)."""
        key = "one-shot:" + uuid.uuid4().hex
        async for replica in self._candidates(set()):
            reply = await self._on_replica(replica, key, job)
            if "full" not in reply:
                return reply
            view = self.admission.replicas.get(replica)
            if view is not None:
                view.sessions = view.capacity
        self.counts["one_shots_refused"] += 1
        self._count_refusal("one_shot_no_capacity")
        raise self._no_capacity()

    async def process(self, job: EditJob) -> tuple[dict[str, Any], bytes]:
        """Edit one frame on the session's replica; embeddings cross from the text encoder once per prompt and
        references once per websocket session and change (resent when the replica lost the session)."""
        t0 = time.perf_counter()
        job, resized = self.sizes.fit(job)
        if resized is not None:
            self.counts["resized"] += 1
        self.checks.check(job)
        reply = await (self._session_frame(job) if job.session else self._one_shot_frame(job))
        if "error" in reply:
            raise RemoteError(reply["error"])
        if job.session and job.session in self.acked_references:
            self.acked_references[job.session] = job.references_version
        image = reply.pop("image")
        timings = dict(reply.get("timings") or {})
        timings["server"] = (time.perf_counter() - t0) * 1000
        reply["timings"] = timings
        if resized is not None:
            reply["resized"] = resized
        self._observe(timings)
        self.replicas_seen[reply.get("replica", "?")] += 1
        return reply, image

    def _close_session(self, session: str, replica: str | None) -> None:
        """Tells the socket's replica to free its engine session and admission (fire and forget; errors logged)."""
        self.acked_references.pop(session, None)
        self._ending.pop(session, None)
        if replica is None:
            return

        async def close() -> None:
            try:
                await asyncio.wait_for(self.editor.close_session.remote(session, replica=replica),
                                       self.args.edit_timeout_s)
            except Exception as exc:  # noqa: BLE001 - the replica may be gone; its sessions went with it
                logger.info("session %s: close_session failed (%s)", session[:8], type(exc).__name__)

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # ---- websocket ----------------------------------------------------------------------------------------------
    @app.websocket("/ws/predict")
    async def ws_predict(self, ws: WebSocket) -> None:
        """Binary frames in, binary frames out; text messages set session settings (see rtedit.streaming)."""
        protocols = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        offered = next((p for p in protocols if p.startswith(WS_KEY_PROTOCOL)), None)
        given = ws.query_params.get("api_key") or (offered[len(WS_KEY_PROTOCOL):] if offered else None)
        if not self._key_ok(given):
            self._count_error("unauthorized", "ws")
            await ws.close(code=1008)  # before accept: the handshake is refused (HTTP 403)
            return
        await ws.accept(subprotocol=offered)
        session = uuid.uuid4().hex
        try:
            await self._admit(session)  # at once: admitted on a replica with room, or refused with the reason
        except NoCapacity as exc:
            self._count_error(exc.code, "ws")
            await ws.close(code=1013, reason=close_reason(str(exc)))  # 1013: try again later
            return
        defaults = await self._session_defaults()
        seed = defaults.seed if defaults.seed is not None else secrets.randbelow(2**31)
        self.counts["sessions_open"] += 1
        self.counts["sessions_total"] += 1
        self.acked_references[session] = -1  # nothing acknowledged yet

        async def receive() -> bytes | str | None:
            try:
                message = await ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return None
            if message["type"] == "websocket.disconnect":
                return None
            if message.get("bytes") is not None:
                return message["bytes"]
            return message.get("text") or ""

        async def send(data: bytes | str) -> None:
            if isinstance(data, bytes):
                await ws.send_bytes(data)
            else:
                await ws.send_text(data)
            ending = self._ending.pop(session, None)
            if ending is not None:  # the frame told why (reconnect, no capacity); the close says it again
                await ws.close(code=ending[0], reason=close_reason(ending[1]))

        def on_frame(event: str) -> None:
            if event.startswith("error:"):
                self._count_error(event[6:], "ws")
            else:
                self._count(event, "ws")

        try:
            stats = await serve_stream(receive, send, self.process, session=session, seed=seed, limits=self.limits,
                                       defaults=defaults, on_frame=on_frame)
            logger.info("session %s closed: received %d processed %d dropped %d errors %d", session[:8],
                        stats.received, stats.processed, stats.dropped, stats.errors)
        finally:
            self._close_session(session, self.admission.unassign(session))
            self.counts["sessions_open"] -= 1
            # After the client's disconnect a close is an ASGI error: Serve's proxy logged an ERROR with a traceback
            # at the end of every session.
            if ws.client_state == WebSocketState.CONNECTED and ws.application_state == WebSocketState.CONNECTED:
                try:
                    await ws.close()
                except (WebSocketDisconnect, RuntimeError) as exc:  # the client left while we closed
                    logger.info("session %s: close after the client left (%s)", session[:8], type(exc).__name__)

    # ---- HTTP ---------------------------------------------------------------------------------------------------
    async def _read_body(self, request: Request, base64_json: bool = False) -> bytes:
        """The body, refused on Content-Length before reading, and cut off while streaming if it lies."""
        limit = self.limits.max_frame_bytes
        if base64_json:
            limit = limit * 4 // 3 + 4096  # base64 grows the image by 4/3, plus the other JSON fields
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise FrameError("bad_header", f"Content-Length {length[:20]!r} is not a number")
            if int(length) > limit:
                raise PayloadTooLarge("too_large", f"body of {length} bytes is over the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge("too_large", f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _http_job(self, settings: dict[str, Any], image: bytes, frame_id: int | None) -> EditJob:
        defaults = await self._session_defaults()
        return EditJob(
            session="", id=frame_id, image=image, prompt=settings.get("prompt") or defaults.prompt or "",
            steps=settings.get("steps", defaults.steps),
            seed=settings.get("seed", defaults.seed if defaults.seed is not None else 0),
            width=settings.get("width", defaults.width), height=settings.get("height", defaults.height),
            format=settings.get("format", defaults.format), references=settings.get("references", ()))

    @app.post("/api/predict", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object", "required": ["image"], "additionalProperties": False, "properties": {
            "image": {"type": "string", "description": "base64 JPEG/PNG/WebP (a data: URL is accepted)"},
            "prompt": {"type": "string", "description": "the instruction; without one the server's default "
                                                        "(GET /api/info defaults.prompt), refused when it has none"},
            "steps": {"type": "integer"}, "seed": {"type": "integer"},
            "width": {"type": "integer"}, "height": {"type": "integer"},
            "format": {"type": "string", "enum": list(OUTPUT_FORMATS)},
            "references": {"type": "array", "items": {"type": "string"}}}}}}}},
              responses=json_responses(PredictReply, 400, 401, 413, 422, 500, 503, 504))
    async def predict(self, request: Request) -> Response:
        """JSON in (base64 image), JSON out (base64 image, size, timings, replica, and `resized` when the image was
        answered at a size the model serves instead of its own)."""
        if (refused := self._refuse(request)) is not None:
            return refused
        self._count("received", "json")
        try:
            body = loads_json(await self._read_body(request, base64_json=True), "body")
            if not isinstance(body, dict):
                raise FrameError("not_object", f"body must be a JSON object, got {type(body).__name__}")
            if not isinstance(body.get("image"), str):
                raise FrameError("missing_field" if "image" not in body else "wrong_type",
                                 "image must be a base64 string")
            image = decode_base64(body["image"], "image")
            settings = parse_settings({k: v for k, v in body.items() if k != "image"}, self.limits)
            if not settings.get("prompt") and not self.defaults.prompt:
                raise FrameError("missing_field", "prompt is required")
            meta, out = await self.process(await self._http_job(settings, image, None))
        except Exception as exc:  # noqa: BLE001 - mapped to a status in classify
            status, error = classify(exc)
            self._count_error(error["code"], "json")
            return JSONResponse({"error": error}, status_code=status, headers=retry_after(exc))
        self._count("processed", "json")
        return JSONResponse({**meta, "image": base64.b64encode(out).decode()})

    @app.post("/api/predict_binary", openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
              response_class=Response, responses=binary_responses(400, 401, 413, 422, 500, 503, 504))
    async def predict_binary(self, request: Request) -> Response:
        """One binary frame in, one out (errors are frames with `error`, with a matching HTTP status)."""
        if (refused := self._refuse(request)) is not None:
            return refused
        self._count("received", "binary")
        frame_id = None
        try:
            frame = decode_frame(await self._read_body(request), self.limits, require_id=False)
            frame_id = frame.meta.id
            settings = {k: v for k, v in frame.meta.to_json().items() if k != "id"}
            if not settings.get("prompt") and not self.defaults.prompt:
                raise FrameError("missing_field", "prompt is required", frame_id)
            meta, out = await self.process(await self._http_job(settings, frame.image, frame_id))
        except Exception as exc:  # noqa: BLE001 - mapped to a status in classify
            status, error = classify(exc)
            self._count_error(error["code"], "binary")
            fid = frame_id if frame_id is not None else getattr(exc, "frame_id", None)
            return Response(encode_frame({"id": fid, "error": error}), status_code=status,
                            media_type="application/octet-stream", headers=retry_after(exc))
        self._count("processed", "binary")
        return Response(encode_frame({**meta, "id": frame_id, "dropped": 0}, out),
                        media_type="application/octet-stream")

    @app.get("/", include_in_schema=False)
    async def index(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/healthz", responses=json_responses(HealthReply))
    async def healthz(self) -> dict[str, str]:
        """Liveness: the router answers (never behind held connections or edits; readiness is /readyz)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={**json_responses(ReadyReply), 503: {"model": ReadyReply,
                                   "description": "not ready: a deployment has no running replica yet"}})
    async def readyz(self) -> Response:
        """Readiness: 200 once every deployment behind the router has a running replica (an editor replica runs
        once it warmed every served shape), 503 before; asked of Serve's controller, never queued behind edits."""
        if self.readiness is None:
            context = serve.get_replica_context()
            self.readiness = Readiness(serve.status, context.app_name, context.deployment)
        try:
            ready, running = await self.readiness.check()
        except Exception as exc:  # noqa: BLE001 - the controller is unreachable: not ready, and say why
            return JSONResponse({"status": "unknown", "running": {},
                                 "reason": f"Serve's controller did not answer ({type(exc).__name__})"},
                                status_code=503)
        return JSONResponse({"status": "ready" if ready else "starting", "running": running},
                            status_code=200 if ready else 503)

    async def _model_info(self) -> dict[str, Any]:
        """The served model as an editor replica reports it (cached: every replica serves the same model)."""
        if self.model_info is None:
            info = await asyncio.wait_for(self.editor.info.remote(), self.args.edit_timeout_s)
            self.model_info = {k: info.get(k) for k in ("name", "random_weights", "description", "device", "dtype",
                                                        "transformer_params", "steps", "native_size")}
            self.model_info["examples"] = list(self.sidecar.examples) if self.sidecar.examples else None
            self.model_info["sizes"] = [list(s) for s in self.sidecar.sizes] if self.sidecar.sizes else None
        return self.model_info

    async def _session_defaults(self) -> SessionDefaults:
        """The configured defaults with the model's step count unless router.defaults.steps overrides it; the
        configured ones while no editor has answered (a later session asks again)."""
        if self._model_defaults is not None:
            return self._model_defaults
        async with self._info_lock:  # one info call for a burst of new sessions
            if self._model_defaults is None:
                try:
                    info = await self._model_info()
                except Exception as exc:  # noqa: BLE001 - the session still starts; its frames report the failure
                    logger.warning("rtedit router: no editor reported the model (%s); session defaults without "
                                   "its step counts for now", type(exc).__name__)
                    return self.defaults
                model_steps = tuple(info["steps"]) if info.get("steps") else None
                self.checks.steps = model_steps
                steps = default_steps(self.args.steps_override, model_steps)
                if model_steps is not None and steps not in model_steps:
                    logger.warning("rtedit router: defaults.steps=%d is not one the model allows %s: frames that do "
                                   "not set steps will be refused", steps, list(model_steps))
                self._model_defaults = dataclasses.replace(self.defaults, steps=steps)
        return self._model_defaults

    @app.get("/api/info", responses=json_responses(InfoReply, 401, 503))
    async def info(self, request: Request) -> Response:
        """The model being served (the page shows it, with a notice when its weights are random), what a request
        may ask for, and the session defaults (steps: the model's own unless the router overrides them)."""
        if (refused := self._refuse(request)) is not None:
            return refused
        try:
            model = await self._model_info()
        except Exception as exc:  # noqa: BLE001 - no replica answered in time
            return JSONResponse({"error": {"type": "EditorFailed", "code": "editor_failed",
                                           "message": f"no editor replica reported the model ({type(exc).__name__}); "
                                                      "retry"}}, status_code=503)
        defaults = await self._session_defaults()
        limits = self.limits
        return JSONResponse({"model": model, "auth": bool(self.api_key),
                             "limits": {"max_frame_bytes": limits.max_frame_bytes,
                                        "max_meta_bytes": limits.max_meta_bytes, "max_side": limits.max_side,
                                        "min_side": limits.min_side, "max_pixels": self.checks.max_pixels,
                                        "max_steps": limits.max_steps, "max_references": limits.max_references,
                                        "max_reference_bytes": limits.max_reference_bytes,
                                        "max_prompt_chars": limits.max_prompt_chars,
                                        "formats": list(OUTPUT_FORMATS), **self.checks.describe(),
                                        **self._served_sizes()},
                             "defaults": {"steps": defaults.steps, "format": defaults.format,
                                          "prompt": defaults.prompt}})

    def _served_sizes(self) -> dict[str, Any]:
        """For /api/info: the sizes the page offers (the model's within the engine's buckets, else the buckets'
        from EngineChecks) and what a frame off the model's sizes gets (null: the model lists none)."""
        if self.sizes.sizes:
            return {"sizes": [list(s) for s in self.sizes.sizes], "off_size": self.sizes.off_size}
        return {"off_size": None}

    async def _per_replica(self, method: str) -> dict[str, Any] | str:
        """`method` of every running editor replica, keyed by replica id (a handle call reaches one at random)."""
        try:
            # broadcast (a PublicAPI alpha in Ray 2.60) calls each running replica once; affinity routing is untouched.
            replies = await self.editor.broadcast(method).results_async(timeout_s=5, return_exceptions=True)
        except Exception as exc:  # noqa: BLE001 - stats must not fail because the editors are restarting
            return f"unavailable ({type(exc).__name__})"
        out: dict[str, Any] = {}
        for i, reply in enumerate(replies):
            if isinstance(reply, dict):
                out[reply.get("replica", f"?{i}")] = reply
            else:
                out[f"unreachable {i}"] = f"unavailable ({type(reply).__name__})"
        return out

    @app.get("/api/stats", responses=json_responses(StatsReply, 401))
    async def stats(self, request: Request) -> Response:
        """Cache hit rates, per-stage p50/p99, frames received/processed/dropped, errors by type; each editor
        replica's engine stats (attention backend, caches, warm-up) and model, keyed by replica id."""
        if (refused := self._refuse(request)) is not None:
            return refused
        encoder_stats: dict[str, Any] | str
        try:
            encoder_stats = await asyncio.wait_for(self.encoder.stats.remote(), 5)
        except Exception as exc:  # noqa: BLE001 - stats must not fail because one deployment is restarting
            encoder_stats = f"unavailable ({type(exc).__name__})"
        editors = await self._per_replica("stats")
        frames = {e: self.counts[e] for e in ("received", "processed", "dropped")}
        return JSONResponse({
            "model": self.model_info,
            "frames": frames,
            "frames_by_route": {k: v for k, v in self.counts.items() if ":" in k},
            "drop_rate": frames["dropped"] / frames["received"] if frames["received"] else 0.0,
            "sessions": {"open": self.counts["sessions_open"], "total": self.counts["sessions_total"]},
            "stages_ms": self.stages.summary(),
            "errors": dict(self.errors_by_type),
            "prompt_cache": encoder_stats,
            "embedding_transfers": self.counts["embedding_transfers"],
            "editors": editors,
            "attention_backend": ({rid: s.get("attention_backend", "not reported by the engine")
                                   for rid, s in editors.items() if isinstance(s, dict)}
                                  if isinstance(editors, dict) else editors),
            "replicas_seen": dict(self.replicas_seen),
            "connections": self.guards.stats(),
            "admission": {**self.admission.stats(), "refused": self.counts["sessions_refused"],
                          "one_shots_refused": self.counts["one_shots_refused"],
                          "readmissions": self.counts["readmissions"], "routing": dict(ROUTING)},
        })
