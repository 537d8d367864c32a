"""Editor replicas: an adapter over rtedit.editor.Editor. Compute only; transport lives in the router."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

from ray import serve
from ray.serve.metrics import Counter, Histogram

from deployments.config import EditorArgs
from rtedit.config import EditorConfig
from rtedit.errors import EditError
from rtedit.prompts import PromptEmbedding
from rtedit.streaming import EditJob

logger = logging.getLogger("ray.serve")

STAGE_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


def error_payload(exc: BaseException) -> dict[str, Any]:
    """An engine error as plain data, so the router gets the message rather than a remote traceback."""
    name = type(exc).__name__
    code = getattr(exc, "code", None) or "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return {"error": {"type": name, "code": code, "message": str(exc)[:500]}}


@serve.deployment(name="Editor", max_ongoing_requests=2, graceful_shutdown_timeout_s=5)
class EditorDeployment:
    """One Editor per replica; keeps a small LRU of prompt embeddings keyed by PromptEmbedding.key."""

    def __init__(self, engine: dict[str, Any], args: EditorArgs):
        from rtedit.editor import Editor  # torch import stays inside the replica

        if args.torch_threads:
            import torch

            torch.set_num_threads(args.torch_threads)
        self.args = args
        # Prompts arrive as embeddings from the TextEncoder deployment: no Qwen3 in an editor replica.
        self.editor = Editor.from_config(EditorConfig.from_dict({**engine, "text_encoder": False}))
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.embeddings: OrderedDict[str, PromptEmbedding] = OrderedDict()
        self.embedding_hits = self.embedding_misses = 0
        self.stage_ms = Histogram("rtedit_editor_stage_ms", description="Editor stage latency (ms)",
                                  boundaries=STAGE_BOUNDARIES_MS, tag_keys=("stage",))
        self.embedding_lookups = Counter("rtedit_editor_embedding_lookups", description="Embedding cache lookups",
                                         tag_keys=("result",))
        self.errors = Counter("rtedit_editor_errors", description="Edit errors by type", tag_keys=("type",))
        if args.warmup:
            self._warmup()
        logger.info("editor replica %s ready: %s (pid %d)", self.replica, self.editor.model_info, os.getpid())

    def _warmup(self) -> None:
        import numpy as np

        emb = self.editor.encode_prompt("warm up") if self.editor.prompt_encoder is not None else None
        if emb is not None:
            self.editor.edit(np.zeros((64, 64, 3), np.uint8), emb, steps=1, seed=0, output_format="jpeg")

    def _key(self, prompt: str) -> str:
        # The key is a hash of the prompt and encoder settings; no text encoder runs here.
        return self.editor.prompt_key(prompt)

    def _remember(self, emb: PromptEmbedding) -> None:
        self.embeddings[emb.key] = emb
        self.embeddings.move_to_end(emb.key)
        while len(self.embeddings) > self.args.embedding_cache_entries:
            self.embeddings.popitem(last=False)

    async def edit(self, job: EditJob, embedding: PromptEmbedding | dict | None = None) -> dict[str, Any]:
        """Edit one frame. Without a cached embedding for job.prompt, answers {"need_embedding": key}.

        `embedding` comes straight from the text encoder (an error payload when the prompt was refused).
        """
        started = time.perf_counter()
        if isinstance(embedding, dict):
            return {**embedding, "replica": self.replica}
        if embedding is not None:
            self._remember(embedding)
            emb = embedding
        else:
            key = self._key(job.prompt)
            emb = self.embeddings.get(key)
            if emb is None:
                self.embedding_misses += 1
                self.embedding_lookups.inc(tags={"result": "miss"})
                return {"need_embedding": key, "replica": self.replica}
            self.embeddings.move_to_end(key)
            self.embedding_hits += 1
            self.embedding_lookups.inc(tags={"result": "hit"})
        cancel = threading.Event()
        try:
            # A thread keeps the replica's event loop free for health checks while torch runs.
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
        }

    def info(self) -> dict[str, Any]:
        return {**self.editor.model_info, "replica": self.replica, "pid": os.getpid()}

    def pid(self) -> dict[str, Any]:
        """This replica's process id (the replica-failure test kills it; the State API needs the dashboard)."""
        return {"pid": os.getpid(), "replica": self.replica}

    def stats(self) -> dict[str, Any]:
        return {**self.editor.stats(), "replica": self.replica,
                "embedding_cache": {"entries": len(self.embeddings), "hits": self.embedding_hits,
                                    "misses": self.embedding_misses}}

    def check_health(self) -> None:
        if self.editor.transformer is None:
            raise RuntimeError("editor has no transformer")
