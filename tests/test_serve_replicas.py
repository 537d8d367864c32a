"""The editor and text-encoder replicas in this process, built from AppArgs exactly as Serve builds them (no Ray
cluster): the typed engine config, warm-up, keys that agree across the split, the PromptCache, health checks."""

from __future__ import annotations

import asyncio
import types

import pytest

pytest.importorskip("ray.serve")

from test_serve_helpers import jpeg  # noqa: E402  (puts the repo root on sys.path)

from deployments.config import AppArgs, EditorArgs  # noqa: E402
from deployments.editor import EditorDeployment, replica_editor  # noqa: E402
from rtedit.config import EditorConfig  # noqa: E402
from rtedit.errors import EngineDead  # noqa: E402
from rtedit.prompts import PromptService  # noqa: E402
from rtedit.streaming import EditJob  # noqa: E402

PROMPT = "make it look like a watercolor painting"


def test_replica_editor_warms_when_asked_and_has_no_text_encoder():
    """EditorArgs.warmup used to do nothing (it warmed only with a prompt encoder, which replicas never have)."""
    engine = AppArgs(engine={"model": "tiny"}).engine
    warm = replica_editor(engine, EditorArgs(warmup=True, torch_threads=1))
    assert warm.warm is not None and warm.warm["shapes"] == [(64, 64, 0)]
    assert warm.prompt_encoder is None and warm.stats()["warm_up"] == warm.warm
    assert replica_editor(engine, EditorArgs(warmup=False)).warm is None


@pytest.mark.parametrize("engine", [None, {"model": "tiny"}], ids=["models/toy-editor", "tiny"])
def test_text_encoder_and_editor_replica_compute_one_prompt_key(engine):
    """The key the TextEncoder deployment caches under is the one each editor replica looks up: else every frame
    would cross from the text encoder again. Built from the same typed AppArgs.engine that build_app binds."""
    args = AppArgs() if engine is None else AppArgs(engine=engine)
    assert isinstance(args.engine, EditorConfig)
    service = PromptService.from_config(args.engine)  # what TextEncoder.__init__ builds
    editor = replica_editor(args.engine, EditorArgs(warmup=False))  # what EditorDeployment.__init__ builds
    for prompt in (PROMPT, "make it blue"):
        assert service.key(prompt) == editor.prompt_key(prompt)
        assert service.encode_prompt(prompt).key == editor.prompt_key(prompt)


@pytest.fixture()
def replica(monkeypatch):
    """An EditorDeployment instance (tiny preset) outside Serve: only the replica context is faked."""
    from ray import serve

    context = types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id="replica-a"))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    args = AppArgs(engine={"model": "tiny"}, editor={"warmup": False, "torch_threads": 1})
    return EditorDeployment.func_or_class(args.engine, args.editor), PromptService.from_config(args.engine)


def _job(**kw) -> EditJob:
    fields = dict(session="s", id=1, image=jpeg(64, 64), prompt=PROMPT, steps=1, seed=0, width=None, height=None,
                  format="jpeg")
    return EditJob(**{**fields, **kw})


def test_replica_keeps_embeddings_in_the_engines_prompt_cache(replica):
    deployment, service = replica
    first = asyncio.run(deployment.edit(_job()))
    assert first == {"need_embedding": service.key(PROMPT), "replica": "replica-a"}
    edited = asyncio.run(deployment.edit(_job(), service.encode_prompt(PROMPT)))
    assert edited["image"][:2] == b"\xff\xd8" and edited["prompt_key"] == service.key(PROMPT)[:16]
    again = asyncio.run(deployment.edit(_job(id=2)))  # no embedding sent: the replica's PromptCache has it
    assert again["image"] == edited["image"]
    cache = deployment.stats()["prompt_cache"]
    assert cache["entries"] == 1 and cache["hits"] == 1 and cache["misses"] == 1
    assert deployment.editor.prompt_cache.max_entries == deployment.editor.config.prompt.cache_entries
    assert "embedding_cache" not in deployment.stats() and not hasattr(deployment, "embeddings")


def test_replica_health_check_fails_after_a_device_failure(replica, monkeypatch):
    deployment, service = replica
    deployment.check_health()  # healthy

    def illegal_access(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(deployment.editor.transformer, "forward", illegal_access)
    reply = asyncio.run(deployment.edit(_job(), service.encode_prompt(PROMPT)))
    assert reply["error"]["type"] == "EngineDead" and reply["error"]["code"] == "engine_dead"
    assert "illegal memory access" in reply["error"]["message"]
    with pytest.raises(EngineDead, match="illegal memory access"):
        deployment.check_health()  # Serve now replaces this replica
    assert deployment.stats()["device_failure"]
