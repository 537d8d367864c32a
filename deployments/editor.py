"""Editor replicas: an adapter over rtedit.editor.Editor. Compute only; transport lives in the router.

Frames arrive over the replica's frame channel (deployments/frame_channel.py), or through Serve's handle when the
router is set to `frame_channel: serve`; everything else (admission, drain, info, stats, health) through Serve.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from deployments.admission import ReplicaBook, measure_engine, replica_capacity
from deployments.config import EditorArgs, replicas_options
from deployments.frame_channel import ChannelServer
from deployments.gauges import GaugeKeeper
from rtedit.config import EditorConfig
from rtedit.errors import EditError
from rtedit.prompts import PromptEmbedding
from rtedit.streaming import EditJob

if TYPE_CHECKING:
    from rtedit.editor import Editor

logger = logging.getLogger("ray.serve")

STAGE_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


def error_payload(exc: BaseException) -> dict[str, Any]:
    """An engine error as plain data, so the router gets the message rather than a remote traceback."""
    name = type(exc).__name__
    code = getattr(exc, "code", None) or "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return {"error": {"type": name, "code": code, "message": str(exc)[:500]}}


def replica_gpu_share(args: EditorArgs) -> float | None:
    """The part of one GPU an editor replica reserves: ray_actor_options["num_gpus"] as build_app sets it
    (gpu_share / replicas_per_gpu; a fraction f is 1/f replicas on a device). None: a CPU replica."""
    return replicas_options(args)["ray_actor_options"].get("num_gpus")


def replica_editor(engine: EditorConfig, args: EditorArgs) -> "Editor":
    """The Editor of one editor replica, built exactly as EditorDeployment builds it (benchmarks call this too).

    torch's intra-op threads from args.torch_threads, the engine's fast path from `engine` with no text encoder
    (prompts arrive as embeddings from the TextEncoder deployment) and the replica's GPU share as the K/V store's
    (unless the engine section sets one), then every served shape warmed when args.warmup is set and
    Editor.from_config has not warmed it already (compiled configs are).
    """
    from rtedit.editor import Editor  # torch import stays inside the replica

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    config = engine.for_replica()
    if config.kv_store_share is None:  # replicas sharing a GPU split its memory, not each take all that is free
        config = dataclasses.replace(config, kv_store_share=replica_gpu_share(args))
    editor = Editor.from_config(config)
    if args.warmup and editor.warm is None:
        editor.warm_up()
    return editor


def replica_book(editor: "Editor", args: EditorArgs, replica: str) -> ReplicaBook:
    """The replica's admission book: its capacity from args.admission and the engine measured now (after warm-up;
    a frame counts at least min_frame_ms), reduced to the sessions whose K/V the store holds."""
    measured = measure_engine(editor)
    store = editor.kv_store.stats()["max_bytes"] if editor.kv_store is not None else None
    capacity = replica_capacity(max_sessions=args.admission.max_sessions, target_fps=args.admission.target_fps,
                                frame_ms=max(measured["engine_ms"], args.min_frame_ms),
                                session_kv_bytes=measured["session_kv_bytes"], kv_max_bytes=store)
    return ReplicaBook(replica, {**capacity, "engine_ms": measured["engine_ms"], "bucket": measured["bucket"]},
                       slots=args.max_ongoing_requests, retry_after_s=args.admission.retry_after_s)


@serve.deployment(name="Editor", max_ongoing_requests=2, graceful_shutdown_timeout_s=5)
class EditorDeployment:
    """One Editor per replica; the embeddings the text encoder sends are kept in the Editor's own PromptCache."""

    def __init__(self, engine: EditorConfig, args: EditorArgs, encoder: Any = None):
        self.args, self.encoder = args, encoder  # encoder: the TextEncoder's handle, for frames off the channel
        self.channel: ChannelServer | None = None  # opened at the first admission_state (the router asks it first)
        self._channel_lock = threading.Lock()
        self.editor = replica_editor(engine, args)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.book = replica_book(self.editor, args, self.replica)
        self.stage_ms = Histogram("rtedit_editor_stage_ms", description="Editor stage latency (ms)",
                                  boundaries=STAGE_BOUNDARIES_MS, tag_keys=("stage",))
        self.embedding_lookups = Counter("rtedit_editor_embedding_lookups", description="Embedding cache lookups",
                                         tag_keys=("result",))
        self.errors = Counter("rtedit_editor_errors", description="Edit errors by type", tag_keys=("type",))
        # Serve tags every replica metric with its replica id itself ("replica" is a reserved tag key).
        self.gauges = {name: Gauge(f"rtedit_editor_{name}", description=text) for name, text in (
            ("kv_entries", "Entries in the session K/V store"), ("kv_bytes", "Bytes in the session K/V store"),
            ("kv_hits", "Session K/V store hits"), ("kv_evictions", "Session K/V store evictions"),
            ("sessions_open", "Open engine sessions"),
            ("steps_reuse_allowed", "Denoise steps that may reuse the previous step (session step reuse), all groups"),
            ("steps_reused", "Denoise steps served from the previous step (session step reuse), all groups"),
            ("dbcache_steps", "Block-group steps under DBCache (full path)"),
            ("dbcache_cached_steps", "Block-group steps served from DBCache (full path)"))}
        self._update_gauges()
        self.gauge_keeper = GaugeKeeper(self._update_gauges)  # set after frames only, they would age out when idle
        logger.info("editor replica %s ready: %s, warm-up %s, admission %s (pid %d)", self.replica,
                    self.editor.model_info, self.editor.warm, self.book.state(), os.getpid())

    # ---- admission (deployments/admission.py); `replica` names this replica (SessionAffinityRouter routes on it) --
    def admission_state(self) -> dict[str, Any]:
        return {**self.book.state(), "channel": self.channel_address()}

    def channel_address(self) -> dict[str, Any]:
        """Where routers send frames: this node's address, a port, and the token a connection must give."""
        with self._channel_lock:  # sync methods run on Serve's thread pool: two first calls open one channel
            if self.channel is None:
                import ray

                host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
                self.channel = ChannelServer(self._channel_edit, host, self.args.channel_port)
                logger.info("editor replica %s: frame channel on %s:%d", self.replica, host, self.channel.port)
        return self.channel.address()

    async def _channel_edit(self, job: EditJob, replica: str) -> dict[str, Any]:
        """A frame from the channel: as `edit`, but a prompt this replica has no embedding for is fetched from the
        text encoder here (its tensors go encoder -> replica, one hop), and the reply says so."""
        reply = await self.edit(job, None, replica=replica)
        if "need_embedding" not in reply or self.encoder is None:
            return reply
        embedding = await self.encoder.encode.remote(job.prompt)
        return {**await self.edit(job, embedding, replica=replica), "embedding_fetched": True}

    def __del__(self) -> None:
        # Serve calls this at shutdown (on its loop; the channel has its own): routers are told the replica leaves,
        # and frames in flight on the channel finish first.
        reason = f"editor replica {getattr(self, 'replica', '?')} is shutting down"
        if getattr(self, "book", None) is not None:
            self.book.drain(reason)  # its admission_state says so: no router admits a session here any more
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close(reason, self.args.channel_grace_s)

    def admit(self, session_id: str, replica: str | None = None) -> dict[str, Any]:
        """Takes the websocket session `session_id` if this replica has room: {"admitted": bool, reason, state}."""
        if replica is not None and replica != self.replica:
            return {"admitted": False, "reason": f"sent to {self.replica}, not {replica}", **self.book.state()}
        return self.book.admit(session_id)

    def drain(self, reason: str | None, replica: str | None = None) -> dict[str, Any]:
        """Stops taking sessions (before a scale-down); its sessions are told to reconnect. None: take them again."""
        return self.book.drain(reason)

    async def edit(self, job: EditJob, embedding: PromptEmbedding | dict | None = None,
                   replica: str | None = None) -> dict[str, Any]:
        """Edit one frame. Without a cached embedding for job.prompt, answers {"need_embedding": key}.

        `embedding` comes straight from the text encoder (an error payload when the prompt was refused). `replica`
        (the router always sends it) names the replica the router admitted the frame's session on: then a session
        not admitted here is answered {"need_admission"}, a draining replica answers {"reconnect": reason}, and a
        sessionless frame takes a one-shot slot or is answered {"full": reason}. Without it (in-process callers,
        tests) nothing is booked.
        """
        if replica is None:
            return await self._edit(job, embedding)
        if replica != self.replica:
            return {"need_admission": job.session, "reason": f"sent to {self.replica}, not {replica}",
                    "replica": self.replica}
        if not job.session:
            reason = self.book.begin_one_shot()
            if reason is not None:
                return {"full": reason, "retry_after_s": self.book.retry_after_s, "replica": self.replica}
            try:
                return await self._edit(job, embedding)
            finally:
                self.book.end_one_shot()
        if self.book.draining is not None:
            return {"reconnect": f"editor replica {self.replica} is draining: {self.book.draining}",
                    "replica": self.replica}
        if job.session not in self.book.sessions:
            return {"need_admission": job.session, "replica": self.replica}
        async with self.book.frame_lock(job.session):  # one frame per session in flight here
            return await self._edit(job, embedding)

    async def _edit(self, job: EditJob, embedding: PromptEmbedding | dict | None) -> dict[str, Any]:
        started = time.perf_counter()
        if isinstance(embedding, dict):
            return {**embedding, "replica": self.replica}
        cache = self.editor.prompt_cache
        if embedding is not None:
            cache.put(embedding)
            emb = embedding
        else:
            # The key is a hash of the prompt and the model's prompt settings; no text encoder runs here.
            key = self.editor.prompt_key(job.prompt)
            emb = cache.get(key)
            if emb is None:
                self.embedding_lookups.inc(tags={"result": "miss"})
                return {"need_embedding": key, "replica": self.replica}
            self.embedding_lookups.inc(tags={"result": "hit"})
        session = None
        if job.session:
            session = self.editor.session(job.session)
            if session is None and job.references is None:
                # Lost (a restart, another replica): the router resends the frame with the full settings.
                return {"need_session": job.session, "replica": self.replica}
        cancel = threading.Event()
        try:
            # A thread keeps the replica's event loop free for health checks while torch runs.
            if job.session:
                session, result = await asyncio.to_thread(self._session_edit, session, job, emb, cancel)
            else:
                result = await asyncio.to_thread(
                    self.editor.edit, job.image, emb, references=job.references, steps=job.steps, seed=job.seed,
                    height=job.height, width=job.width, output_format=job.format, cancel=cancel)
        except asyncio.CancelledError:
            # The request timed out or its client left: a thread cannot be killed, so stop it at its next step.
            cancel.set()
            self.errors.inc(tags={"type": "EditCancelled"})
            raise
        except EditError as exc:
            self.errors.inc(tags={"type": type(exc).__name__})
            return {**error_payload(exc), "replica": self.replica}
        for stage, ms in result.timings.items():
            self.stage_ms.observe(ms, tags={"stage": stage})
        self._update_gauges()
        if self.args.min_frame_ms:
            await asyncio.sleep(max(0.0, self.args.min_frame_ms / 1000 - (time.perf_counter() - started)))
        return {
            "image": result.data,
            "width": result.image.width,
            "height": result.image.height,
            "format": job.format,
            "seed": result.seed,
            "steps": result.steps,
            "timings": result.timings,
            "replica": self.replica,
            "prompt_key": emb.key[:16],
            "prompt_truncated": result.prompt_truncated,
            **({"session_version": session.version} if session is not None else {}),
        }

    def _session_edit(self, session, job: EditJob, emb: PromptEmbedding, cancel: threading.Event):
        """One frame of the websocket session job.session: opened on its first frame, updated when its prompt or
        references change (job.references None: keep the session's), then edited (in a worker thread)."""
        bucket = (job.height, job.width) if job.height is not None and job.width is not None else None
        if session is None:
            session = self.editor.open_session(emb, job.references or (), bucket, session_id=job.session)
        else:
            changes: dict[str, Any] = {}
            if session.inputs.prompt_key != emb.key:
                changes["prompt"] = emb
            if job.references is not None:
                changes["references"] = job.references  # a no-op when they are the session's already
            if changes:
                session.update(**changes)
            session.bucket = bucket
        return session, session.edit(job.image, seed=job.seed, steps=job.steps, output_format=job.format,
                                     cancel=cancel)

    def close_session(self, session_id: str, replica: str | None = None) -> dict[str, Any]:
        """Frees the engine session of a websocket that closed and its admission (the router calls this); unknown
        ids are fine."""
        self.book.release(session_id)
        session = self.editor.session(session_id)
        if session is not None:
            session.close()
        self._update_gauges()
        return {"closed": session is not None, "replica": self.replica}

    def _update_gauges(self) -> None:
        # After every frame and from the GaugeKeeper's thread: the store's counters and the session count, not the
        # whole of editor.stats().
        if self.editor.kv_store is not None:
            store = self.editor.kv_store.stats()
            for name in ("entries", "bytes", "hits", "evictions"):
                self.gauges["kv_" + name].set(store[name])
        self.gauges["sessions_open"].set(len(self.editor.sessions))
        reuse = self.editor.reuse_counts()
        for name in ("steps_reuse_allowed", "steps_reused", "dbcache_steps", "dbcache_cached_steps"):
            self.gauges[name].set(reuse.get(name, 0))  # 0 where this model has no such reuse

    def info(self) -> dict[str, Any]:
        return {**self.editor.model_info, "replica": self.replica, "pid": os.getpid()}

    def pid(self) -> dict[str, Any]:
        """This replica's process id (the replica-failure test kills it; the State API needs the dashboard)."""
        return {"pid": os.getpid(), "replica": self.replica}

    def stats(self) -> dict[str, Any]:
        """The engine's stats (attention backend, caches, warm-up, prompt_cache, kv_store, sessions) with this
        replica's model info."""
        self._update_gauges()
        return {**self.editor.stats(), "model": self.editor.model_info, "replica": self.replica,
                "admission": self.book.state()}

    def check_health(self) -> None:
        # Raises EngineDead once the device failed beyond recovery: Serve then replaces this replica.
        self.editor.check_health()
