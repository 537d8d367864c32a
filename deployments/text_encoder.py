"""The text encoder deployment: owns the engine's PromptCache and batches concurrent cache misses."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.serve.metrics import Counter

from deployments.config import TextEncoderArgs
from deployments.editor import error_payload
from rtedit.config import EditorConfig
from rtedit.prompts import PromptEmbedding

logger = logging.getLogger("ray.serve")


@serve.deployment(name="TextEncoder", max_ongoing_requests=64, graceful_shutdown_timeout_s=5)
class TextEncoder:
    """Prompt -> PromptEmbedding through a PromptService (PromptCache first, one encoder batch for misses).

    It holds the text encoder alone: no transformer or VAE is loaded here.
    """

    def __init__(self, engine: EditorConfig, args: TextEncoderArgs):
        from rtedit.prompts import PromptService

        # The typed config AppArgs parsed once; its keys match every editor replica's (tests/test_serve_replicas.py).
        self.service = PromptService.from_config(engine)
        self.model_name = engine.model
        self.encode_batch.set_max_batch_size(args.max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        self.lookups = Counter("rtedit_prompt_cache_lookups", description="PromptCache lookups",
                               tag_keys=("result",))
        self.batch_sizes = Counter("rtedit_text_encoder_prompts", description="Prompts encoded", tag_keys=())
        self._seen = (0, 0)
        logger.info("text encoder ready: %s", self.model_name)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode_batch(self, prompts: list[str]) -> list[PromptEmbedding | Exception]:
        try:
            embeddings: list[Any] = await asyncio.to_thread(self.service.encode_prompts, prompts)
        except Exception:  # noqa: BLE001 - one bad prompt must not fail the others in its batch
            embeddings = []
            for prompt in prompts:
                try:
                    embeddings.append(await asyncio.to_thread(self.service.encode_prompt, prompt))
                except Exception as exc:  # noqa: BLE001 - returned to that prompt's caller
                    embeddings.append(exc)
        self._export_cache_counts()
        self.batch_sizes.inc(len(prompts))
        return embeddings

    async def encode(self, prompt: str) -> PromptEmbedding | dict[str, Any]:
        """The embedding, or an error payload (plain data: no remote traceback reaches a client)."""
        result = await self.encode_batch(prompt)
        if isinstance(result, Exception):
            return error_payload(result)
        return result

    def _export_cache_counts(self) -> None:
        cache = self.service.cache
        hits, misses = cache.hits, cache.misses
        if hits > self._seen[0]:
            self.lookups.inc(hits - self._seen[0], tags={"result": "hit"})
        if misses > self._seen[1]:
            self.lookups.inc(misses - self._seen[1], tags={"result": "miss"})
        self._seen = (hits, misses)

    def stats(self) -> dict[str, Any]:
        return self.service.cache.stats()

    def check_health(self) -> None:
        if self.service.encoder is None:
            raise RuntimeError("text encoder deployment has no text encoder")
